"""The benchmark of issue 5: VLoRA against dense (and the official PyTorch code), as ratios.

Everything is measured side by side in ONE process, so that every number is read against its
neighbour (the 2-core machine is shared and noisy: never compare numbers from different runs):

  1. train step, VLoRA / dense at equal architecture: the real step of
     `vlora_jax.train.trainer.make_train_step` (AdamW, clipping, metrics, donation), as in
     ``bench_train.py`` (whose `Variant` builds it); and the VLoRA step with the layer stack
     unrolled (``model.scan=False``) / scanned (timed only: no memory, FLOP or checkpoint entries);
  2. inference (the eval step: forward + loss sums), VLoRA / dense, with the VLoRA weights
     materialised on the fly and with merged weights (`stack.merge` into `params.dense_twin`);
  3. compile time against depth of a scanned train step (``bench_core.compile_case``: value_and_grad
     + adamw, at the size's width and batch), deepest / shallowest (48 / 12 for cifar, vit_b16);
  4. peak memory of the compiled train step (XLA ``memory_analysis()``), VLoRA / dense;
  5. checkpoint bytes on disk, VLoRA / dense: real Orbax checkpoints written by
     `vlora_jax.train.checkpoint.Checkpointer` (the full train state, and params only), and the
     official PyTorch ``state_dict`` bytes when torch is available;
  6. the fraction of the measured matmul ceiling (``bench_train.matmul_ceiling``) each step reaches,
     and MFU against ``--peak-tflops`` when given;
  7. the official VLoRA ViT train step (PyTorch, float32, 2 threads), run by a worker process in the
     torch venv (this same file, ``--torch-worker``), as the ratio ours / official, for our scanned
     and unrolled steps.

Timed things run in interleaved rounds (the order reversed every other round); a ratio is the
median over rounds of the per-round ratio (neighbours in time share the machine's load). Writes
the JSON (versions, machine, raw timings, ratios with targets and pass/miss) to ``--out``, a
markdown summary beside it (same stem, ``.md``), and prints the table.

Run from the repository root:

  PYTHONPATH=. .venv/bin/python experiments/bench.py --out experiments/results/bench.json
  PYTHONPATH=. .venv/bin/python experiments/bench.py --size small --quick --out /tmp/bench.json
  PYTHONPATH=. .venv/bin/python experiments/bench.py --size vit_b16 --peak-tflops 989 --out b16.json

The torch part uses ``--torch-python`` (default ``$VLORA_TORCH_PYTHON``, else
``/tmp/torchref/venv/bin/python``; build it with ``../shared/tools/setup_torch_reference.sh
/tmp/torchref``); ``--no-torch`` skips it. It only runs on the CPU backend (the reference venv's
torch is CPU-only) for float32 models, and a skip is recorded with its reason. ``--quick``
(3 rounds, one compile per depth, the shallowest and deepest only) is a smoke run: its ratios are
too noisy to judge.
"""

from __future__ import annotations

import json
import sys
import time


# ------------------------------------------------------------------- the torch worker (no JAX)
# This part runs under the torch venv, which has no JAX: it is defined, and dispatched to, before
# anything else is imported.


