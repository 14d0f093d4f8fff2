"""The VLoRA train step under layer-stack modes, remat policies and XLA flags, side by side.

  PYTHONPATH=. .venv/bin/python experiments/step_variants.py --out experiments/results/step_variants.json

Each variant is a resident worker process (XLA flags are per process) that compiles the real train
step of `bench_train` (CIFAR config: D 192, 12 layers = 3 x 4, r 8, batch 128, float32) once; the
driver then times one step per variant per round, rounds interleaved, so that load on this shared
machine hits every variant alike. Reported: median and min seconds per step and the median of the
per-round ratios to the first variant. Workers run with the allocator tuning of
`vlora_jax.cpu_malloc` (as `python -m vlora_jax.main` does), which keeps each step's ~3 GB of
temporaries resident: more than 4 workers at once ran out of memory on this 24 GiB machine.

``--variants`` picks from `VARIANTS` (name: config overrides, XLA_FLAGS). The committed results:

  PYTHONPATH=. .venv/bin/python experiments/step_variants.py \
      --out experiments/results/step_variants.json                    # stack modes, remat
  PYTHONPATH=. .venv/bin/python experiments/step_variants.py --variants flags \
      --out experiments/results/step_variants_flags.json              # XLA:CPU flags
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# name -> (config overrides, XLA_FLAGS)
VARIANTS = {
    "scan": ({}, ""),
    "unrolled": ({"model.scan": False}, ""),
    "scan_remat_dots": ({"model.remat": "dots"}, ""),
    "scan_copy_region_analysis": ({}, "--xla_cpu_copy_insertion_use_region_analysis=true"),
    "unrolled_onednn": ({"model.scan": False}, "--xla_cpu_use_onednn=true"),
    "unrolled_no_ynnpack": ({"model.scan": False}, "--xla_cpu_experimental_ynn_fusion_type="),
    "unrolled_concurrency_scheduler": (
        {"model.scan": False}, "--xla_cpu_enable_concurrency_optimized_scheduler=true"),
}
DEFAULT = ("scan", "unrolled", "scan_remat_dots", "scan_copy_region_analysis")
FLAGS = ("unrolled", "unrolled_onednn", "unrolled_no_ynnpack", "unrolled_concurrency_scheduler")


def worker(name: str) -> None:
  """Compiles the variant's step, then times one step per line read from stdin."""
  sys.path.insert(0, str(ROOT))
  sys.path.insert(0, str(ROOT / "experiments"))
  import numpy as np  # pylint: disable=import-outside-toplevel
  import bench_train  # pylint: disable=import-outside-toplevel
  over = dict(bench_train.SIZES["paper"]["vit"], **VARIANTS[name][0])
  bench_train.SIZES["variant"] = {"vit": over}
  scan = over.pop("model.scan", True)
  v = bench_train.Variant("vit", "variant", True, np.random.default_rng(0), scan=scan)
  v.run(1)
  v.run(1)
  print(json.dumps({"ready": name, "compile_s": v.compile_s}), flush=True)
  for _ in sys.stdin:
    print(v.run(1), flush=True)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--out", required=True, help="JSON path; a markdown table goes beside it")
  ap.add_argument("--variants", default=",".join(DEFAULT),
                  help=f"comma-separated, the first is the baseline; from {sorted(VARIANTS)}; "
                  "or 'flags' for the XLA flag set")
  ap.add_argument("--rounds", type=int, default=6)
  ap.add_argument("--worker", help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.worker:
    return worker(args.worker)
  names = list(FLAGS) if args.variants == "flags" else args.variants.split(",")
  for n in names:
    if n not in VARIANTS:
      raise SystemExit(f"--variants: {n!r} is not one of {sorted(VARIANTS)}")
  from vlora_jax import cpu_malloc  # pylint: disable=import-outside-toplevel
  procs, compile_s = {}, {}
  log = open(Path(args.out).with_suffix(".log"), "w")  # the workers' stderr
  for n in names:  # started one at a time: compiles do not compete
    env = dict(os.environ, XLA_FLAGS=VARIANTS[n][1], GLIBC_TUNABLES=cpu_malloc.TUNABLES,
               VLORA_MALLOC_TUNED="1", PYTHONPATH=str(ROOT))
    p = subprocess.Popen([sys.executable, __file__, "--out", args.out, "--worker", n], env=env,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                         text=True)
    line = p.stdout.readline()
    if not line:
      raise SystemExit(f"worker {n} died while compiling; see {log.name}")
    compile_s[n] = json.loads(line)["compile_s"]
    procs[n] = p
    print(f"  {n}: compiled in {compile_s[n]:.1f}s", flush=True)
  times = {n: [] for n in names}
  for r in range(args.rounds):
    for n, p in procs.items():
      p.stdin.write("step\n")
      p.stdin.flush()
      times[n].append(float(p.stdout.readline()))
    print(f"  round {r + 1}/{args.rounds}: " +
          "  ".join(f"{n} {times[n][-1]:.2f}s" for n in names), flush=True)
  for p in procs.values():
    p.stdin.close()
    p.wait()
  base = names[0]
  rows = [{"variant": n, "overrides": VARIANTS[n][0], "xla_flags": VARIANTS[n][1],
           "median_s": statistics.median(times[n]), "min_s": min(times[n]),
           "ratio_to_baseline": statistics.median(a / b for a, b in zip(times[n], times[base])),
           "compile_s": compile_s[n], "all_s": times[n]} for n in names]
  result = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "loadavg_end": list(os.getloadavg()), "baseline": base, "rounds": args.rounds,
            "rows": rows}
  out = Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(result, indent=1) + "\n")
  md = [f"# step_variants ({result['date']}, {args.rounds} interleaved rounds; ratios to `{base}`)",
        "", "```", f"PYTHONPATH=. .venv/bin/python experiments/step_variants.py --out {args.out}",
        "```", "", "| variant | overrides | XLA_FLAGS | median s | min s | / baseline | compile s |",
        "|---|---|---|---:|---:|---:|---:|"]
  for r in rows:
    md.append(f"| {r['variant']} | {json.dumps(r['overrides'])} | `{r['xla_flags']}` | "
              f"{r['median_s']:.3f} | {r['min_s']:.3f} | {r['ratio_to_baseline']:.3f} | "
              f"{r['compile_s']:.1f} |")
  out.with_suffix(".md").write_text("\n".join(md) + "\n")
  print("\n".join(md))


if __name__ == "__main__":
  main()
