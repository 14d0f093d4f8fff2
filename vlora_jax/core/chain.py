"""The vertical increment chain: stacked factors -> per-layer weights. Pure JAX, no Flax.

For one targeted weight of a compound of ``s`` layers, with base ``W0`` and factors
``A_k [d_in, r]``, ``B_k [r, d_out]`` for ``k = 1 .. s-1``:

  cumulative (the paper):     W_k = W_{k-1} + scale * A_k @ B_k
  anchored   (official code): W_k = W0      + scale * A_k @ B_k
  tied       (official ``vl_enabled=False``): W_k = W0

and, for ``k = 0 .. s-1`` (``s`` steps, the first layer included):

  relaxed    (Relaxed Recursive Transformers): W_k = W0 + scale * A_k @ B_k, where ``W0`` is a
             shared weight that is not itself a layer (compression starts it at the compound's
             mean); every layer of the compound, the first included, has its own increment

With ``stop_gradient_base`` the ``W0`` seen by layers ``k >= 1`` is detached, so ``W0`` gets gradient
from the base layer only (what the official code does). A 1-D target (bias, norm scale) carries a
full-vector increment ``delta_k [d]`` in place of ``A_k @ B_k`` and no scale.

The math is written for one layer at a time, which is how the layer stack trains and how
`stack.materialize` builds every layer for merged inference. Layer ``k``'s weight is
``W0 + L_k @ R`` with ``L_k, R`` taken from its compound's factors (`layer_factors`): cumulative
puts all ``s-1`` steps side by side in one low-rank product and masks the steps after ``k`` out of
``L_k``, so no running weight is carried from layer to layer; anchored takes step ``k`` alone.
`layer_weight` adds the product (and a horizontal LoRA adapter's, side by side with it) to the
base in float32 whatever the parameter dtype. It is a `jax.custom_vjp` whose residuals are its
inputs (parameters every layer shares, and the layer's indices), and whose forward the stack
recomputes in the backward pass (`REBUILT_IN_BACKWARD`): only one layer's weights exist at a time,
in the forward and in the backward pass.

Why a masked product and not a running sum for cumulative: a running weight carried from layer to
layer would be a per-layer residual of the layer scan (every layer's weights kept for the backward
pass, the memory this design removes). The mask costs ``(s-1) r`` ranks instead of ``k r``: a
``d_in x d_out x (s-1) r`` matmul a layer, small next to the layer's own ``tokens x d_in x d_out``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import jax
import jax.numpy as jnp

Mode = Literal["cumulative", "anchored", "tied", "relaxed"]
Scaling = Literal["standard", "rslora"]
MODES = ("cumulative", "anchored", "tied", "relaxed")
SCALINGS = ("standard", "rslora")
INITS = ("official", "zero_b")


def num_steps(mode: Mode, compound_size: int) -> int:
  """Increments per compound: one per layer after the base, or one per layer (``relaxed``)."""
  if mode == "tied":
    return 0
  return compound_size if mode == "relaxed" else compound_size - 1


def lora_scale(alpha: float, rank: int, scaling: Scaling = "standard") -> float:
  """``alpha / r`` (LoRA, the official code) or ``alpha / sqrt(r)`` (rsLoRA)."""
  if scaling == "standard":
    return alpha / rank
  if scaling == "rslora":
    return alpha / math.sqrt(rank)
  raise ValueError(f"scaling={scaling!r} is not one of {SCALINGS}")


# ---------------------------------------------------------------------------- one layer at a time

# The name of the primitive under which JAX stages the forward of a `jax.custom_vjp` defined with
# ``optimize_remat=True`` (`layer_weight`). A remat policy that answers "recompute" for it rebuilds
# each layer's weights in the backward pass instead of saving them (`stack.weight_policy`).
REBUILT_IN_BACKWARD = "remat_opt"
_HIGHEST = jax.lax.Precision.HIGHEST  # on TPU the default f32 matmul runs in bf16 passes


def step_mask(k: jax.Array, steps: int, mode: Mode) -> jax.Array:
  """Which of a compound's ``steps`` increments layer ``k`` sums, as float32 ``[steps]``.

  Increment ``j`` (0-based) is that of layer ``j + 1``: cumulative layer ``k`` sums ``j < k``,
  anchored layer ``k`` takes ``j = k - 1`` alone, and layer 0 (the base) takes none. In
  ``relaxed`` increment ``j`` is layer ``j``'s, and layer ``k`` takes ``j = k``.
  """
  j = jnp.arange(steps)
  if mode == "relaxed":
    return (j == k).astype(jnp.float32)
  return (j < k if mode == "cumulative" else j == k - 1).astype(jnp.float32)


def layer_factors(a: jax.Array, b: jax.Array, c: jax.Array, k: jax.Array, *, mode: Mode,
                  scale: float):
  """``(lhs, rhs)`` in float32 with ``lhs @ rhs`` = the increments of layer ``k`` of compound ``c``.

  Args:
    a: ``[C, steps, d_in, r]`` and ``b``: ``[C, steps, r, d_out]``, the stacked factors
      (`num_steps`).
    c, k: the layer's compound and its index in it (traced ints).
    mode: ``cumulative``: every step of the compound side by side (rank ``(s-1) r``), the steps
      after ``k`` masked to zero in ``lhs``, so no running weight is carried from layer to layer;
      ``anchored``: step ``k - 1`` alone (rank ``r``), zero for the base layer; ``relaxed``: step
      ``k`` alone.
    scale: the LoRA scale, folded into ``lhs``.
  """
  f32 = jnp.float32
  steps, d_in, r = a.shape[1:]
  if mode in ("anchored", "relaxed"):  # one slice each: a[c, j], b[c, j]
    j = k if mode == "relaxed" else jnp.maximum(k - 1, 0)
    # One index dtype for all four: under jax_enable_x64 a literal 0 would be int64.
    start = tuple(jnp.asarray(i, jnp.int32) for i in (c, j, 0, 0))
    a = jax.lax.dynamic_slice(a, start, (1, 1) + a.shape[2:]).reshape(d_in, r)
    b = jax.lax.dynamic_slice(b, start, (1, 1) + b.shape[2:]).reshape(r, -1)
    live = scale if mode == "relaxed" else scale * (k > 0)
    return a.astype(f32) * live, b.astype(f32)
  a, b = jax.lax.dynamic_index_in_dim(a, c, 0, False), jax.lax.dynamic_index_in_dim(b, c, 0, False)
  live = step_mask(k, steps, mode) * scale
  lhs = (a.astype(f32) * live[:, None, None]).transpose(1, 0, 2).reshape(d_in, steps * r)
  return lhs, b.astype(f32).reshape(steps * r, b.shape[-1])


def vector_factors(deltas: jax.Array, c: jax.Array, k: jax.Array, *, mode: Mode):
  """``(lhs [1, steps], rhs [steps, d])`` for a 1-D target's full-vector increments
  ``[C, steps, d]``."""
  deltas = jax.lax.dynamic_index_in_dim(deltas, c, 0, False)
  return step_mask(k, deltas.shape[0], mode)[None], deltas.astype(jnp.float32)


def adapter_factors(a: jax.Array, b: jax.Array, *, scale: float):
  """``(lhs, rhs)`` of one layer's horizontal LoRA adapter ``A [*in, r]``, ``B [r, d_out]``."""
  return a.astype(jnp.float32).reshape(-1, a.shape[-1]) * scale, b.astype(jnp.float32)


