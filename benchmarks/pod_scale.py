"""Per-chip memory and FLOPs of the pod configs, compiled for TPU slices from this machine.

  .venv/bin/python -m benchmarks.pod_scale                # every part -> results/pod_scale.json
  .venv/bin/python -m benchmarks.pod_scale --parts flat,sizes --out /tmp/pod.json

Every row is one run of the compile command (`vlora_jax.compile`, in a fresh process), so each
figure is what a user gets from ``python -m vlora_jax.compile --config ... --topology ...``; the
rows record their command. Parts:

  flat     configs/lm_pod.py:1b, VLoRA and dense, one sequence per chip on v5e:2x2, v5e:4x4 and
           v5e:16x16: per-chip cost against the slice's size (the targets: 16 over 4 chips <= 1.05,
           256 over 4 <= 1.10, for temp bytes and FLOPs)
  sizes    1b / 8b / 70b, VLoRA and dense, on a v5e-256 (one sequence per chip) and a v5p-128
           (64 chips, v5p:4x4x4, one sequence per chip)
  remat    8b on the v5e-256 under every remat policy of vlora_jax/core/remat.py, VLoRA and dense
  vit      configs/vit_pod.py (ViT-H/14), VLoRA and dense, on the v5e-256 (16 images per chip)
  largest  the largest dense twin whose train step fits a v5e-256 at one sequence per chip, VLoRA
           against dense, by search over the width D (multiples of 1,024) at a fixed shape rule
           (layers D / 128 in compounds of 4, heads of 128, 8 key/value heads, MLP 3.5 D), under
           the policies of ``--largest-remat`` with the kernels of ``--largest-attention`` and
           the tensor parallelism of ``--largest-tp``, doubling from ``--largest-from``

Rows already in ``--out`` are kept (``--force`` recomputes them): the run can be stopped and
resumed. Writes the JSON and docs/pod.md (the tables).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import vlora_jax  # noqa: F401 -- first: it settles the backend before JAX starts
from benchmarks import harness

GIB = 2 ** 30
DOC = harness.ROOT / "docs" / "pod.md"
V5E_256, V5P_128 = ("v5e:16x16", 256), ("v5p:4x4x4", 64)
POLICIES = ("none", "full", "dots_no_batch", "save_proj", "save_qkv_proj", "offload_dots_no_batch",
            "offload_layer_inputs")


def compile_row(config: str, topology: str, count_flops: bool = True, timeout: int = 3600) -> dict:
  """One ``python -m vlora_jax.compile`` run: its report, its command and its exit status."""
  with tempfile.TemporaryDirectory() as d:
    out = Path(d) / "report.json"
    args = [f"--config={config}", f"--topology={topology}", f"--out={out}"]
    if not count_flops:
      args.append("--nocount_flops")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "vlora_jax.compile", *args], cwd=harness.ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)
    row = json.loads(out.read_text()) if out.exists() else {}
  row.update(command="python -m vlora_jax.compile " + " ".join(a for a in args
                                                                 if not a.startswith("--out")),
             exit_status=proc.returncode, wall_s=time.time() - t0)
  if proc.returncode not in (0, 3):
    row["error"] = (proc.stdout + proc.stderr)[-2000:]
  return row


def key(config: str, topology: str) -> str:
  """A row's name: its config argument and its slice (the same compile is one row)."""
  return f"{config}@{topology}"


def plan(parts) -> list[tuple[str, str, bool]]:
  """``(config, topology, count FLOPs)`` of every fixed row of ``parts``, most wanted first."""
  rows = []
  variants = ("vlora", "dense")
  if "flat" in parts:
    rows += [(f"configs/lm_pod.py:1b,{v},batch={chips}", topology, True) for v in variants
             for topology, chips in (("v5e:2x2", 4), ("v5e:4x4", 16), V5E_256)]
  # FLOPs are counted for every row they are reported in (each count is two more compiles).
  if "sizes" in parts:
    rows += [(f"configs/lm_pod.py:{size},{v},batch={chips}", topology, True)
             for size in ("8b", "70b", "1b") for v in variants
             for topology, chips in (V5E_256, V5P_128)]
  if "vit" in parts:
    rows += [(f"configs/vit_pod.py:{v}", V5E_256[0], True) for v in variants]
  if "remat" in parts:
    rows += [(f"configs/lm_pod.py:8b,{v},batch=256,remat={p}", V5E_256[0], False)
             for p in POLICIES for v in variants]
  return rows


