"""Where the train step's time goes: a `jax.profiler` trace of one step, summed per XLA op kind.

  PYTHONPATH=. .venv/bin/python experiments/profile_step.py [--unrolled] [--dense] \
      [--override model.remat=dots] [--out FILE.json]

Compiles the real train step of `bench_train` (CIFAR config: D 192, 12 layers = 3 x 4, r 8,
batch 128, float32), warms it up, traces two steps and sums the first traced step's XLA:CPU ops by
kind (the HLO instruction name without its numeric suffix: ``ynn_fusion`` = the YNNPACK matmuls,
``wrapped_broadcast``, ``bitcast_dynamic-update-slice_fusion``, ...). Times are thread-ms (ops on
both threads add up), so "busy" can differ from the step's wall time.

This is the profile behind `results/perf_notes.md`: e.g. the scanned step against ``--unrolled``
shows what the layer scan's stacked residuals cost on XLA:CPU. The trace stays in ``--trace`` for
TensorBoard / XProf.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))

# Trace events that are not XLA ops: the executor's own spans, thread-pool work, Python.
_NOT_OPS = ("ThunkExecutor", "$", "SlinkyThreadPool", "PjitFunction", "end:")


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


def main(argv=None):
  import jax
  import numpy as np
  from bench_train import Variant
  from sweep import parse_override

  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--unrolled", action="store_true", help="model.scan=False")
  p.add_argument("--dense", action="store_true", help="the dense twin instead of VLoRA")
  p.add_argument("--override", action="append", default=[], help="dotted config key=value")
  p.add_argument("--size", default="paper", choices=("small", "paper"))
  p.add_argument("--top", type=int, default=20, help="op kinds to print")
  p.add_argument("--trace", default=None, help="trace directory (default: a temporary one)")
  p.add_argument("--out", default=None, help="write the totals as JSON here")
  a = p.parse_args(argv)

  overrides = dict(parse_override(o) for o in a.override)
  v = Variant("vit", a.size, not a.dense, np.random.default_rng(0), scan=not a.unrolled,
              overrides=overrides)
  v.run(2)  # warm-up: allocator and caches settle
  times = [v.run(1) for _ in range(3)]
  trace = a.trace or tempfile.mkdtemp(prefix="profile_step_")
  jax.profiler.start_trace(trace)
  v.run(2)
  jax.profiler.stop_trace()
  step_ms, totals = op_totals(trace)
  busy = sum(ms for ms, _ in totals.values())
  ranked = sorted(totals.items(), key=lambda kv: -kv[1][0])
  print(f"{v.name} {overrides or ''}: untraced steps {[round(t, 2) for t in times]} s; traced "
        f"step {step_ms:.0f} ms, busy {busy:.0f} thread-ms (trace: {trace})")
  for kind, (ms, n) in ranked[:a.top]:
    print(f"{ms:8.1f} ms {100 * ms / busy:5.1f}%  n={n:4d}  {kind}")
  if a.out:
    Path(a.out).write_text(json.dumps({
        "variant": v.name, "overrides": overrides, "untraced_step_s": times,
        "traced_step_ms": step_ms, "busy_thread_ms": busy, "ops": dict(ranked),
        "jax": jax.__version__, "date": time.strftime("%Y-%m-%d")}, indent=1))


if __name__ == "__main__":
  main()