# What a layer's low-rank terms are made of: a name in a term's static description -> its factors.
# ``product``: factors given as they are (a `LowRankWeight` read as an array).
TERMS = {"increments": layer_factors, "vector": vector_factors, "adapter": adapter_factors,
         "product": lambda lhs, rhs: (lhs, rhs)}


def term_factors(terms, inputs):
  """``(lhs, rhs)``: the factors of every term side by side, so one product sums them all.

  ``terms`` is a tuple of static ``(name, keyword arguments as a tuple of pairs)``, ``inputs`` the
  matching tuple of array tuples, e.g. ``("increments", (("mode", "cumulative"), ("scale", .5)))``
  with ``(a, b, c, k)``.
  """
  factors = [TERMS[name](*x, **dict(kw)) for (name, kw), x in zip(terms, inputs)]
  if len(factors) == 1:
    return factors[0]
  return (jnp.concatenate([f[0] for f in factors], axis=1),
          jnp.concatenate([f[1] for f in factors], axis=0))


def _layer_weight(compounds, terms, base, index, inputs, base_grad):
  del compounds, base_grad  # the gradient's business
  w = base if index is None else jax.lax.dynamic_index_in_dim(base, index, keepdims=False)
  if not terms:
    return w
  lhs, rhs = term_factors(terms, inputs)
  delta = jnp.matmul(lhs, rhs, precision=_HIGHEST)
  return (w.astype(jnp.float32) + delta.reshape(w.shape)).astype(w.dtype)


def _layer_weight_fwd(compounds, terms, base, index, inputs, base_grad):
  w = _layer_weight(compounds, terms, base, index, inputs, base_grad)
  return w, (index, inputs, base_grad)


