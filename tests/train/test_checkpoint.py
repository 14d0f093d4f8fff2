"""Checkpoints: resume == straight run, restore across device counts, layout check, atomicity."""

import json
import shutil
import textwrap

import jax
import numpy as np
import pytest
from helpers_train import result, run_py, tiny

from vlora_jax import errors
from vlora_jax.runs import checkpoint_format
from vlora_jax.train import train_and_evaluate

STEPS = 4
KEEP_ALL = {"num_train_steps": STEPS, "checkpoint.every_steps": 1, "checkpoint.keep": 10}


def _max_diff(a, b) -> float:
  assert jax.tree.structure(a) == jax.tree.structure(b)
  return max(float(np.max(np.abs(np.asarray(x, np.float64) - y)))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _crash_after(src, dst, step: int):
  """A copy of a run as if it had died after checkpointing ``step`` (later steps lost)."""
  shutil.copytree(src, dst)
  for p in (dst / "checkpoints").iterdir():
    if p.name.isdigit() and int(p.name) > step:
      shutil.rmtree(p)
  return dst


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  """One device, 4 steps in one go, a checkpoint after every step."""
  d = tmp_path_factory.mktemp("straight")
  summary = train_and_evaluate(tiny("vit", **KEEP_ALL), d)
  return d, summary


def test_resume_equals_straight_run_and_ignores_unfinished_saves(straight, tmp_path):
  ref, ref_summary = straight
  run = _crash_after(ref, tmp_path / "run", 2)
  # the crash hit in the middle of saving step 3: Orbax's unfinished temporary directory
  partial = run / "checkpoints" / "3.orbax-checkpoint-tmp-1234567"
  (partial / "state").mkdir(parents=True)
  (partial / "state" / "garbage").write_bytes(b"\0" * 100)
  s = train_and_evaluate(tiny("vit", **KEEP_ALL), run)
  assert s["start_step"] == 2 and s["step"] == STEPS and "resumed" in s["origin"]
  assert not partial.exists()  # cleaned up; never taken for a checkpoint
  a = checkpoint_format.read_path(str(run), params_only=False)
  b = checkpoint_format.read_path(str(ref), params_only=False)
  assert int(a["step"]) == int(b["step"]) == STEPS
  assert _max_diff(a["params"], b["params"]) <= 1e-6
  assert _max_diff(a["opt_state"], b["opt_state"]) <= 1e-6
  assert np.array_equal(a["rng"], b["rng"])
  assert s["eval/loss"] == pytest.approx(ref_summary["eval/loss"], abs=1e-6)


EIGHT = textwrap.dedent("""
    import json, shutil
    import jax
    from helpers_train import tiny
    from vlora_jax.train import train_and_evaluate
    assert jax.device_count() == 8
    mesh = {"mesh.data": 2, "mesh.tensor": 4}
    # (a) a run that writes its checkpoints from 8 devices
    train_and_evaluate(tiny("vit", **%(keep)r, **mesh), "%(tmp)s/eight")
    # (b) restore the one-device checkpoint of step 2 on 8 devices and finish the run
    s = train_and_evaluate(tiny("vit", **%(keep)r, **mesh, **{"checkpoint.restore_from":
                                                              "%(one)s/checkpoints/2"}),
                           "%(tmp)s/one_to_eight")
    print("RESULT " + json.dumps({"origin": s["origin"], "start": s["start_step"]}), flush=True)
    """)


@pytest.mark.slow
def test_restore_across_device_counts(straight, tmp_path):
  ref, _ = straight
  proc = run_py(EIGHT % {"keep": KEEP_ALL, "tmp": str(tmp_path), "one": str(ref)}, devices=8)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  out = result(proc.stdout)
  assert out["start"] == 2 and out["origin"].startswith("restored")
  want = checkpoint_format.read_path(str(ref))["params"]
  # one device -> eight: finished on 8 devices from the 1-device step-2 checkpoint
  got = checkpoint_format.read_path(str(tmp_path / "one_to_eight"))["params"]
  assert _max_diff(got, want) <= 1e-5
  # eight devices -> one: resume the 8-device run's step 2 here, on one device
  run = _crash_after(tmp_path / "eight", tmp_path / "eight_to_one", 2)
  s = train_and_evaluate(tiny("vit", **KEEP_ALL), run)
  assert s["start_step"] == 2
  assert _max_diff(checkpoint_format.read_path(str(run))["params"], want) <= 1e-5
  meta = json.loads((run / "checkpoints" / "4" / "meta" / "metadata").read_text())
  assert meta["config"]["mesh"] == {"data": -1, "fsdp": 1, "tensor": 1}


def test_layout_mismatch_is_one_line_naming_the_keys(straight, tmp_path):
  run = _crash_after(straight[0], tmp_path / "run", 2)
  with pytest.raises(errors.CheckpointError,
                     match=r"^checkpoint .* \(a resume\) was written with other values of "
                           r"keys that define what it holds: "
                           r"model.vlora.rank: 2 -> 1\. Set these keys back") as e:
    train_and_evaluate(tiny("vit", **KEEP_ALL, **{"model.vlora.rank": 1}), run)
  assert "\n" not in str(e.value)
  with pytest.raises(errors.CheckpointError, match=r"model.vlora.enabled: True -> False"):
    train_and_evaluate(tiny("vit", **KEEP_ALL, **{"model.vlora.enabled": False}), run)


def test_init_from_checkpoint_takes_params_only(straight, tmp_path):
  ref, ref_summary = straight
  s = train_and_evaluate(tiny("vit", num_train_steps=0, init_from=f"checkpoint:{ref}"),
                         tmp_path / "fresh")
  assert s["origin"] == f"init_from checkpoint:{ref}" and s["start_step"] == 0
  assert s["eval/loss"] == pytest.approx(ref_summary["eval/loss"], abs=1e-6)
  # a workdir's own checkpoint wins over init_from (resume first)
  again = train_and_evaluate(tiny("vit", **KEEP_ALL, init_from="checkpoint:/does/not/exist"), ref)
  assert again["origin"].startswith("resumed")


def test_find_and_meta(straight):
  ref, _ = straight
  steps, asked = checkpoint_format.find(str(ref))
  assert steps[0] == ref / "checkpoints" / str(STEPS) and not asked
  assert checkpoint_format.find(str(ref / "checkpoints" / "2")) == ([ref / "checkpoints" / "2"],
                                                                   True)
  with pytest.raises(errors.CheckpointError, match="no such directory"):
    checkpoint_format.find("/does/not/exist")
  meta = checkpoint_format.meta_at(str(ref))
  (layout,) = meta["layout"].values()
  assert layout["vlora"]["rank"] == 2 and layout["vlora"]["mode"] == "anchored"
  assert layout["params"]["attn/qkv/kernel"]["role"] == "lowrank"


def test_init_from_python_hook(straight, tmp_path, monkeypatch):
  """``py:<module>.<function>:<arg>``: any importable converter (here: params read from a run)."""
  import types
  import sys
  calls = []

  def hook(arg, *, abstract_params, config):
    calls.append((arg, config.model.dim))
    params = checkpoint_format.read_path(arg)["params"]
    assert jax.tree.structure(params) == jax.tree.structure(abstract_params)
    return params

  monkeypatch.setitem(sys.modules, "my_converter", types.SimpleNamespace(convert=hook))
  ref, ref_summary = straight
  s = train_and_evaluate(tiny("vit", num_train_steps=0, init_from=f"py:my_converter.convert:{ref}"),
                         tmp_path)
  assert calls == [(str(ref), 16)]
  assert s["eval/loss"] == pytest.approx(ref_summary["eval/loss"], abs=1e-6)
