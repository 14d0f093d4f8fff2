"""Allocator settings on each way a process starts: our CIFAR train step against the official one.

XLA:CPU page-faults every step's temporaries in afresh under glibc's default allocator
(vlora_jax/platform/cpu_malloc.py). This measures, for the VLoRA train step of the CIFAR config
(the real step of `vlora_jax.train`, `benchmarks.train.Variant`), each way a process can be set
up:

  untuned   glibc's defaults (``VLORA_MALLOC_TUNING=0``);
  import    what `import vlora_jax` does: ``mallopt`` before JAX starts, i.e. what a notebook,
            a script that imports the library and ``python -m vlora_jax.main`` all get;
  tunables  the same settings as ``GLIBC_TUNABLES`` at process start.

Each setting runs in a fresh process per round (``--steps`` timed steps after ``--warmup`` steps:
with the fix, the first few steps still fault as glibc's heap grows to the step's high-water mark
through fragmentation, then none; one warm-up step left that growth in the timed steps, so that
the "import" setting seemed to fault in some rounds),
the settings' order reversed every other round, and the official PyTorch step
(`benchmarks.torch_ref`, in the torch venv) runs right after each, so that a ratio is read against
its neighbour in time. Reports per setting the median over rounds of ours / official, and the
minor page faults per step. Needs the torch reference venv.

  .venv/bin/python -m benchmarks.malloc            # -> benchmarks/results/bench_malloc.json
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics

from benchmarks import harness, torch_ref

SETTINGS = ("untuned", "import", "tunables")


def setting_env(setting: str) -> dict[str, str]:
  from vlora_jax.platform import cpu_malloc  # light: no JAX
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "VLORA_MALLOC_TUNING")}
  if setting == "untuned":
    env["VLORA_MALLOC_TUNING"] = "0"
  elif setting == "tunables":
    env.update(VLORA_MALLOC_TUNING="0", GLIBC_TUNABLES=cpu_malloc.TUNABLES)
  return env


def worker(steps: int, warmup: int) -> dict:
  """In a fresh process: compile the CIFAR VLoRA train step, ``warmup`` steps, ``steps`` timed;
  the warm-up steps' faults are reported too."""
  import numpy as np  # the imports a notebook does, in its order

  from vlora_jax.platform import cpu_malloc
  from benchmarks import train
  variant = train.Variant("vit", "paper", vlora=True, rng=np.random.default_rng(0))
  warm_faults = []
  for _ in range(warmup):
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    variant.run(1)
    warm_faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
  times, faults = [], []
  for _ in range(steps):
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    times.append(variant.run(1))
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
  return {"step_s": times, "faults": faults, "warmup_faults": warm_faults,
          "tuned_at_import": cpu_malloc.tune()}


def markdown(result: dict) -> str:
  cfg = result["config"]
  rows = [[s, f"{v['ours_over_official']:.3f}", f"{v['ours_step_s']:.3f}",
           f"{v['faults_per_step']:.0f}",
           " / ".join(str(x.get("warmup_faults")) for x in result["runs"][s])]
          for s, v in result["summary"].items()]
  return "\n".join([
      "# The allocator settings on each path: our CIFAR VLoRA train step / the official one", "",
      harness.describe(result["environment"]), "",
      f"{cfg['rounds']} rounds, {cfg['steps']} timed steps a process after {cfg['warmup']} "
      "untimed ones (the first compiles).", "",
      "```", result["command"], "```", "",
      harness.table(["setting", "ours / official (median of rounds)", "ours s/step",
                     "minor faults / timed step", "faults of each warm-up step, by round"],
                    rows)])


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--out", default=str(harness.RESULTS / "bench_malloc.json"),
                  help="JSON path; a markdown table goes beside it")
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--steps", type=int, default=4, help="timed steps per process")
  ap.add_argument("--warmup", type=int, default=6, help="untimed steps first (the first one "
                  "compiles; the heap settles in the next few)")
  ap.add_argument("--torch-python", default=torch_ref.DEFAULT_PYTHON)
  ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if args.worker:
    harness.reply(worker(args.steps, args.warmup))
    return

  from benchmarks import train
  env = harness.environment()
  config = train._config("vit", "paper", vlora=True)  # pylint: disable=protected-access
  torch = torch_ref.start(args.torch_python, torch_ref.config(config))
  cmd = harness.module_command("benchmarks.malloc", "--worker", "--steps", str(args.steps),
                               "--warmup", str(args.warmup))

  def run(setting: str) -> dict:
    with harness.Worker(cmd, env=setting_env(setting), cwd=harness.ROOT, name=setting) as w:
      result = dict(w.info)
    result["official_s"] = torch.request(train=args.steps)["s_per_step"]
    print(f"{setting}: ours {statistics.median(result['step_s']):.3f} s, official "
          f"{result['official_s']:.3f} s, faults/step {statistics.median(result['faults']):.0f}",
          flush=True)
    return result

  runs = harness.interleaved({s: lambda s=s: run(s) for s in SETTINGS}, args.rounds,
                             verbose=False)
  torch.close()
  summary = {}
  for s, rs in runs.items():
    summary[s] = {
        "ours_over_official": statistics.median(statistics.median(x["step_s"]) / x["official_s"]
                                                for x in rs),
        "ours_step_s": statistics.median(statistics.median(x["step_s"]) for x in rs),
        "faults_per_step": statistics.median(statistics.median(x["faults"]) for x in rs),
        "tuned_at_import": rs[0]["tuned_at_import"]}
  result = {"environment": harness.finish(env), "torch": torch.info, "config": vars(args),
            "summary": summary, "runs": runs,
            "command": harness.command("benchmarks.malloc", argv)}
  text = markdown(result)
  print(text)
  harness.write(args.out, result, text)


if __name__ == "__main__":
  main()