def torch_worker(cfg: dict) -> None:
  """Official VLoRA ViT train steps on request: one JSON line in, one JSON line out.

  Args:
    cfg: ``{"official": VisionTransformerVLoRA kwargs, "timm": the dense VisionTransformer kwargs,
      "batch": int, "threads": int}``.
  """
  import importlib.metadata
  import io

  import timm
  import torch
  from timm.models.vision_transformer import VisionTransformer
  from vlora.models.vit import VisionTransformerVLoRA

  torch.set_num_threads(cfg["threads"])
  torch.manual_seed(0)
  model = VisionTransformerVLoRA(**cfg["official"]).train()
  dense = VisionTransformer(**cfg["timm"])

  def state_dict_bytes(m) -> int:
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    return buf.getbuffer().nbytes

  k = cfg["official"]
  x = torch.randn(cfg["batch"], 3, k["img_size"], k["img_size"])
  y = torch.randint(0, k["num_classes"], (cfg["batch"],))
  # The same update as ours: AdamW (lr 1e-3, wd 0.05), clipping at global norm 1, no smoothing.
  opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)

  def step() -> None:
    opt.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()

  step()  # warm-up: first-call allocations
  info = {"torch": torch.__version__, "timm": timm.__version__,
          "vlora": importlib.metadata.version("vlora"), "threads": torch.get_num_threads(),
          "params_official": sum(p.numel() for p in model.parameters()),  # shared W_0 once
          "params_timm_dense": sum(p.numel() for p in dense.parameters()),
          # Its state_dict names the shared W_0 again in every layer k >= 1 of a compound;
          # torch.save writes a shared storage once, so the bytes count it once.
          "state_dict_numel_official": sum(t.numel() for t in model.state_dict().values()),
          "state_dict_bytes_official": state_dict_bytes(model),
          "state_dict_bytes_timm_dense": state_dict_bytes(dense)}
  print(json.dumps({"ready": info}), flush=True)
  for line in sys.stdin:
    steps = int(json.loads(line)["train"])
    t0 = time.perf_counter()
    for _ in range(steps):
      step()
    print(json.dumps({"s_per_step": (time.perf_counter() - t0) / steps}), flush=True)


if __name__ == "__main__" and sys.argv[1:2] == ["--torch-worker"]:
  torch_worker(json.loads(sys.argv[2]))
  sys.exit(0)

# ------------------------------------------------------------------------------ the JAX side

import argparse  # noqa: E402
import contextlib  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_core, bench_train
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # vlora_jax, configs

import bench_core  # noqa: E402
import bench_train  # noqa: E402
from sweep import parse_override  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402

from vlora_jax import cpu_malloc, models, stack  # noqa: E402
from vlora_jax import params as params_lib  # noqa: E402
from vlora_jax.train import checkpoint as ckpt_lib  # noqa: E402
from vlora_jax.train.trainer import make_eval_step  # noqa: E402

# Config overrides of configs/vit_cifar10.py per size; dense and VLoRA differ only in
# model.vlora.enabled (bench_train's `Variant` applies that, dropout 0 and scan).
SIZES = {
    "small": {"model.dim": 64, "model.depth": 4, "model.num_heads": 2,
              "model.vlora.compound_size": 2, "model.vlora.rank": 4, "batch_size": 16},
    "cifar": bench_train.SIZES["paper"]["vit"],
    "vit_b16": {"model.img_size": 224, "model.patch_size": 16, "model.num_classes": 1000,
                "model.dim": 768, "model.depth": 12, "model.num_heads": 12,
                "model.dtype": "bfloat16", "model.vlora.compound_size": 4,
                "model.vlora.rank": 8, "batch_size": 128},
}
COMPILE_DEPTHS = {"small": (4, 8, 16), "cifar": (12, 24, 48), "vit_b16": (12, 24, 48)}

# Repetitions: (full run, --quick).
ROUNDS = (7, 3)
COMPILE_REPS = (3, 1)
CEILING_REPEATS = (5, 1)
TRAIN_STEPS = {"small": (3, 1), "cifar": (2, 1), "vit_b16": (10, 3)}  # per variant per round
EVAL_CALLS = {"small": (5, 2), "cifar": (3, 1), "vit_b16": (10, 3)}