def _layer_weight_bwd(compounds, terms, residuals, g):
  index, inputs, base_grad = residuals
  d_inputs = None
  if terms:
    (lhs, rhs), factors_vjp = jax.vjp(lambda x: term_factors(terms, x), inputs)
    g32 = g.astype(jnp.float32).reshape(lhs.shape[0], rhs.shape[1])
    d_lhs = jnp.matmul(g32, rhs.T, precision=_HIGHEST)
    d_rhs = jnp.matmul(lhs.T, g32, precision=_HIGHEST)
    (d_inputs,) = factors_vjp((d_lhs, d_rhs))
  d_w = g if base_grad is None else g * base_grad.astype(g.dtype)
  if index is None:
    return d_w, None, d_inputs, None
  # Scattered into zeros: the layer scan's transpose adds this to its running [C, ...] gradient,
  # and XLA rewrites that sum into an in-place update of one compound's slice.
  d_base = jax.lax.dynamic_update_index_in_dim(
      jnp.zeros((compounds,) + g.shape, g.dtype), d_w, index, 0)
  return d_base, None, d_inputs, None


_layer_weight_vjp = jax.custom_vjp(_layer_weight, nondiff_argnums=(0, 1))
_layer_weight_vjp.defvjp(_layer_weight_fwd, _layer_weight_bwd, optimize_remat=True)


def layer_weight(base, index=None, terms=(), inputs=(), base_grad=None):
  """One layer's weight: ``base[index]`` plus the product of its low-rank ``terms``, in float32,
  cast to the base's dtype.

  Args:
    base: ``[C, *shape]`` (one weight per compound; ``index`` picks one) or ``[*shape]``
      (``index=None``).
    index: the layer's compound (a traced int), or None.
    terms, inputs: the low-rank terms (see `term_factors`): static descriptions, and the arrays
      each is computed from. No terms: the weight is ``base[index]``.
    base_grad: None (the base gets the full gradient) or a float scalar gate on it: 0 detaches
      the base (the official code's stop-gradient), 1 keeps it.

  A `jax.custom_vjp` whose backward pass needs only its inputs (the stack's parameters, shared by
  every layer, and the layer's indices), never the weight: the weight's gradient ``g`` reaches the
  factors through ``g @ rhs^T`` and ``lhs^T @ g``, and the base as ``g`` in its compound's slice.
  Under `stack.weight_policy` the weight itself is rebuilt in the backward pass, so at most one
  layer's weights exist at a time.
  """
  compounds = None if index is None else base.shape[0]
  return _layer_weight_vjp(compounds, tuple(terms), base, index, tuple(inputs), base_grad)


# ------------------------------------------------------------ kept factored for the matmul


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LowRankWeight:
  """A layer's weight ``w0 + lhs @ rhs`` kept as its parts, for the matmul that consumes it.

  Why: the weight's gradient in ``y = x @ W`` is ``g = x^T dy``, ``tokens x d_in x d_out`` FLOPs,
  as many as the matmul itself, and the official code computes it in every layer. The factors need
  only ``x^T (dy rhs^T)`` and ``(x lhs)^T dy``, ``tokens x (d_in + d_out) x rank`` FLOPs each, and
  ``w0`` needs ``g`` only where its gradient is not detached (the base layer of a compound):
  `lowrank_matmul` computes ``g`` there alone. A consumer that does not know this type (any block
  not built from `layers.dense`, or a compute dtype other than float32) reads it as the array
  ``w0 + lhs @ rhs`` (``__jax_array__``), with the gradients of `layer_weight`.

  Fields (``w0`` first: Flax checks a parameter's first leaf against the shape a module declares):
    w0: ``[d_in, d_out]``, the compound's base weight.
    lhs, rhs: ``[d_in, R]``, ``[R, d_out]`` float32, the layer's low-rank terms side by side.
    gate: float32 scalar; ``w0``'s gradient is ``gate * g`` (0 where the base is detached).
  """
  w0: jax.Array
  lhs: jax.Array
  rhs: jax.Array
  gate: jax.Array

  shape = property(lambda self: self.w0.shape)
  dtype = property(lambda self: self.w0.dtype)
  ndim = property(lambda self: self.w0.ndim)

  def __jax_array__(self):
    return layer_weight(self.w0, None, (("product", ()),), ((self.lhs, self.rhs),), self.gate)


def _merged(w0, lhs, rhs):
  delta = jnp.matmul(lhs, rhs, precision=_HIGHEST)
  return (w0.astype(jnp.float32) + delta).astype(w0.dtype)


def _factored(compounds, terms, base, index, inputs, gate):
  del compounds
  w0 = base if index is None else jax.lax.dynamic_index_in_dim(base, index, keepdims=False)
  lhs, rhs = term_factors(terms, inputs)
  return LowRankWeight(w0, lhs, rhs, jnp.asarray(gate, jnp.float32))


def _factored_fwd(compounds, terms, base, index, inputs, gate):
  return _factored(compounds, terms, base, index, inputs, gate), (index, inputs)


