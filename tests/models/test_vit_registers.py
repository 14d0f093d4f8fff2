"""The register-token ViT: a family added as one file (plus a config), trained end to end."""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
import pytest

from helpers_train import ROOT
from vlora_jax import models
from vlora_jax.core import params
from vlora_jax.models.vit import ViT
from vlora_jax.models.vit_registers import ViTRegisters
from vlora_jax.core.spec import VLoRASpec
from vlora_jax.train import load_config, train_and_evaluate

SPEC = VLoRASpec(compound_size=2, rank=2, mode="anchored")
KW = dict(num_classes=10, patch_size=4, dim=16, depth=2, num_heads=2, vlora=SPEC)
IMAGES = jax.random.normal(jax.random.key(1), (3, 8, 8, 1))


def test_no_registers_is_the_plain_vit():
  plain, reg = ViT(**KW), ViTRegisters(**KW, num_registers=0)
  v = plain.init(jax.random.key(0), IMAGES)
  np.testing.assert_allclose(reg.apply(v, IMAGES), plain.apply(v, IMAGES), atol=1e-6)


def test_registers_are_params_that_change_the_output_and_merge():
  model = ViTRegisters(**KW, num_registers=3)
  boxed = model.init(jax.random.key(0), IMAGES)
  v = nn.unbox(boxed)
  assert v["params"]["registers"].shape == (1, 3, 16)
  out = model.apply(v, IMAGES)
  # A random move (a constant one would vanish in the blocks' LayerNorm).
  noise = jax.random.normal(jax.random.key(2), v["params"]["registers"].shape)
  moved = {"params": {**v["params"], "registers": v["params"]["registers"] + noise}}
  assert not np.allclose(model.apply(moved, IMAGES), out, atol=1e-4)
  dense, merged = models.to_dense(model, boxed)  # the family's stacks fold like any other
  np.testing.assert_allclose(dense.apply(merged, IMAGES), out, atol=1e-5, rtol=1e-5)


def test_bad_register_count_names_the_key():
  c = load_config(str(ROOT / "configs/vit_registers_digits.py"), **{"model.num_registers": -1})
  with pytest.raises(ValueError, match=r"model.num_registers=-1: must be an integer >= 0"):
    train_and_evaluate(c, "/nonexistent_never_written")


def test_trains_from_its_config(tmp_path):
  c = load_config(str(ROOT / "configs/vit_registers_digits.py"),
                  **{"model.dim": 16, "model.depth": 2, "model.num_heads": 2,
                     "model.vlora.compound_size": 2, "model.vlora.rank": 2,
                     "num_train_steps": 3, "eval_every_steps": 3, "tensorboard": False,
                     "progress": False, "data.eval_examples": 32, "eval_batch_size": 32})
  counts = params.count(params.param_shapes(models.build(c.model),
                                            *models.sample_inputs(c.model)))
  s = train_and_evaluate(c, tmp_path)
  assert s["step"] == 3 and s["params_total"] == counts["total"]
  assert np.isfinite(s["eval/loss"]) and 0.0 <= s["eval/accuracy"] <= 1.0
  assert "eval/perplexity" not in s  # the family's task: classification metrics
  # The registers are trained: three steps moved them off their initial values.
  import vlora_jax
  model, trained, _, _ = vlora_jax.load(tmp_path)
  init_key = jax.random.split(jax.random.key(c.seed))[0]  # the trainer's (train.trainer)
  fresh = nn.unbox(model.init({"params": init_key, "dropout": init_key},
                              *[np.zeros(x.shape, x.dtype) for x in models.sample_inputs(c.model)],
                              train=False))["params"]
  moved = np.abs(trained["registers"] - np.asarray(fresh["registers"])).max()
  assert trained["registers"].shape == fresh["registers"].shape and moved > 1e-4, moved
