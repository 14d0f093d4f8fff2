"""A workdir's files belong to one run: the run lock, ``metrics.jsonl`` cut back on resume and
written whole, every checkpoint save checked, and a damaged ``best/`` step set aside.

(Damaged latest checkpoints and full disks at save: test_reliability.py.)
"""

import errno
import json
import logging
import os
import shutil
import socket
import textwrap
import threading

import jax
import numpy as np
import pytest
from helpers_train import run_py, tiny

from vlora_jax import errors
from vlora_jax.train import checkpoint, train_and_evaluate
from vlora_jax.train import metrics as metrics_lib

STEPS = 4
# A constant rate: these runs are resumed with more steps, which a cosine schedule refuses.
EVERY_2 = {"num_train_steps": STEPS, "eval_every_steps": 2, "checkpoint.every_steps": 2,
           "checkpoint.keep": 10, "checkpoint.keep_best": 2, "optim.schedule": "constant"}


def config(**overrides):
  return tiny("vit", **{**EVERY_2, **overrides})


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """A finished run of 4 steps: eval and checkpoints (latest and best) at steps 2 and 4."""
  d = tmp_path_factory.mktemp("finished")
  train_and_evaluate(config(), d)
  return d


def _rows(workdir) -> list[dict]:
  """The rows of ``metrics.jsonl``; fails if any line does not parse or is not complete."""
  text = (workdir / "metrics.jsonl").read_text()
  assert text.endswith("\n")
  return [json.loads(line) for line in text.splitlines()]


def _steps(rows, prefix: str) -> list[int]:
  return [r["step"] for r in rows if any(k.startswith(prefix) for k in r)]


def _files(d) -> dict:
  """Every file under ``d``: its modification time and contents."""
  return {str(p.relative_to(d)): (p.stat().st_mtime_ns, p.read_bytes())
          for p in sorted(d.rglob("*")) if p.is_file()}


def _warnings(caplog) -> list[str]:
  return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


HOLD = textwrap.dedent("""
    import time
    from vlora_jax.train import workdir
    with workdir.hold(%r):
      print("HELD", flush=True)
      time.sleep(300)
    """)


def _hold_in_child(workdir):
  """Another process that holds the workdir's lock (as a run would) until it is killed."""
  proc = run_py(HOLD % str(workdir), wait=False)
  out = []
  for line in proc.stdout:
    out.append(line)
    if line.strip() == "HELD":
      return proc
  proc.wait()
  raise AssertionError("the child never took the lock:\n" + "".join(out)[-3000:])


# ------------------------------------------------------------------------------------- the lock


def test_a_second_run_in_a_busy_workdir_is_refused_and_touches_nothing(finished, tmp_path):
  run = tmp_path / "run"
  shutil.copytree(finished, run)
  holder = _hold_in_child(run)
  try:
    record = json.loads((run / "run.lock").read_text())
    before = _files(run)
    with pytest.raises(errors.WorkdirError) as e:
      train_and_evaluate(config(num_train_steps=6), run)  # it would train steps 5 and 6
    message = str(e.value)
    assert f"pid {holder.pid} on host {socket.gethostname()}" in message, message
    assert f"started {record['started']}" in message and "choose another --workdir" in message
    assert _files(run) == before  # the same files, contents and modification times
  finally:
    holder.kill()
    holder.wait()


def test_the_lock_of_a_killed_run_is_taken_over(tmp_path, caplog):
  holder = _hold_in_child(tmp_path)
  holder.kill()  # SIGKILL: no clean-up ran; the kernel dropped the lock
  holder.wait()
  assert json.loads((tmp_path / "run.lock").read_text())["pid"] == holder.pid
  with caplog.at_level(logging.WARNING):
    s = train_and_evaluate(config(), tmp_path)
  assert s["step"] == STEPS
  assert any(f"pid {holder.pid} on host {socket.gethostname()}" in m and "taking it over" in m
             for m in _warnings(caplog)), _warnings(caplog)
  assert (tmp_path / "run.lock").read_text() == ""  # released: the next run starts silently


