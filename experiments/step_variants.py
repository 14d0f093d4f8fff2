"""The VLoRA train step under layer-stack modes, remat policies and XLA flags, side by side.

  PYTHONPATH=. .venv/bin/python experiments/step_variants.py --out FILE.json [--variants a,b]

Each variant is a resident worker process (XLA flags are per process) that compiles the real train
step of `bench_train` (CIFAR config: D 192, 12 layers = 3 x 4, r 8, batch 128, float32) once; the
driver then times one step per variant per round, rounds interleaved, so that load on this shared
machine hits every variant alike. Reported: median and min seconds per step and the median of the
per-round ratios to the first variant. Workers run with the allocator tuning of
`vlora_jax.cpu_malloc` where `python -m vlora_jax.main` would apply it (``VLORA_MALLOC_TUNING=0``
turns it off), which keeps each step's ~3 GB of temporaries resident: more than 4 workers at once
ran out of memory on this 24 GiB machine. A variant's XLA flags are appended to ``$XLA_FLAGS``.

``--variants`` picks from `VARIANTS` (name: config overrides, XLA_FLAGS); ``NAME@REV`` runs that
variant on the code of git revision REV (a temporary ``git worktree``): the A/B of a code change,
e.g. ``--variants unrolled@HEAD~1,unrolled``. The committed results:

  PYTHONPATH=. .venv/bin/python experiments/step_variants.py \
      --out experiments/results/step_variants.json                    # stack modes, remat
  PYTHONPATH=. .venv/bin/python experiments/step_variants.py --variants flags \
      --out experiments/results/step_variants_flags.json              # XLA:CPU flags
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# A worker of a ``NAME@REV`` variant imports the library and `bench_train` from REV's worktree.
CODE = Path(os.environ.get("STEP_VARIANTS_CODE", ROOT))
sys.path.insert(0, str(ROOT / "experiments"))
sys.path.insert(0, str(CODE / "experiments"))
sys.path.insert(0, str(CODE))


# name -> (config overrides, XLA_FLAGS)
VARIANTS = {
    "scan": ({}, ""),
    "dense": ({"model.vlora.enabled": False}, ""),
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


def split_name(name: str) -> tuple[str, str | None]:
  """``'unrolled@HEAD~1'`` -> ``('unrolled', 'HEAD~1')``; no ``@``: the working tree (None)."""
  variant, _, rev = name.partition("@")
  return variant, rev or None


def git_describe(rev: str | None = None) -> str:
  """``git describe --always`` of ``rev`` (a short hash where there are no tags), or of the
  working tree (``-dirty`` if it has changes)."""
  cmd = ["git", "-C", str(ROOT), "describe", "--always"] + ([rev] if rev else ["--dirty"])
  return subprocess.run(cmd, capture_output=True, text=True).stdout.strip()


def worktree(rev: str, parent: Path) -> Path:
  """A detached ``git worktree`` of ``rev`` under ``parent`` (the code a ``NAME@REV`` runs), named
  by its commit: two spellings of one commit share it, two commits never do."""
  commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", f"{rev}^{{commit}}"],
                          capture_output=True, text=True, check=True).stdout.strip()
  path = parent / commit
  if not path.exists():
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(path), commit],
                   check=True)
  return path


def worker(name: str) -> None:
  """Compiles the variant's step, then times one step per line read from stdin."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  import bench_train  # pylint: disable=import-outside-toplevel
  over = dict(VARIANTS[split_name(name)[0]][0])
  scan = over.pop("model.scan", True)
  v = bench_train.Variant("vit", "paper", True, np.random.default_rng(0), scan=scan, overrides=over)
  v.run(1)
  v.run(1)
  print(json.dumps({"ready": name, "compile_s": v.compile_s}), flush=True)
  for _ in sys.stdin:
    print(v.run(1), flush=True)


