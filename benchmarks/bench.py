"""The main benchmark: VLoRA against dense (and the official PyTorch code), as ratios with targets.

Everything is measured side by side in ONE run, so that every number is read against its
neighbour (on a shared, noisy machine, never compare numbers from different runs):

  1. train step, VLoRA / dense at equal architecture: the real step of
     `vlora_jax.train.steps.make_train_step` (AdamW, clipping, metrics, donation), built by
     `benchmarks.train.Variant`; and the VLoRA step with the layer stack unrolled
     (``model.scan=False``) / scanned (timed only: no memory, FLOP or checkpoint entries). Each
     step is timed in a resident process of its own (`benchmarks.profile`'s worker), as a
     training run has it: in one process the programs share one allocator heap and XLA's thread
     pools, which no run does, and VLoRA / dense read 1-2% higher there (`--train-in-process`
     times them in this process, for comparison);
  2. inference (the eval step: forward + loss sums), VLoRA / dense, with the VLoRA weights
     materialised on the fly and with merged weights (`stack.merge` into `params.dense_twin`);
     the merged twin and dense must compile to one program (the same optimised HLO);
  3. compile time against depth of a scanned train step (`benchmarks.core.compile_case`:
     value_and_grad + adamw, at the size's width and batch), deepest / shallowest (48 / 12 for
     cifar, vit_b16);
  4. peak memory of the compiled train step (XLA ``memory_analysis()``), VLoRA / dense;
  5. checkpoint bytes on disk, VLoRA / dense: real Orbax checkpoints written by
     `vlora_jax.train.checkpoint.Checkpointer` (the full train state, and params only), and the
     official PyTorch ``state_dict`` bytes when torch is available;
  6. the fraction of the measured matmul ceiling (`benchmarks.train.matmul_ceiling`) each step
     reaches, and MFU against ``--peak-tflops`` when given;
  7. the official VLoRA ViT train step (PyTorch, float32, 2 threads, `benchmarks.torch_ref`), as the
     ratio ours / official, for our scanned and unrolled steps, and for a user's path
     (`benchmarks.user_path`: the official model's weights through `convert.torch_vit` under a
     plain jitted optax step).

Timed things run in `harness.interleaved` rounds; a ratio is the median over rounds of the
per-round ratio. Writes the JSON (environment, raw timings, ratios with targets and pass/miss) to
``--out``, a markdown summary beside it (same stem, ``.md``), and prints the table.

  .venv/bin/python -m benchmarks.bench --size cifar --out benchmarks/results/bench.json
  .venv/bin/python -m benchmarks.bench --size small --quick --no-torch --out /tmp/bench.json
  .venv/bin/python -m benchmarks.bench --size vit_b16 --peak-tflops 989 --out b16.json

The torch part uses ``--torch-python`` (see `benchmarks.torch_ref`); ``--no-torch`` skips it. It
only runs on the CPU backend (the reference venv's torch is CPU-only) for float32 models, and a
skip is recorded with its reason. ``--quick`` (3 rounds, one compile per depth, the shallowest
and deepest only) is a smoke run: its ratios are too noisy to judge.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from experiments.sweep import parse_override
from vlora_jax import models
from vlora_jax.platform import cpu_malloc
from vlora_jax.runs import checkpoint_format
from vlora_jax.core import stack
from vlora_jax.core import params as params_lib
from vlora_jax.train import checkpoint as ckpt_lib
from vlora_jax.train.trainer import make_eval_step

from benchmarks import core, harness, torch_ref, train, user_path
from benchmarks.harness import paired_ratio as paired

# Config overrides of configs/vit_cifar10.py per size; dense and VLoRA differ only in
# model.vlora.enabled (`train.Variant` applies that, dropout 0 and scan).
SIZES = {
    "small": {"model.dim": 64, "model.depth": 4, "model.num_heads": 2,
              "model.vlora.compound_size": 2, "model.vlora.rank": 4, "batch_size": 16},
    "cifar": train.SIZES["paper"]["vit"],
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
                                "(benchmarks.memory: other sizes, measured RSS)"),
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
    "torch/user_path_over_official": (1.0, "the official weights imported by convert.torch_vit, "
                                      "a plain jitted optax step / the official train step"),
    "train_step/vlora_unrolled_over_scan": (None, "VLoRA train step, layer stack unrolled / "
                                            "scanned (the default)"),
}
# Targets set for one config only: the byte ratio follows the parameter ratio of the config.
TARGET_SIZES = {"checkpoint/state_vlora_over_dense": "cifar",
                "checkpoint/params_vlora_over_dense": "cifar",
                "torch/ours_vlora_over_official": "cifar",
                "torch/ours_vlora_unrolled_over_official": "cifar",
                "torch/user_path_over_official": "cifar"}
# Ratios that need the official PyTorch worker.
TORCH_RATIOS = ("checkpoint/official_state_dict_over_timm_dense",
                "checkpoint/ours_params_over_official_state_dict", "torch/ours_vlora_over_official",
                "torch/ours_vlora_unrolled_over_official", "torch/user_path_over_official")


# ----------------------------------------------------------------------------------- timing


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
  return sum(harness.timed(fn) for _ in range(calls)) / calls


# ------------------------------------------------------------------------------- inference


def copy_params(variant: train.Variant):
  """A copy of a variant's params: its train step donates (invalidates) the state it is given."""
  return jax.tree.map(jnp.copy, variant.state["params"])


