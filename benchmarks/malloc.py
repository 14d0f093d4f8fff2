"""The allocator fix on the library path: our CIFAR train step against the official PyTorch step.

  PYTHONPATH=. .venv/bin/python experiments/bench_malloc.py --out experiments/results/bench_malloc.json

XLA:CPU page-faults every step's temporaries in afresh under glibc's default allocator
(vlora_jax/cpu_malloc.py). This measures, for the VLoRA train step of the CIFAR config (the real
step of `vlora_jax.train`, `bench_train.Variant`), each way a process can be set up:

  untuned   glibc's defaults (``VLORA_MALLOC_TUNING=0``);
  import    what `import vlora_jax` does: ``mallopt`` before JAX starts, i.e. what a notebook,
            a script that imports the library and ``python -m vlora_jax.main`` all get;
  tunables  the same settings as ``GLIBC_TUNABLES`` at process start (the earlier re-exec).

Each setting runs in a fresh process per round (``--steps`` timed steps after one warm-up step),
the settings' order reversed every other round, and the official PyTorch step (the worker of
``bench.py``, in the torch venv) runs right after each, so that a ratio is read against its
neighbour in time. Reports per setting the median over rounds of ours / official, and the minor
page faults per step.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))

SETTINGS = ("untuned", "import", "tunables")


def setting_env(setting: str) -> dict[str, str]:
  from vlora_jax import cpu_malloc  # light: no JAX
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "VLORA_MALLOC_TUNING")}
  env["PYTHONPATH"] = str(ROOT)
  if setting == "untuned":
    env["VLORA_MALLOC_TUNING"] = "0"
  elif setting == "tunables":
    env.update(VLORA_MALLOC_TUNING="0", GLIBC_TUNABLES=cpu_malloc.TUNABLES)
  return env


def worker(steps: int) -> dict:
  """In a fresh process: compile the CIFAR VLoRA train step, one warm-up step, ``steps`` timed."""
  import numpy as np  # noqa: F401  (the imports a notebook does, in its order)

  import bench_train
  from vlora_jax import cpu_malloc
  variant = bench_train.Variant("vit", "paper", vlora=True, rng=np.random.default_rng(0))
  variant.run(1)
  times, faults = [], []
  for _ in range(steps):
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    times.append(variant.run(1))
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
  return {"step_s": times, "faults": faults, "tuned_at_import": cpu_malloc.tune()}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--out")
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--steps", type=int, default=4, help="timed steps per process")
  ap.add_argument("--torch-python", default=os.environ.get(
      "VLORA_TORCH_PYTHON", "/tmp/torchref/venv/bin/python"))
  ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if args.worker:
    print(json.dumps(worker(args.steps)))
    return
  if not args.out:
    ap.error("--out is required")

  import bench
  import bench_core
  import bench_train
  t_start = time.perf_counter()
  env = bench_core.environment()
  config = bench_train._config("vit", "paper", vlora=True)  # pylint: disable=protected-access
  torch = bench.TorchWorker(args.torch_python, bench.torch_config(config))
  runs = {s: [] for s in SETTINGS}
  for r in range(args.rounds):
    for setting in SETTINGS if r % 2 == 0 else SETTINGS[::-1]:
      proc = subprocess.run([sys.executable, __file__, "--worker", "--steps", str(args.steps)],
                            env=setting_env(setting), capture_output=True, text=True, check=True,
                            timeout=1800)
      run = json.loads(proc.stdout.strip().splitlines()[-1])
      run["official_s"] = torch.train(args.steps)
      runs[setting].append(run)
      print(f"round {r + 1} {setting}: ours {statistics.median(run['step_s']):.3f} s, official "
            f"{run['official_s']:.3f} s, faults/step {statistics.median(run['faults']):.0f}",
            flush=True)
  torch.close()
  summary = {}
  for s, rs in runs.items():
    summary[s] = {
        "ours_over_official": statistics.median(statistics.median(x["step_s"]) / x["official_s"]
                                                for x in rs),
        "ours_step_s": statistics.median(statistics.median(x["step_s"]) for x in rs),
        "faults_per_step": statistics.median(statistics.median(x["faults"]) for x in rs),
        "tuned_at_import": rs[0]["tuned_at_import"]}
  env["wall_s"] = round(time.perf_counter() - t_start, 1)
  result = {"env": env, "torch": torch.info, "config": vars(args), "summary": summary,
            "runs": runs,
            "command": "PYTHONPATH=. .venv/bin/python experiments/bench_malloc.py "
                       + " ".join(sys.argv[1:] if argv is None else argv)}
  out = Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(result, indent=1) + "\n")
  lines = ["# The allocator fix on each path: our CIFAR VLoRA train step / the official PyTorch step",
           "", f"Date (UTC): {env['date_utc']}, {env['cpu_count']} CPUs. {args.rounds} rounds, "
           f"{args.steps} timed steps a process.", "", "```", result["command"], "```", "",
           "| setting | ours / official (median of rounds) | ours s/step | minor faults / step |",
           "|---|---:|---:|---:|"]
  lines += [f"| {s} | {v['ours_over_official']:.3f} | {v['ours_step_s']:.3f} | "
            f"{v['faults_per_step']:.0f} |" for s, v in summary.items()]
  out.with_suffix(".md").write_text("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
