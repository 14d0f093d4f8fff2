"""Llama-family decoder (Llama 2/3, SmolLM2...), dense or VLoRA from one field (``vlora``).

Token embedding, a stack of pre-norm blocks run by `vlorafy` (RMSNorm, grouped-query attention with
rotary positions, RMSNorm, SwiGLU MLP), a final RMSNorm and a head that is its own ``lm_head`` or
the transposed embedding (``tie_embeddings``). The parameters are named after Hugging Face's
``LlamaForCausalLM`` (``embed_tokens``, ``self_attn/q_proj``, ``k_proj``, ``v_proj``, ``o_proj``,
``mlp/gate_proj``, ``up_proj``, ``down_proj``, ``input_layernorm``, ``post_attention_layernorm``,
``norm``, ``lm_head``) so that its checkpoints map one to one (`vlora_jax.convert.hf_llama`), as
`layers` follows timm for the ViT. Rotary positions rotate the channel pairs ``(i, i + hd/2)``,
Hugging Face's layout (`layers.rotary`); llama.cpp's interleaved q/k rows are undone on import.

VLoRA targets the seven matrices of a block (`TARGETS`); the model decodes with the KV cache of
`layers.SelfAttention` (it is one, with separate projections and fewer key/value heads) and samples
through `vlora_jax.models.decoding` like the character LM.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from vlora_jax.core import layers
from vlora_jax.core import lora as lora_lib
from vlora_jax.config.keys import Bool, Float, Int
from vlora_jax.models import family, lm
from vlora_jax.core.partitioning import (ATTENTION_HEADS, BATCH, LENGTH, MLP, RESIDUAL, VOCAB,
                                         constrain)
from vlora_jax.core.remat import OUT_PROJ, QKV_PROJ, tag
from vlora_jax.core.spec import VLoRASpec
from vlora_jax.core.stack import vlorafy

# The family's VLoRA targets: every matrix of a block, one pattern each (a rank per target).
TARGETS = (r"self_attn/q_proj/kernel", r"self_attn/k_proj/kernel", r"self_attn/v_proj/kernel",
           r"self_attn/o_proj/kernel", r"mlp/gate_proj/kernel", r"mlp/up_proj/kernel",
           r"mlp/down_proj/kernel")
NORM_EPS = 1e-5  # Llama 2 / SmolLM2 RMSNorm eps (Hugging Face's LlamaConfig default is 1e-6)


def rms_norm(name: str, eps: float, dtype) -> nn.RMSNorm:
  """RMSNorm with a float32 ``scale`` named ('embed',): x / rms(x) * scale, reduced in float32."""
  return nn.RMSNorm(epsilon=eps, dtype=dtype, param_dtype=jnp.float32, name=name,
                    scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)))


class LlamaAttention(layers.SelfAttention):
  """Causal grouped-query attention with rotary positions: separate ``q_proj`` (``num_heads``
  heads), ``k_proj`` and ``v_proj`` (``num_kv_heads`` heads each, shared by ``num_heads /
  num_kv_heads`` query heads) and ``o_proj``, every head ``head_dim`` wide.

  Decoding keeps the parent's KV cache (`layers.SelfAttention._attend_cached`), ``[B, T_max,
  num_kv_heads, head_dim]``: grouped-query attention caches the key/value heads only.
  """
  num_kv_heads: int = 1
  head_dim: int = 64
  use_bias: bool = False  # Hugging Face's ``attention_bias``: biases on q, k, v and o

  @nn.compact
  def __call__(self, x, mask=None, positions=None, *, decode=None):
    layers.check_decode(decode)
    b, t, _ = x.shape
    hd = self.head_dim

    def heads(n: int, names: tuple[str, str], name: str):
      y = tag(layers.dense(n * hd, names, name, self.dtype, self.use_bias)(x), QKV_PROJ)
      return constrain(y.reshape(b, t, n, hd), ATTENTION_HEADS)

    q = heads(self.num_heads, ("embed", "heads"), "q_proj")
    k = heads(self.num_kv_heads, ("embed", "kv_heads"), "k_proj")
    v = heads(self.num_kv_heads, ("embed", "kv_heads"), "v_proj")
    if decode is None:
      pos = jnp.arange(t) if positions is None else positions
      q, k = layers.rotary(q, pos, self.rope_base), layers.rotary(k, pos, self.rope_base)
      out = layers.attend(q, k, v, mask, True, self.attention)
    else:
      out = self._attend_cached(q, k, v, mask, positions)
    out = out.reshape(b, t, self.num_heads * hd)
    out = layers.dense(self.dim, ("heads", "embed"), "o_proj", self.dtype, self.use_bias)(out)
    return tag(out, OUT_PROJ)


class SwiGLU(nn.Module):
  """down_proj(silu(gate_proj(x)) * up_proj(x)): Llama's MLP."""
  dim: int
  hidden: int
  use_bias: bool = False
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    gate = layers.dense(self.hidden, ("embed", "mlp"), "gate_proj", self.dtype, self.use_bias)(x)
    up = layers.dense(self.hidden, ("embed", "mlp"), "up_proj", self.dtype, self.use_bias)(x)
    h = constrain(nn.silu(gate) * up, (BATCH, LENGTH, MLP))
    return layers.dense(self.dim, ("mlp", "embed"), "down_proj", self.dtype, self.use_bias)(h)


