"""Runs a sweep of ``configs/sweeps.py`` locally, one point after another, and collects the results.

  python -m experiments.sweep --sweep paper_digits                 # run (resumes) + collect
  python -m experiments.sweep --sweep paper_digits --list          # the points, nothing run
  python -m experiments.sweep --sweep paper --collect              # gather finished points only
  python -m experiments.sweep --sweep ablate_digits --override num_train_steps=300

Each point trains in ``<root>/<sweep>/<point id>`` through the library (``train_and_evaluate``, the
same code as ``python -m vlora_jax.main``); a point whose ``summary.json`` reached the last step is
skipped, so a killed sweep picks up where it stopped. ``<root>/<sweep>/results.json`` gets one row
per finished point: its tags, the metric, parameter counts and times, the code revision that
trained it and the hash of its config. A point that fails is recorded with its error and the sweep
goes on.

A finished point is reused only for the config it ran: its workdir keeps ``point.json`` (the
revision and the config hash; for older runs the config stored in the checkpoint is compared). A
point whose declared config changed since is refused, in ``run`` and in ``collect``, with the
workdir to move away: its figures belong to another experiment.

Runs in-process: one Python start-up and import for the sweep (~5 s a run saved on CPU), while
every point still compiles its own program as a separate launch would.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

from configs import sweeps  # noqa: E402

KEEP = ("step", "eval/accuracy", "eval/loss", "test/accuracy", "test/loss", "train/accuracy",
        "train/loss", "params_total",
        "params_trainable", "params_dense_equivalent", "params_groups", "train_time_s",
        "wall_time_s", "compile_train_step_s", "examples_per_sec", "tokens_per_sec")
RECORD = ("revision", "config_hash")  # what trained the row (point.json)


# Where the data lives is not what a run computes: a moved checkout or $VLORA_DATA keeps the hash.
_LOCATIONS = ("path", "dir", "data_dir")


def _hash_json(cfg: dict) -> str:
  cfg = dict(cfg, data={k: v for k, v in cfg.get("data", {}).items() if k not in _LOCATIONS})
  return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]


def config_hash(config) -> str:
  """A short hash of the config, as its checkpoints store it (JSON, sorted keys), without the
  data's location."""
  return _hash_json(json.loads(config.to_json_best_effort()))


def code_revision() -> str:
  """The git commit of the checkout (``-dirty`` with uncommitted changes), or 'unknown'."""
  try:
    rev = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                           check=True, capture_output=True, text=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "unknown"
  return rev + ("-dirty" if dirty else "")


class StalePoint(ValueError):
  """A finished point whose config is not the one declared now."""


def _recorded_hash(workdir: Path) -> str | None:
  """The config hash a finished point ran with: its ``point.json``, else its checkpoint's."""
  record = workdir / "point.json"
  if record.exists():
    return json.loads(record.read_text())["config_hash"]
  try:
    from vlora_jax.runs import checkpoint_format
    saved = checkpoint_format.meta_at(str(workdir))["config"]
  except (OSError, ValueError, KeyError):
    return None
  return _hash_json(saved)


def _flat(tree: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[prefix + k] = v
  return out


def _same_but_new_keys(workdir: Path, config) -> bool:
  """True if the config the point's checkpoint stores equals ``config`` on every key it has: the
  declared config differs only by keys added to the defaults since, which the run did not know
  (a new option, off by default, computes what the run computed)."""
  try:
    from vlora_jax.runs import checkpoint_format
    saved = _flat(checkpoint_format.meta_at(str(workdir))["config"])
  except (OSError, ValueError, KeyError):
    return False
  now = _flat(json.loads(config.to_json_best_effort()))
  where = {f"data.{k}" for k in _LOCATIONS}
  return all(k in now and (k in where or now[k] == v) for k, v in saved.items())


def _finished(workdir: Path, config) -> dict | None:
  """The summary of a point that ran to the end with ``config``; None if it did not finish.

  Raises `StalePoint` if it finished with another config.
  """
  f = workdir / "summary.json"
  if not f.exists():
    return None
  s = json.loads(f.read_text())
  if s.get("step") != config.num_train_steps:
    return None
  if _recorded_hash(workdir) != config_hash(config) and not _same_but_new_keys(workdir, config):
    raise StalePoint(f"{workdir}: finished with a config other than the one declared now; move "
                     "the workdir away to rerun the point")
  record = workdir / "point.json"
  return {**s, **(json.loads(record.read_text()) if record.exists() else {})}


def _config(point: dict, extra: dict | None):
  from vlora_jax.train import load_config
  return load_config(str(ROOT / point["config"]), **{**point["overrides"], **(extra or {})})


def parse_override(text: str) -> tuple[str, object]:
  """``'optim.lr=3e-4'`` -> ``('optim.lr', 0.0003)``: the value read as the command lines read
  theirs (`vlora_jax.config.overrides.parse_value`: a Python literal where it parses, else text)."""
  from vlora_jax.config import overrides
  key, _, value = text.partition("=")
  return key, overrides.parse_value(value, None)


def run(name: str, root: Path, extra: dict | None = None, only: str | None = None,
        log=print) -> list[dict]:
  """Trains every unfinished point of sweep ``name``; returns the collected rows."""
  from vlora_jax.train import metrics
  metrics.quiet_libraries()
  points = [p for p in sweeps.get(name) if only is None or only in p["id"]]
  revision = code_revision()  # the code this sweep runs, whatever is committed meanwhile
  for i, p in enumerate(points):
    wd = root / name / p["id"]
    config = _config(p, extra)
    try:
      if _finished(wd, config):
        continue
      # A point that started under another config must not resume under this one.
      if (wd / "checkpoints").exists() and _recorded_hash(wd) not in (None, config_hash(config)):
        raise StalePoint(f"{wd}: started with a config other than the one declared now; move the "
                         "workdir away to rerun the point")
    except StalePoint as e:
      log(f"[{i + 1}/{len(points)}] {p['id']}: SKIPPED: {e}")
      continue
    log(f"[{i + 1}/{len(points)}] {p['id']}")
    train_point(config, wd, revision, log)
  return collect(name, root, extra)


def train_point(config, wd: Path, revision: str, log=print) -> bool:
  """Trains one point in ``wd`` and records what trained it (``point.json``); a failure is written
  to ``wd/error.txt`` and logged, not raised, so that a sweep goes on. True if it finished."""
  from vlora_jax.train import train_and_evaluate
  t0 = time.time()
  try:
    train_and_evaluate(config, wd)
    (wd / "point.json").write_text(json.dumps(
        {"revision": revision, "config_hash": config_hash(config)}, indent=1))
    return True
  except Exception as e:  # noqa: BLE001 -- record it, keep sweeping
    (wd / "error.txt").parent.mkdir(parents=True, exist_ok=True)
    (wd / "error.txt").write_text(traceback.format_exc())
    log(f"  FAILED after {time.time() - t0:.0f} s: {type(e).__name__}: {e}")
    return False


def collect(name: str, root: Path, extra: dict | None = None) -> list[dict]:
  """One row per finished point (tags + summary figures), written to ``results.json``."""
  rows = []
  for p in sweeps.get(name):
    wd = root / name / p["id"]
    try:
      s = _finished(wd, _config(p, extra))
    except StalePoint as e:
      print(f"left out: {e}", flush=True)
      continue
    if s is None:
      continue
    rows.append({"id": p["id"], **p["tags"], **{k: s.get(k) for k in KEEP + RECORD}})
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