class Worker:
  """A resident worker process for one variant; `step` times one train step in it."""

  def __init__(self, name: str, out: str, log, code: Path = ROOT):
    from vlora_jax import cpu_malloc  # pylint: disable=import-outside-toplevel
    self.name, self.log = name, log
    env = dict(os.environ, PYTHONPATH=str(code), STEP_VARIANTS_CODE=str(code))
    flags = (os.environ.get("XLA_FLAGS", ""), VARIANTS[split_name(name)[0]][1])
    env["XLA_FLAGS"] = " ".join(f for f in flags if f)
    if cpu_malloc.wanted() and not os.environ.get("GLIBC_TUNABLES"):
      env["GLIBC_TUNABLES"] = cpu_malloc.TUNABLES
    self.proc = subprocess.Popen([sys.executable, __file__, "--out", out, "--worker", name],
                                 env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=log, text=True)
    self.compile_s = json.loads(self._line("compiling"))["compile_s"]

  def _line(self, doing: str) -> str:
    line = self.proc.stdout.readline()
    if not line:
      raise SystemExit(f"worker {self.name} died while {doing}: see {self.log.name}")
    return line

  def step(self) -> float:
    self.proc.stdin.write("step\n")
    self.proc.stdin.flush()
    return float(self._line("timing a step"))

  def close(self) -> None:
    self.proc.stdin.close()
    self.proc.wait()


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
  import bench  # pylint: disable=import-outside-toplevel  (the driver's; its `interleaved` rounds)
  names = list(FLAGS) if args.variants == "flags" else args.variants.split(",")
  for n in names:
    if split_name(n)[0] not in VARIANTS:
      raise SystemExit(f"--variants: {n!r} is not one of {sorted(VARIANTS)} (or 'flags'), "
                       "optionally with @REV")
  out = Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  trees = Path(tempfile.mkdtemp(prefix="step_variants_"))
  with open(out.with_suffix(".log"), "w") as log:  # the workers' stderr
    workers = {}
    try:
      for n in names:  # started one at a time: compiles do not compete
        rev = split_name(n)[1]
        workers[n] = Worker(n, args.out, log, worktree(rev, trees) if rev else ROOT)
        print(f"  {n}: compiled in {workers[n].compile_s:.1f}s", flush=True)
      times = bench.interleaved({n: w.step for n, w in workers.items()}, args.rounds)
    finally:
      for w in workers.values():
        w.close()
      for tree in trees.iterdir():  # unregistered from git too, not only deleted
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)],
                       check=False)
      shutil.rmtree(trees, ignore_errors=True)
  base = names[0]
  revs = {n: split_name(n)[1] for n in names}
  rows = [{"variant": n, "overrides": VARIANTS[split_name(n)[0]][0],
           "xla_flags": VARIANTS[split_name(n)[0]][1],
           "code": git_describe(revs[n]) if revs[n] else f"working tree ({git_describe()})",
           "median_s": statistics.median(times[n]), "min_s": min(times[n]),
           "ratio_to_baseline": statistics.median(a / b for a, b in zip(times[n], times[base])),
           "compile_s": workers[n].compile_s, "all_s": times[n]} for n in names]
  result = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "loadavg_end": list(os.getloadavg()), "baseline": base, "rounds": args.rounds,
            "rows": rows}
  out.write_text(json.dumps(result, indent=1) + "\n")
  command = " ".join(["PYTHONPATH=. .venv/bin/python experiments/step_variants.py",
                      f"--variants {args.variants}", f"--rounds {args.rounds}",
                      f"--out {args.out}"])
  md = [f"# step_variants ({result['date']}, {args.rounds} interleaved rounds, the order reversed "
        f"every other round; ratios to `{base}`: medians of per-round ratios)",
        "", "```", command, "```", "",
        "| variant | code | overrides | XLA_FLAGS | median s | min s | / baseline | compile s |",
        "|---|---|---|---|---:|---:|---:|---:|"]
  for r in rows:
    flags = f"`{r['xla_flags']}`" if r["xla_flags"] else "-"
    md.append(f"| {r['variant']} | {r['code']} | {json.dumps(r['overrides'])} | {flags} | "
              f"{r['median_s']:.3f} | {r['min_s']:.3f} | {r['ratio_to_baseline']:.3f} | "
              f"{r['compile_s']:.1f} |")
  out.with_suffix(".md").write_text("\n".join(md) + "\n")
  print("\n".join(md))


if __name__ == "__main__":
  main()
