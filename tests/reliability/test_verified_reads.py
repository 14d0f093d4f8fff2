"""One verified read for every reader of a checkpoint (issue 29, class 1).

Every way a step can be damaged (`helpers_runs.DAMAGES`: a flipped bit the storage cannot see,
truncated or missing array data, a missing manifest or array metadata, an empty state, a meta
that is truncated, not an object, without a config, not UTF-8, or missing) is a `CheckpointError`
for a step asked for by number, and for the newest or the best one a fall back to the next good
step with a warning that names the damaged one; never a library's traceback, never the damaged
arrays. Every reader goes through it: `vlora_jax.load`, sample, evaluate, predict, export, a
compress source, a teacher, ``checkpoint.restore_from`` and ``init_from='checkpoint:'``.
"""

from __future__ import annotations

import logging

import jax
import numpy as np
import pytest
from helpers_runs import DAMAGES, copy_run, flip_a_bit, stored_run, truncate_meta
from helpers_train import tiny

import vlora_jax
from vlora_jax.errors import CheckpointError


def _same(a, b) -> bool:
  return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("verified")
  vit = stored_run(tmp / "vit", tiny("vit", **{"eval_every_steps": 1, "checkpoint.keep_best": 2}),
                   best={1: 0.5, 2: 0.9})
  lm = stored_run(tmp / "lm", tiny("lm"))
  dense = stored_run(tmp / "dense", tiny("vit", **{"model.vlora.enabled": False}))
  return {"vit": vit, "lm": lm, "dense": dense, "tmp": tmp}


def _damaged(runs, tmp_path, name="vit", damage=flip_a_bit, where="checkpoints/2"):
  run = copy_run(runs[name], tmp_path / f"{name}_damaged")
  damage(run / where)
  return run


def _warned(caplog, step_dir) -> bool:
  return any("skipped 1 damaged checkpoint" in r.getMessage() and str(step_dir) in r.getMessage()
             for r in caplog.records)


@pytest.mark.parametrize("damage", DAMAGES, ids=lambda f: f.__name__)
def test_load_falls_back_from_a_damaged_newest_step_and_says_so(damage, runs, tmp_path, caplog):
  run = _damaged(runs, tmp_path, damage=damage)
  with caplog.at_level(logging.WARNING):
    got = vlora_jax.load(run)
  assert got.step == 1 and got.checkpoint == run / "checkpoints" / "1"
  assert _warned(caplog, run / "checkpoints" / "2"), [r.getMessage() for r in caplog.records]
  assert _same(got.params, vlora_jax.load(runs["vit"], step=1).params)


@pytest.mark.parametrize("damage", DAMAGES, ids=lambda f: f.__name__)
def test_a_damaged_step_asked_for_by_number_is_one_checkpoint_error(damage, runs, tmp_path):
  run = _damaged(runs, tmp_path, damage=damage)
  with pytest.raises(CheckpointError) as e:
    vlora_jax.load(run, step=2)
  assert "\n" not in str(e.value) and str(run / "checkpoints" / "2") in str(e.value)


def test_a_damaged_best_step_falls_back_to_the_next_best(runs, tmp_path, caplog):
  run = _damaged(runs, tmp_path, where="best/2")  # best/2 scores 0.9, best/1 0.5
  assert vlora_jax.load(runs["vit"], step="best").step == 2
  with caplog.at_level(logging.WARNING):
    assert vlora_jax.load(run, step="best").step == 1
  assert _warned(caplog, run / "best" / "2")


def test_when_no_step_reads_the_error_names_each(runs, tmp_path):
  run = _damaged(runs, tmp_path)
  truncate_meta(run / "checkpoints" / "1")
  with pytest.raises(CheckpointError, match=r"no checkpoint reads back: checkpoint .*/2: .*; "
                                            r"checkpoint .*/1: its meta"):
    vlora_jax.load(run)


def test_sample_reads_the_newest_good_step(runs, tmp_path, caplog):
  from vlora_jax.sample import sample
  run = _damaged(runs, tmp_path, name="lm")
  kw = dict(max_new_tokens=4, temperature=0.0)
  with caplog.at_level(logging.WARNING):
    got = sample(run, "First", **kw)
  assert _warned(caplog, run / "checkpoints" / "2")
  assert got == sample(runs["lm"], "First", step=1, **kw)
  with pytest.raises(CheckpointError, match="checkpoints/2"):
    sample(run, "First", step=2, **kw)