def program_text(compiled) -> str:
  """The optimised HLO without its source locations (which name the Python line that traced it)."""
  return re.sub(r"\{file_name_id=[^}]*\}", "", compiled.as_text())


def compile_eval(model, params, batch):
  return jax.jit(make_eval_step(model, models.FAMILIES["vit"])).lower(params, batch).compile()


def build_inference(dense: train.Variant, vlora: train.Variant) -> dict[str, Any]:
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


def checkpoint_bytes(variant: train.Variant, workdir: Path) -> dict[str, int]:
  """Bytes on disk of real Orbax checkpoints (`Checkpointer`) of the train state and the params."""
  c = variant.config
  spec = models.vlora_spec(c.model.vlora)
  state = variant.state
  meta = {"config": json.loads(c.to_json_best_effort()),
          "layout": checkpoint_format.layouts(state["params"], spec)}
  out = {}
  for what, tree in (("state", state), ("params", {"params": state["params"]})):
    d = workdir / what
    ckpt = ckpt_lib.Checkpointer.of_config(d, c.checkpoint, meta)
    ckpt.save(int(jax.device_get(state["step"])), tree)
    ckpt.wait()
    ckpt.close()
    out[what] = dir_bytes(d)
  out["params_in_memory"] = params_lib.count(state["params"])["bytes"]
  return out


# -------------------------------------------------------------------------------- compile