# ratio name -> (target, what it is). A target is an upper bound; None: reported, not judged.
TARGETS = {
    "train_step/vlora_over_dense": (1.02, "train step time, VLoRA / dense"),
    "eval/on_the_fly_over_dense": (1.03, "eval step, VLoRA weights materialised in the forward "
                                   "/ dense"),
    "eval/merged_over_dense": (1.00, "eval step, merged VLoRA weights in the dense twin / dense "
                               "(one program with other weights: this reads the noise floor)"),
    "compile/vlora_deep_over_shallow": (1.2, "compile time of the scanned VLoRA train step, "
                                        "deepest / shallowest"),
    "compile/dense_deep_over_shallow": (1.2, "the same for the dense train step"),
    "memory/vlora_over_dense": (1.0, "compiled train step temp + argument + output - alias bytes "
                                "(experiments/bench_memory.py: other sizes, measured RSS)"),
    "checkpoint/state_vlora_over_dense": (0.31, "Orbax checkpoint of the train state (params + "
                                          "AdamW moments), bytes on disk"),
    "checkpoint/params_vlora_over_dense": (0.31, "Orbax checkpoint of the params only"),
    "checkpoint/official_state_dict_over_timm_dense": (None, "official VLoRA state_dict / timm "
                                                       "dense state_dict (torch.save bytes)"),
    "checkpoint/ours_params_over_official_state_dict": (None, "our params-only checkpoint / the "
                                                        "official VLoRA state_dict"),
    "ceiling/vlora_fraction": (None, "VLoRA step FLOP rate / measured matmul ceiling"),
    "ceiling/dense_fraction": (None, "dense step FLOP rate / measured matmul ceiling"),
    "mfu/vlora": (None, "VLoRA step FLOP rate / --peak-tflops"),
    "mfu/dense": (None, "dense step FLOP rate / --peak-tflops"),
    "torch/ours_vlora_over_official": (1.0, "our VLoRA train step / the official PyTorch VLoRA "
                                       "train step"),
    "torch/ours_vlora_unrolled_over_official": (1.0, "the same with our layer stack unrolled "
                                                "(model.scan=False)"),
    "train_step/vlora_unrolled_over_scan": (None, "VLoRA train step, layer stack unrolled / "
                                            "scanned (the default)"),
}
# Targets set for one config only: the byte ratio follows the parameter ratio of the config.
TARGET_SIZES = {"checkpoint/state_vlora_over_dense": "cifar",
                "checkpoint/params_vlora_over_dense": "cifar",
                "torch/ours_vlora_over_official": "cifar",
                "torch/ours_vlora_unrolled_over_official": "cifar"}
# Ratios that need the official PyTorch worker.
TORCH_RATIOS = ("checkpoint/official_state_dict_over_timm_dense",
                "checkpoint/ours_params_over_official_state_dict", "torch/ours_vlora_over_official",
                "torch/ours_vlora_unrolled_over_official")


# ----------------------------------------------------------------------------------- timing


def paired_ratio(a: list[float], b: list[float]) -> float:
  """Median over rounds of a[i] / b[i]: the load of round i hits both sides alike."""
  return statistics.median(x / y for x, y in zip(a, b))


