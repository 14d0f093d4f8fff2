"""Where a train step's time goes, and A/B timings of variants of it.

Both modes run the real train step of `benchmarks.train.Variant` (``--size paper``: the CIFAR
config, D 192, 12 layers = 3 x 4, r 8, batch 128, float32), with ``--override KEY=VALUE`` config
keys on top. Run as a module (``-m``): this file's name would shadow the standard library's
``profile`` if its folder were on ``sys.path``.

Trace (the default): compiles the step, warms it up, traces two steps with `jax.profiler` and
sums the first traced step's XLA ops by kind (the HLO instruction name without its numeric
suffix: ``ynn_fusion`` = the YNNPACK matmuls, ``wrapped_broadcast``,
``bitcast_dynamic-update-slice_fusion``, ...). Times are thread-ms (ops on all threads add up),
so "busy" can exceed the step's wall time. The trace stays in ``--trace`` for TensorBoard / XProf.

  .venv/bin/python -m benchmarks.profile [--unrolled] [--dense] [--override model.remat=dots] \
      [--out benchmarks/results/profile_step_scan.json]

Variants (``--variants``): each variant is a resident `harness.Worker` process (XLA flags are per
process) that compiles its step once; the driver times one step per variant per round in
`harness.interleaved` rounds. Reported: median and min seconds per step, and the median of the
per-round ratios to the first variant. A variant is a name of `VARIANTS` (config overrides, XLA
flags appended to ``$XLA_FLAGS``), or ``NAME@REV``: that variant on the code of git revision REV
(a temporary ``git worktree``), the A/B of a code change. ``default`` and ``flags`` name the sets
`DEFAULT` and `FLAGS`. Workers get the allocator tuning of `vlora_jax.platform.cpu_malloc` where
``python -m vlora_jax.main`` would apply it (``VLORA_MALLOC_TUNING=0`` turns it off): each holds
its step's temporaries (~3 GB at the CIFAR size), so mind the RAM before running many at once.

  .venv/bin/python -m benchmarks.profile --variants default \
      --out benchmarks/results/step_variants.json
  .venv/bin/python -m benchmarks.profile --variants unrolled@HEAD~1,unrolled --out /tmp/ab.json
"""

from __future__ import annotations

import argparse
import collections
import gzip
import importlib.util
import json
import os
import re
import shutil
import statistics
import subprocess
import tempfile
from pathlib import Path

from benchmarks import harness

# name -> (config overrides, XLA_FLAGS)
VARIANTS = {
    "scan": ({}, ""),
    "dense": ({"model.vlora.enabled": False}, ""),
    "unrolled": ({"model.scan": False}, ""),
    "scan_remat_dots": ({"model.remat": "dots"}, ""),
    "scan_copy_region_analysis": ({}, "--xla_cpu_copy_insertion_use_region_analysis=true"),
    "unrolled_onednn": ({"model.scan": False}, "--xla_cpu_use_onednn=true"),
    "scan_onednn": ({}, "--xla_cpu_use_onednn=true"),
    "unrolled_no_ynnpack": ({"model.scan": False}, "--xla_cpu_experimental_ynn_fusion_type="),
    "unrolled_concurrency_scheduler": (
        {"model.scan": False}, "--xla_cpu_enable_concurrency_optimized_scheduler=true"),
}
DEFAULT = ("scan", "unrolled", "scan_remat_dots", "scan_copy_region_analysis")
FLAGS = ("unrolled", "unrolled_onednn", "unrolled_no_ynnpack", "unrolled_concurrency_scheduler")

# Trace events that are not XLA ops: the executor's own spans, thread-pool work, Python.
_NOT_OPS = ("ThunkExecutor", "$", "SlinkyThreadPool", "PjitFunction", "end:")


# ------------------------------------------------------------------------------------- trace


def op_totals(trace_dir: str) -> tuple[float, dict[str, tuple[float, int]]]:
  """(step ms, {op kind: (thread-ms, count)}) of the first traced step in ``trace_dir``."""
  f = next(Path(trace_dir).glob("plugins/profile/*/*.trace.json.gz"))
  events = [e for e in json.load(gzip.open(f))["traceEvents"] if e.get("ph") == "X"]
  steps = sorted((e["ts"], e["dur"]) for e in events
                 if e["name"] == "ThunkExecutor::Execute (wait for completion)")
  t0, dur = steps[0]
  totals = collections.defaultdict(lambda: [0.0, 0])
  for e in events:
    if e["name"].startswith(_NOT_OPS) or not t0 <= e["ts"] <= t0 + dur:
      continue
    kind = re.sub(r"\.\d+$", "", e["name"])
    totals[kind][0] += e["dur"] / 1e3
    totals[kind][1] += 1
  return dur / 1e3, {k: (round(ms, 1), n) for k, (ms, n) in totals.items()}


