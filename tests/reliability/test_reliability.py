"""Nothing is lost: corrupt checkpoints are skipped, failed saves keep the last good one, a workdir
that cannot hold the run is refused at start, and non-finite states are never saved.

(Kills at random moments: test_kill_resume.py. Bad configs: test_train_validate.py.)
"""

import logging
import shutil
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers_runs import delete_data, flip_a_bit, truncate_data, truncate_meta
from helpers_train import result, run_py, tiny

from vlora_jax import errors
from vlora_jax.runs import checkpoint_format
from vlora_jax.train import train_and_evaluate

STEPS = 4
KEEP_ALL = {"num_train_steps": STEPS, "checkpoint.every_steps": 1, "checkpoint.keep": 10}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  """One uninterrupted run with a checkpoint after every step."""
  d = tmp_path_factory.mktemp("straight")
  return d, train_and_evaluate(tiny("vit", **KEEP_ALL), d)


def _half_written(step_dir):
  # a step directory that lost its state item (e.g. copied by hand, or a non-atomic file system)
  shutil.rmtree(step_dir / "state")


def _identical(a, b) -> bool:
  return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("damage", [truncate_data, delete_data, flip_a_bit, truncate_meta, _half_written],
                         ids=lambda f: f.__name__.strip("_"))
def test_a_bad_newest_checkpoint_is_skipped_with_a_warning(damage, straight, tmp_path, caplog):
  ref, ref_summary = straight
  run = tmp_path / "run"
  shutil.copytree(ref, run)
  damage(run / "checkpoints" / str(STEPS))
  with caplog.at_level(logging.WARNING):
    s = train_and_evaluate(tiny("vit", **KEEP_ALL), run)
  # resumed from the newest good checkpoint (3), redid step 4: the same result as straight
  assert s["start_step"] == STEPS - 1 and s["step"] == STEPS
  warned = [r.getMessage() for r in caplog.records if "skipped 1 newer checkpoint" in r.getMessage()]
  assert warned and f"step {STEPS}:" in warned[0] and "resuming from step 3" in warned[0], \
      [r.getMessage() for r in caplog.records][-5:]
  moved = list((run / "checkpoints.bad").iterdir())
  assert [p.name.split("-")[0] for p in moved] == [str(STEPS)]  # kept for inspection
  a = checkpoint_format.read_path(str(run), params_only=False)
  b = checkpoint_format.read_path(str(ref), params_only=False)
  assert _identical(a, b)
  assert s["eval/loss"] == ref_summary["eval/loss"]


def test_the_fingerprint_catches_what_storage_does_not(straight):
  ref, _ = straight
  state = checkpoint_format.read_path(str(ref), params_only=False)
  prints, finite = checkpoint_format.fingerprint(state)
  assert finite and len(prints) == len(jax.tree.leaves(state))
  leaf = state["params"]["head"]["kernel"]
  swapped = leaf.copy()
  swapped[[0, 1]] = swapped[[1, 0]]  # same values, other places: the weighted sum must notice
  state["params"]["head"]["kernel"] = swapped
  assert checkpoint_format.fingerprint(state)[0] != prints
  state["params"]["head"]["kernel"] = np.full_like(leaf, np.nan)
  assert not checkpoint_format.fingerprint(state)[1]


def test_a_host_state_that_every_process_reads_is_counted_once(monkeypatch):
  """A checkpoint read into numpy (a teacher, a compress source) is whole on every process: two
  processes must give the one-process fingerprint, not twice its sums."""
  from jax.experimental import multihost_utils
  host = {"w": np.arange(12, dtype=np.float32).reshape(3, 4) - 5, "b": np.ones(3, jnp.bfloat16)}
  one = checkpoint_format.fingerprint(host)
  other = checkpoint_format._local_sums(jax.tree.leaves(host), 1)[0]  # process 1's share
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(multihost_utils, "process_allgather",
                      lambda x: np.stack([x, other if np.ndim(x) == 2 else x]))
  assert checkpoint_format.fingerprint(host) == one
  monkeypatch.undo()
  host["b"] = np.array([1, np.inf, 2], jnp.bfloat16)  # numpy does not call bfloat16 floating
  assert not checkpoint_format.fingerprint(host)[1]


def test_when_no_checkpoint_restores_nothing_is_moved(straight, tmp_path):
  ref, _ = straight
  run = tmp_path / "run"
  shutil.copytree(ref, run)
  steps = sorted(p for p in (run / "checkpoints").iterdir() if p.name.isdigit())
  for p in steps:
    truncate_meta(p)
  with pytest.raises(errors.CheckpointError, match=r"(?s)no checkpoint .* restores:.*step 4:"
                                                       r".*step 1:.*Nothing was moved"):
    train_and_evaluate(tiny("vit", **KEEP_ALL), run)
  assert sorted(p for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == steps


@pytest.mark.parametrize("where", ["under_a_file", "read_only_fs"])
def test_an_unwritable_workdir_fails_at_start(where, tmp_path):
  if where == "under_a_file":
    (tmp_path / "file").write_text("x")
    workdir = tmp_path / "file" / "run"
  else:
    workdir = "/proc/vlora_jax_run"  # a file system nobody can create directories in
  with pytest.raises(errors.WorkdirError, match=r"workdir=.*cannot write there"):
    train_and_evaluate(tiny("vit"), workdir)


FULL_DISK = textwrap.dedent("""
    import json, resource, signal
    from helpers_train import tiny
    from vlora_jax import errors
    from vlora_jax.train import train_and_evaluate
    # The disk fills up: no file may grow past %(limit)d bytes (checkpoint files are larger; the
    # metrics log is not). SIGXFSZ ignored, so a write that crosses it fails with EFBIG.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (%(limit)d, %(limit)d))
    try:
      train_and_evaluate(tiny("vit", **%(keep)r), "%(run)s")
      out = {"raised": None}
    except errors.WorkdirError as e:
      out = {"raised": type(e).__name__, "message": str(e)}
    print("RESULT " + json.dumps(out), flush=True)
    """)


@pytest.mark.slow
def test_a_full_disk_at_save_keeps_the_last_good_checkpoint(straight, tmp_path):
  ref, ref_summary = straight
  run = tmp_path / "run"
  shutil.copytree(ref, run)
  for p in (run / "checkpoints").iterdir():
    if p.name.isdigit() and int(p.name) > 2:
      shutil.rmtree(p)  # as if the run had stopped after step 2
  proc = run_py(FULL_DISK % {"limit": 40_000, "keep": KEEP_ALL, "run": run})
  out = result(proc.stdout)
  assert out["raised"] == "WorkdirError", proc.stdout[-3000:]
  assert "saving checkpoint step 3" in out["message"]
  assert "The last good checkpoint is kept" in out["message"] and "checkpoints/2" in out["message"]
  # the same command with space again: resumes from 2 and ends where the straight run did
  s = train_and_evaluate(tiny("vit", **KEEP_ALL), run)
  assert s["start_step"] == 2 and s["step"] == STEPS
  assert _identical(checkpoint_format.read_path(str(run), params_only=False),
                    checkpoint_format.read_path(str(ref), params_only=False))
  assert s["eval/loss"] == ref_summary["eval/loss"]


def test_a_workdir_without_room_for_the_checkpoints_fails_at_start(tmp_path, monkeypatch):
  import shutil as shutil_mod
  from collections import namedtuple
  usage = namedtuple("usage", "total used free")
  monkeypatch.setattr(shutil_mod, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
  with pytest.raises(errors.WorkdirError, match=r"MiB free, but the checkpoints need about"):
    train_and_evaluate(tiny("vit"), tmp_path)