def _factored_bwd(compounds, terms, residuals, ct):
  index, inputs = residuals
  _, factors_vjp = jax.vjp(lambda x: term_factors(terms, x), inputs)
  (d_inputs,) = factors_vjp((ct.lhs, ct.rhs))
  if index is None:
    return ct.w0, None, d_inputs, None
  d_base = jax.lax.dynamic_update_index_in_dim(
      jnp.zeros((compounds,) + ct.w0.shape, ct.w0.dtype), ct.w0, index, 0)
  return d_base, None, d_inputs, None


_factored_vjp = jax.custom_vjp(_factored, nondiff_argnums=(0, 1))
_factored_vjp.defvjp(_factored_fwd, _factored_bwd, optimize_remat=True)


def factored_weight(base, index, terms, inputs, base_grad) -> LowRankWeight:
  """`layer_weight`'s weight as a `LowRankWeight`: the same value, and a backward pass that never
  forms the weight's gradient where the base is detached (``base_grad`` 0). Arguments as
  `layer_weight`'s; ``terms`` must not be empty and ``base_grad`` must be given. Rebuilt in the
  backward pass like `layer_weight` (`REBUILT_IN_BACKWARD`)."""
  compounds = None if index is None else base.shape[0]
  return _factored_vjp(compounds, tuple(terms), base, index, tuple(inputs), base_grad)


@jax.custom_vjp
def lowrank_matmul(x: jax.Array, w0, lhs, rhs, gate) -> jax.Array:
  """``x [n, d_in] @ (w0 + lhs @ rhs)`` in float32; the backward pass of `LowRankWeight`.

  ``dx = dy @ W^T`` as for any weight. Where ``gate`` is 0 the parts' gradients are the skinny
  ``x^T (dy rhs^T)`` and ``(x lhs)^T dy``, and ``w0`` gets zeros; elsewhere ``g = x^T dy`` once,
  ``w0`` gets ``gate * g`` and the factors ``g rhs^T``, ``lhs^T g`` (cheaper once ``g`` exists).
  A `jax.lax.cond`, so a scanned stack, whose gate is traced, runs one branch per layer.
  """
  return x @ _merged(w0, lhs, rhs)


def _lowrank_matmul_fwd(x, w0, lhs, rhs, gate):
  return lowrank_matmul(x, w0, lhs, rhs, gate), (x, w0, lhs, rhs, gate)


def _lowrank_matmul_bwd(residuals, dy):
  x, w0, lhs, rhs, gate = residuals
  dx = dy @ _merged(w0, lhs, rhs).T

  def full(_):
    g = x.T @ dy
    return (g * gate, jnp.matmul(g, rhs.T, precision=_HIGHEST),
            jnp.matmul(lhs.T, g, precision=_HIGHEST))

  def factors_only(_):
    return jnp.zeros_like(w0), x.T @ (dy @ rhs.T), (x @ lhs).T @ dy

  d_w0, d_lhs, d_rhs = jax.lax.cond(gate != 0, full, factors_only, None)
  return dx, d_w0, d_lhs, d_rhs, jnp.zeros_like(gate)


lowrank_matmul.defvjp(_lowrank_matmul_fwd, _lowrank_matmul_bwd)


# ------------------------------------------------------------------------------------------ init


def kaiming_uniform_a_sqrt5(key: jax.Array, shape, fan_in: int, dtype=jnp.float32) -> jax.Array:
  """torch ``kaiming_uniform_(a=sqrt(5))``: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in)
  return jax.random.uniform(key, shape, dtype, -bound, bound)


def init_factors(key, *, compounds: int, steps: int, d_in: int, d_out: int, rank: int,
                 init: str = "official", dtype=jnp.float32):
  """Stacked factors ``A [C, steps, d_in, r]`` and ``B [C, steps, r, d_out]``.

  ``official``: both kaiming-uniform(a=sqrt(5)) as in the official code, whose torch tensors are
  ``A [r, d_in]`` (fan_in d_in) and ``B [r, d_out]`` (fan_in d_out): increments are non-zero at init.
  ``zero_b``: A as above, B = 0: every layer starts equal to its predecessor (LoRA's convention).
  """
  if init not in INITS:
    raise ValueError(f"init={init!r} is not one of {INITS}")
  ka, kb = jax.random.split(key)
  a = kaiming_uniform_a_sqrt5(ka, (compounds, steps, d_in, rank), d_in, dtype)
  if init == "zero_b":
    b = jnp.zeros((compounds, steps, rank, d_out), dtype)
  else:
    b = kaiming_uniform_a_sqrt5(kb, (compounds, steps, rank, d_out), d_out, dtype)
  return a, b