def trace(args, overrides: dict) -> None:
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from benchmarks.train import Variant  # pylint: disable=import-outside-toplevel

  env = harness.environment()
  v = Variant("vit", args.size, not args.dense, np.random.default_rng(0), scan=not args.unrolled,
              overrides=overrides)
  v.run(2)  # warm-up: allocator and caches settle
  times = [v.run(1) for _ in range(3)]
  trace_dir = args.trace or tempfile.mkdtemp(prefix="profile_step_")
  jax.profiler.start_trace(trace_dir)
  v.run(2)
  jax.profiler.stop_trace()
  step_ms, totals = op_totals(trace_dir)
  busy = sum(ms for ms, _ in totals.values())
  ranked = sorted(totals.items(), key=lambda kv: -kv[1][0])
  summary = (f"{v.name} {overrides or ''}: untraced steps {[round(t, 2) for t in times]} s; "
             f"traced step {step_ms:.0f} ms, busy {busy:.0f} thread-ms")
  print(f"{summary} (trace: {trace_dir})")
  for kind, (ms, n) in ranked[:args.top]:
    print(f"{ms:8.1f} ms {100 * ms / busy:5.1f}%  n={n:4d}  {kind}")
  if args.out:
    result = {"variant": v.name, "overrides": overrides, "untraced_step_s": times,
              "traced_step_ms": step_ms, "busy_thread_ms": busy, "ops": dict(ranked),
              "environment": harness.finish(env),
              "command": harness.command("benchmarks.profile", args.argv)}
    rows = [[kind, f"{ms:.1f}", f"{100 * ms / busy:.1f}", n] for kind, (ms, n) in ranked]
    harness.write(args.out, result, "\n".join([
        f"# Per-op totals of one traced train step: {v.name}", "",
        harness.describe(result["environment"]), "", "```", result["command"], "```", "",
        summary + ".", "",
        harness.table(["op kind", "thread-ms", "% of busy", "count"], rows)]))


# ---------------------------------------------------------------------------------- variants


def split_name(name: str) -> tuple[str, str | None]:
  """``'unrolled@HEAD~1'`` -> ``('unrolled', 'HEAD~1')``; no ``@``: the working tree (None)."""
  variant, _, rev = name.partition("@")
  return variant, rev or None


def worktree(rev: str, parent: Path) -> Path:
  """A detached ``git worktree`` of ``rev`` under ``parent`` (the code a ``NAME@REV`` runs), named
  by its commit: two spellings of one commit share it, two commits never do.

  A revision without this package gets this worker's modules (``__init__``, `harness`, this file)
  copied in, so that its worker speaks this driver's protocol; its train step stays its own.
  """
  commit = subprocess.run(["git", "-C", str(harness.ROOT), "rev-parse", "--short",
                           f"{rev}^{{commit}}"], capture_output=True, text=True,
                          check=True).stdout.strip()
  path = parent / commit
  if not path.exists():
    subprocess.run(["git", "-C", str(harness.ROOT), "worktree", "add", "--detach", "-q",
                    str(path), commit], check=True)
    if not (path / "benchmarks" / "__init__.py").exists():
      (path / "benchmarks").mkdir(exist_ok=True)
      for name in ("__init__.py", "harness.py", "profile.py"):
        shutil.copy(harness.ROOT / "benchmarks" / name, path / "benchmarks" / name)
  return path


def variant_class(code: Path):
  """`Variant` of the code under test (the worker runs in its directory): its
  ``benchmarks/train.py``, or in a revision from before that file ``experiments/bench_train.py``."""
  old = code / "experiments" / "bench_train.py"
  if (code / "benchmarks" / "train.py").exists() or not old.exists():
    from benchmarks.train import Variant  # pylint: disable=import-outside-toplevel
    return Variant
  spec = importlib.util.spec_from_file_location("bench_train", old)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.Variant


def worker(cfg: dict) -> None:
  """Compiles the step of variant ``cfg["name"]``, then times one step per request.

  Imports nothing but the code under test (its working directory): a revision's library, and its
  own harness where it has one.
  """
  import numpy as np  # pylint: disable=import-outside-toplevel
  name, size = cfg["name"], cfg["size"]
  over = dict(VARIANTS[split_name(name)[0]][0], **cfg["overrides"])
  vlora, scan = over.pop("model.vlora.enabled", True), over.pop("model.scan", True)
  v = variant_class(Path.cwd())("vit", size, vlora, np.random.default_rng(0), scan=scan,
                                overrides=over)
  v.run(1)
  v.run(1)
  harness.serve({"ready": name, "compile_s": v.compile_s, "params": v.params_total},
                lambda _: {"s": v.run(1)})


