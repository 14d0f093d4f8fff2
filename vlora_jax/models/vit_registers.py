"""ViT with register tokens (Darcet et al., "Vision Transformers Need Registers", ICLR 2024).

A few learned tokens join the sequence after the patches and are dropped at the output. They give
attention somewhere to park global information, instead of in high-norm patch tokens; the paper
reports cleaner attention maps and small accuracy gains with 4-16 of them. The registers carry no
position embedding. Everything else is `vit.ViT`: the same block, the same stack (dense or VLoRA
from one field), and the same task, so this file is all that a family of its own needs.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from vlora_jax.config.keys import Int
from vlora_jax.models import family, vit


class ViTRegisters(vit.ViT):
  """`vit.ViT` plus ``num_registers`` learned tokens after the patches (``global_pool`` and
  ``fc_norm`` as there)."""

  num_registers: int = 4

  def extra_tokens(self, x):
    if isinstance(self.num_registers, bool) or not isinstance(self.num_registers, int) \
        or self.num_registers < 0:
      raise ValueError(f"model.num_registers={self.num_registers!r}: must be an integer >= 0")
    if not self.num_registers:
      return x
    reg = self.param("registers", nn.with_logical_partitioning(
        nn.initializers.truncated_normal(0.02), (None, None, "embed")),
        (1, self.num_registers, self.dim))
    return jnp.concatenate([x, jnp.broadcast_to(reg, (x.shape[0],) + reg.shape[1:])
                            .astype(x.dtype)], 1)


class ViTRegistersFamily(vit.ViTFamily):
  """`vit.ViTFamily`'s task and data; ``config.model.num_registers`` (default 4) on top."""

  name = "vit_registers"
  # timm has register tokens, but `convert.torch_vit` does not import them: an export could not
  # come back.
  exports_timm = False
  config_keys = {**vit.ViTFamily.config_keys,
                 "model.num_registers": Int(lo=0, default=4,
                                            doc="register tokens (dropped before the head)")}

  def build(self, mcfg, vlora, lora) -> ViTRegisters:
    return ViTRegisters(num_registers=mcfg.num_registers, **self.vit_kwargs(mcfg),
                        **family.shared_kwargs(mcfg, vlora, lora))

  def sequence_length(self, mcfg) -> int:
    return super().sequence_length(mcfg) + self.model_config(mcfg).num_registers


FAMILY = ViTRegistersFamily()
