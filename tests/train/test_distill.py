"""Distillation (``config.distill``): the mixed loss, its limits, and a teacher checked before
anything compiles."""

import json
from dataclasses import replace as dataclasses_replace

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
  return teacher_lib.Teacher(workdir="", checkpoint=None, model=dense,
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


def _kl_numpy(student, teacher, weight, temperature):
  """``sum weight * KL(softmax(teacher / T) || softmax(student / T))`` in float64."""
  def log_softmax(z):
    z = np.asarray(z, np.float64) / temperature
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))
  t, s = log_softmax(teacher), log_softmax(student)
  return float(((np.exp(t) * (t - s)).sum(-1) * np.asarray(weight, np.float64)).sum())


def test_kl_against_float64_numpy_its_direction_and_temperature():
  """Different inputs (KL(p||p) = 0 proves little): the value, KL(teacher || student) and not
  the reverse, and the temperature inside the softmax."""
  rng = np.random.default_rng(0)
  s, t = rng.normal(0, 2, (3, 5, 11)), rng.normal(0, 2, (3, 5, 11))
  w = rng.uniform(0, 1, (3, 5))
  for temp in (1.0, 2.5):
    got = float(teacher_lib.kl_sum(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32),
                                   jnp.asarray(w, jnp.float32), temp))
    want = _kl_numpy(s, t, w, temp)
    assert got == pytest.approx(want, rel=1e-5)
    assert abs(want - _kl_numpy(t, s, w, temp)) > 1e-2 * want  # the reverse would be caught
  assert abs(_kl_numpy(s, t, w, 1.0) - _kl_numpy(s, t, w, 2.5)) > 1e-2  # so would a lost T


def test_the_step_mixes_task_and_t_squared_kl(parts):
  """loss = (1 - w) task + w T^2 KL, with the KL the float64 one of the two models' logits."""
  config, fam, student, dense, batch, p, tp, opt, st = parts
  weight, temp = 0.3, 2.0
  _, m = jax.jit(make_train_step(student, fam, opt, 0.0,
                                 teacher=_teacher(dense, weight, temp)))(st, batch, tp)
  x = batch["image"]
  s_logits = student.apply({"params": p}, x, train=False)
  t_logits = dense.apply({"params": tp}, x, train=False)
  n = s_logits.shape[0]
  kl = _kl_numpy(s_logits, t_logits, np.ones(n), temp) / n
  assert float(m["train/kl"]) == pytest.approx(kl, rel=1e-4)
  want = (1 - weight) * float(m["train/task_loss"]) + weight * temp ** 2 * kl
  assert float(m["train/loss"]) == pytest.approx(want, rel=1e-4)


def _fake_run(tmp_path, config):
  """A workdir whose only checkpoint holds the meta with ``config`` (what `check` judges) and the
  model's parameters as zeros (what set-up reads and verifies once the checks pass)."""
  from vlora_jax.runs import checkpoint_format
  from vlora_jax.core import params as params_lib
  from vlora_jax.train import checkpoint as ckpt_lib
  fam = models.family(config.model.name)
  shapes = params_lib.param_shapes(models.build(config.model),
                                   *fam.sample_inputs(config.model, batch=1), train=False)
  params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
  state = {"step": np.zeros((), np.int32), "params": params, "rng": np.zeros(2, np.uint32)}
  meta = checkpoint_format.build_meta(config, params, None, None)
  ckpt = ckpt_lib.Checkpointer(tmp_path, meta, keep=1, async_save=False)
  try:
    ckpt.save(5, state)
  finally:
    ckpt.close()
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


# --- the per-compound loss (distill.hidden_weight) ----------------------------------------------

def _streams(model, params, x):
  _, v = model.apply({"params": params}, x, train=False, mutable=["intermediates"])
  return teacher_lib.layer_outputs(v["intermediates"])


def test_layer_outputs_are_every_layers_output_scanned_or_not():
  """The sown [L, ...] outputs: the same scanned and unrolled, the last one the stack's output,
  and sowing changes no logits."""
  config = tiny("vit")
  x = models.family("vit").example_batch(config.model, 3, np.random.default_rng(0))["image"]
  scanned = models.build(config.model)
  unrolled = scanned.clone(scan=False)
  p = nn.unbox(scanned.init(jax.random.key(0), x))["params"]
  a, b = _streams(scanned, p, x)["blocks"], _streams(unrolled, p, x)["blocks"]
  assert a.shape[0] == config.model.depth
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  logits, v = scanned.apply({"params": p}, x, train=False, mutable=["intermediates"])
  np.testing.assert_array_equal(logits, scanned.apply({"params": p}, x, train=False))


def test_hidden_loss_against_float64_numpy():
  rng = np.random.default_rng(0)
  s, t = rng.normal(size=(2, 6, 4, 5, 8)).astype(np.float32)  # [L, B, T, D]
  w = np.array([1.0, 1.0, 0.0, 1.0])  # a padding example weighs nothing
  pos = np.ones((4, 5))
  pos[1, 3:] = 0.0  # the last two positions of example 1 are padding
  ends = {"blocks": (2, 5)}  # compounds of 3
  for position_weights in (None, pos):
    p = np.ones((4, 5)) if position_weights is None else pos
    want = []
    for e in ends["blocks"]:
      d = ((s[e] - t[e]).astype(np.float64) ** 2).sum(-1)
      n = (t[e].astype(np.float64) ** 2).sum(-1)
      want.append(((d * p).sum(1) / (n * p).sum(1) * w).sum() / w.sum())
    got = teacher_lib.hidden_loss(
        {"blocks": jnp.asarray(s)}, {"blocks": jnp.asarray(t)}, ends, jnp.asarray(w, jnp.float32),
        None if position_weights is None else {"blocks": jnp.asarray(pos, jnp.float32)})
    assert float(got) == pytest.approx(np.mean(want), rel=1e-5)