def start_worker(name: str, size: str, overrides: dict, code: Path) -> harness.Worker:
  """The resident worker of variant ``name``, run in ``code`` (the imports come from there)."""
  # pylint: disable-next=import-outside-toplevel  (light: no JAX)
  from vlora_jax.platform import cpu_malloc
  env = dict(os.environ, PYTHONPATH=str(code))
  flags = (os.environ.get("XLA_FLAGS", ""), VARIANTS[split_name(name)[0]][1])
  env["XLA_FLAGS"] = " ".join(f for f in flags if f)
  if cpu_malloc.wanted() and not os.environ.get("GLIBC_TUNABLES"):
    env["GLIBC_TUNABLES"] = cpu_malloc.TUNABLES
  cmd = harness.module_command("benchmarks.profile", "--worker", json.dumps(
      {"name": name, "size": size, "overrides": overrides}))
  return harness.Worker(cmd, env=env, cwd=code, name=name)


def variants(args, overrides: dict) -> None:
  names = {"default": list(DEFAULT), "flags": list(FLAGS)}.get(args.variants,
                                                               args.variants.split(","))
  for n in names:
    if split_name(n)[0] not in VARIANTS:
      raise SystemExit(f"--variants: {n!r} is not one of {sorted(VARIANTS)} (or 'default', "
                       "'flags'), optionally with @REV")
  if not args.out:
    raise SystemExit("--variants needs --out")
  env = harness.environment()
  trees = Path(tempfile.mkdtemp(prefix="step_variants_"))
  workers: dict[str, harness.Worker] = {}
  try:
    for n in names:  # started one at a time: compiles do not compete
      rev = split_name(n)[1]
      workers[n] = start_worker(n, args.size, overrides,
                                worktree(rev, trees) if rev else harness.ROOT)
      print(f"  {n}: compiled in {workers[n].info['compile_s']:.1f}s", flush=True)
    times = harness.interleaved({n: lambda w=w: w.request()["s"] for n, w in workers.items()},
                                args.rounds)
  finally:
    for w in workers.values():
      w.close()
    for tree in trees.iterdir():  # unregistered from git too, not only deleted
      subprocess.run(["git", "-C", str(harness.ROOT), "worktree", "remove", "--force", str(tree)],
                     check=False)
    shutil.rmtree(trees, ignore_errors=True)

  base = names[0]
  rows = []
  for n in names:
    variant, rev = split_name(n)
    rows.append({"variant": n, "overrides": {**VARIANTS[variant][0], **overrides},
                 "xla_flags": VARIANTS[variant][1],
                 "code": harness.git_describe(rev) if rev else f"working tree ({env['code']})",
                 "median_s": statistics.median(times[n]), "min_s": min(times[n]),
                 "ratio_to_baseline": harness.paired_ratio(times[n], times[base]),
                 "params": workers[n].info["params"], "compile_s": workers[n].info["compile_s"],
                 "all_s": times[n]})
  result = {"environment": harness.finish(env), "baseline": base, "rounds": args.rounds,
            "size": args.size, "rows": rows,
            "command": harness.command("benchmarks.profile", args.argv)}
  table = harness.table(
      ["variant", "code", "overrides", "XLA_FLAGS", "params", "median s", "min s", "/ baseline",
       "compile s"],
      [[r["variant"], r["code"], json.dumps(r["overrides"]),
        f"`{r['xla_flags']}`" if r["xla_flags"] else "-", f"{r['params']:,}",
        f"{r['median_s']:.3f}",
        f"{r['min_s']:.3f}", f"{r['ratio_to_baseline']:.3f}", f"{r['compile_s']:.1f}"]
       for r in rows])
  text = "\n".join([
      f"# Train-step variants: {args.rounds} interleaved rounds, ratios to `{base}`", "",
      harness.describe(result["environment"]), " A ratio is the median of per-round ratios.", "",
      "```", result["command"], "```", "", table])
  print(table)
  harness.write(args.out, result, text)


# -------------------------------------------------------------------------------------- main


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--size", default="paper", choices=("small", "paper"))
  p.add_argument("--override", action="append", default=[], help="dotted config key=value")
  p.add_argument("--out", default=None, help="JSON path; a markdown table goes beside it")
  p.add_argument("--unrolled", action="store_true", help="trace: model.scan=False")
  p.add_argument("--dense", action="store_true", help="trace: the dense twin instead of VLoRA")
  p.add_argument("--top", type=int, default=20, help="trace: op kinds to print")
  p.add_argument("--trace", default=None, help="trace: directory (default: a temporary one)")
  p.add_argument("--variants", default=None,
                 help=f"time these variants instead (comma-separated, the first is the baseline) "
                 f"from {sorted(VARIANTS)}, each optionally NAME@REV; or 'default' or 'flags'")
  p.add_argument("--rounds", type=int, default=6, help="variants: interleaved rounds")
  p.add_argument("--worker", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.worker:
    return worker(json.loads(args.worker))
  from experiments.sweep import parse_override  # pylint: disable=import-outside-toplevel
  args.argv = argv
  overrides = dict(parse_override(o) for o in args.override)
  if args.variants:
    variants(args, overrides)
  else:
    trace(args, overrides)


if __name__ == "__main__":
  main()