def interleaved(timers: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
  """Runs every timer once per round, the order reversed every other round (no position bias)."""
  times: dict[str, list[float]] = {k: [] for k in timers}
  names = list(timers)
  for r in range(rounds):
    for name in names if r % 2 == 0 else names[::-1]:
      times[name].append(timers[name]())
    print(f"  round {r + 1}/{rounds}: " + "  ".join(
        f"{k} {v[-1] * 1e3:.1f}ms" for k, v in times.items()), flush=True)
  return times


@contextlib.contextmanager
def phase(name: str, record: dict[str, float]):
  """Prints a section header and records the section's wall seconds (where a run's time goes)."""
  print(f"\n== {name} ==", flush=True)
  t = time.perf_counter()
  yield
  record[name] = time.perf_counter() - t
  print(f"  ({name}: {record[name]:.1f}s)", flush=True)


def mean_time(fn: Callable[[], Any], calls: int) -> float:
  """Seconds per call of ``fn`` over ``calls`` calls, each ending in ``block_until_ready``."""
  return sum(bench_core.timed(fn) for _ in range(calls)) / calls


# ------------------------------------------------------------------------------- inference


def copy_params(variant: bench_train.Variant):
  """A copy of a variant's params: its train step donates (invalidates) the state it is given."""
  return jax.tree.map(jnp.copy, variant.state["params"])


def program_text(compiled) -> str:
  """The optimised HLO without its source locations (which name the Python line that traced it)."""
  return re.sub(r"\{file_name_id=[^}]*\}", "", compiled.as_text())


def compile_eval(model, params, batch):
  return jax.jit(make_eval_step(model, models.FAMILIES["vit"])).lower(params, batch).compile()


def build_inference(dense: bench_train.Variant, vlora: bench_train.Variant) -> dict[str, Any]:
  """Compiled eval steps: dense, VLoRA on the fly, VLoRA merged into the dense twin.

  Raises:
    AssertionError: the merged twin does not compute the VLoRA model's loss (a timing of a wrong
      merge would mean nothing).
  """
  model = models.build(vlora.config.model)
  p_vlora, p_dense = copy_params(vlora), copy_params(dense)
  merged = jax.jit(lambda p: stack.merge(p, model.vlora))(p_vlora)
  batch = vlora.batch
  fns = {"dense": (compile_eval(models.build(dense.config.model), p_dense, batch), p_dense),
         "on_the_fly": (compile_eval(model, p_vlora, batch), p_vlora),
         "merged": (compile_eval(params_lib.dense_twin(model), merged, batch), merged)}
  loss = {k: float(f(p, batch)["loss"]) for k, (f, p) in fns.items()}
  tol = 1e-3 if vlora.config.model.dtype == "float32" else 3e-2
  if not abs(loss["merged"] - loss["on_the_fly"]) <= tol * abs(loss["on_the_fly"]):
    raise AssertionError(f"merged twin loss {loss['merged']} != VLoRA loss {loss['on_the_fly']}")
  # The twin and the dense model should be one program with other weights.
  same = program_text(fns["merged"][0]) == program_text(fns["dense"][0])
  return {"fns": fns, "batch": batch, "loss_sums": loss, "merged_same_hlo_as_dense": same}


# --------------------------------------------------------------------------- memory, bytes


def memory(compiled) -> dict[str, int]:
  """XLA's compiled memory analysis; ``total`` = temp + argument + output - alias bytes (the
  donated state's buffers are reused for the new state: counted once)."""
  m = compiled.memory_analysis()
  out = {k: int(getattr(m, f"{k}_size_in_bytes")) for k in
         ("temp", "argument", "output", "alias", "generated_code")}
  out["total"] = out["temp"] + out["argument"] + out["output"] - out["alias"]
  return out


def dir_bytes(path: Path) -> int:
  return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def checkpoint_bytes(variant: bench_train.Variant, workdir: Path) -> dict[str, int]:
  """Bytes on disk of real Orbax checkpoints (`Checkpointer`) of the train state and the params."""
  c = variant.config
  spec = models.vlora_spec(c.model.vlora)
  state = variant.state
  meta = {"config": json.loads(c.to_json_best_effort()),
          "layout": ckpt_lib.layouts(state["params"], spec)}
  out = {}
  for what, tree in (("state", state), ("params", {"params": state["params"]})):
    d = workdir / what
    ckpt = ckpt_lib.Checkpointer(d, c.checkpoint, meta)
    ckpt.save(int(jax.device_get(state["step"])), tree)
    ckpt.wait()
    ckpt.close()
    out[what] = dir_bytes(d)
  out["params_in_memory"] = params_lib.count(state["params"])["bytes"]
  return out


# -------------------------------------------------------------------------------- compile


def compile_vs_depth(cfg, depths: tuple[int, ...], reps: int) -> dict[str, Any]:
  """Fresh compiles of bench_core's scanned train step (value_and_grad + adamw) at each depth.

  Uses the size's width, heads and batch; reps are interleaved over depths and stacks.
  """
  m = cfg.model
  ns = argparse.Namespace(num_classes=m.num_classes, patch=m.patch_size, img=m.img_size,
                          compile_dim=m.dim, compile_heads=m.num_heads,
                          compile_batch=cfg.batch_size)
  spec = models.vlora_spec(m.vlora)
  runs: dict[str, dict[int, list[dict]]] = {s: {d: [] for d in depths} for s in ("vlora", "dense")}
  for rep in range(reps):
    for d in depths:
      for s in runs:
        r = bench_core.compile_case(ns, depth=d, scan=True, spec=spec if s == "vlora" else None,
                                    phase="train_step")
        runs[s][d].append(r)
        print(f"  [{rep + 1}/{reps}] {s:5s} L={d:3d}  lower {r['lower_s']:.2f}s  compile "
              f"{r['compile_s']:.2f}s  HLO ops {r['hlo_ops']}", flush=True)
  med = {s: {d: statistics.median(r["total_s"] for r in rs) for d, rs in by_d.items()}
         for s, by_d in runs.items()}
  return {"depths": list(depths), "reps": reps, "median_total_s": med, "runs": runs}


# ---------------------------------------------------------------------------- torch worker


class TorchWorker:
  """The official PyTorch train step in a subprocess of the torch venv (see `torch_worker`)."""

  def __init__(self, python: str, cfg: dict):
    self.log = tempfile.TemporaryFile(mode="w+")  # stderr: a file, so a chatty worker cannot block
    # torch runs as shipped: without our glibc allocator tuning (vlora_jax/cpu_malloc.py)
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "XLA_FLAGS", "GLIBC_TUNABLES", "VLORA_MALLOC_TUNED")}
    self.proc = subprocess.Popen([python, __file__, "--torch-worker", json.dumps(cfg)],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                 text=True, env=env)
    self.info = self._reply()["ready"]

  def _reply(self) -> dict:
    line = self.proc.stdout.readline()
    if not line:
      self.proc.wait()
      self.log.seek(0)
      raise RuntimeError(f"torch worker exited ({self.proc.returncode}): "
                         f"{self.log.read()[-2000:]}")
    return json.loads(line)

  def train(self, steps: int) -> float:
    self.proc.stdin.write(json.dumps({"train": steps}) + "\n")
    self.proc.stdin.flush()
    return self._reply()["s_per_step"]

  def close(self) -> None:
    self.proc.stdin.close()
    self.proc.wait(timeout=60)
    self.log.close()


