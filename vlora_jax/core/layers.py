"""Transformer building blocks, written once and used by every model (dense or VLoRA alike).

Parameter names follow timm (``norm1``, ``attn/qkv``, ``attn/proj``, ``norm2``, ``mlp/fc1``,
``mlp/fc2``) so that PyTorch checkpoints map one to one and VLoRA targets read the same in both
codebases. Every parameter carries logical axis names (``embed``, ``mlp``, ``qkv``, ``vocab``...)
that the training config maps onto mesh axes.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlora_jax.core import chain
from vlora_jax.core.partitioning import (ATTENTION_HEADS, BATCH, HEADS, LENGTH, MLP,
                                         RESIDUAL, constrain, per_shard)
from vlora_jax.core.remat import OUT_PROJ, QKV_PROJ, tag

Dtype = Any
LN_EPS = 1e-6  # timm's ViT LayerNorm eps
ROPE_BASE = 10000.0  # RoFormer / GPT-NeoX frequency base


def flat_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
                     **kwargs):
  """``lax.dot_general`` computing ``x [..., d] @ W [d, f]`` as one 2-D matmul ``[n, d] @ [d, f]``.

  Why: for a 3-D ``x [B, T, d]`` the weight gradient ``x^T dy`` contracts two dims (B and T), and
  XLA:CPU canonicalises that dot with a transposed copy of the activation gradient (or of ``x``)
  before it, one per weight per layer. Flattening first leaves a plain 2-D dot that reads both in
  place: the MLP block's train step 0.71x on the CIFAR config's shapes (see
  benchmarks/results/perf_notes.md). The reshapes are free (row-major bitcasts), and merging a
  batch-sharded leading dim keeps its sharding. Other dimension numbers, or extra keyword
  arguments (e.g. ``out_sharding``, which names the 3-D output), go to ``lax.dot_general`` as is.
  """
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
  if kwargs or not (lhs.ndim > 2 and rhs.ndim == 2 and tuple(lhs_contract) == (lhs.ndim - 1,)
          and tuple(rhs_contract) == (0,) and not lhs_batch and not rhs_batch):
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type, **kwargs)
  rows = math.prod(lhs.shape[:-1])  # not -1: a zero-width d would leave it undefined
  out = jax.lax.dot_general(lhs.reshape(rows, lhs.shape[-1]), rhs, (((1,), (0,)), ((), ())),
                            precision=precision, preferred_element_type=preferred_element_type)
  return out.reshape(*lhs.shape[:-1], rhs.shape[-1])


class Dense(nn.Dense):
  """`nn.Dense` that also takes a `chain.LowRankWeight` kernel (what a VLoRA stack gives the
  layers whose base is detached) and multiplies by it through `chain.lowrank_matmul`, whose
  backward pass never forms the weight's gradient where it is not needed. Any other kernel, or a
  compute dtype other than float32, takes `nn.Dense`'s path (a `LowRankWeight` then reads as its
  merged array). Written out rather than calling ``super().__call__``, so that a method
  interceptor (`convert.calibrate`) sees one call per layer."""
  dot_general: Any = flat_dot_general

  @nn.compact
  def __call__(self, inputs):
    kernel = self.param("kernel", self.kernel_init, (jnp.shape(inputs)[-1], self.features),
                        self.param_dtype)
    bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias else None)
    f32 = jnp.float32
    if (isinstance(kernel, chain.LowRankWeight) and kernel.dtype == f32
        and jnp.result_type(inputs) == f32 and self.dtype in (None, f32)):
      rows = math.prod(inputs.shape[:-1])
      y = chain.lowrank_matmul(inputs.reshape(rows, inputs.shape[-1]), kernel.w0, kernel.lhs,
                               kernel.rhs, kernel.gate).reshape(*inputs.shape[:-1], self.features)
    else:
      inputs, kernel, bias = self.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
      y = self.dot_general(inputs, kernel, (((inputs.ndim - 1,), (0,)), ((), ())),
                           precision=self.precision)
    if bias is not None:
      y += jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
    return y


def dense(features: int, names: tuple[str, str], name: str, dtype: Dtype, use_bias: bool = True):
  """A Linear with timm's init (trunc-normal 0.02, zero bias) and logical axis names."""
  return Dense(
      features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32, name=name,
      kernel_init=nn.with_logical_partitioning(nn.initializers.truncated_normal(0.02), names),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, names[1:]))