def test_evaluate_reads_the_newest_good_step(runs, tmp_path, caplog):
  from vlora_jax.evaluate import evaluate
  run = _damaged(runs, tmp_path, damage=truncate_meta)
  with caplog.at_level(logging.WARNING):
    result = evaluate(run, out=tmp_path / "e.json")
  assert result["step"] == 1 and result["checkpoint"] == str(run / "checkpoints" / "1")
  assert _warned(caplog, run / "checkpoints" / "2")
  with pytest.raises(CheckpointError, match="checkpoints/2"):
    evaluate(run, step=2, out=tmp_path / "e2.json")
  assert not (tmp_path / "e2.json").exists()


def test_predict_reads_the_newest_good_step(runs, tmp_path):
  from vlora_jax.predict import predict
  run = _damaged(runs, tmp_path)
  image = tmp_path / "x.npy"
  np.save(image, np.arange(64, dtype=np.uint8).reshape(8, 8))
  got = predict(run, [image])[0]["probs"]
  np.testing.assert_array_equal(got, predict(runs["vit"], [image], step=1)[0]["probs"])
  with pytest.raises(CheckpointError, match="checkpoints/2"):
    predict(run, [image], step=2)


def test_export_writes_the_newest_good_step(runs, tmp_path):
  from vlora_jax import export
  run = _damaged(runs, tmp_path)
  out = tmp_path / "dense.npz"
  export.export(run, "npz", out)
  _, want = vlora_jax.load(runs["vit"], step=1).to_dense()
  with np.load(out) as z:
    np.testing.assert_array_equal(z["head/kernel"], want["head"]["kernel"])
  with pytest.raises(CheckpointError, match="checkpoints/2"):
    export.export(run, "npz", tmp_path / "two.npz", step=2)
  assert not (tmp_path / "two.npz").exists()


def _student(**overrides):
  return tiny("vit", **{"init_from": "", **overrides})


def test_a_compress_source_is_read_verified(runs, tmp_path, caplog):
  from vlora_jax.train.from_dense import params_from_dense_run
  dense = _damaged(runs, tmp_path, name="dense")
  with caplog.at_level(logging.WARNING):
    params_from_dense_run(str(dense), abstract_params=None,
                          config=_student(init_from=f"compress:{dense}"))
  assert _warned(caplog, dense / "checkpoints" / "2")
  for d in ("1", "2"):
    truncate_meta(dense / "checkpoints" / d)
  with pytest.raises(CheckpointError, match=r"^init_from='compress:.*no checkpoint reads back"):
    params_from_dense_run(str(dense), abstract_params=None,
                          config=_student(init_from=f"compress:{dense}"))


def test_a_teacher_is_read_verified_in_set_up(runs, tmp_path, caplog):
  from vlora_jax.train.setup import set_up
  dense = _damaged(runs, tmp_path, name="dense")
  with caplog.at_level(logging.WARNING):
    run = set_up(_student(**{"distill.teacher": str(dense)}), tmp_path / "student")
  assert run.teacher.checkpoint == dense / "checkpoints" / "1"
  assert _warned(caplog, dense / "checkpoints" / "2")
  assert _same(run.teacher.source.params, vlora_jax.load(runs["dense"], step=1).params)


def test_restore_from_and_init_from_checkpoint_are_read_verified(runs, tmp_path, caplog):
  from vlora_jax.train import checkpoint as ckpt_lib, init_from, trainer
  from vlora_jax.train.setup import set_up
  src = _damaged(runs, tmp_path)
  config = _student(**{"checkpoint.restore_from": str(src)})
  run = set_up(config, tmp_path / "restored")
  with caplog.at_level(logging.WARNING):
    state = ckpt_lib.restore_path(str(src), trainer._state_target(run), run.meta)
  assert int(state["step"]) == 1 and _warned(caplog, src / "checkpoints" / "2")
  with pytest.raises(CheckpointError, match="checkpoints/2"):
    ckpt_lib.restore_path(str(src / "checkpoints" / "2"), trainer._state_target(run), run.meta)
  params = init_from.params(f"checkpoint:{src}", run)
  assert _same(params, vlora_jax.load(runs["vit"], step=1).params)


@pytest.mark.parametrize("damage", DAMAGES, ids=lambda f: f.__name__)
def test_the_command_line_exits_2_with_one_line_on_a_damaged_step(damage, runs, tmp_path, capsys):
  from vlora_jax import export
  run = _damaged(runs, tmp_path, damage=damage)
  with pytest.raises(SystemExit) as e:
    export.main(["--workdir", str(run), "--step", "2", "--format", "npz", "--out",
                 str(tmp_path / "two.npz")])
  lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
  assert e.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
  assert str(run / "checkpoints" / "2") in lines[0] and not (tmp_path / "two.npz").exists()