def official_number(x):
  """A rank or alpha as the official code takes it: an int or a list (a float has no len there)."""
  if isinstance(x, (list, tuple)):
    return [official_number(v) for v in x]
  return int(x) if float(x).is_integer() else float(x)


def torch_config(cfg) -> dict:
  """The official VLoRA and timm dense kwargs of the same architecture (official depth counts
  compounds)."""
  m, v = cfg.model, cfg.model.vlora
  common = dict(img_size=m.img_size, patch_size=m.patch_size, embed_dim=m.dim,
                num_heads=m.num_heads, mlp_ratio=m.mlp_ratio, num_classes=m.num_classes)
  return {"official": dict(common, depth=m.depth // v.compound_size, vl_size=v.compound_size,
                           vl_rank=official_number(v.rank), vl_alpha=official_number(v.alpha)),
          "timm": dict(common, depth=m.depth), "batch": cfg.batch_size, "threads": 2}


def start_torch(args, cfg) -> tuple[TorchWorker | None, str | None]:
  """The worker, or None and the reason it is skipped."""
  if args.no_torch:
    return None, "--no-torch"
  if jax.default_backend() != "cpu":
    return None, f"backend {jax.default_backend()}: the reference torch is CPU-only"
  if cfg.model.dtype != "float32":
    return None, f"model dtype {cfg.model.dtype}: the official step runs in float32"
  if not Path(args.torch_python).exists():
    return None, (f"no torch python at {args.torch_python} (build it with "
                  "../shared/tools/setup_torch_reference.sh /tmp/torchref)")
  try:
    return TorchWorker(args.torch_python, torch_config(cfg)), None
  except (RuntimeError, OSError, ValueError) as e:
    return None, f"torch worker failed to start: {e}"


# --------------------------------------------------------------------------------- ratios


def judged(value: float | None, name: str, size: str, skipped: str | None = None
           ) -> dict[str, Any]:
  """A ratio with its target and pass/miss (None when there is no target or no value)."""
  target, what = TARGETS[name]
  if TARGET_SIZES.get(name, size) != size:
    target, what = None, f"{what} (the target is for --size {TARGET_SIZES[name]})"
  ok = None if value is None or target is None else bool(value <= target)
  out = {"value": value, "target": target, "pass": ok, "what": what}
  if value is None:
    out["skipped"] = skipped
  return out