def compile_vs_depth(cfg, depths: tuple[int, ...], reps: int) -> dict[str, Any]:
  """Fresh compiles of the scanned train step of `core.compile_case` at each depth.

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
        r = core.compile_case(ns, depth=d, scan=True, spec=spec if s == "vlora" else None,
                              phase="train_step")
        runs[s][d].append(r)
        print(f"  [{rep + 1}/{reps}] {s:5s} L={d:3d}  lower {r['lower_s']:.2f}s  compile "
              f"{r['compile_s']:.2f}s  HLO ops {r['hlo_ops']}", flush=True)
  med = {s: {d: statistics.median(r["total_s"] for r in rs) for d, rs in by_d.items()}
         for s, by_d in runs.items()}
  return {"depths": list(depths), "reps": reps, "median_total_s": med, "runs": runs}


# ---------------------------------------------------------------------------- torch worker


def start_torch(args, cfg) -> tuple[harness.Worker | None, str | None]:
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
    return torch_ref.start(args.torch_python, torch_ref.config(cfg)), None
  except (RuntimeError, OSError, ValueError) as e:
    return None, f"torch worker failed to start: {e}"


def start_user_path(official: harness.Worker, cfg) -> harness.Worker:
  """A user's path (`benchmarks.user_path`) on the official worker's own weights."""
  weights = Path(tempfile.mkdtemp(prefix="vlora_bench_official_")) / "official.npz"
  official.request(save=str(weights))
  k = torch_ref.config(cfg)
  try:
    return user_path.start(str(weights), k["official"], k["batch"])
  finally:
    shutil.rmtree(weights.parent, ignore_errors=True)  # the worker has read it


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
      "train_step/vlora_over_dense": paired(t["train/vlora"], t["train/dense"]),
      "eval/on_the_fly_over_dense": paired(t["eval/on_the_fly"], t["eval/dense"]),
      "eval/merged_over_dense": paired(t["eval/merged"], t["eval/dense"]),
      "memory/vlora_over_dense": mem["vlora"]["total"] / mem["dense"]["total"],
      "checkpoint/state_vlora_over_dense": ck["vlora"]["state"] / ck["dense"]["state"],
      "checkpoint/params_vlora_over_dense": ck["vlora"]["params"] / ck["dense"]["params"],
      "train_step/vlora_unrolled_over_scan": paired(t["train/vlora_unrolled"], t["train/vlora"]),
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
    out["torch/ours_vlora_over_official"] = paired(t["train/vlora"], t["train/official"])
    out["torch/ours_vlora_unrolled_over_official"] = paired(t["train/vlora_unrolled"],
                                                            t["train/official"])
    out["torch/user_path_over_official"] = paired(t["train/user_path"], t["train/official"])

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
  t1 = harness.table(["ratio", "value", "target", "verdict"], rows)
  rows = [[name, f"{statistics.median(v) * 1e3:.2f}", " ".join(f"{x * 1e3:.1f}" for x in v)]
          for name, v in result["times_s"].items()]
  t2 = harness.table(["timed (per step or call)", "median ms", "rounds (ms)"], rows)
  return t1 + "\n\n" + t2


def details(result: dict[str, Any]) -> list[str]:
  """The raw quantities behind the ratios, as markdown bullets."""
  mem, ck, fl = result["memory"], result["checkpoint_bytes"], result["flops"]
  comp, inf = result["compile"], result["inference"]
  out = [f"- memory (bytes; total = temp + argument + output): vlora {mem['vlora']}, "
         f"dense {mem['dense']}",
         f"- checkpoint bytes on disk: vlora {ck['vlora']}, dense {ck['dense']}",
         f"- compile of `benchmarks.core`'s scanned train step (value_and_grad + adamw), median "
         f"seconds (trace + lower + compile) by depth: {comp['median_total_s']} "
         f"({comp['reps']} fresh compile(s) each); the trainer's step compiled at depth "
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
      "# VLoRA vs dense vs the official PyTorch code",
      "",
      harness.describe(env),
      "",
      f"Size `{cfg['size']}`{' (quick)' if cfg['quick'] else ''}: "
      f"{json.dumps(cfg['overrides'])}. {cfg['rounds']} interleaved rounds of "
      f"{cfg['train_steps']} train step(s) and {cfg['eval_calls']} eval call(s) per variant; a "
      "ratio is the median of per-round ratios. Only ratios from one run are comparable.",
      "",
      "```",
      harness.command("benchmarks.bench", env["argv"][1:]),
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
  ap.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds (default: "
                  f"{ROUNDS[0]}, {ROUNDS[1]} with --quick)")
  ap.add_argument("--batch", type=int, default=None, help="overrides the size's batch")
  ap.add_argument("--peak-tflops", type=float, default=None,
                  help="the device's peak TFLOP/s at the model's dtype: adds MFU")
  ap.add_argument("--torch-python", default=torch_ref.DEFAULT_PYTHON,
                  help="python of the venv with torch, timm and the official vlora")
  ap.add_argument("--no-torch", action="store_true", help="skip the official PyTorch step")
  ap.add_argument("--train-in-process", action="store_true",
                  help="time our train steps in this process, not one process each")
  ap.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                  help="a dotted config key for every variant, e.g. model.remat=dots")
  args = ap.parse_args(argv)
  q = int(args.quick)
  args.rounds, args.compile_reps = args.rounds or ROUNDS[q], COMPILE_REPS[q]
  args.ceiling_repeats = CEILING_REPEATS[q]
  depths = COMPILE_DEPTHS[args.size]
  args.compile_depths = (depths[0], depths[-1]) if args.quick else depths  # the ratio's two ends
  args.train_steps, args.eval_calls = TRAIN_STEPS[args.size][q], EVAL_CALLS[args.size][q]
  return args


def size_overrides(args) -> dict[str, Any]:
  """The size's config overrides, with ``--batch`` and ``--override`` applied."""
  over = dict(SIZES[args.size])
  if args.batch:
    over["batch_size"] = args.batch
  over.update(parse_override(item) for item in args.override)
  return over