def test_a_second_run_in_the_same_process_is_refused(tmp_path):
  inside, go, first = threading.Event(), threading.Event(), {}

  def init_params(abstract_params, config):  # called while the first run holds the workdir
    inside.set()
    assert go.wait(120)
    return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract_params)

  def run_first():
    try:
      first["summary"] = train_and_evaluate(config(), tmp_path, init_params=init_params)
    except BaseException as e:  # noqa: BLE001 -- reported by the main thread
      first["error"] = e

  thread = threading.Thread(target=run_first)
  thread.start()
  try:
    assert inside.wait(120), first
    with pytest.raises(errors.WorkdirError, match=rf"pid {os.getpid()} on host .*this process"):
      train_and_evaluate(config(), tmp_path)
  finally:
    go.set()
    thread.join(120)
  assert "error" not in first, first
  assert first["summary"]["step"] == STEPS
  rows = _rows(tmp_path)
  assert _steps(rows, "train/") == [1, 2, 3, 4] and _steps(rows, "eval/") == [2, 4]


# ------------------------------------------------------------------------------- metrics.jsonl


def test_metrics_are_cut_back_to_the_restored_step(finished, tmp_path):
  """Died after checkpointing step 2, with rows of steps 3-5 and half a row written; resumed
  to 6: every step once, every line whole. (Its best/4 is replaced, not a failed save.)"""
  run = tmp_path / "run"
  shutil.copytree(finished, run)
  shutil.rmtree(run / "checkpoints" / "4")
  with open(run / "metrics.jsonl", "a") as f:
    f.write(json.dumps({"step": 5, "train/loss": 9.0}) + "\n")
    f.write('{"step": 5, "train/lo')  # the kill hit mid-row
  s = train_and_evaluate(config(num_train_steps=6), run)
  assert s["start_step"] == 2 and s["step"] == 6
  rows = _rows(run)
  assert _steps(rows, "train/") == [1, 2, 3, 4, 5, 6]
  assert _steps(rows, "eval/") == [2, 4, 6]
  assert [r for r in rows if r["step"] <= 2] == [r for r in _rows(finished) if r["step"] <= 2]
  assert sorted(int(p.name) for p in (run / "best").iterdir() if p.name.isdigit()) == [4, 6]
  # started again when finished: it only evaluates, and its eval row replaces the old one
  train_and_evaluate(config(num_train_steps=6), run)
  rows = _rows(run)
  assert _steps(rows, "train/") == [1, 2, 3, 4, 5, 6] and _steps(rows, "eval/") == [2, 4, 6]