def ratios(res: dict[str, Any], args) -> dict[str, dict[str, Any]]:
  """Every ratio of `TARGETS` from the raw results (a skipped part gives value None + reason)."""
  t, mem, ck = res["times_s"], res["memory"], res["checkpoint_bytes"]
  out = {
      "train_step/vlora_over_dense": paired_ratio(t["train/vlora"], t["train/dense"]),
      "eval/on_the_fly_over_dense": paired_ratio(t["eval/on_the_fly"], t["eval/dense"]),
      "eval/merged_over_dense": paired_ratio(t["eval/merged"], t["eval/dense"]),
      "memory/vlora_over_dense": mem["vlora"]["total"] / mem["dense"]["total"],
      "checkpoint/state_vlora_over_dense": ck["vlora"]["state"] / ck["dense"]["state"],
      "checkpoint/params_vlora_over_dense": ck["vlora"]["params"] / ck["dense"]["params"],
      "train_step/vlora_unrolled_over_scan": paired_ratio(t["train/vlora_unrolled"],
                                                          t["train/vlora"]),
  }
  med = res["compile"]["median_total_s"]
  lo, hi = min(res["compile"]["depths"]), max(res["compile"]["depths"])
  for s in ("vlora", "dense"):
    out[f"compile/{s}_deep_over_shallow"] = med[s][hi] / med[s][lo]
    rate = res["flops"][s]["xla"] / statistics.median(t[f"train/{s}"])
    out[f"ceiling/{s}_fraction"] = rate / (res["matmul_ceiling_gflop_per_s"] * 1e9)
    out[f"mfu/{s}"] = rate / (args.peak_tflops * 1e12) if args.peak_tflops else None
  torch_info = res["torch"].get("info")
  if torch_info:
    sd = torch_info["state_dict_bytes_official"]
    out["checkpoint/official_state_dict_over_timm_dense"] = (
        sd / torch_info["state_dict_bytes_timm_dense"])
    out["checkpoint/ours_params_over_official_state_dict"] = ck["vlora"]["params"] / sd
    out["torch/ours_vlora_over_official"] = paired_ratio(t["train/vlora"], t["train/official"])
    out["torch/ours_vlora_unrolled_over_official"] = paired_ratio(t["train/vlora_unrolled"],
                                                                  t["train/official"])

  def why(name: str) -> str | None:
    if name.startswith("mfu/"):
      return "no --peak-tflops given"
    return res["torch"].get("skipped") if name in TORCH_RATIOS else None
  return {name: judged(out.get(name), name, args.size, why(name)) for name in TARGETS}


# ------------------------------------------------------------------------------ reporting


def fmt_ratio(r: dict[str, Any]) -> list[str]:
  value = "-" if r["value"] is None else f"{r['value']:.4f}"
  target = "-" if r["target"] is None else f"<= {r['target']:.2f}"
  verdict = {True: "pass", False: "MISS", None: r.get("skipped") or "-"}[r["pass"]]
  return [value, target, verdict]


def tables(result: dict[str, Any]) -> str:
  """The ratios (with targets) and the median timings, as markdown tables."""
  rows = [[name] + fmt_ratio(r) for name, r in result["ratios"].items()]
  t1 = bench_core.fmt_table(["ratio", "value", "target", "verdict"], rows)
  rows = [[name, f"{statistics.median(v) * 1e3:.2f}", " ".join(f"{x * 1e3:.1f}" for x in v)]
          for name, v in result["times_s"].items()]
  t2 = bench_core.fmt_table(["timed (per step or call)", "median ms", "rounds (ms)"], rows)
  return t1 + "\n\n" + t2


def details(result: dict[str, Any]) -> list[str]:
  """The raw quantities behind the ratios, as markdown bullets."""
  mem, ck, fl = result["memory"], result["checkpoint_bytes"], result["flops"]
  comp, inf = result["compile"], result["inference"]
  out = [f"- memory (bytes; total = temp + argument + output): vlora {mem['vlora']}, "
         f"dense {mem['dense']}",
         f"- checkpoint bytes on disk: vlora {ck['vlora']}, dense {ck['dense']}",
         f"- compile of bench_core's scanned train step (value_and_grad + adamw), median seconds "
         f"(trace + lower + compile) by depth: {comp['median_total_s']} ({comp['reps']} fresh "
         f"compile(s) each); the trainer's step compiled at depth "
         f"{result['config']['depth']} in vlora {result['compile_s']['vlora']:.1f} s, dense "
         f"{result['compile_s']['dense']:.1f} s",
         f"- GFLOP per train step (XLA, unrolled twin): vlora {fl['vlora']['xla'] / 1e9:.2f}, "
         f"dense {fl['dense']['xla'] / 1e9:.2f}; matmul ceiling "
         f"{result['matmul_ceiling_gflop_per_s']:.1f} GFLOP/s",
         f"- params: {result['params']}; eval loss sums {inf['loss_sums']}; the merged twin "
         f"compiles to the same HLO as dense: {inf['merged_same_hlo_as_dense']}"]
  tr = result["torch"]
  out.append(f"- official PyTorch: {tr['info']}" if tr.get("info") else
             f"- official PyTorch: skipped ({tr.get('skipped')})")
  return out