class LlamaBlock(nn.Module):
  """Pre-norm block: x + self_attn(input_layernorm(x)), then x + mlp(post_attention_layernorm(x)).

  ``dropout`` (after attention and after the MLP; Hugging Face's Llama has none) is for training
  from scratch; at 0 the block is Hugging Face's.
  """
  dim: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  rope_base: float = layers.ROPE_BASE
  norm_eps: float = NORM_EPS
  attention_bias: bool = False
  mlp_bias: bool = False
  dropout: float = 0.0
  dtype: layers.Dtype = jnp.float32
  attention: str = "xla"  # `layers.ATTENTION_IMPLS`

  @nn.compact
  def __call__(self, x, mask=None, positions=None, *, deterministic: bool = True, decode=None):
    drop = lambda h: nn.Dropout(self.dropout)(h, deterministic=deterministic)
    x = constrain(x, RESIDUAL)
    attn = LlamaAttention(self.dim, self.num_heads, causal=True, dtype=self.dtype, rope=True,
                          attention=self.attention, rope_base=self.rope_base,
                          num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
                          use_bias=self.attention_bias, name="self_attn")
    h = attn(rms_norm("input_layernorm", self.norm_eps, self.dtype)(x), mask, positions,
             decode=decode)
    x = constrain(x + drop(h), RESIDUAL)
    h = SwiGLU(self.dim, self.mlp_dim, self.mlp_bias, self.dtype, name="mlp")(
        rms_norm("post_attention_layernorm", self.norm_eps, self.dtype)(x))
    return constrain(x + drop(h), RESIDUAL)


def _check_positive_int(key: str, value) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"model.{key}={value!r}: must be an integer >= 1")


class Llama(nn.Module):
  """Causal LM: ``apply(variables, tokens [B, T] int32, train=False) -> logits [B, T, V]``.

  The call is the character LM's (`lm.LM`): ``position_ids``, ``mask`` and ``decode`` as there, so
  `vlora_jax.models.decoding` drives both.

  Attributes:
    vocab_size: V.
    max_len: the context of training windows and of a decode's sliding window (rotary positions
      have no table: a longer context changes no parameter).
    dim, depth: width D and layers L.
    num_heads, num_kv_heads: query heads and key/value heads (grouped-query attention: the second
      divides the first; equal is multi-head attention, 1 multi-query).
    head_dim: width of a head (Hugging Face's ``head_dim``; not always ``dim / num_heads``).
    mlp_dim: SwiGLU hidden width (``intermediate_size``).
    rope_base: rotary frequency base (``rope_theta``).
    norm_eps: RMSNorm epsilon (``rms_norm_eps``).
    tie_embeddings: logits = h @ embedding.T (no ``lm_head``).
    attention_bias, mlp_bias: biases on q/k/v/o and on gate/up/down.
    dropout: after attention and MLP in every block (0 for a pretrained model).
    vlora, lora, scan, remat, dtype, attention: as `lm.LM`.
  """

  vocab_size: int
  max_len: int = 2048
  dim: int = 576
  depth: int = 30
  num_heads: int = 9
  num_kv_heads: int = 3
  head_dim: int = 64
  mlp_dim: int = 1536
  rope_base: float = 10000.0
  norm_eps: float = NORM_EPS
  tie_embeddings: bool = True
  attention_bias: bool = False
  mlp_bias: bool = False
  dropout: float = 0.0
  vlora: VLoRASpec | None = None
  scan: bool = True
  remat: str = "none"
  dtype: jnp.dtype = jnp.float32
  lora: lora_lib.LoRASpec | None = None
  attention: str = "xla"  # `layers.ATTENTION_IMPLS`

  def check(self) -> None:
    for key in ("vocab_size", "max_len", "dim", "depth", "num_heads", "num_kv_heads", "head_dim",
                "mlp_dim"):
      _check_positive_int(key, getattr(self, key))
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"model.num_kv_heads={self.num_kv_heads} does not divide model.num_heads="
                       f"{self.num_heads} (each key/value head serves a whole group of query "
                       "heads)")
    if self.head_dim % 2:
      raise ValueError(f"model.head_dim={self.head_dim}: must be even (rotary positions rotate "
                       "channel pairs)")
    for key in ("rope_base", "norm_eps"):
      if not getattr(self, key) > 0:
        raise ValueError(f"model.{key}={getattr(self, key)!r}: must be > 0")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"model.dropout={self.dropout!r}: must be in [0, 1)")

  def stack_specs(self):
    """``{stack name: (vlora, lora)}``: one stack."""
    return {"blocks": (self.vlora, self.lora)}

  def block(self) -> LlamaBlock:
    return LlamaBlock(self.dim, self.num_heads, self.num_kv_heads, self.head_dim, self.mlp_dim,
                      self.rope_base, self.norm_eps, self.attention_bias, self.mlp_bias,
                      self.dropout, self.dtype, self.attention, parent=None)

  @nn.compact
  def __call__(self, tokens, position_ids=None, mask=None, *, train: bool = False,
               decode=None):
    """Logits ``[B, T, V]`` (float32) of ``tokens [B, T]``; the arguments as `lm.LM`'s."""
    self.check()
    layers.check_decode(decode)
    if tokens.ndim != 2:
      raise ValueError(f"tokens must be [batch, time] token ids; got shape {tokens.shape}")
    if tokens.shape[1] > self.max_len:
      raise ValueError(f"sequence length {tokens.shape[1]} exceeds model.max_len={self.max_len}")
    emb = lm.embed(self.vocab_size, self.dim, self.dtype, name="embed_tokens")
    x = constrain(nn.Dropout(self.dropout)(emb(tokens), deterministic=not train), RESIDUAL)
    x = vlorafy(self.block(), self.depth, self.vlora, scan=self.scan, remat=self.remat,
                lora=self.lora, name="blocks")(x, mask, position_ids, deterministic=not train,
                                               decode=decode)
    x = rms_norm("norm", self.norm_eps, self.dtype)(x).astype(jnp.float32)
    if self.tie_embeddings:
      logits = x @ emb.embedding.astype(jnp.float32).T  # logits = h @ E^T, in float32
    else:
      logits = layers.dense(self.vocab_size, ("embed", "vocab"), "lm_head", jnp.float32,
                            use_bias=False)(x)
    return constrain(logits, (BATCH, LENGTH, VOCAB))


