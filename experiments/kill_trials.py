"""Kill-and-resume trials: SIGKILL ``python -m vlora_jax.main`` at random moments, rerun the same
command, and check the result equals an uninterrupted run's.

  python -m experiments.kill_trials --trials 20 --out experiments/results/kill_trials.json

One uninterrupted reference run, then trials of three kinds, each on its own workdir:

  random   killed 1-3 times at a random moment (start-up, a random step, a random delay after it),
           then run to the end;
  save     killed the instant a checkpoint's temporary directory appears (mid-save), twice;
  mesh     killed at a random step while running on 8 (fake CPU) devices with FSDP-sharded
           parameters, then finished on 1 device.

A trial passes when the last run exits 0 and, against the reference: the final params, optimizer
state and RNG are bitwise equal (random, save; ``mesh``: within 1e-5, since 8 devices sum in another
order), the final eval metrics are equal, and every step's training metrics (loss, accuracy,
gradient norm: logged at every step) are equal, so the same batches were seen in the same order.
`tests/reliability/test_kill_resume.py` runs a few trials; this script runs as many as asked and saves them.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
STEPS = 40
FLAGS = [
    f"--config={ROOT / 'configs' / 'vit_digits.py'}:vlora,r=2,s=2,steps={STEPS}",
    "--config.model.dim=16", "--config.model.depth=2", "--config.model.num_heads=2",
    "--config.model.dropout=0.1",  # dropout on: the RNG state must resume exactly too
    "--config.batch_size=16", "--config.eval_batch_size=64", "--config.data.eval_examples=64",
    "--config.data.threads=1", "--config.optim.warmup_steps=4", "--config.eval_every_steps=0",
    "--config.log_every_steps=1", "--config.checkpoint.every_steps=4", "--config.checkpoint.keep=2",
    "--config.checkpoint.keep_best=0", "--config.progress=False", "--config.tensorboard=False",
    "--config.mesh.data=1", "--config.mesh.fsdp=-1",  # parameters sharded over all devices
]
TRAIN_KEYS = ("train/loss", "train/accuracy", "train/grad_norm", "train/param_norm")


def launch(workdir: Path, devices: int = 1) -> subprocess.Popen:
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT),
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  return subprocess.Popen([sys.executable, "-m", "vlora_jax.main", f"--workdir={workdir}", *FLAGS],
                          cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)


def _logged_steps(workdir: Path) -> int:
  f = workdir / "metrics.jsonl"
  return sum(1 for line in f.read_text().splitlines() if '"train/loss"' in line) \
      if f.exists() else 0


def _tmp_dirs(workdir: Path) -> set[str]:
  d = workdir / "checkpoints"
  return {p.name for p in d.iterdir() if ".orbax-checkpoint-tmp" in p.name} if d.is_dir() else set()


def _saving(workdir: Path, before: frozenset = frozenset()) -> bool:
  """A save of this launch is in flight (leftovers of a killed launch do not count)."""
  return bool(_tmp_dirs(workdir) - before)


def _kill_when(proc: subprocess.Popen, workdir: Path, kind: str, rng) -> dict:
  """Waits for the trial's moment, SIGKILLs, and says what the moment was."""
  t0 = time.time()
  before = frozenset(_tmp_dirs(workdir))
  if kind == "save":
    seen = 0
    while proc.poll() is None:
      if _saving(workdir, before):
        seen += 1
        if seen >= rng.integers(1, 3):  # not always the first save of this launch
          break
        while _saving(workdir, before) and proc.poll() is None:
          time.sleep(0.0005)
      time.sleep(0.0005)
    what = "mid-save"
  elif kind == "random" and rng.random() < 0.2:  # during start-up (imports, compile, restore)
    time.sleep(rng.uniform(0.5, 6.0))
    what = "start-up"
  else:
    base = _logged_steps(workdir)
    target = base + int(rng.integers(1, STEPS // 2))
    while proc.poll() is None and _logged_steps(workdir) < target:
      time.sleep(0.002)
    time.sleep(rng.uniform(0.0, 0.05))
    what = f"after ~{target} logged steps"
  if proc.poll() is not None:
    return {"moment": what, "killed": False, "note": "finished before the kill"}
  mid_save = _saving(workdir, before)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  on_disk = sorted(p.name for p in (workdir / "checkpoints").iterdir()) \
      if (workdir / "checkpoints").is_dir() else []
  return {"moment": what, "killed": True, "seconds": round(time.time() - t0, 2),
          "mid_save": mid_save, "on_disk": on_disk}


def _train_rows(workdir: Path) -> dict[int, dict]:
  """Step -> training metrics; a step logged twice (re-run after a kill) keeps its last row."""
  rows = {}
  for line in (workdir / "metrics.jsonl").read_text().splitlines():
    r = json.loads(line)
    if "train/loss" in r:
      rows[r["step"]] = {k: r[k] for k in TRAIN_KEYS}
  return rows


def compare(run: Path, ref: Path, atol: float = 0.0) -> list[str]:
  """The differences between a run and the reference (empty: equal)."""
  from absl import logging as absl_logging
  from vlora_jax.runs import checkpoint_format
  problems = []
  verbosity = absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.ERROR)  # Orbax's notes on reading a bare step dir
  try:
    a = checkpoint_format.read_path(str(run), params_only=False)
    b = checkpoint_format.read_path(str(ref), params_only=False)
  finally:
    absl_logging.set_verbosity(verbosity)  # callers (tests) may watch warnings afterwards
  import jax
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
    x, y = np.asarray(x), np.asarray(y)
    ok = np.array_equal(x, y) if atol == 0 else np.allclose(x, y, rtol=0, atol=atol)
    if not ok:
      problems.append(f"state{jax.tree_util.keystr(path)} differs "
                      f"(max {np.max(np.abs(x.astype(np.float64) - y)):.3g})")
  sa = json.loads((run / "summary.json").read_text())
  sb = json.loads((ref / "summary.json").read_text())
  for k in ("step", "eval/accuracy", "eval/loss"):
    if abs(sa[k] - sb[k]) > atol * 10:
      problems.append(f"summary {k}: {sa[k]} vs {sb[k]}")
  ra, rb = _train_rows(run), _train_rows(ref)
  if sorted(ra) != sorted(rb):
    problems.append(f"logged steps differ: {sorted(set(ra) ^ set(rb))}")
  bad = [s for s in rb if s in ra and any(abs(ra[s][k] - rb[s][k]) > atol * 10 for k in TRAIN_KEYS)]
  if bad:
    problems.append(f"training metrics differ at steps {bad[:5]} (another batch or RNG)")
  return problems


def reference(root: Path) -> Path:
  ref = root / "reference"
  if not (ref / "summary.json").exists():
    out = launch(ref).communicate(timeout=600)[0]
    if not (ref / "summary.json").exists():
      raise RuntimeError(f"the reference run failed:\n{out[-3000:]}")
  return ref


def trial(root: Path, ref: Path, index: int, kind: str, rng, kills: int | None = None) -> dict:
  wd = root / f"trial{index:02d}_{kind}"
  kills = kills or {"random": int(rng.integers(1, 4)), "save": 2, "mesh": 1}[kind]
  events = []
  for k in range(kills):
    devices = 8 if kind == "mesh" else 1
    events.append(_kill_when(launch(wd, devices), wd, kind, rng))
  proc = launch(wd)  # the same command, to the end (on 1 device)
  out = proc.communicate(timeout=600)[0]
  problems = [] if proc.returncode == 0 else [f"final run exited {proc.returncode}: {out[-2000:]}"]
  if not problems:
    problems = compare(wd, ref, atol=1e-5 if kind == "mesh" else 0.0)
  resumed = [l for l in out.splitlines() if "state: resumed" in l or "state: scratch" in l]
  return {"trial": index, "kind": kind, "kills": events, "passed": not problems,
          "problems": problems, "final_origin": resumed[-1].split("] ")[-1] if resumed else None}


def run_trials(root: Path, kinds: list[str], seed: int = 0, kills: int | None = None,
               log=print) -> list[dict]:
  """Runs one trial per entry of ``kinds``; ``kills`` fixes the kills per trial (else random)."""
  rng = np.random.default_rng(seed)
  ref = reference(root)
  results = []
  for i, kind in enumerate(kinds):
    r = trial(root, ref, i, kind, rng, kills)
    log(f"trial {i} ({kind}): {'passed' if r['passed'] else 'FAILED'}: "
        + "; ".join(e["moment"] + ("" if e["killed"] else " (finished first)")
                    + (" [mid-save]" if e.get("mid_save") else "") for e in r["kills"])
        + ("" if r["passed"] else "\n  " + "\n  ".join(r["problems"])))
    results.append(r)
  return results


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--trials", type=int, default=12)
  ap.add_argument("--root", default="/tmp/vlora_kill_trials")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--out", help="JSON file for the results")
  args = ap.parse_args()
  kinds = [("random", "save", "mesh")[i % 3] for i in range(args.trials)]
  results = run_trials(Path(args.root), kinds, args.seed)
  passed = sum(r["passed"] for r in results)
  kills = sum(e["killed"] for r in results for e in r["kills"])
  mid = sum(bool(e.get("mid_save")) for r in results for e in r["kills"] if e["killed"])
  print(f"{passed}/{len(results)} trials passed ({kills} SIGKILLs, {mid} of them mid-save)")
  if args.out:
    Path(args.out).write_text(json.dumps({"passed": passed, "trials": len(results), "kills": kills,
                                          "mid_save_kills": mid, "results": results}, indent=1))
  sys.exit(0 if passed == len(results) else 1)


if __name__ == "__main__":
  main()