@functools.partial(jax.custom_jvp, nondiff_argnums=(3,))
def normalize(x, scale, bias, eps: float):
  """LayerNorm over the last axis in float32: ``(x - mean) / sqrt(var + eps) * scale + bias``.

  Why its own derivative: differentiated as written (as ``nn.LayerNorm`` is), the backward pass
  keeps three ``x``-sized intermediates and four per-row ones; this rule keeps the normalised
  ``x`` and ``1 / sqrt(var + eps)``, one of each, so a scanned stack carries fewer residual stacks.
  """
  return _normalized(x, eps)[0] * scale + bias


def _normalized(x, eps):
  centred = x - jnp.mean(x, axis=-1, keepdims=True)
  inv_std = jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + eps)
  return centred * inv_std, inv_std


@normalize.defjvp
def _normalize_jvp(eps, primals, tangents):
  (x, scale, bias), (t_x, t_scale, t_bias) = primals, tangents
  x_hat, inv_std = _normalized(x, eps)
  mean = lambda v: jnp.mean(v, axis=-1, keepdims=True)
  t_hat = inv_std * (t_x - mean(t_x) - x_hat * mean(x_hat * t_x))
  return x_hat * scale + bias, t_hat * scale + x_hat * t_scale + t_bias


class LayerNorm(nn.Module):
  """timm's LayerNorm (eps 1e-6, ``scale`` and ``bias``), statistics and result in float32, the
  output cast to ``dtype`` (`normalize`)."""
  dtype: Dtype = jnp.float32
  epsilon: float = LN_EPS

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                       (d,), jnp.float32)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
                      (d,), jnp.float32)
    f32 = jnp.float32
    y = normalize(x.astype(f32), scale.astype(f32), bias.astype(f32), self.epsilon)
    return y.astype(self.dtype or x.dtype)


def layer_norm(name: str, dtype: Dtype):
  return LayerNorm(dtype=dtype, name=name)


# ``model.attention``: the kernel behind `attend`. 'xla' runs anywhere; 'cudnn' is cuDNN's fused
# (flash) attention on NVIDIA GPUs, for bfloat16 inputs; 'pallas' is the Pallas flash attention
# kernel for TPUs (jax.experimental.pallas.ops.tpu), which never holds a [T, T] score matrix.
ATTENTION_IMPLS = ("xla", "cudnn", "pallas")


def attend(q, k, v, mask=None, causal: bool = False, implementation: str = "xla"):
  """Scaled dot-product attention over ``[B, T, H, hd]`` queries and ``[B, S, K, hd]`` keys and
  values (``K`` divides ``H``: grouped-query attention).

  q, k and v stay in the compute dtype, so bfloat16 reaches the fused kernels and the MXU; the
  logits and the softmax are float32 (``jax.nn.dot_product_attention`` computes them so for
  bfloat16 inputs, and so does the Pallas kernel). The Pallas kernel takes no padding mask: where
  one is given (padded batches, decoding from a KV cache), XLA's attention runs instead.
  """
  if implementation not in ATTENTION_IMPLS:
    raise ValueError(f"model.attention={implementation!r}: allowed are {list(ATTENTION_IMPLS)}")
  k, v = k.astype(q.dtype), v.astype(q.dtype)
  if implementation == "pallas" and mask is None:
    out = _pallas_flash(q, k, v, causal)
  else:
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal,
                                       implementation=None if implementation == "pallas"
                                       else implementation)
  return constrain(out, ATTENTION_HEADS)


