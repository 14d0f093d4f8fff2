"""References the stack is tested against: the prefix-sum chain over stacked increments (the
method's definition as a scan), and a float64 layer loop written from the definitions.

``materialize_prefix_sum`` materialises: every layer's weights at once, the increments
``scale * A_k @ B_k`` of every compound and step, then ONE ``jax.lax.scan`` over the steps whose
carry is the running weight of every compound, in float32. `stack.materialize` and the layer stack
must agree with it.
"""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from vlora_jax.core import chain as chain_lib


class ToyBlock(nn.Module):
  """A block that is not a transformer block: names and shapes unlike the ViT's."""
  width: int = 8

  @nn.compact
  def __call__(self, x, gate, *, deterministic=True):
    h = nn.Dense(2 * self.width, name="up")(nn.LayerNorm(name="ln")(x))
    h = jnp.tanh(h) * gate
    return x + nn.Dense(self.width, name="down")(h)


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
    mode: str,
    stop_gradient_base: bool = False,
) -> jax.Array:
  """All ``s`` effective weights of every compound from the base and the increments.

  Args:
    base: ``[C, *shape]``, layer 0 of each compound.
    deltas: ``[C, s-1, *shape]``, the increments ``Delta_k`` (already scaled; ``[C, s, ...]`` for
      relaxed), or ``None`` for tied.
    mode: ``cumulative``, ``anchored``, ``tied`` or ``relaxed``.
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
  if mode == "relaxed":  # every layer, the first included, is the shared base plus its own step
    return base32[:, None] + deltas.astype(jnp.float32)
  if mode not in ("cumulative", "anchored"):
    raise ValueError(f"mode={mode!r} is not one of {chain_lib.MODES}")
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


def chain_reference_unrolled(base, deltas, *, mode: str, stop_gradient_base: bool = False):
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




def _flat(tree):
  return traverse_util.flatten_dict(tree, sep="/")


def materialize_prefix_sum(stack_params, layout, lora_entries=()):
  """Every layer's weights ``{path: [L, *shape]}`` (flat) by the prefix-sum chain, then adapters."""
  p = {g: _flat(stack_params.get(g, {})) for g in
       ("per_layer", "base", "inc_a", "inc_b", "inc_vec", "lora_a", "lora_b")}
  spec = layout.spec
  out = {}
  for e in layout.entries:
    if e.role == "full":
      out[e.path] = p["per_layer"][e.path]
      continue
    base = p["base"][e.path]
    if e.role == "tied":
      deltas = None
    elif e.role == "vector":
      deltas = p["inc_vec"][e.path]
    else:
      a, b = p["inc_a"][e.path], p["inc_b"][e.path]
      deltas = increments(a, b, e.scale).reshape(a.shape[:2] + e.shape)
    w = chain(base, deltas, mode=spec.mode, stop_gradient_base=spec.stop_gradient_base)
    out[e.path] = expand(w, layout.compound_size).astype(base.dtype)
  for e in lora_entries:
    w = out[e.path]
    delta = jnp.einsum("lir,lro->lio", p["lora_a"][e.path].astype(jnp.float32),
                       p["lora_b"][e.path].astype(jnp.float32), precision="highest")
    out[e.path] = (w.astype(jnp.float32) + e.scale * delta.reshape(w.shape)).astype(w.dtype)
  return out


def layer_weights_float64(stack_params, spec, num_layers, lora=None):
  """``[{path: float64 weight}]`` for every layer, written from the definitions in numpy.

  Works on concrete arrays only (no gradient); `layer_weights_x64` is the differentiable twin.
  """
  return [{k: np.asarray(v) for k, v in w.items()}
          for w in layer_weights_x64(stack_params, spec, num_layers, lora, xp=np)]


def layer_weights_x64(stack_params, spec, num_layers, lora=None, xp=jnp):
  """Per-layer weights from the definitions, in float64 (``xp=jnp`` under `jax.enable_x64` is
  differentiable, with the stop-gradient written as `jax.lax.stop_gradient`)."""
  p = {g: _flat(stack_params.get(g, {})) for g in
       ("per_layer", "base", "inc_a", "inc_b", "inc_vec", "lora_a", "lora_b")}
  f64 = lambda a: xp.asarray(a, dtype=np.float64)
  sg = (lambda a: a) if xp is np else jax.lax.stop_gradient
  paths = {q for g in ("per_layer", "base") for q in p[g]}
  s = spec.compound_size if spec else 1
  layers = []
  for layer in range(num_layers):
    c, k = divmod(layer, s)
    weights = {}
    for path in paths:
      if path in p["per_layer"]:
        weights[path] = f64(p["per_layer"][path][layer])
        continue
      i = next(i for i, t in enumerate(spec.targets) if re.fullmatch(t, path))
      w0 = f64(p["base"][path][c])
      scale = chain_lib.lora_scale(spec.alphas[i], spec.ranks[i], spec.scaling)
      if spec.mode == "relaxed":  # step k is layer k's own increment on the shared base
        if path in p["inc_vec"]:
          weights[path] = w0 + f64(p["inc_vec"][path][c, k])
        else:
          d = scale * (f64(p["inc_a"][path][c, k]) @ f64(p["inc_b"][path][c, k]))
          weights[path] = w0 + d.reshape(w0.shape)
        continue
      if k == 0 or spec.mode == "tied":
        weights[path] = w0
        continue
      deltas = []
      for j in range(k):  # step j is the increment of layer j + 1
        if path in p["inc_vec"]:
          deltas.append(f64(p["inc_vec"][path][c, j]))
        else:
          d = scale * (f64(p["inc_a"][path][c, j]) @ f64(p["inc_b"][path][c, j]))
          deltas.append(d.reshape(w0.shape))
      start = sg(w0) if spec.stop_gradient_base else w0
      w = start + (sum(deltas) if spec.mode == "cumulative" else deltas[-1])
      weights[path] = w
    for path in p["lora_a"]:
      a, b = f64(p["lora_a"][path][layer]), f64(p["lora_b"][path][layer])
      weights[path] = weights[path] + lora.scale * (a @ b).reshape(weights[path].shape)
    layers.append(weights)
  return layers
