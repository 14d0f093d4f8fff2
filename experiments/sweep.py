"""Runs a sweep of ``configs/sweeps.py`` locally, one point after another, and collects the results.

  python experiments/sweep.py --sweep paper_digits                 # run (resumes) + collect
  python experiments/sweep.py --sweep paper_digits --list          # the points, nothing run
  python experiments/sweep.py --sweep paper --collect              # gather finished points only
  python experiments/sweep.py --sweep ablate_digits --override num_train_steps=300

Each point trains in ``<root>/<sweep>/<point id>`` through the library (``train_and_evaluate``, the
same code as ``python -m vlora_jax.main``); a point whose ``summary.json`` reached the last step is
skipped, so a killed sweep picks up where it stopped. ``<root>/<sweep>/results.json`` gets one row
per finished point: its tags, the metric, parameter counts and times. A point that fails is
recorded with its error and the sweep goes on.

Runs in-process: one Python start-up and import for the sweep (~5 s a run saved on CPU), while
every point still compiles its own program as a separate launch would.
"""

from __future__ import annotations

import argparse
import ast
import json
import time
import traceback
from pathlib import Path

from configs import sweeps

ROOT = Path(__file__).resolve().parent.parent

KEEP = ("step", "eval/accuracy", "eval/loss", "train/accuracy", "train/loss", "params_total",
        "params_trainable", "params_dense_equivalent", "params_groups", "train_time_s",
        "wall_time_s", "compile_train_step_s", "examples_per_sec", "tokens_per_sec")


def _finished(workdir: Path, steps: int) -> dict | None:
  f = workdir / "summary.json"
  if not f.exists():
    return None
  s = json.loads(f.read_text())
  return s if s.get("step") == steps else None


def _config(point: dict, extra: dict | None):
  from vlora_jax.train import load_config
  return load_config(str(ROOT / point["config"]), **{**point["overrides"], **(extra or {})})


def parse_override(text: str) -> tuple[str, object]:
  """``'optim.lr=3e-4'`` -> ``('optim.lr', 0.0003)``: a Python literal where it parses, else
  text."""
  key, _, value = text.partition("=")
  try:
    return key, ast.literal_eval(value)
  except (ValueError, SyntaxError):
    return key, value


def run(name: str, root: Path, extra: dict | None = None, only: str | None = None,
        log=print) -> list[dict]:
  """Trains every unfinished point of sweep ``name``; returns the collected rows."""
  from vlora_jax.train import metrics, train_and_evaluate
  metrics.quiet_libraries()
  points = [p for p in sweeps.get(name) if only is None or only in p["id"]]
  for i, p in enumerate(points):
    wd = root / name / p["id"]
    config = _config(p, extra)
    if _finished(wd, config.num_train_steps):
      continue
    log(f"[{i + 1}/{len(points)}] {p['id']}")
    t0 = time.time()
    try:
      train_and_evaluate(config, wd)
    except Exception as e:  # noqa: BLE001 -- record it, keep sweeping
      (wd / "error.txt").parent.mkdir(parents=True, exist_ok=True)
      (wd / "error.txt").write_text(traceback.format_exc())
      log(f"  FAILED after {time.time() - t0:.0f} s: {type(e).__name__}: {e}")
  return collect(name, root, extra)


def collect(name: str, root: Path, extra: dict | None = None) -> list[dict]:
  """One row per finished point (tags + summary figures), written to ``results.json``."""
  rows = []
  for p in sweeps.get(name):
    wd = root / name / p["id"]
    s = _finished(wd, _config(p, extra).num_train_steps)
    if s is None:
      continue
    rows.append({"id": p["id"], **p["tags"], **{k: s.get(k) for k in KEEP}})
  out = root / name / "results.json"
  if not rows and out.exists():  # e.g. collected without the --override the runs used
    print(f"{name}: no finished point found; {out} left as it was", flush=True)
    return rows
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(rows, indent=1))
  return rows


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--sweep", required=True, action="append",
                  help=f"one of {sorted(sweeps.SWEEPS)} (repeatable); 'paper' = all paper_*")
  ap.add_argument("--root", default=str(ROOT / "runs" / "sweeps"), help="workdirs and results")
  ap.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                  help="dotted config key for every point, e.g. num_train_steps=300")
  ap.add_argument("--only", help="run only points whose id contains this")
  ap.add_argument("--list", action="store_true", help="print the points and exit")
  ap.add_argument("--collect", action="store_true",
                  help="train nothing: only gather the finished points into results.json "
                  "(all of them: --only does not apply)")
  args = ap.parse_args()
  names = [n for s in args.sweep for n in (sweeps.PAPER if s == "paper" else [s])]
  extra = dict(parse_override(o) for o in args.override)
  for name in names:
    if args.list:
      for p in sweeps.get(name):
        print(p["id"], p["config"], p["overrides"])
      continue
    rows = (collect(name, Path(args.root), extra) if args.collect
            else run(name, Path(args.root), extra, args.only))
    print(f"{name}: {len(rows)}/{len(sweeps.get(name))} points finished "
          f"-> {Path(args.root) / name / 'results.json'}", flush=True)


if __name__ == "__main__":
  main()
