"""The model families, by ``config.model.name``, and the calls that serve every family.

The ``config.model`` schema (every experiment config fills it; see ``configs/``):

  name        a key of `FAMILIES`: 'vit' | 'vit_registers' | 'lm' | 'llama' | 'seq2seq'
  dim, depth, num_heads, mlp_ratio, dropout, dtype ('float32' | 'bfloat16'), scan, remat
  vlora       enabled, compound_size, targets, rank, alpha, mode, stop_gradient_base, scaling, init
  lora        (optional) enabled, targets, rank, alpha: horizontal LoRA on every stack (`core/lora.py`)
  ...         the family's own keys: see the `Family` subclass in its module

A family (`family.Family`) is one module of this package; it is registered here by one import and
one entry in `FAMILIES`.
"""

from __future__ import annotations

import flax.linen as nn
import jax

from vlora_jax.core import stack
from vlora_jax.models import llama, lm, seq2seq, vit, vit_registers
from vlora_jax.models.family import DTYPES, Family, dtype, vlora_spec

__all__ = ["DTYPES", "FAMILIES", "Family", "build", "dtype", "family", "sample_inputs",
           "to_dense", "vlora_spec"]

FAMILIES: dict[str, Family] = {
    f.name: f for f in (vit.FAMILY, vit_registers.FAMILY, lm.FAMILY, llama.FAMILY,
                        seq2seq.FAMILY)}


def family(name: str) -> Family:
  """``config.model.name`` -> its `Family`."""
  if name not in FAMILIES:
    raise ValueError(f"model.name={name!r}: allowed are {sorted(FAMILIES)}")
  return FAMILIES[name]


def build(mcfg) -> nn.Module:
  """``config.model`` -> an unbound Flax module (specs built from the config)."""
  return family(mcfg.name).build_from_config(mcfg)


def sample_inputs(mcfg, batch: int = 2) -> tuple[jax.ShapeDtypeStruct, ...]:
  """Shapes of the positional inputs of ``model.apply`` / ``init`` for a batch."""
  return family(mcfg.name).sample_inputs(mcfg, batch)


to_dense = stack.to_dense  # the dense twin of any family's model: see there