def shape_rule(d: int) -> str:
  """The searched family's config argument at width ``d`` (a multiple of 1024: its d / 128 heads
  then share 8 key/value heads evenly, and its d / 128 layers fill compounds of 4)."""
  return f"d={d},layers={d // 128}"


def setting(remat: str, attention: str, tp: int = 1) -> str:
  """A searched setting's name in the results: the remat policy, with the attention kernel and
  the tensor parallelism where they are not the config's defaults (XLA's, none)."""
  return " + ".join([remat] + ([f"{attention} attention"] if attention != "xla" else [])
                    + ([f"tp {tp}"] if tp > 1 else []))


def search_largest(results: dict, save, variant: str, remat: str, attention: str = "xla",
                   tp: int = 1, lo: int = 1024, hi: int = 65536, step: int = 1024) -> None:
  """The largest ``d`` (a multiple of ``step``) whose step fits a v5e-256, by doubling from ``lo``
  then bisection; the answer is ``results['largest/{setting}/{variant}']``."""
  attn = ("" if attention == "xla" else f",attn={attention}") + ("" if tp == 1 else f",tp={tp}")

  def config_at(d: int) -> str:
    return f"configs/lm_pod.py:1b,{variant},batch=256,remat={remat}{attn},{shape_rule(d)}"

  def fits(d: int) -> bool:
    config = config_at(d)
    name = key(config, V5E_256[0])
    if name not in results:
      results[name] = compile_row(config, V5E_256[0], count_flops=False)
      save()
    return bool(results[name].get("fits"))

  if not fits(lo):
    return
  good, bad = lo, None
  while bad is None and good * 2 <= hi:
    bad = None if fits(good * 2) else good * 2
    good = good * 2 if bad is None else good
  bad = bad or hi + step
  while bad - good > step:
    mid = (good + bad) // 2 // step * step
    if fits(mid):
      good = mid
    else:
      bad = mid
  results[f"largest/{setting(remat, attention, tp)}/{variant}"] = {
      "d": good, "row": key(config_at(good), V5E_256[0])}
  save()


# ------------------------------------------------------------------------------------ the doc


LARGEST_TARGET = 3.0  # VLoRA's largest twin over dense's (issue 25)


def largest_verdicts(results: dict) -> list[dict]:
  """Per setting (`setting`) searched for both variants, then over all of them (each side at its
  best setting): ``{setting, vlora: {d, twin, row}, dense: {...}, ratio, met}``, twin being the
  dense-equivalent parameter count of the largest width that fits."""
  found: dict[str, dict] = {}
  for name, entry in results.items():
    if name.startswith("largest/"):
      _, searched, variant = name.split("/")
      row = results[entry["row"]]
      found.setdefault(searched, {})[variant] = dict(d=entry["d"], row=entry["row"],
                                                  twin=row["params_dense_equivalent"])
  out = [dict(setting=searched, **pair) for searched, pair in found.items()
         if {"vlora", "dense"} <= set(pair)]
  if len(out) > 1:
    best = {v: max((o[v] for o in out), key=lambda x: x["twin"]) for v in ("vlora", "dense")}
    out.append(dict(setting="best of each", **best))
  for o in out:
    o["ratio"] = o["vlora"]["twin"] / o["dense"]["twin"]
    o["met"] = o["ratio"] >= LARGEST_TARGET
  return out


def _gib(row, key) -> str:
  v = row.get(key)
  return "—" if v is None else f"{v / GIB:.2f}"


def _tflop(row) -> str:
  return "—" if row.get("flops") is None else f"{row['flops'] / 1e12:.1f}"