def _pallas_flash(q, k, v, causal: bool):
  """The Pallas TPU flash attention kernel on ``[B, T, H, hd]``, each device on its own shard
  (the kernel has no GSPMD rule). Key/value heads are repeated up to the query heads."""
  from jax.experimental.pallas.ops.tpu import flash_attention as pallas_tpu
  groups = q.shape[2] // k.shape[2]
  if groups > 1:
    k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
  scale = 1.0 / math.sqrt(q.shape[-1])

  def kernel(q, k, v):  # [B, T, H, hd] -> the kernel's [B, H, T, hd] and back
    heads_first = lambda a: jnp.swapaxes(a, 1, 2)
    out = pallas_tpu.flash_attention(heads_first(q), heads_first(k), heads_first(v),
                                     causal=causal, sm_scale=scale)
    return heads_first(out)

  # Split by examples and heads only: a device's kernel must see every key of its queries and the
  # whole head width, whatever the activation rules do with the length and kv axes.
  return per_shard(kernel, (BATCH, None, HEADS, None), q, k, v)


def rotary(x, positions, base: float = ROPE_BASE):
  """Rotary position embedding (RoFormer, GPT-NeoX half-split form) of ``x [B, T, H, hd]``.

  Channel pairs ``(i, i + hd/2)`` are rotated by ``positions * base^(-2i/hd)``, so the dot product of
  a rotated query and key depends on their positions only through the difference. ``positions`` is
  ``[T]`` (every sequence alike) or ``[B, T]`` (each its own, as in left-padded decoding). No
  parameters.
  """
  hd = x.shape[-1]
  if hd % 2:
    raise ValueError(f"rotary embeddings need an even head dimension; got head_dim={hd}")
  freqs = base ** (-jnp.arange(0, hd // 2, dtype=jnp.float32) / (hd // 2))
  angles = jnp.asarray(positions, jnp.float32)[..., None] * freqs  # [(B,) T, hd/2]
  cos, sin = jnp.cos(angles)[..., None, :], jnp.sin(angles)[..., None, :]  # over heads
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


# How a layer meets its KV cache (the ``decode`` argument of the attention layers and blocks):
#   None       whole sequences, no cache: training and evaluation
#   "prefill"  the first call of a decode: its tokens go into the cache, and cross-attention
#              projects the encoder memory into keys and values once and keeps them
#   "step"     every later call: its tokens are appended; cross-attention reads what it kept
# Self-attention treats "prefill" and "step" alike: both append their tokens at the cache index.
DECODE_MODES = (None, "prefill", "step")


def check_decode(decode) -> None:
  if decode not in DECODE_MODES:
    raise ValueError(f"decode={decode!r}: allowed are {list(DECODE_MODES)}")


class SelfAttention(nn.Module):
  """timm's Attention: one fused qkv projection, heads split as (3, heads, head_dim).

  ``rope=True`` rotates queries and keys by their positions (`rotary`); it adds no parameters, so
  parameter names and shapes are the same with or without it. ``positions`` (``[t]`` or ``[B, t]``)
  are the tokens' positions; default ``arange(t)``, or ``index + arange(t)`` when decoding.

  Decoding (``decode`` set; causal attention only) keeps a KV cache in the ``cache`` collection:
  ``k`` and ``v`` ``[B, T_max, H, hd]`` and ``index``, the next free slot. The call that creates
  the cache sizes it (``model.init(..., decode="prefill")`` on ``T_max`` tokens). Every later call
  writes its ``t`` tokens' keys and values from ``index`` on, and query ``i`` attends to the slots
  up to ``index + i`` that ``mask`` (``[B, 1, 1, T_max]``: which slots hold real tokens) allows:
  the rows of the full causal pass, one at a time.
  """
  dim: int
  num_heads: int
  causal: bool = False
  dtype: Dtype = jnp.float32
  rope: bool = False
  attention: str = "xla"  # `ATTENTION_IMPLS`
  rope_base: float = ROPE_BASE  # the rotary frequency base (`rotary`)

  @nn.compact
  def __call__(self, x, mask=None, positions=None, *, decode=None):
    check_decode(decode)
    b, t, _ = x.shape
    hd = self.dim // self.num_heads
    qkv = tag(dense(3 * self.dim, ("embed", "qkv"), "qkv", self.dtype)(x), QKV_PROJ)
    q, k, v = (constrain(y.reshape(b, t, self.num_heads, hd), ATTENTION_HEADS)
               for y in jnp.split(qkv, 3, axis=-1))
    if decode is None:
      if self.rope:
        pos = jnp.arange(t) if positions is None else positions
        q, k = rotary(q, pos, self.rope_base), rotary(k, pos, self.rope_base)
      out = attend(q, k, v, mask, self.causal, self.attention)
    else:
      out = self._attend_cached(q, k, v, mask, positions)
    out = dense(self.dim, ("heads", "embed"), "proj", self.dtype)(out.reshape(b, t, self.dim))
    return tag(out, OUT_PROJ)

  def _attend_cached(self, q, k, v, mask, positions):
    if not self.causal:
      raise ValueError("decoding with a KV cache needs causal self-attention (causal=True)")
    t = q.shape[1]
    cached_k = self.variable("cache", "k", jnp.zeros, k.shape, k.dtype)
    cached_v = self.variable("cache", "v", jnp.zeros, v.shape, v.dtype)
    index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
    start = index.value
    if self.rope:
      pos = start + jnp.arange(t) if positions is None else positions
      q, k = rotary(q, pos, self.rope_base), rotary(k, pos, self.rope_base)
    for cached, new in ((cached_k, k), (cached_v, v)):
      cached.value = constrain(jax.lax.dynamic_update_slice(
          cached.value, new.astype(cached.value.dtype), (0, start, 0, 0)), ATTENTION_HEADS)
    index.value = start + t
    slots = jnp.arange(cached_k.value.shape[1])
    allowed = (slots[None, :] <= start + jnp.arange(t)[:, None])[None, None]  # [1, 1, t, T_max]
    if mask is not None:
      allowed = allowed & mask
    return attend(q, cached_k.value, cached_v.value, allowed, implementation=self.attention)


class CrossAttention(nn.Module):
  """Queries from x, keys and values (fused ``kv``) from the encoder memory.

  Decoding keeps the memory's keys and values in the ``cache`` collection: projected once, by the
  ``"prefill"`` call, and read by every ``"step"`` (which ignores ``memory``).
  """
  dim: int
  num_heads: int
  dtype: Dtype = jnp.float32
  attention: str = "xla"  # `ATTENTION_IMPLS`

  @nn.compact
  def __call__(self, x, memory, mask=None, *, decode=None):
    check_decode(decode)
    b, t, _ = x.shape
    hd = self.dim // self.num_heads
    q = tag(dense(self.dim, ("embed", "heads"), "q", self.dtype)(x), QKV_PROJ)
    q = constrain(q.reshape(b, t, self.num_heads, hd), ATTENTION_HEADS)
    kv_proj = dense(2 * self.dim, ("embed", "qkv"), "kv", self.dtype)
    heads = lambda y: constrain(y.reshape(b, memory.shape[1], self.num_heads, hd),
                                ATTENTION_HEADS)
    if decode is None:
      k, v = (heads(y) for y in jnp.split(tag(kv_proj(memory), QKV_PROJ), 2, axis=-1))
    else:
      kept_k = self.variable("cache", "k", lambda: heads(jnp.zeros_like(memory, self.dtype)))
      kept_v = self.variable("cache", "v", lambda: heads(jnp.zeros_like(memory, self.dtype)))
      if decode == "prefill":
        k, v = (heads(y) for y in jnp.split(kv_proj(memory), 2, axis=-1))
        kept_k.value, kept_v.value = k.astype(kept_k.value.dtype), v.astype(kept_v.value.dtype)
      k, v = kept_k.value, kept_v.value
    out = attend(q, k, v, mask, implementation=self.attention).reshape(b, t, self.dim)
    return tag(dense(self.dim, ("heads", "embed"), "proj", self.dtype)(out), OUT_PROJ)


@jax.custom_jvp
def gelu(x):
  """Exact (erf) GELU, ``x * Phi(x)``, as ``jax.nn.gelu(approximate=False)`` computes it.

  Why its own derivative: differentiated as written, the backward pass keeps two ``erfc``
  intermediates of every layer's ``[B, T, mlp]`` pre-activation beside its output; this rule keeps
  one array, ``Phi(x) + x phi(x)``, so a scanned stack carries two ``mlp``-wide residual stacks
  instead of four (see benchmarks/results/perf_notes.md).
  """
  return jax.nn.gelu(x, approximate=False)


@gelu.defjvp
def _gelu_jvp(primals, tangents):
  (x,), (t,) = primals, tangents
  cdf = 0.5 * jax.lax.erfc(-x * (1 / math.sqrt(2)))
  pdf = jnp.exp(-0.5 * x * x) * (1 / math.sqrt(2 * math.pi))
  return x * cdf, (cdf + x * pdf) * t


class Mlp(nn.Module):
  """fc1 -> exact (erf) GELU -> dropout -> fc2, as timm."""
  dim: int
  hidden: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    h = gelu(dense(self.hidden, ("embed", "mlp"), "fc1", self.dtype)(x))
    h = constrain(h, (BATCH, LENGTH, MLP))
    h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
    return dense(self.dim, ("mlp", "embed"), "fc2", self.dtype)(h)


class EncoderBlock(nn.Module):
  """Pre-norm block: x + attn(norm1(x)), then x + mlp(norm2(x)). ViT, and causal for LMs.

  ``positions`` and ``decode`` go to the self-attention (`SelfAttention`: rotary positions, the KV
  cache of a causal block).
  """
  dim: int
  num_heads: int
  mlp_dim: int
  dropout: float = 0.0
  causal: bool = False
  dtype: Dtype = jnp.float32
  rope: bool = False  # rotary positions in self-attention (LMs); no extra parameters
  attention: str = "xla"  # `ATTENTION_IMPLS`

  @nn.compact
  def __call__(self, x, mask=None, positions=None, *, deterministic: bool = True, decode=None):
    drop = lambda h: nn.Dropout(self.dropout)(h, deterministic=deterministic)
    x = constrain(x, RESIDUAL)
    h = SelfAttention(self.dim, self.num_heads, self.causal, self.dtype, self.rope,
                      self.attention, name="attn")(
        layer_norm("norm1", self.dtype)(x), mask, positions, decode=decode)
    x = constrain(x + drop(h), RESIDUAL)
    h = Mlp(self.dim, self.mlp_dim, self.dropout, self.dtype, name="mlp")(
        layer_norm("norm2", self.dtype)(x), deterministic)
    return constrain(x + drop(h), RESIDUAL)


class DecoderBlock(nn.Module):
  """Pre-norm decoder block: causal self-attention, cross-attention to memory, MLP.

  ``decode``: both attentions keep a cache (`SelfAttention`, `CrossAttention`).
  """
  dim: int
  num_heads: int
  mlp_dim: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  attention: str = "xla"  # `ATTENTION_IMPLS`

  @nn.compact
  def __call__(self, x, memory, self_mask=None, cross_mask=None, *, deterministic: bool = True,
               decode=None):
    drop = lambda h: nn.Dropout(self.dropout)(h, deterministic=deterministic)
    x = constrain(x, RESIDUAL)
    h = SelfAttention(self.dim, self.num_heads, True, self.dtype, attention=self.attention,
                      name="attn")(layer_norm("norm1", self.dtype)(x), self_mask, decode=decode)
    x = constrain(x + drop(h), RESIDUAL)
    h = CrossAttention(self.dim, self.num_heads, self.dtype, self.attention, name="cross")(
        layer_norm("norm_cross", self.dtype)(x), memory, cross_mask, decode=decode)
    x = constrain(x + drop(h), RESIDUAL)
    h = Mlp(self.dim, self.mlp_dim, self.dropout, self.dtype, name="mlp")(
        layer_norm("norm2", self.dtype)(x), deterministic)
    return constrain(x + drop(h), RESIDUAL)
