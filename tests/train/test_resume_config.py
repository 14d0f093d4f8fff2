"""Every config difference on resume judged before the compile, key by key (issue 29, class 4).

A key that does not change what the checkpoint holds (the optimizer's numbers, the schedule,
steps, batch sizes, seeds, how the model computes: remat, dropout, dtype, scan, the mesh, eval and
checkpoint settings) is accepted, and a warning names it; the state then restores. A key that does
(the model's shapes and meaning, the VLoRA layout, the RNG implementation, optimizer settings that
give the state another structure) is refused in set-up, in one line naming the keys, and never as
"corrupt" or "unreadable".
"""

from __future__ import annotations

import logging
import shutil

import pytest
from helpers_runs import stored_run
from helpers_train import tiny

from vlora_jax.errors import CheckpointError
from vlora_jax.train import checkpoint as ckpt_lib, trainer
from vlora_jax.train.setup import set_up

BASE = {"num_train_steps": 4}


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
  return stored_run(tmp_path_factory.mktemp("resume") / "run", tiny("vit", **BASE))


def _copy(stored, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(stored, workdir)
  return workdir


ACCEPTED = [
    ("optim.lr", 5e-4), ("optim.b1", 0.8), ("optim.warmup_steps", 0),
    ("optim.schedule", "constant"), ("optim.weight_decay", 0.0), ("optim.min_lr_ratio", 0.1),
    ("num_train_steps", 10), ("batch_size", 8), ("eval_batch_size", 16), ("seed", 3),
    ("label_smoothing", 0.2), ("grad_accum_steps", 2), ("model.remat", "full"),
    ("model.dropout", 0.1), ("model.dtype", "bfloat16"), ("model.scan", False),
    ("model.vlora.stop_gradient_base", False), ("model.vlora.init", "zero_b"),
    ("checkpoint.keep", 3), ("checkpoint.every_steps", 7), ("log_every_steps", 5),
    ("mesh.data", 1), ("data.eval_examples", 32),
]

REFUSED = [
    ("model.dim", 32), ("model.depth", 4), ("model.num_heads", 4), ("model.mlp_ratio", 2.0),
    ("model.patch_size", 2), ("model.num_classes", 12), ("model.vlora.rank", 3),
    ("model.vlora.mode", "cumulative"), ("model.vlora.alpha", 2.0),
    ("model.vlora.scaling", "rslora"), ("model.vlora.enabled", False),
    ("model.vlora.targets", (r"attn/qkv/kernel",)), ("rng_impl", "rbg"),
    ("optim.freeze", "head/.*"), ("optim.wd_mults", ()),
    ("optim.lr_mults", ((r".*/inc_[ab]/.*", 2.0),)),
]


@pytest.mark.parametrize("key, value", ACCEPTED, ids=lambda v: str(v))
def test_a_key_that_keeps_what_the_checkpoint_holds_is_accepted_and_named(key, value, stored,
                                                                           tmp_path, caplog):
  workdir = _copy(stored, tmp_path)
  with caplog.at_level(logging.WARNING):
    run = set_up(tiny("vit", **{**BASE, key: value}), workdir)
    ckpt = ckpt_lib.Checkpointer.of_config(workdir, run.config.checkpoint, run.meta)
    try:
      step, _ = ckpt.restore_latest(trainer._state_target(run))
    finally:
      ckpt.close()
  assert step == 2
  assert any(key in r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING), \
      [r.getMessage() for r in caplog.records]


@pytest.mark.parametrize("key, value", REFUSED, ids=lambda v: str(v))
def test_a_key_that_changes_what_the_checkpoint_holds_is_refused_in_one_line(key, value, stored,
                                                                              tmp_path):
  with pytest.raises(CheckpointError) as e:
    set_up(tiny("vit", **{**BASE, key: value}), _copy(stored, tmp_path))
  message = str(e.value)
  assert "\n" not in message and key in message, message
  assert not any(w in message for w in ("corrupt", "unreadable", "damaged")), message


def test_every_refused_key_is_named_at_once(stored, tmp_path):
  with pytest.raises(CheckpointError, match=r"model.depth: 2 -> 4; model.dim: 16 -> 32"):
    set_up(tiny("vit", **BASE, **{"model.dim": 32, "model.depth": 4}), _copy(stored, tmp_path))


def test_restore_from_is_judged_the_same_way(stored, tmp_path):
  config = tiny("vit", **BASE, **{"checkpoint.restore_from": str(stored), "model.dim": 32})
  with pytest.raises(CheckpointError, match=r"^checkpoint.restore_from=.*model.dim: 16 -> 32"):
    set_up(config, tmp_path / "fresh")


def test_the_refusal_comes_before_the_compile(stored, tmp_path, monkeypatch):
  def compile_train_step(run):
    raise AssertionError("compiled before the refusal")
  monkeypatch.setattr(trainer, "compile_train_step", compile_train_step)
  for key, value in (("model.vlora.rank", 3), ("optim.freeze", "head/.*"), ("rng_impl", "rbg")):
    with pytest.raises(CheckpointError, match=key):
      trainer.train_and_evaluate(tiny("vit", **{**BASE, key: value}), _copy(stored, tmp_path / key))
