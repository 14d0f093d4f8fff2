"""Every registered model family keeps its parts consistent: inputs, example batch, task."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers_train import ROOT, tiny
from vlora_jax import models
from vlora_jax.models.family import TokenFamily
from vlora_jax.train import load_config

TINY = {"model.dim": 16, "model.depth": 2, "model.num_heads": 2, "model.vlora.compound_size": 2,
        "model.vlora.rank": 2}


def _config(name):
  if name == "vit_registers":
    return load_config(str(ROOT / "configs/vit_registers_digits.py"), **TINY)
  return tiny(name)


@pytest.mark.parametrize("name", sorted(models.FAMILIES))
def test_example_batch_feeds_the_model_and_the_loss(name):
  config = _config(name)
  fam = models.family(name)
  assert fam.name == name and config.data.source in fam.sources
  batch = jax.tree.map(jnp.asarray,
                       fam.example_batch(config.model, 3, np.random.default_rng(0)))
  inputs = fam.inputs(batch)
  want = fam.sample_inputs(config.model, batch=3)
  assert [(x.shape, x.dtype) for x in inputs] == [(s.shape, s.dtype) for s in want]
  model = fam.build_from_config(config.model)
  params = model.init(jax.random.key(0), *inputs)
  sums = fam.sums(model.apply(params, *inputs), batch)
  metrics = fam.finalize(jax.device_get(sums), "eval")
  # A fresh model's logits are near zero: its loss is that of a uniform guess, ln(classes).
  logits = model.apply(params, *inputs)
  assert metrics["eval/loss"] == pytest.approx(np.log(logits.shape[-1]), abs=0.3), metrics
  assert 0 <= metrics["eval/accuracy"] <= 1
  assert (fam.tokens_per_example({"tokens_per_example": 7}) == 7) == isinstance(fam, TokenFamily)
  assert fam.sequence_length(config.model) >= 1
  assert set(fam.stack_specs(model)) and all(
      isinstance(k, str) for k in fam.stack_specs(model))


def test_what_each_command_serves_comes_from_the_family():
  """predict and the timm and Hugging Face exports ask the family, not a list of names."""
  from vlora_jax import export, predict
  for name, fam in models.FAMILIES.items():
    meta = {"config": {"model": {"name": name}}}
    for fmt, serves in (("timm", fam.exports_timm), ("hf", fam.hf_architecture is not None)):
      if serves:
        export._check_format(fmt, meta)
      else:
        with pytest.raises(export.ExportError, match=f"--format={fmt}: the run's model.name"):
          export._check_format(fmt, meta)
    if fam.classifies_images:
      predict._check_family(meta, "run")
    else:
      with pytest.raises(predict.PredictError, match="is not an image classifier"):
        predict._check_family(meta, "run")
  assert {n for n, f in models.FAMILIES.items() if f.classifies_images} == {"vit", "vit_registers"}
  assert {n for n, f in models.FAMILIES.items() if f.exports_timm} == {"vit"}
