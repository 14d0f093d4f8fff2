"""The vertical increment chain: stacked factors -> per-layer weights. Pure JAX, no Flax.

For one targeted weight of a compound of ``s`` layers, with base ``W0`` and factors
``A_k [d_in, r]``, ``B_k [r, d_out]`` for ``k = 1 .. s-1``:

  cumulative (the paper):     W_k = W_{k-1} + scale * A_k @ B_k
  anchored   (official code): W_k = W0      + scale * A_k @ B_k
  tied       (official ``vl_enabled=False``): W_k = W0

With ``stop_gradient_base`` the ``W0`` seen by layers ``k >= 1`` is detached, so ``W0`` gets gradient
from the base layer only (what the official code does). A 1-D target (bias, norm scale) carries a
full-vector increment ``delta_k [d]`` in place of ``A_k @ B_k`` and no scale.

Every function here works on all compounds at once: leading axis ``C`` (compounds), then ``s-1``
(steps). The chain is ONE ``jax.lax.scan`` over the steps whose carry is the running weight of every
compound, accumulated in float32 whatever the parameter dtype, so the compiled program does not grow
with the compound size.
"""

from __future__ import annotations

import math
from typing import Literal

import jax
import jax.numpy as jnp

Mode = Literal["cumulative", "anchored", "tied"]
Scaling = Literal["standard", "rslora"]
MODES = ("cumulative", "anchored", "tied")
SCALINGS = ("standard", "rslora")
INITS = ("official", "zero_b")


def lora_scale(alpha: float, rank: int, scaling: Scaling = "standard") -> float:
  """``alpha / r`` (LoRA, the official code) or ``alpha / sqrt(r)`` (rsLoRA)."""
  if scaling == "standard":
    return alpha / rank
  if scaling == "rslora":
    return alpha / math.sqrt(rank)
  raise ValueError(f"scaling={scaling!r} is not one of {SCALINGS}")


def increments(a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
  """``scale * A_k @ B_k`` for every compound and step, in float32: [C, s-1, d_in, d_out]."""
  f32 = jnp.float32
  # HIGHEST: on TPU the default f32 matmul runs in bf16 passes; the factors are tiny, exactness is cheap.
  return scale * jnp.einsum("ckir,ckro->ckio", a.astype(f32), b.astype(f32),
                            precision=jax.lax.Precision.HIGHEST)


def chain(
    base: jax.Array,
    deltas: jax.Array | None,
    *,
    mode: Mode,
    stop_gradient_base: bool = False,
) -> jax.Array:
  """All ``s`` effective weights of every compound from the base and the increments.

  Args:
    base: ``[C, *shape]``, layer 0 of each compound.
    deltas: ``[C, s-1, *shape]``, the increments ``Delta_k`` (already scaled), or ``None`` for tied.
    mode: ``cumulative``, ``anchored`` or ``tied``.
    stop_gradient_base: detach ``W0`` in layers ``k >= 1`` (official behaviour).

  Returns:
    ``[C, s, *shape]`` in float32: index ``[c, 0]`` is the base itself (it carries its gradient),
    ``[c, k]`` the weight of layer ``k`` of compound ``c``.
  """
  base32 = base.astype(jnp.float32)
  if mode == "tied":
    if deltas is not None:
      raise ValueError("mode='tied' takes no increments")
    return base32[:, None]  # broadcast over the compound by the caller (see `expand`)
  if mode not in ("cumulative", "anchored"):
    raise ValueError(f"mode={mode!r} is not one of {MODES}")
  start = jax.lax.stop_gradient(base32) if stop_gradient_base else base32
  steps = jnp.moveaxis(deltas.astype(jnp.float32), 1, 0)  # [s-1, C, *shape]: scan over steps

  def step(carry, delta):
    w = carry + delta
    # cumulative: the next layer grows from this one; anchored: every layer grows from W0.
    return (w if mode == "cumulative" else carry), w

  _, later = jax.lax.scan(step, start, steps)
  return jnp.concatenate([base32[:, None], jnp.moveaxis(later, 0, 1)], axis=1)


def expand(weights: jax.Array, compound_size: int) -> jax.Array:
  """``[C, s or 1, *shape]`` -> ``[C * s, *shape]``: one weight per layer, in layer order."""
  c = weights.shape[0]
  weights = jnp.broadcast_to(weights, (c, compound_size) + weights.shape[2:])
  return weights.reshape((c * compound_size,) + weights.shape[2:])


def chain_reference_unrolled(base, deltas, *, mode: Mode, stop_gradient_base: bool = False):
  """The same as `chain`, as a plain Python loop over compounds and layers (tests only)."""
  out = []
  for c in range(base.shape[0]):
    w0 = base[c].astype(jnp.float32)
    w0_later = jax.lax.stop_gradient(w0) if stop_gradient_base else w0
    layers, prev = [w0], w0_later
    for k in range(deltas.shape[1]):
      w = (prev if mode == "cumulative" else w0_later) + deltas[c, k].astype(jnp.float32)
      layers.append(w)
      prev = w
    out.append(jnp.stack(layers))
  return jnp.stack(out)


def kaiming_uniform_a_sqrt5(key: jax.Array, shape, fan_in: int, dtype=jnp.float32) -> jax.Array:
  """torch ``kaiming_uniform_(a=sqrt(5))``: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in)
  return jax.random.uniform(key, shape, dtype, -bound, bound)


def init_factors(key, *, compounds: int, steps: int, d_in: int, d_out: int, rank: int,
                 init: str = "official", dtype=jnp.float32):
  """Stacked factors ``A [C, s-1, d_in, r]`` and ``B [C, s-1, r, d_out]``.

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