# Our train steps by their `benchmarks.profile` variant names.
TRAIN_WORKERS = {"dense": "dense", "vlora": "scan", "vlora_unrolled": "unrolled"}


def start_train_workers(overrides: dict) -> dict[str, harness.Worker]:
  """Each of our train steps compiled in a resident process of its own (one at a time: the
  compiles do not compete)."""
  from benchmarks import profile  # pylint: disable=import-outside-toplevel
  return {s: profile.start_worker(name, overrides, {}, harness.ROOT)
          for s, name in TRAIN_WORKERS.items()}


def make_timers(args, variants, inference, worker) -> dict[str, Callable[[], float]]:
  """Seconds per train step / eval call of everything compared, one callable each.

  ``variants``: `Variant`s (timed here) or `harness.Worker`s (one request = one step).
  """
  def train_timer(v):
    if isinstance(v, harness.Worker):
      return lambda: statistics.mean(v.request()["s"] for _ in range(args.train_steps))
    return lambda: v.run(args.train_steps)

  timers: dict[str, Callable[[], float]] = {f"train/{s}": train_timer(v)
                                            for s, v in variants.items()}
  if worker:
    timers["train/official"] = lambda: worker.request(train=args.train_steps)["s_per_step"]
  batch = inference["batch"]
  for name, (fn, p) in inference["fns"].items():
    timers[f"eval/{name}"] = lambda fn=fn, p=p: mean_time(lambda: fn(p, batch), args.eval_calls)
  return timers


def main(argv=None):
  args = parse_args(argv)
  env = harness.environment()
  # Ours only (at `import vlora_jax`, vlora_jax/platform/cpu_malloc.py); torch runs untuned.
  env["allocator_tuned"] = cpu_malloc.tune()
  print(json.dumps(env, indent=1), flush=True)
  phases: dict[str, float] = {}

  with phase("build: train steps (dense, VLoRA, VLoRA unrolled), eval steps, torch worker, "
             "a user's path",
             phases):
    overrides = size_overrides(args)
    rng = np.random.default_rng(0)
    variants = {s: train.Variant("vit", overrides, s == "vlora", rng) for s in ("dense", "vlora")}
    # The layer stack unrolled (model.scan=False): train step only, against scan and torch.
    unrolled = train.Variant("vit", overrides, True, rng, scan=False)
    cfg = variants["vlora"].config
    worker, torch_skipped = start_torch(args, cfg)
    user = start_user_path(worker, cfg) if worker else None
    inference = build_inference(variants["dense"], variants["vlora"])
    if args.train_in_process:
      trained = {**variants, "vlora_unrolled": unrolled}
      for v in trained.values():  # warm-up: first calls, allocator
        v.run(1)
    else:
      trained = start_train_workers(overrides)  # each warmed up by its worker
    if user:
      trained["user_path"] = user
    timers = make_timers(args, trained, inference, worker)

  with phase(f"timing: {args.rounds} interleaved rounds, matmul ceiling before and after",
             phases):
    ceiling_before = train.matmul_ceiling(args.ceiling_repeats)
    times = harness.interleaved(timers, args.rounds)
    ceiling_after = train.matmul_ceiling(args.ceiling_repeats)
    for w in [worker, *trained.values()]:
      if isinstance(w, harness.Worker):
        w.close()

  with phase("checkpoints", phases):
    workdir = Path(tempfile.mkdtemp(prefix="vlora_bench_ckpt_"))
    try:
      ck = {s: checkpoint_bytes(v, workdir / s) for s, v in variants.items()}
    finally:
      shutil.rmtree(workdir, ignore_errors=True)

  with phase(f"compile time vs depth {args.compile_depths}", phases):
    comp = compile_vs_depth(cfg, args.compile_depths, args.compile_reps)

  harness.finish(env)
  result = {
      "environment": env,
      "config": {"size": args.size, "quick": args.quick, "overrides": overrides,
                 "depth": cfg.model.depth, "rounds": args.rounds,
                 "train_steps": args.train_steps, "eval_calls": args.eval_calls,
                 "train_timed_in": "this process" if args.train_in_process
                                   else "a process each",
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
  print("\n" + tables(result))
  harness.write(args.out, result, markdown(result))


if __name__ == "__main__":
  main()
