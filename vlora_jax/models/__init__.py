"""Models from config: ``build(config.model)`` and the inputs ``init`` needs.

The ``config.model`` schema (every experiment config fills it; see ``configs/``):

  name        'vit' | 'lm' | 'seq2seq'
  dim, depth, num_heads, mlp_ratio, dropout, dtype ('float32' | 'bfloat16'), scan, remat
  vit:        num_classes, img_size, in_chans, patch_size, class_token, global_pool
  lm:         vocab_size, max_len, positions ('learned' | 'rope'), tie_embeddings
  seq2seq:    vocab_size, max_len, dec_depth (``depth`` is the encoder's), tie_embeddings (optional)
  vlora       enabled, compound_size, targets, rank, alpha, mode, stop_gradient_base, scaling, init;
              seq2seq also dec_targets (the decoder's targets; default adds its cross-attention)
  lora        (optional) enabled, targets, rank, alpha: horizontal LoRA on every stack (`lora.py`)
"""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp

from vlora_jax.spec import VLoRASpec

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# name -> (module, builder): builders take the model config and return an unbound nn.Module.
REGISTRY = {
    "vit": ("vlora_jax.models.vit", "from_config"),
    "lm": ("vlora_jax.models.lm", "from_config"),
    "seq2seq": ("vlora_jax.models.seq2seq", "from_config"),
}


def vlora_spec(vcfg) -> VLoRASpec | None:
  """``config.model.vlora`` -> a validated `VLoRASpec`, or None for the dense model."""
  if vcfg is None or not vcfg.get("enabled", True):
    return None
  keys = ("compound_size", "targets", "rank", "alpha", "mode", "stop_gradient_base", "scaling",
          "init")
  kw = {k: vcfg[k] for k in keys if k in vcfg}
  for k in ("targets", "rank", "alpha"):  # config lists arrive as lists or tuples
    if k in kw and isinstance(kw[k], list):
      kw[k] = tuple(kw[k])
  return VLoRASpec(**kw)


def dtype(name: str):
  if name not in DTYPES:
    raise ValueError(f"model.dtype={name!r}: allowed are {list(DTYPES)}")
  return DTYPES[name]


def build(mcfg):
  """``config.model`` -> an unbound Flax module."""
  if mcfg.name not in REGISTRY:
    raise ValueError(f"model.name={mcfg.name!r}: allowed are {sorted(REGISTRY)}")
  module, fn = REGISTRY[mcfg.name]
  return getattr(importlib.import_module(module), fn)(mcfg)


def sample_inputs(mcfg, batch: int = 2) -> tuple[jax.ShapeDtypeStruct, ...]:
  """Shapes of the positional inputs of ``model.apply`` / ``init`` for a batch."""
  if mcfg.name == "vit":
    return (jax.ShapeDtypeStruct((batch, mcfg.img_size, mcfg.img_size, mcfg.in_chans), jnp.float32),)
  if mcfg.name == "lm":
    return (jax.ShapeDtypeStruct((batch, mcfg.max_len), jnp.int32),)
  if mcfg.name == "seq2seq":
    tok = jax.ShapeDtypeStruct((batch, mcfg.max_len), jnp.int32)
    return (tok, tok)
  raise ValueError(f"model.name={mcfg.name!r}: allowed are {sorted(REGISTRY)}")
