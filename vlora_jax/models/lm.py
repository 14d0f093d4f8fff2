"""Decoder-only language model (GPT-style), dense or VLoRA from one field (``vlora``).

Token embedding, learned position embedding (``positions='learned'``) or rotary positions inside
attention (``'rope'``), a stack of pre-norm causal `layers.EncoderBlock` run by `vlorafy` (the block
is written once; the stack is dense or VLoRA), final LayerNorm, and a head that is either its own
``head`` Dense or the transposed token embedding (``tie_embeddings``).
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
from vlora_jax.core.partitioning import BATCH, LENGTH, RESIDUAL, VOCAB, constrain
from vlora_jax.core.spec import VLoRASpec
from vlora_jax.core.stack import vlorafy

POSITIONS = ("learned", "rope")


def embed(vocab_size: int, dim: int, dtype, name: str = "embed") -> nn.Embed:
  """Token embedding (normal 0.02, as GPT-2), logical names ('vocab', 'embed')."""
  return nn.Embed(vocab_size, dim, dtype=dtype, param_dtype=jnp.float32, name=name,
                  embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                              ("vocab", "embed")))


def check_common(*, vocab_size: int, max_len: int, dim: int, num_heads: int, mlp_ratio: float,
                 dropout: float) -> None:
  """Shape checks shared by the LM and the encoder-decoder, naming the ``model.*`` key."""
  for key, v in (("vocab_size", vocab_size), ("max_len", max_len), ("dim", dim),
                 ("num_heads", num_heads)):
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
      raise ValueError(f"model.{key}={v!r}: must be an integer >= 1")
  if dim % num_heads:
    raise ValueError(f"model.num_heads={num_heads} does not divide model.dim={dim}")
  if not mlp_ratio > 0:
    raise ValueError(f"model.mlp_ratio={mlp_ratio!r}: must be > 0")
  if not 0.0 <= dropout < 1.0:
    raise ValueError(f"model.dropout={dropout!r}: must be in [0, 1)")


class LM(nn.Module):
  """Causal LM: ``apply(variables, tokens [B, T] int32, train=False) -> logits [B, T, V]``.

  Attributes:
    vocab_size: V.
    max_len: longest sequence (size of the learned position table; ``T <= max_len``).
    dim, depth, num_heads, mlp_ratio, dropout: the block stack (``depth`` = total layers L).
    positions: ``learned`` (added to the embeddings) or ``rope`` (rotary, inside attention).
    tie_embeddings: logits = h @ embedding.T (no separate head).
    vlora: the stack's VLoRA parameterisation; None for dense.
    lora: horizontal LoRA adapters on the stack (`lora.LoRASpec`); None for none.
    scan, remat, dtype: as `ViT`.
  """

  vocab_size: int
  max_len: int = 256
  dim: int = 256
  depth: int = 8
  num_heads: int = 4
  mlp_ratio: float = 4.0
  dropout: float = 0.0
  positions: str = "learned"
  tie_embeddings: bool = False
  vlora: VLoRASpec | None = None
  scan: bool = True
  remat: str = "none"
  dtype: jnp.dtype = jnp.float32
  lora: lora_lib.LoRASpec | None = None
  attention: str = "xla"  # `layers.ATTENTION_IMPLS`

  def check(self) -> None:
    check_common(vocab_size=self.vocab_size, max_len=self.max_len, dim=self.dim,
                 num_heads=self.num_heads, mlp_ratio=self.mlp_ratio, dropout=self.dropout)
    if self.positions not in POSITIONS:
      raise ValueError(f"model.positions={self.positions!r}: allowed are {list(POSITIONS)}")
    if self.positions == "rope" and (self.dim // self.num_heads) % 2:
      raise ValueError(f"model.positions='rope' needs an even head dim; dim={self.dim} / "
                       f"num_heads={self.num_heads} = {self.dim // self.num_heads}")

  def stack_specs(self):
    """``{stack name: (vlora, lora)}``: one stack."""
    return {"blocks": (self.vlora, self.lora)}

  def block(self) -> layers.EncoderBlock:
    return layers.EncoderBlock(self.dim, self.num_heads, int(self.dim * self.mlp_ratio),
                               self.dropout, causal=True, dtype=self.dtype,
                               rope=self.positions == "rope", attention=self.attention,
                               parent=None)

  @nn.compact
  def __call__(self, tokens, position_ids=None, mask=None, *, train: bool = False,
               decode=None):
    """Logits ``[B, T, V]`` (float32) of ``tokens [B, T]``.

    Args:
      position_ids: ``[B, T]`` position of every token (default ``arange(T)``): the learned table's
        row, or the rotary angle. Left-padded prompts start their positions at their first real
        token.
      mask: ``[B, 1, 1, T_keys]`` bool, the keys that hold real tokens (None: all); causality is
        added inside attention. When decoding, ``T_keys`` is the cache length.
      decode: None (whole sequences), or ``"prefill"`` / ``"step"``: append the tokens to the KV
        cache (`layers.SelfAttention`), which is sized by ``init(..., decode="prefill")`` on
        ``[B, T_max]`` tokens; apply with ``mutable=["cache"]``. `decoding.py` drives it.
    """
    self.check()
    layers.check_decode(decode)
    if tokens.ndim != 2:
      raise ValueError(f"tokens must be [batch, time] token ids; got shape {tokens.shape}")
    t = tokens.shape[1]
    if t > self.max_len:
      raise ValueError(f"sequence length {t} exceeds model.max_len={self.max_len}")
    if decode is not None and position_ids is None and self.positions == "learned":
      raise ValueError("decoding with learned positions needs position_ids (the tokens' places "
                       "in the sequence: the cache does not know them)")
    emb = embed(self.vocab_size, self.dim, self.dtype)
    x = emb(tokens)
    if self.positions == "learned":
      pos = self.param("pos_embed", nn.with_logical_partitioning(
          nn.initializers.normal(0.02), (None, None, "embed")), (1, self.max_len, self.dim))
      rows = (pos[0, :t][None] if position_ids is None
              else jnp.take(pos[0], position_ids, axis=0))
      x = x + rows.astype(x.dtype)
    x = constrain(nn.Dropout(self.dropout)(x, deterministic=not train), RESIDUAL)
    rope_positions = position_ids if self.positions == "rope" else None
    x = vlorafy(self.block(), self.depth, self.vlora, scan=self.scan, remat=self.remat,
                lora=self.lora, name="blocks")(x, mask, rope_positions, deterministic=not train,
                                               decode=decode)
    x = layers.layer_norm("norm", self.dtype)(x).astype(jnp.float32)
    if self.tie_embeddings:
      logits = x @ emb.embedding.astype(jnp.float32).T  # logits = h @ E^T, in float32
    else:
      logits = layers.dense(self.vocab_size, ("embed", "vocab"), "head", jnp.float32)(x)
    return constrain(logits, (BATCH, LENGTH, VOCAB))


class LMFamily(family.TokenFamily):
  """Next-token prediction: ``tokens [B, T+1]``; the model reads ``tokens[:, :-1]`` and predicts
  ``tokens[:, 1:]``.

  ``config.model``: vocab_size, max_len, positions ('learned' | 'rope'), tie_embeddings.
  """

  name = "lm"
  sources = ("text", "tfds")
  input_keys = ("tokens",)
  generates = True
  config_keys = {
      "model.vocab_size": Int(required=True, lo=1, doc="token ids < vocab_size"),
      "model.max_len": Int(required=True, lo=1, doc="context length T"),
      "model.positions": Choice(choices=POSITIONS, default="learned", doc="learned | rope"),
      "model.tie_embeddings": Bool(default=False, doc="the head is the token embedding"),
  }

  def build(self, mcfg, vlora, lora) -> LM:
    return LM(vocab_size=mcfg.vocab_size, max_len=mcfg.max_len, mlp_ratio=mcfg.mlp_ratio,
              positions=mcfg.positions, tie_embeddings=mcfg.tie_embeddings,
              **family.shared_kwargs(mcfg, vlora, lora))

  def sample_inputs(self, mcfg, batch: int = 2):
    return (jax.ShapeDtypeStruct((batch, mcfg.max_len), jnp.int32),)

  def inputs(self, batch) -> tuple:
    return (batch["tokens"][:, :-1],)

  def targets(self, batch, example_weight):
    targets = batch["tokens"][:, 1:]
    return targets, jnp.broadcast_to(example_weight[:, None], targets.shape)

  def example_batch(self, mcfg, batch: int, rng):
    return {"tokens": rng.integers(0, mcfg.vocab_size, (batch, mcfg.max_len + 1)).astype(np.int32)}

  def sequence_length(self, mcfg) -> int:
    return mcfg.max_len

  def finalize(self, sums: dict, prefix: str) -> dict[str, float]:
    out = super().finalize(sums, prefix)
    out[f"{prefix}/perplexity"] = float(jnp.exp(jnp.minimum(out[f"{prefix}/loss"], 50.0)))
    return out


FAMILY = LMFamily()
