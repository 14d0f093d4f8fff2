"""Distillation (``config.distill``): the mixed loss, its limits, and a teacher checked before
anything compiles."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers_train import tiny

from vlora_jax import models
from vlora_jax.errors import UserError
from vlora_jax.train import optim, state as state_lib
from vlora_jax.train import teacher as teacher_lib
from vlora_jax.train.setup import set_up
from vlora_jax.train.steps import make_train_step


@pytest.fixture(scope="module")
def parts():
  config = tiny("vit")
  fam = models.family(config.model.name)
  student = models.build(config.model)
  dense = student.clone(vlora=None)
  batch = fam.example_batch(config.model, 8, np.random.default_rng(0))
  x = batch["image"]
  p = nn.unbox(student.init(jax.random.key(0), x))["params"]
  tp = nn.unbox(dense.init(jax.random.key(1), x))["params"]
  opt = optim.build(config.optim, p, 10)
  st = state_lib.create(p, opt.tx, jax.random.key_data(jax.random.key(2)))
  return config, fam, student, dense, batch, p, tp, opt, st


def _teacher(dense, weight, temperature=2.0):
  return teacher_lib.Teacher(workdir="", checkpoint=None, model=dense, source_model=dense,
                             abstract_params=None, shardings=None, weight=weight,
                             temperature=temperature)


def test_weight_zero_is_plain_training(parts):
  config, fam, student, dense, batch, p, tp, opt, st = parts
  plain = jax.jit(make_train_step(student, fam, opt, 0.0))(st, batch)
  mixed = jax.jit(make_train_step(student, fam, opt, 0.0, teacher=_teacher(dense, 0.0)))(
      st, batch, tp)
  for a, b in zip(jax.tree.leaves(plain[0]["params"]), jax.tree.leaves(mixed[0]["params"])):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  assert float(mixed[1]["train/loss"]) == pytest.approx(float(plain[1]["train/loss"]), rel=1e-6)
  assert float(mixed[1]["train/kl"]) > 0  # the teacher differs: reported, not trained on


def test_a_student_equal_to_its_teacher_has_zero_kl(parts):
  config, fam, student, dense, batch, p, tp, opt, st = parts
  same = state_lib.create(tp, optim.build(config.optim, tp, 10).tx, st["rng"])
  opt_d = optim.build(config.optim, tp, 10)
  _, m = jax.jit(make_train_step(dense, fam, opt_d, 0.0, teacher=_teacher(dense, 1.0)))(
      same, batch, tp)
  assert abs(float(m["train/kl"])) < 1e-6 and float(m["train/loss"]) < 1e-5
  logits = jax.random.normal(jax.random.key(0), (4, 7, 5))
  assert float(teacher_lib.kl_sum(logits, logits, jnp.ones((4, 7)), 3.0)) == pytest.approx(0,
                                                                                          abs=1e-6)


def test_weight_one_trains_on_the_teacher_alone(parts):
  """w = 1: the gradient is T^2 KL's; a teacher that moves changes the step, the labels do not."""
  config, fam, student, dense, batch, p, tp, opt, st = parts
  step = jax.jit(make_train_step(student, fam, opt, 0.0, teacher=_teacher(dense, 1.0)))
  other = dict(batch, label=(batch["label"] + 1) % 10)
  a, b = step(st, batch, tp)[0], step(st, other, tp)[0]
  for x, y in zip(jax.tree.leaves(a["params"]), jax.tree.leaves(b["params"])):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)


def _fake_run(tmp_path, config):
  """A workdir whose only checkpoint holds just the meta with ``config`` (what `check` reads)."""
  step = tmp_path / "checkpoints" / "5"
  (step / "state").mkdir(parents=True)
  (step / "meta").mkdir()
  (step / "meta" / "metadata").write_text(json.dumps({"config": json.loads(
      config.to_json_best_effort())}))
  return str(tmp_path)


@pytest.mark.parametrize("teacher_overrides, says", [
    ({"model.num_classes": 7}, "predicts logits of shape"),
    ({"model.img_size": 16}, "reads inputs"),
])
def test_a_teacher_that_does_not_fit_is_refused_before_compile(tmp_path, teacher_overrides, says):
  teacher = _fake_run(tmp_path, tiny("vit", **{"model.vlora.enabled": False, **teacher_overrides}))
  with pytest.raises(UserError, match=says):
    set_up(tiny("vit", **{"distill.teacher": teacher}), tmp_path / "student")


def test_a_teacher_of_another_family_or_without_checkpoint_is_refused(tmp_path):
  teacher = _fake_run(tmp_path / "lm", tiny("lm"))
  with pytest.raises(UserError, match="a teacher must be of the same family"):
    set_up(tiny("vit", **{"distill.teacher": teacher}), tmp_path / "s1")
  (tmp_path / "empty").mkdir()
  with pytest.raises(UserError, match="holds no checkpoint"):
    set_up(tiny("vit", **{"distill.teacher": str(tmp_path / "empty")}), tmp_path / "s2")