def markdown(result: dict[str, Any]) -> str:
  env, cfg = result["environment"], result["config"]
  return "\n".join([
      "# Benchmark of issue 5: VLoRA vs dense vs the official PyTorch code",
      "",
      f"Date (UTC): {env['date_utc']}. jax {env['jax']}, flax {env['flax']}, orbax "
      f"{env['orbax']}, device {env['device']} ({env['backend']}), {env['cpu_count']} CPUs, load "
      f"average {env['loadavg_start'][0]:.2f} at start, {env['loadavg_end'][0]:.2f} at end, "
      f"{env['wall_s']:.0f} s. Size `{cfg['size']}`{' (quick)' if cfg['quick'] else ''}: "
      f"{json.dumps(cfg['overrides'])}. {cfg['rounds']} interleaved rounds of "
      f"{cfg['train_steps']} train step(s) and {cfg['eval_calls']} eval call(s) per variant; a "
      "ratio is the median of per-round ratios. Only ratios from one run are comparable.",
      "",
      "```",
      "PYTHONPATH=. .venv/bin/python experiments/bench.py " + " ".join(env["argv"][1:]),
      "```",
      "",
      tables(result),
      "",
      "Ratios:",
      "",
  ] + [f"- `{name}`: {r['what']}" for name, r in result["ratios"].items()] + [
      "",
      "Raw quantities:",
      "",
  ] + details(result)) + "\n"


# ----------------------------------------------------------------------------------- main


def parse_args(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--out", required=True,
                  help="JSON path; the markdown summary goes beside it (same stem, .md)")
  ap.add_argument("--size", default="cifar", choices=sorted(SIZES),
                  help="cifar: the official CIFAR config (default); small: a fast smoke run; "
                  "vit_b16: ViT-B/16 at 224 in bfloat16, for an accelerator")
  ap.add_argument("--quick", action="store_true", help="few rounds and repetitions")
  ap.add_argument("--batch", type=int, default=None, help="overrides the size's batch")
  ap.add_argument("--peak-tflops", type=float, default=None,
                  help="the device's peak TFLOP/s at the model's dtype: adds MFU")
  ap.add_argument("--torch-python", default=os.environ.get(
      "VLORA_TORCH_PYTHON", "/tmp/torchref/venv/bin/python"),
                  help="python of the venv with torch, timm and the official vlora")
  ap.add_argument("--no-torch", action="store_true", help="skip the official PyTorch step")
  ap.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                  help="a dotted config key for every variant, e.g. model.remat=dots")
  args = ap.parse_args(argv)
  q = int(args.quick)
  args.rounds, args.compile_reps = ROUNDS[q], COMPILE_REPS[q]
  args.ceiling_repeats = CEILING_REPEATS[q]
  depths = COMPILE_DEPTHS[args.size]
  args.compile_depths = (depths[0], depths[-1]) if args.quick else depths  # the ratio's two ends
  args.train_steps, args.eval_calls = TRAIN_STEPS[args.size][q], EVAL_CALLS[args.size][q]
  return args


def register_size(args) -> dict[str, Any]:
  """The size's config overrides (``--batch`` applied), entered in bench_train's table of sizes,
  which is where `bench_train.Variant` reads them; returns them."""
  over = dict(SIZES[args.size])
  if args.batch:
    over["batch_size"] = args.batch
  over.update(parse_override(item) for item in args.override)
  bench_train.SIZES[f"bench_{args.size}"] = {"vit": over}
  return over