def _params(row) -> str:
  return f"{row['params_total'] / 1e9:.2f}B" if row.get("params_total") else "—"


def markdown(results: dict, env: dict) -> str:
  rows = {k: v for k, v in results.items() if "command" in v}
  out = ["# Pod scale: the pod configs' train steps, compiled for TPU slices",
         "",
         "Every figure is per chip, from `python -m vlora_jax.compile` (the train step that "
         "training runs, compiled ahead of time for the slice on a CPU-only machine; "
         "`benchmarks/pod_scale.py` ran every row and wrote `benchmarks/results/pod_scale.json`, "
         f"code {env.get('code')}, {env.get('date_utc')}). Temp is XLA's scratch memory of the "
         "step, peak = temp + arguments + outputs - aliased (the donated state), TFLOP the whole "
         "step's with every layer counted. Step time and MFU are roofline estimates "
         "(max of FLOPs / peak and bytes / HBM bandwidth; MFU from PaLM's model FLOPs), not "
         "measurements.", ""]

  def label(name: str) -> str:
    return name.split("@")[0].replace("configs/", "")

  def table(title, names, label):
    present = [n for n in names if n in rows]
    if not present:
      return
    out.extend([f"## {title}", ""])
    body = []
    for n in present:
      r = rows[n]
      est = (f"{r['step_time_estimate_s'] * 1e3:.0f} ms, {r['mfu_estimate']:.0%}"
             if r.get("step_time_estimate_s") else "—")
      body.append([label(n), r.get("topology"), r.get("chips"), r.get("global_batch"), _params(r),
                   _gib(r, "temp_bytes"), _gib(r, "argument_bytes"), _gib(r, "peak_bytes"),
                   "yes" if r.get("fits") else "**no**", _tflop(r), est])
    out.append(harness.table(["config", "slice", "chips", "batch", "params", "temp GiB",
                              "args GiB", "peak GiB", "fits", "TFLOP", "estimate"], body))
    out.append("")

  slices = (("v5e:2x2", 4), ("v5e:4x4", 16), V5E_256)
  flat = {(v, t): key(f"configs/lm_pod.py:1b,{v},batch={n}", t) for v in ("vlora", "dense")
          for t, n in slices}
  table("Flat in the slice's size (1b, one 2,048-token sequence per chip)", list(flat.values()),
        label)
  ratios = []
  for v in ("vlora", "dense"):
    base = rows.get(flat[(v, "v5e:2x2")])
    for t in ("v5e:4x4", "v5e:16x16"):
      r = rows.get(flat[(v, t)])
      if base and r and base.get("temp_bytes") and r.get("temp_bytes"):
        ratios.append([f"1b {v}", f"{t} / v5e:2x2", f"{r['temp_bytes'] / base['temp_bytes']:.2f}",
                       f"{r['flops'] / base['flops']:.2f}" if r.get("flops") else "—",
                       "<= 1.05" if t == "v5e:4x4" else "<= 1.10"])
  if ratios:
    out.extend(["Per-chip cost over that of 4 chips:", "",
                harness.table(["config", "slices", "temp", "FLOPs", "target"], ratios), ""])
  sizes = [key(f"configs/lm_pod.py:{s},{v},batch={n}", t) for s in ("1b", "8b", "70b")
           for v in ("vlora", "dense") for t, n in (V5E_256, V5P_128)]
  table("1b, 8b and 70b on a v5e-256 and a v5p-128 (one sequence per chip)", sizes, label)
  remat = [key(f"configs/lm_pod.py:8b,{v},batch=256,remat={p}", V5E_256[0]) for p in POLICIES
           for v in ("vlora", "dense")]
  table("Remat policies (8b on a v5e-256)", remat, label)
  table("ViT-H/14 on a v5e-256 (16 images per chip)",
        [key(f"configs/vit_pod.py:{v}", V5E_256[0]) for v in ("vlora", "dense")], label)
  verdicts = largest_verdicts(results)
  if verdicts:
    out.extend(["## The largest twin that fits a v5e-256", "",
                "Width D searched in steps of 1,024 at a fixed shape rule (layers D / 128, heads of "
                "128, 8 key/value heads, MLP 3.5 D, vocabulary 32k, 2,048 tokens, one sequence "
                "per chip), the largest D whose compiled step fits 15.75 GiB, and what the next "
                "width needs. State is the parameters and AdamW's moments (the step's arguments), "
                "temp XLA's scratch: the activations, each layer's gathered weights and "
                "gradients, and the optimizer update's temporaries:", ""])
    body = []
    for v in verdicts:
      if v["setting"] == "best of each":  # rows already listed under their own setting
        continue
      for variant in ("dense", "vlora"):
        d, r = v[variant]["d"], rows[v[variant]["row"]]
        wider = rows.get(v[variant]["row"].replace(shape_rule(d), shape_rule(d + 1024)), {})
        body.append([variant, v["setting"], d, f"{r['params_dense_equivalent'] / 1e9:.1f}B",
                     _params(r), _gib(r, "argument_bytes"), _gib(r, "temp_bytes"),
                     _gib(r, "peak_bytes"),
                     f"{_gib(wider, 'peak_bytes')} ({_gib(wider, 'argument_bytes')} / "
                     f"{_gib(wider, 'temp_bytes')})" if wider.get("temp_bytes") else
                     _gib(wider, "peak_bytes")])
    out.append(harness.table(["variant", "setting", "D", "dense twin", "params", "state GiB",
                              "temp GiB", "peak GiB", "D + 1024 needs GiB (state / temp)"],
                             body))
    best = " (best of each: each side at its own best setting)" if len(verdicts) > 1 else ""
    out.extend(["", f"VLoRA's largest twin over dense's{best}:", "",
                harness.table(["setting", "VLoRA twin", "dense twin", "ratio", "target"],
                              [[v["setting"], f"{v['vlora']['twin'] / 1e9:.1f}B",
                                f"{v['dense']['twin'] / 1e9:.1f}B", f"{v['ratio']:.2f}x",
                                ("met" if v["met"] else "**missed**") + " (>= 3x)"]
                               for v in verdicts]), ""])
  return "\n".join(out)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--parts", default="flat,sizes,largest,vit,remat")
  ap.add_argument("--largest-remat", default="full,offload_layer_inputs")
  ap.add_argument("--largest-attention", default="xla,pallas",
                  help="attention kernels searched with each remat policy (model.attention)")
  ap.add_argument("--largest-tp", default="1",
                  help="tensor-parallel sizes searched (lm_pod's tp=, with sequence parallelism)")
  ap.add_argument("--largest-from", type=int, default=1024,
                  help="the search's first width (a multiple of 1024; it doubles from there)")
  ap.add_argument("--out", default=str(harness.RESULTS / "pod_scale.json"))
  ap.add_argument("--doc", default=str(DOC))
  ap.add_argument("--force", action="store_true")
  args = ap.parse_args(argv)
  parts = args.parts.split(",")
  out = Path(args.out)
  stored = json.loads(out.read_text()) if out.exists() else {}
  results = {} if args.force else stored.get("rows", {})
  env = harness.environment()

  def save():
    harness.write(out, {"env": harness.finish(env), "rows": results}, markdown(results, env))
    Path(args.doc).write_text(markdown(results, env) + "\n")

  for part in parts:  # in the order given
    if part == "largest":
      for tp in map(int, args.largest_tp.split(",")):
        for attention in args.largest_attention.split(","):
          for remat in args.largest_remat.split(","):
            for variant in ("dense", "vlora"):
              search_largest(results, save, variant, remat, attention, tp, lo=args.largest_from)
      continue
    for config, topology, flops in plan([part]):
      name = key(config, topology)
      done = results.get(name)
      if done and "error" not in done and ("flops" in done or not flops or not done["fits"]):
        continue
      print(name, flush=True)
      results[name] = compile_row(config, topology, flops)
      save()
  save()


if __name__ == "__main__":
  main()
