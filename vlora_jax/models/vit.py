"""Vision Transformer with timm's layout, dense or VLoRA from one field (``vlora``).

Patch conv (kernel = stride = patch), class token, learned position embedding added after the class
token is prepended, pre-norm blocks (`layers.EncoderBlock`), final LayerNorm, head on the class token
(``global_pool='token'``) or on the mean of the patch tokens (``'avg'``).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vlora_jax.core import layers
from vlora_jax.config.keys import Bool, Choice, Int
from vlora_jax.core import lora as lora_lib
from vlora_jax.models import family
from vlora_jax.core.partitioning import BATCH, RESIDUAL, VOCAB, constrain
from vlora_jax.core.spec import VLoRASpec
from vlora_jax.core.stack import vlorafy


class ViT(nn.Module):
  num_classes: int
  patch_size: int = 4
  dim: int = 192
  depth: int = 12  # total layers L (the official code's ``depth`` counts compounds)
  num_heads: int = 3
  mlp_ratio: float = 4.0
  class_token: bool = True
  global_pool: str = "token"  # token | avg
  fc_norm: bool = False  # timm's avg-pool default: LayerNorm after pooling instead of before
  dropout: float = 0.0
  vlora: VLoRASpec | None = None
  scan: bool = True
  remat: str = "none"
  dtype: jnp.dtype = jnp.float32
  lora: lora_lib.LoRASpec | None = None  # horizontal LoRA adapters on every block
  attention: str = "xla"  # `layers.ATTENTION_IMPLS`

  def stack_specs(self):
    """``{stack name: (vlora, lora)}``: one stack."""
    return {"blocks": (self.vlora, self.lora)}

  def block(self) -> layers.EncoderBlock:
    return layers.EncoderBlock(self.dim, self.num_heads, int(self.dim * self.mlp_ratio),
                               self.dropout, dtype=self.dtype, attention=self.attention,
                               parent=None)

  def embed(self, images):
    """Patch embedding, class token and learned positions: ``[B, H, W, C]`` -> ``[B, N, D]``.

    Called from the compact ``__call__`` (of this class or a subclass), so its parameters are
    the model's own: ``patch_embed``, ``cls_token``, ``pos_embed``.
    """
    p = self.patch_size
    x = nn.Conv(self.dim, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                param_dtype=jnp.float32, name="patch_embed",
                kernel_init=nn.with_logical_partitioning(
                    nn.initializers.lecun_normal(), (None, None, None, "embed")),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))(
                    images.astype(self.dtype))
    b = x.shape[0]
    x = x.reshape(b, -1, self.dim)
    if self.class_token:
      cls = self.param("cls_token", nn.with_logical_partitioning(
          nn.initializers.normal(1e-6), (None, None, "embed")), (1, 1, self.dim))
      x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, self.dim)).astype(x.dtype), x], axis=1)
    pos = self.param("pos_embed", nn.with_logical_partitioning(
        nn.initializers.truncated_normal(0.02), (None, None, "embed")), (1, x.shape[1], self.dim))
    return constrain(x + pos.astype(x.dtype), RESIDUAL)

  def extra_tokens(self, x):
    """Tokens appended after the patches, which the blocks see and the head does not (none
    here; `vit_registers.ViTRegisters` adds its registers). Called inside ``__call__``."""
    return x

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    if self.global_pool not in ("token", "avg"):
      raise ValueError(f"global_pool={self.global_pool!r}: allowed are ['token', 'avg']")
    if self.global_pool == "token" and not self.class_token:
      raise ValueError("global_pool='token' needs class_token=True")
    x = self.embed(images)
    tokens = x.shape[1]  # class token and patches: what the head reads
    x = nn.Dropout(self.dropout)(self.extra_tokens(x), deterministic=not train)
    x = vlorafy(self.block(), self.depth, self.vlora, scan=self.scan, remat=self.remat,
                lora=self.lora, name="blocks")(x, deterministic=not train)
    x = x[:, :tokens]
    if not self.fc_norm:
      x = layers.layer_norm("norm", self.dtype)(x)
    x = x[:, 0] if self.global_pool == "token" else x[:, int(self.class_token):].mean(axis=1)
    if self.fc_norm:
      x = layers.layer_norm("fc_norm", self.dtype)(x)
    head = layers.dense(self.num_classes, ("embed", "vocab"), "head", jnp.float32)
    return constrain(head(x.astype(jnp.float32)), (BATCH, VOCAB))


def vit_param_count(*, img_size: int, patch_size: int, in_chans: int, dim: int, depth: int,
                    mlp_ratio: float, num_classes: int, compound_size: int = 1, rank: int = 0,
                    class_token: bool = True) -> int:
  """Closed-form parameter count of `ViT` with the four big matrices targeted (no list ranks).

  With D = dim, H = mlp_ratio * D, N = (img/patch)^2 patches, T = N + class_token:
    stem   = p^2 * in_chans * D + D  (patch conv)  + class_token * D + T * D  (pos)
    block  = 4D (two LayerNorms) + (3D^2 + 3D) + (D^2 + D) + (DH + H) + (HD + D)
    vector = 4D + 3D + D + H + D      (norms and biases: full in every layer)
    inc    = r * [(D + 3D) + (D + D) + (D + H) + (H + D)]   (A and B of qkv, proj, fc1, fc2)
    head   = 2D (final norm) + D * classes + classes
  Dense (s = 1): stem + L * block + head.
  VLoRA (s > 1): stem + (L / s) * block + (L - L / s) * (vector + inc) + head.
  """
  d, h = dim, int(dim * mlp_ratio)
  tokens = (img_size // patch_size) ** 2 + int(class_token)
  stem = patch_size ** 2 * in_chans * d + d + int(class_token) * d + tokens * d
  block = 4 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * h + h) + (h * d + d)
  vector = 4 * d + 3 * d + d + h + d
  inc = rank * ((d + 3 * d) + (d + d) + (d + h) + (h + d))
  head = 2 * d + d * num_classes + num_classes
  if compound_size == 1:
    return stem + depth * block + head
  bases = depth // compound_size
  return stem + bases * block + (depth - bases) * (vector + inc) + head


class ViTFamily(family.Family):
  """Image classification: ``image [B,H,W,C]``, ``label [B]``; cross-entropy with label smoothing.

  ``config.model``: num_classes, img_size, in_chans, patch_size, class_token, global_pool.
  """

  name = "vit"
  sources = ("digits", "npz", "tfds")
  input_keys = ("image",)
  classifies_images = True
  exports_timm = True
  config_keys = {
      "model.num_classes": Int(required=True, lo=1, doc="classes of the head"),
      "model.img_size": Int(required=True, lo=1, doc="image height = width"),
      "model.in_chans": Int(required=True, lo=1, doc="image channels"),
      "model.patch_size": Int(required=True, lo=1, doc="patch height = width (divides img_size)"),
      "model.class_token": Bool(default=True, doc="prepend a class token"),
      "model.global_pool": Choice(choices=("token", "avg"), default="token",
                                  doc="class token or mean of patches"),
  }

  def build(self, mcfg, vlora, lora) -> ViT:
    return ViT(**self.vit_kwargs(mcfg), **family.shared_kwargs(mcfg, vlora, lora))

  def vit_kwargs(self, mcfg) -> dict:
    """The ViT's own module arguments (beside `family.shared_kwargs`)."""
    return dict(num_classes=mcfg.num_classes, patch_size=mcfg.patch_size,
                mlp_ratio=mcfg.mlp_ratio, class_token=mcfg.class_token,
                global_pool=mcfg.global_pool)

  def sample_inputs(self, mcfg, batch: int = 2):
    return (jax.ShapeDtypeStruct((batch, mcfg.img_size, mcfg.img_size, mcfg.in_chans),
                                 jnp.float32),)

  def targets(self, batch, example_weight):
    return batch["label"], example_weight

  def example_batch(self, mcfg, batch: int, rng):
    shape = (batch, mcfg.img_size, mcfg.img_size, mcfg.in_chans)
    return {"image": rng.normal(size=shape).astype(np.float32),
            "label": rng.integers(0, mcfg.num_classes, batch).astype(np.int32)}

  def sequence_length(self, mcfg) -> int:
    return (mcfg.img_size // mcfg.patch_size) ** 2 + int(self.model_config(mcfg).class_token)

  def check_data(self, mcfg, info: dict) -> None:
    h, w, c = info["image_shape"]
    if (mcfg.img_size, mcfg.img_size) != (h, w):
      raise family.bad("model.img_size", mcfg.img_size, f"the data's images are {h}x{w}")
    if mcfg.in_chans != c:
      raise family.bad("model.in_chans", mcfg.in_chans, f"the data's images have {c} channels")
    if mcfg.img_size % mcfg.patch_size:
      raise family.bad("model.patch_size", mcfg.patch_size,
                       f"must divide model.img_size={mcfg.img_size}")
    if mcfg.num_classes < info["num_classes"]:
      raise family.bad("model.num_classes", mcfg.num_classes,
                       f"the data has {info['num_classes']} classes")


FAMILY = ViTFamily()