def make_timers(args, variants, inference, worker) -> dict[str, Callable[[], float]]:
  """Seconds per train step / eval call of everything compared, one callable each."""
  timers: dict[str, Callable[[], float]] = {
      f"train/{s}": (lambda v=v: v.run(args.train_steps)) for s, v in variants.items()}
  if worker:
    timers["train/official"] = lambda: worker.train(args.train_steps)
  batch = inference["batch"]
  for name, (fn, p) in inference["fns"].items():
    timers[f"eval/{name}"] = lambda fn=fn, p=p: mean_time(lambda: fn(p, batch), args.eval_calls)
  return timers


def main(argv=None):
  args = parse_args(argv)
  t_start = time.perf_counter()
  env = bench_core.environment()
  env["orbax"] = ocp.__version__
  # Ours only (at `import vlora_jax`, vlora_jax/cpu_malloc.py); torch runs untuned.
  env["allocator_tuned"] = cpu_malloc.tune()
  print(json.dumps(env, indent=1), flush=True)
  phases: dict[str, float] = {}

  with phase("build: train steps (dense, VLoRA, VLoRA unrolled), eval steps, torch worker",
             phases):
    overrides = register_size(args)
    rng = np.random.default_rng(0)
    variants = {s: bench_train.Variant("vit", f"bench_{args.size}", s == "vlora", rng)
                for s in ("dense", "vlora")}
    # The layer stack unrolled (model.scan=False): train step only, against scan and torch.
    unrolled = bench_train.Variant("vit", f"bench_{args.size}", True, rng, scan=False)
    cfg = variants["vlora"].config
    worker, torch_skipped = start_torch(args, cfg)
    inference = build_inference(variants["dense"], variants["vlora"])
    timers = make_timers(args, {**variants, "vlora_unrolled": unrolled}, inference, worker)
    for v in (*variants.values(), unrolled):  # warm-up: first calls, allocator
      v.run(1)

  with phase(f"timing: {args.rounds} interleaved rounds, matmul ceiling before and after",
             phases):
    ceiling_before = bench_train.matmul_ceiling(args.ceiling_repeats)
    times = interleaved(timers, args.rounds)
    ceiling_after = bench_train.matmul_ceiling(args.ceiling_repeats)
    if worker:
      worker.close()

  with phase("checkpoints", phases):
    workdir = Path(tempfile.mkdtemp(prefix="vlora_bench_ckpt_"))
    try:
      ck = {s: checkpoint_bytes(v, workdir / s) for s, v in variants.items()}
    finally:
      shutil.rmtree(workdir, ignore_errors=True)

  with phase(f"compile time vs depth {args.compile_depths}", phases):
    comp = compile_vs_depth(cfg, args.compile_depths, args.compile_reps)

  env["loadavg_end"] = list(os.getloadavg())
  env["wall_s"] = time.perf_counter() - t_start
  result = {
      "environment": env,
      "config": {"size": args.size, "quick": args.quick, "overrides": overrides,
                 "depth": cfg.model.depth, "rounds": args.rounds,
                 "train_steps": args.train_steps, "eval_calls": args.eval_calls,
                 "compile_reps": args.compile_reps, "peak_tflops": args.peak_tflops,
                 "model": cfg.model.to_dict()},
      "times_s": times,
      "compile_s": {**{s: v.compile_s for s, v in variants.items()},
                    "vlora_unrolled": unrolled.compile_s},
      "params": {s: v.params_total for s, v in variants.items()},
      "flops": {s: {"xla": v.xla_flops, "analytic": v.analytic_flops}
                for s, v in variants.items()},
      "matmul_ceiling_gflop_per_s": max(*ceiling_before.values(), *ceiling_after.values()),
      "matmul_ceiling_detail": {"before": ceiling_before, "after": ceiling_after},
      "memory": {s: memory(v.step) for s, v in variants.items()},
      "checkpoint_bytes": ck,
      "inference": {k: v for k, v in inference.items() if k not in ("fns", "batch")},
      "compile": comp,
      "torch": {"info": worker.info} if worker else {"skipped": torch_skipped},
      "phase_s": phases,
  }
  result["ratios"] = ratios(result, args)
  out = Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(result, indent=1, default=str) + "\n")
  out.with_suffix(".md").write_text(markdown(result))
  print("\n" + tables(result))
  print(f"\nwrote {out} and {out.with_suffix('.md')} in {env['wall_s']:.0f}s")


if __name__ == "__main__":
  main()
