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

from vlora_jax import layers
from vlora_jax.config_keys import Int
from vlora_jax.models import family, vit
from vlora_jax.stack import vlorafy


class ViTRegisters(vit.ViT):
  """`vit.ViT` plus ``num_registers`` learned tokens (``global_pool``: 'token' or 'avg')."""

  num_registers: int = 4

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    if self.global_pool == "token" and not self.class_token:
      raise ValueError("global_pool='token' needs class_token=True")
    if isinstance(self.num_registers, bool) or not isinstance(self.num_registers, int) \
        or self.num_registers < 0:
      raise ValueError(f"model.num_registers={self.num_registers!r}: must be an integer >= 0")
    x = self.embed(images)
    b, tokens, lead = x.shape[0], x.shape[1], int(self.class_token)
    if self.num_registers:
      reg = self.param("registers", nn.with_logical_partitioning(
          nn.initializers.truncated_normal(0.02), (None, None, "embed")),
          (1, self.num_registers, self.dim))
      x = jnp.concatenate([x, jnp.broadcast_to(reg, (b,) + reg.shape[1:]).astype(x.dtype)], 1)
    x = nn.Dropout(self.dropout)(x, deterministic=not train)
    x = vlorafy(self.block(), self.depth, self.vlora, scan=self.scan, remat=self.remat,
                lora=self.lora, name="blocks")(x, deterministic=not train)
    x = layers.layer_norm("norm", self.dtype)(x[:, :tokens])  # the registers leave here
    x = x[:, 0] if self.global_pool == "token" else x[:, lead:].mean(axis=1)
    head = layers.dense(self.num_classes, ("embed", "vocab"), "head", jnp.float32)
    return head(x.astype(jnp.float32))


class ViTRegistersFamily(vit.ViTFamily):
  """`vit.ViTFamily`'s task and data; ``config.model.num_registers`` (default 4) on top."""

  name = "vit_registers"
  config_keys = {**vit.ViTFamily.config_keys,
                 "model.num_registers": Int(lo=0, doc="register tokens (dropped before the head)")}

  def build(self, mcfg, vlora, lora) -> ViTRegisters:
    return ViTRegisters(
        num_classes=mcfg.num_classes, patch_size=mcfg.patch_size, dim=mcfg.dim, depth=mcfg.depth,
        num_heads=mcfg.num_heads, mlp_ratio=mcfg.mlp_ratio,
        class_token=mcfg.get("class_token", True), global_pool=mcfg.get("global_pool", "token"),
        dropout=mcfg.get("dropout", 0.0), vlora=vlora, scan=mcfg.get("scan", True),
        remat=mcfg.get("remat", "none"), dtype=family.dtype(mcfg.get("dtype", "float32")),
        lora=lora, num_registers=mcfg.get("num_registers", 4),
        attention=mcfg.get("attention", "xla"))

  def sequence_length(self, mcfg) -> int:
    return super().sequence_length(mcfg) + mcfg.get("num_registers", 4)



FAMILY = ViTRegistersFamily()