def test_seq2seq_streams_weigh_only_real_positions():
  fam = models.family("seq2seq")
  batch = {"src": np.array([[5, 6, 0, 0]]), "tgt_in": np.array([[1, 7, 8, 0]]),
           "tgt_out": np.array([[7, 8, 2, 0]])}
  w = fam.stream_weights(batch, jnp.ones((1,)))
  np.testing.assert_array_equal(w["encoder"], [[1, 1, 0, 0]])
  np.testing.assert_array_equal(w["decoder"], [[1, 1, 1, 0]])


def test_hidden_loss_in_the_train_step(parts):
  """A student equal to its teacher has zero hidden loss; another one a positive one, which the
  step adds to its loss with its weight (w = 0: task + h * hidden)."""
  config, fam, student, dense, batch, p, tp, opt, st = parts
  ends = {"blocks": (1,)}  # tiny: one compound of 2
  t = dataclasses_replace(_teacher(dense, 0.0), hidden_weight=0.5, ends=ends)
  _, m = jax.jit(make_train_step(student, fam, opt, 0.0, teacher=t))(st, batch, tp)
  assert float(m["train/hidden"]) > 0
  assert float(m["train/loss"]) == pytest.approx(
      float(m["train/task_loss"]) + 0.5 * float(m["train/hidden"]), rel=1e-5)
  opt_d = optim.build(config.optim, tp, 10)
  same = state_lib.create(tp, opt_d.tx, st["rng"])
  _, m = jax.jit(make_train_step(dense, fam, opt_d, 0.0, teacher=t))(same, batch, tp)
  assert abs(float(m["train/hidden"])) < 1e-10


def test_a_teacher_of_another_depth_is_refused_only_for_the_hidden_loss(tmp_path):
  teacher = _fake_run(tmp_path, tiny("vit", **{"model.vlora.enabled": False, "model.depth": 4}))
  run = set_up(tiny("vit", **{"distill.teacher": teacher}), tmp_path / "s0")
  assert run.teacher is not None and run.teacher.ends == {}
  with pytest.raises(UserError, match="needs a teacher of the student's depth and width"):
    set_up(tiny("vit", **{"distill.teacher": teacher, "distill.hidden_weight": 1.0}),
           tmp_path / "s1")
  same = _fake_run(tmp_path / "same", tiny("vit", **{"model.vlora.enabled": False}))
  run = set_up(tiny("vit", **{"distill.teacher": same, "distill.hidden_weight": 1.0}),
               tmp_path / "s2")
  assert run.teacher.ends == {"blocks": (1,)}  # tiny: 2 layers, one compound of 2


def _np_kl_sum(student, teacher, weight, temperature):
  """sum weight * KL(softmax(teacher / T) || softmax(student / T)) in float64."""
  def log_softmax(z):
    z = z.astype(np.float64) / temperature
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))
  t, s = log_softmax(teacher), log_softmax(student)
  return float((np.sum(np.exp(t) * (t - s), -1) * weight).sum())


@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_kl_is_teacher_to_student_against_float64_numpy(temperature):
  rng = np.random.default_rng(1)
  student, teacher = rng.normal(size=(2, 4, 7, 11)).astype(np.float32) * 3
  weight = rng.uniform(size=(4, 7)).astype(np.float32)
  got = float(teacher_lib.kl_sum(student, teacher, weight, temperature))
  assert got == pytest.approx(_np_kl_sum(student, teacher, weight, temperature), rel=1e-5)
  # The direction is the teacher's distribution to the student's, not the reverse.
  reverse = _np_kl_sum(teacher, student, weight, temperature)
  assert abs(got - reverse) > 1e-2 * abs(reverse)


def test_the_step_mixes_task_and_t_squared_kl(parts):
  """The step's loss is (1 - w) task + w T^2 KL / weight, with the KL as the numpy reference."""
  config, fam, student, dense, batch, p, tp, opt, st = parts
  w, temperature = 0.3, 2.5
  _, m = jax.jit(make_train_step(student, fam, opt, 0.0,
                                 teacher=_teacher(dense, w, temperature)))(st, batch, tp)
  s_logits = student.apply({"params": p}, batch["image"], train=True,
                           rngs={"dropout": jax.random.key(0)})
  t_logits = dense.apply({"params": tp}, batch["image"])
  n = batch["image"].shape[0]
  kl = _np_kl_sum(np.asarray(s_logits), np.asarray(t_logits), np.ones(n), temperature) / n
  assert float(m["train/kl"]) == pytest.approx(kl, rel=1e-4)
  want = (1 - w) * float(m["train/task_loss"]) + w * temperature ** 2 * kl
  assert float(m["train/loss"]) == pytest.approx(want, rel=1e-4)
