"""A full disk, simulated with RLIMIT_FSIZE in a subprocess, during a checkpoint save and during a
metrics write: a clear `WorkdirError`, nothing mixed; the rerun (without the limit) ends
bitwise-equal to the uninterrupted run, with a clean ``metrics.jsonl``.

The limit is set in the middle of the run (at a chosen step), so that earlier checkpoints are
complete, as after a disk that filled up during training. Python ignores SIGXFSZ, so a write past
the limit fails with EFBIG, as one on a full disk fails with ENOSPC.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers_train import result, run_py, tiny

from vlora_jax.runs import checkpoint_format
from vlora_jax.train import checkpoint as ckpt_lib
from vlora_jax.train import train_and_evaluate

STEPS = 8
OVERRIDES = {"checkpoint.every_steps": 2}

DRIVER = """
import json, os, resource
from helpers_train import tiny
from vlora_jax import errors
from vlora_jax.train import checkpoint as ckpt_lib, loop as loop_lib, train_and_evaluate
workdir, where, at = os.environ["WORKDIR"], os.environ["WHERE"], int(os.environ["AT"])

def limit(nbytes):
  resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, resource.RLIM_INFINITY))

if where == "save":  # checkpoint files (tens of KB) no longer fit; metrics rows still do
  save = ckpt_lib.Checkpointer.save
  def limited_save(self, step, state):
    if step == at:
      self.wait()  # the previous save completes first: the disk fills during this one
      limit(8_000)
    return save(self, step, state)
  ckpt_lib.Checkpointer.save = limited_save
else:  # the next metrics row does not fit
  absorb = loop_lib.Loop.absorb
  def limited_absorb(self, step_done, m):
    if step_done == at:
      self.ckpt.wait()  # the step-2 save completes first: the disk fills after it
      limit(os.path.getsize(os.path.join(workdir, "metrics.jsonl")) + 40)
    absorb(self, step_done, m)
  loop_lib.Loop.absorb = limited_absorb
try:
  train_and_evaluate(tiny("vit", num_train_steps=%(steps)d, **%(overrides)r), workdir)
  out = {"error": None}
except errors.UserError as e:
  out = {"error": type(e).__name__, "message": str(e)}
print("RESULT " + json.dumps(out), flush=True)
"""


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  wd = tmp_path_factory.mktemp("straight")
  train_and_evaluate(tiny("vit", num_train_steps=STEPS, **OVERRIDES), wd)
  return checkpoint_format.read_path(str(wd))["params"]


def _rows(workdir):
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  return [json.loads(line) for line in lines]  # every line parses: no half row


@pytest.mark.slow
@pytest.mark.parametrize("where,at,names", [
    ("save", 4, ("saving checkpoint step 4", "last good checkpoint is kept", "checkpoints/2")),
    ("metrics", 3, ("metrics.jsonl", "step 3", "checkpoints are untouched"))])
def test_a_full_disk_stops_cleanly_and_the_rerun_is_bitwise_equal(where, at, names, straight,
                                                                   tmp_path):
  proc = run_py(DRIVER % {"steps": STEPS, "overrides": OVERRIDES},
                env={"WORKDIR": str(tmp_path), "WHERE": where, "AT": str(at)})
  out = result(proc.stdout + proc.stderr)
  assert out["error"] == "WorkdirError", out
  assert all(n in out["message"] for n in names), out["message"]
  steps = [r["step"] for r in _rows(tmp_path) if "train/loss" in r]
  assert steps == sorted(set(steps)), steps  # nothing twice, whatever was cut
  assert (tmp_path / "checkpoints" / "2").is_dir()  # the last good checkpoint is kept

  summary = train_and_evaluate(tiny("vit", num_train_steps=STEPS, **OVERRIDES), tmp_path)
  assert summary["step"] == STEPS and summary["start_step"] in (2, 4)
  got = checkpoint_format.read_path(str(tmp_path))["params"]
  import jax
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(straight)):
    assert np.array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))
  rows = _rows(tmp_path)
  train = [r["step"] for r in rows if "train/loss" in r]
  assert train == list(range(1, STEPS + 1)), train  # every step once, in order
