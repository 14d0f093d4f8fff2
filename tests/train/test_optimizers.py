"""Every optimizer of ``optim.name`` trains: the project's own train step, on a tiny ViT and one
batch of digits, lowers the loss; each is a valid config key; adafactor's and SGD's weight decay
scale with the learning rate as AdamW's does."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers_train import tiny

from vlora_jax import data, errors, models
from vlora_jax.train import optim, state as state_lib, validate
from vlora_jax.train.steps import make_train_step

STEPS = 60
# Each at a rate of its own kind (Lion's is 3-10x below AdamW's; Adafactor's is relative).
SETTINGS = {"adamw": {"optim.lr": 3e-3}, "adafactor": {"optim.lr": 3e-2},
            "lion": {"optim.lr": 2e-3, "optim.b2": 0.99},
            "sgd": {"optim.lr": 0.3, "optim.momentum": 0.9, "optim.nesterov": True}}


@pytest.fixture(scope="module")
def batch_and_init():
  c = tiny("vit")
  batch = jax.tree.map(jnp.asarray, data.build(c).train_batch(0))
  model = models.build(c.model)
  fam = models.family(c.model.name)
  inputs = [jnp.zeros(x.shape, x.dtype) for x in fam.sample_inputs(c.model)]
  params = nn.unbox(model.init(jax.random.key(0), *inputs, train=False))
  return batch, params["params"]


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_each_optimizer_trains(name, batch_and_init):
  batch, params = batch_and_init
  c = tiny("vit", **{"optim.name": name, "optim.warmup_steps": 0, "optim.schedule": "constant",
                     **SETTINGS[name]})
  validate.check(c, num_devices=1)  # a valid config, as the command line would give it
  model, fam = models.build(c.model), models.family(c.model.name)
  opt = optim.build(c.optim, params, STEPS)
  step = jax.jit(make_train_step(model, fam, opt, 0.0))
  st = state_lib.create(params, opt.tx, jax.random.key_data(jax.random.key(1)))
  losses = []
  for _ in range(STEPS):
    st, m = step(st, batch)
    losses.append(float(m["train/loss"]))
  assert np.isfinite(losses).all()
  assert losses[-1] < 0.6 * losses[0], (name, losses[0], losses[-1])


@pytest.mark.parametrize("name", ["adafactor", "sgd", "lion", "adamw"])
def test_weight_decay_is_decoupled_and_scaled_by_the_rate(name):
  """With a zero gradient, a step shrinks every weight by lr * weight_decay, whatever the rule."""
  c = tiny("vit", **{"optim.name": name, "optim.weight_decay": 0.1, "optim.lr": 0.01})
  params = {"w": jnp.full((4, 4), 2.0)}
  tx = optim.update_rule(c.optim, optax.constant_schedule(0.01), 0.1)
  updates, _ = tx.update({"w": jnp.zeros((4, 4))}, tx.init(params), params)
  np.testing.assert_allclose(updates["w"], -0.01 * 0.1 * 2.0, rtol=1e-5)


def test_an_unknown_optimizer_is_named():
  allowed = r"optim.name='adam': allowed are \['adamw', 'adafactor', 'lion', 'sgd'\]"
  with pytest.raises(errors.ConfigError, match=allowed):
    validate.check(tiny("vit", **{"optim.name": "adam"}), num_devices=1)