class _FullDisk:
  """``os`` as metrics.py sees it: from the ``fail_at``-th ``write`` on, the disk is full."""

  def __init__(self, fail_at: int, short: bool):
    self.fail_at, self.short, self.calls = fail_at, short, 0

  def __getattr__(self, name):
    return getattr(os, name)

  def write(self, fd, data):
    self.calls += 1
    if self.calls < self.fail_at:
      return os.write(fd, data)
    n = os.write(fd, data[: len(data) // 2])  # part of the row reaches the file
    if self.short:
      return n  # the write comes up short
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("short", [True, False], ids=["short_write", "enospc"])
def test_a_failed_metrics_write_leaves_no_half_row(short, tmp_path, monkeypatch):
  w = metrics_lib.Writer(tmp_path, tensorboard=False, resume_step=0)
  w.write(1, {"train/loss": 1.0})
  monkeypatch.setattr(metrics_lib, "os", _FullDisk(1, short))
  with pytest.raises(errors.WorkdirError) as e:
    w.write(2, {"train/loss": 0.5})
  message = str(e.value)
  assert "metrics.jsonl" in message and "step 2" in message and "checkpoints are untouched" in message
  assert ("only" in message) if short else ("ENOSPC" in message)
  w.close()
  assert _rows(tmp_path) == [{"step": 1, "train/loss": 1.0}]


def test_a_full_disk_for_the_metrics_stops_the_run_and_rerunning_resumes(finished, tmp_path,
                                                                         monkeypatch):
  # rows: step 1, step 2, eval at 2, step 3 <- the disk is full here (checkpoint 2 is saved)
  monkeypatch.setattr(metrics_lib, "os", _FullDisk(4, short=False))
  with pytest.raises(errors.WorkdirError, match=r"metrics.jsonl: writing the metrics of step 3"):
    train_and_evaluate(config(), tmp_path)
  monkeypatch.undo()
  assert _steps(_rows(tmp_path), "train/") == [1, 2]
  assert (tmp_path / "run.lock").read_text() == ""  # released on the error
  s = train_and_evaluate(config(), tmp_path)
  assert s["start_step"] == 2 and s["step"] == STEPS
  rows = _rows(tmp_path)
  assert _steps(rows, "train/") == [1, 2, 3, 4] and _steps(rows, "eval/") == [2, 4]
  losses = lambda rs, k: {r["step"]: r[k] for r in rs if k in r}
  for k in ("train/loss", "eval/loss"):  # as if nothing had happened
    assert losses(rows, k) == losses(_rows(finished), k)


# ----------------------------------------------------------------------------------- checkpoints


class _Manager:
  """An Orbax manager reduced to what `Checkpointer` relies on: a background save that failed
  raises at the next wait (or save, or close), once."""

  def __init__(self):
    self.failure, self.steps, self.closed = None, [], False

  def wait_until_finished(self):
    failure, self.failure = self.failure, None
    if failure:
      raise failure

  def save(self, step, **kwargs):
    self.wait_until_finished()
    self.steps.append(step)
    return True

  def all_steps(self):
    return list(self.steps)

  def close(self):
    self.wait_until_finished()
    self.closed = True


def test_every_async_save_is_checked(tmp_path):
  ckpt = checkpoint.Checkpointer.of_config(tmp_path, config().checkpoint, {})
  ckpt.latest.close()
  ckpt.best.close()
  ckpt.latest, ckpt.best = _Manager(), _Manager()
  # The last finished save on disk (a step whose state directory Orbax renamed into place).
  (tmp_path / "checkpoints" / "2" / "state").mkdir(parents=True)
  state, metrics = {"w": np.ones(3, np.float32)}, {"eval/accuracy": 0.5}
  disk_full = OSError(errno.ENOSPC, "No space left on device")

  ckpt.save_best(2, state, metrics)
  ckpt.best.failure = disk_full  # best step 2 failed in the background
  with pytest.raises(errors.WorkdirError, match=r"saving best checkpoint step 2 \(in the "
                                                r"background\).*No space.*checkpoints/2"):
    ckpt.save_best(4, state, metrics)
  ckpt.save_best(4, state, metrics)
  ckpt.best.failure = disk_full
  with pytest.raises(errors.WorkdirError, match=r"best checkpoint step 4 \(in the background"):
    ckpt.wait()
  ckpt.save(6, state)
  ckpt.latest.failure = disk_full
  with pytest.raises(errors.WorkdirError, match=r"saving checkpoint step 6 \(in the background"):
    ckpt.close()
  assert ckpt.latest.closed and ckpt.best.closed
  ckpt.close()  # a second close (the trainer's, on an error) does nothing


def _truncate(f):
  f.write_text(f.read_text()[: len(f.read_text()) // 2])


BEST_DAMAGE = {
    "metrics_truncated": lambda d: _truncate(d / "metrics" / "metrics"),
    "metric_missing": lambda d: (d / "metrics" / "metrics").write_text('{"eval/loss": 1.0}'),
    "step_metadata_truncated": lambda d: _truncate(d / "_CHECKPOINT_METADATA"),
    "state_deleted": lambda d: shutil.rmtree(d / "state"),
}


@pytest.mark.parametrize("damage", sorted(BEST_DAMAGE))
def test_a_damaged_best_step_is_set_aside(damage, finished, tmp_path, caplog):
  run = tmp_path / "run"
  shutil.copytree(finished, run)
  BEST_DAMAGE[damage](run / "best" / "4")
  with caplog.at_level(logging.WARNING):
    ckpt = checkpoint.Checkpointer.of_config(run, config().checkpoint, {})
  assert ckpt.best.all_steps() == [2]
  ckpt.close()
  assert [p.name.split("-")[0] for p in (run / "best.bad").iterdir()] == ["4"]
  assert any("damaged best checkpoint" in m and "step 4:" in m for m in _warnings(caplog))


def test_a_run_with_a_damaged_best_step_resumes_from_the_latest(finished, tmp_path):
  run = tmp_path / "run"
  shutil.copytree(finished, run)
  _truncate(run / "best" / "4" / "metrics" / "metrics")  # Orbax reads it when opening best/
  s = train_and_evaluate(config(num_train_steps=6), run)
  assert s["start_step"] == STEPS and s["step"] == 6 and s["origin"].startswith("resumed")
  assert sorted(p.name for p in (run / "best").iterdir() if p.name.isdigit()) == ["2", "6"]
  assert _steps(_rows(run), "train/") == [1, 2, 3, 4, 5, 6]
