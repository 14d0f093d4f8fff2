"""Gradient accumulation (``config.grad_accum_steps``): one update from microbatches equals the
update from the whole batch, for every family and with distillation, and a step's memory is a
microbatch's."""

import flax.linen as nn
import jax
import numpy as np
import pytest
from helpers_train import tiny

from vlora_jax import models
from vlora_jax.train import optim, state as state_lib
from vlora_jax.train import teacher as teacher_lib
from vlora_jax.train.steps import make_train_step, split_microbatches


def _parts(family, batch_size=8):
  config = tiny(family)
  fam = models.family(config.model.name)
  model = models.build(config.model)
  batch = fam.example_batch(config.model, batch_size, np.random.default_rng(0))
  if family == "seq2seq":  # targets of different lengths: microbatches of unequal loss weight
    batch["tgt_out"][::3, 4:] = 0
  params = nn.unbox(model.init(jax.random.key(0), *fam.inputs(batch)))["params"]
  opt = optim.build(config.optim, params, 10)
  st = state_lib.create(params, opt.tx, jax.random.key_data(jax.random.key(1)))
  return fam, model, batch, opt, st


def _close(a, b, what):
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, rtol=2e-5, atol=2e-6,
                               err_msg=f"{what} {jax.tree_util.keystr(path)}")


@pytest.mark.parametrize("family", ["vit", "lm", "seq2seq"])
def test_microbatches_give_the_whole_batch_update(family):
  fam, model, batch, opt, st = _parts(family)
  whole, m1 = jax.jit(make_train_step(model, fam, opt, 0.0))(st, batch)
  for n in (2, 4):
    accum, mn = jax.jit(make_train_step(model, fam, opt, 0.0, grad_accum_steps=n))(st, batch)
    _close(accum["params"], whole["params"], f"grad_accum_steps={n}")
    for key in ("train/loss", "train/accuracy", "train/grad_norm"):
      assert float(mn[key]) == pytest.approx(float(m1[key]), rel=2e-5), (n, key)


def test_microbatches_with_a_teacher():
  fam, model, batch, opt, st = _parts("vit")
  dense = model.clone(vlora=None)
  tp = nn.unbox(dense.init(jax.random.key(3), *fam.inputs(batch)))["params"]
  t = teacher_lib.Teacher(workdir="", checkpoint=None, model=dense, abstract_params=None,
                          shardings=None, weight=0.5, temperature=2.0)
  whole, m1 = jax.jit(make_train_step(model, fam, opt, 0.0, teacher=t))(st, batch, tp)
  accum, m2 = jax.jit(make_train_step(model, fam, opt, 0.0, teacher=t, grad_accum_steps=4))(
      st, batch, tp)
  _close(accum["params"], whole["params"], "distilled")
  assert float(m2["train/kl"]) == pytest.approx(float(m1["train/kl"]), rel=2e-5)


def test_split_is_strided_so_no_row_moves_between_devices():
  rows = np.arange(12)
  np.testing.assert_array_equal(split_microbatches(rows, 3),
                                [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8, 11]])
  with pytest.raises(ValueError, match="grad_accum_steps=5"):
    split_microbatches(rows, 5)


def test_a_step_holds_one_microbatch_of_activations():
  fam, model, batch, opt, st = _parts("lm", batch_size=32)
  temp = {}
  for n in (1, 4):
    step = jax.jit(make_train_step(model, fam, opt, 0.0, grad_accum_steps=n))
    temp[n] = step.lower(st, batch).compile().memory_analysis().temp_size_in_bytes
  assert temp[4] < 0.6 * temp[1], temp