class LlamaFamily(lm.LMFamily):
  """Next-token prediction with a Llama (the character LM's task: ``tokens [B, T+1]``).

  ``config.model``: the LM's keys (vocab_size, max_len, tie_embeddings) and num_kv_heads,
  head_dim, mlp_dim, rope_base, norm_eps, attention_bias, mlp_bias. ``model.mlp_ratio`` and
  ``model.positions`` are not read: the MLP width is ``mlp_dim``, and positions are rotary.
  """

  name = "llama"
  sources = ("text", "tfds", "tokenized")
  hf_architecture = "LlamaForCausalLM"
  config_keys = {
      "model.vocab_size": Int(required=True, lo=1, doc="token ids < vocab_size"),
      "model.max_len": Int(required=True, lo=1, doc="context length T"),
      "model.tie_embeddings": Bool(default=True, doc="the head is the token embedding"),
      "model.num_kv_heads": Int(lo=1, nullable=True,
                                doc="key/value heads, dividing num_heads (None: num_heads)"),
      "model.head_dim": Int(lo=2, nullable=True, doc="per-head width, even (None: dim // "
                                                     "num_heads)"),
      "model.mlp_dim": Int(required=True, lo=1, doc="SwiGLU hidden width"),
      "model.rope_base": Float(lo=0, lo_open=True, default=layers.ROPE_BASE,
                               doc="rotary frequency base (rope_theta)"),
      "model.norm_eps": Float(lo=0, lo_open=True, default=NORM_EPS, doc="RMSNorm epsilon"),
      "model.attention_bias": Bool(default=False, doc="biases on q/k/v/o"),
      "model.mlp_bias": Bool(default=False, doc="biases on gate/up/down"),
  }

  def build(self, mcfg, vlora, lora) -> Llama:
    heads = mcfg.num_heads
    return Llama(vocab_size=mcfg.vocab_size, max_len=mcfg.max_len,
                 num_kv_heads=mcfg.num_kv_heads or heads,
                 head_dim=mcfg.head_dim or mcfg.dim // heads, mlp_dim=mcfg.mlp_dim,
                 rope_base=float(mcfg.rope_base), norm_eps=float(mcfg.norm_eps),
                 tie_embeddings=mcfg.tie_embeddings, attention_bias=mcfg.attention_bias,
                 mlp_bias=mcfg.mlp_bias,
                 **family.shared_kwargs(mcfg, vlora, lora))


FAMILY = LlamaFamily()
