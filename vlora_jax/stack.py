"""`vlorafy`: any Flax block -> a layer stack run as ONE scan, dense or VLoRA.

A VLoRA stack is the dense stack with a different parameterisation: the block is written once and
applied per layer with weights that come either straight from stacked per-layer parameters (dense) or
from `materialize` (base per compound + the increment chain of `chain.py`). So the compiled program
is one scan over layers plus one scan over compound steps, whatever the depth.

Parameters of a stack (leading axes named for sharding rules):

  per_layer/<path>  [L, *shape]            ('layers', ...)  non-targeted params, full in every layer
  base/<path>       [C, *shape]            ('compound', ...) layer 0 of each compound
  inc_a/<path>      [C, s-1, d_in, r]      ('compound', 'step', ..., 'rank')
  inc_b/<path>      [C, s-1, r, d_out]     ('compound', 'step', 'rank', ...)
  inc_vec/<path>    [C, s-1, d]            full-vector increments of targeted 1-D params

These five group names are reserved: `params.py` groups counts by them and optimizer rules
(e.g. ``.*/inc_[ab]/.*``) select by them.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from vlora_jax import chain
from vlora_jax.spec import Layout, VLoRASpec, dense_layout

GROUPS = ("per_layer", "base", "inc_a", "inc_b", "inc_vec")

# Named remat policies (jax.checkpoint_policies); "none" = no rematerialisation.
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

BlockFactory = Callable[..., nn.Module]


def _flat(tree) -> dict[str, Any]:
  return traverse_util.flatten_dict(tree, sep="/")


def _nest(flat: dict[str, Any]):
  return traverse_util.unflatten_dict(flat, sep="/")


def block_param_shapes(block: nn.Module, *args, **kwargs):
  """``{path: ShapeDtypeStruct}`` and ``{path: logical axis names}`` of one block (no compute)."""
  boxed = jax.eval_shape(functools.partial(block.init, **kwargs), jax.random.key(0), *args)
  boxed = boxed["params"]
  names = jax.tree.map(lambda b: b.names if isinstance(b, nn.LogicallyPartitioned) else None,
                       boxed, is_leaf=lambda b: isinstance(b, nn.LogicallyPartitioned))
  shapes = _flat(nn.unbox(boxed))
  names = {p: n for p, n in _flat(names).items()}
  names = {p: names.get(p) or (None,) * len(s.shape) for p, s in shapes.items()}
  return shapes, names


def materialize(stack_params, layout: Layout):
  """Stack parameters -> per-layer dense parameters ``{path: [L, *shape]}`` (as a nested dict).

  The result is exactly the ``per_layer`` tree of a dense stack of the same block, so it can be
  loaded into the dense model (merged inference) or exported. Targeted weights come out of the
  increment chain in float32 and are cast back to the parameter dtype.
  """
  p = {g: _flat(stack_params.get(g, {})) for g in GROUPS}
  spec, s = layout.spec, layout.compound_size
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
      deltas = chain.increments(a, b, e.scale).reshape(a.shape[:2] + e.shape)
    w = chain.chain(base, deltas, mode=spec.mode, stop_gradient_base=spec.stop_gradient_base)
    out[e.path] = chain.expand(w, s).astype(base.dtype)
  return _nest(out)


def init_stack_params(key, block: nn.Module, layout: Layout, sample_args, kwargs):
  """Fresh stack parameters, each group a nested dict (unboxed)."""
  k_layers, k_factors = jax.random.split(key)
  keys = jax.random.split(k_layers, layout.num_layers)
  init_one = lambda k: nn.unbox(block.init(k, *sample_args, **kwargs)["params"])
  full = _flat(jax.vmap(init_one)(keys))  # [L, ...]: every layer initialised like the dense model
  groups = {g: {} for g in GROUPS}
  s, c = layout.compound_size, layout.compounds
  for i, e in enumerate(layout.entries):
    if e.role == "full":
      groups["per_layer"][e.path] = full[e.path]
      continue
    groups["base"][e.path] = full[e.path][::s]  # layer 0 of each compound: the dense init
    if e.role == "vector":  # official: full-vector increments start at zero
      groups["inc_vec"][e.path] = jnp.zeros((c, s - 1) + e.shape, full[e.path].dtype)
    elif e.role == "lowrank":
      a, b = chain.init_factors(jax.random.fold_in(k_factors, i), compounds=c, steps=s - 1,
                                d_in=e.d_in, d_out=e.d_out, rank=e.rank, init=layout.spec.init,
                                dtype=full[e.path].dtype)
      groups["inc_a"][e.path], groups["inc_b"][e.path] = a, b
  return {g: _nest(v) for g, v in groups.items() if v}


def stack_axis_names(layout: Layout, names: dict[str, tuple]):
  """Logical axis names of every stack parameter (for sharding rules)."""
  groups = {g: {} for g in GROUPS}
  for e in layout.entries:
    n = tuple(names[e.path])
    if e.role == "full":
      groups["per_layer"][e.path] = ("layers",) + n
      continue
    groups["base"][e.path] = ("compound",) + n
    if e.role == "vector":
      groups["inc_vec"][e.path] = ("compound", "step") + n
    elif e.role == "lowrank":
      groups["inc_a"][e.path] = ("compound", "step", n[0] if len(n) == 2 else None, "rank")
      groups["inc_b"][e.path] = ("compound", "step", "rank", n[-1])
  return {g: _nest(v) for g, v in groups.items() if v}


class LayerStack(nn.Module):
  """``num_layers`` applications of one block, dense (``vlora=None``) or VLoRA.

  Attributes:
    block: a factory returning the block, called as ``block(parent=None)``; the block is called as
      ``block(x, *args, deterministic=..., **kwargs) -> x``. `vlorafy` builds this from a module.
    num_layers: depth L.
    vlora: the parameterisation; ``None`` for the dense stack.
    scan: one ``jax.lax.scan`` over layers (default); False runs the unrolled reference path,
      numerically identical, for tests.
    remat: a name in `REMAT_POLICIES`.
  """

  block: BlockFactory
  num_layers: int
  vlora: VLoRASpec | None = None
  scan: bool = True
  remat: str = "none"

  def _block(self) -> nn.Module:
    return self.block(parent=None)

  def layout_for(self, *args, **kwargs) -> tuple[Layout, dict]:
    """The resolved layout and logical names for these call arguments (shapes only)."""
    if self.num_layers < 1:
      raise ValueError(f"num_layers={self.num_layers}: must be >= 1")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"remat={self.remat!r}: allowed are {list(REMAT_POLICIES)}")
    structs = jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)), args)
    shapes, names = block_param_shapes(self._block(), *structs, deterministic=True, **kwargs)
    shapes = {p: s.shape for p, s in shapes.items()}
    if self.vlora is None:
      return dense_layout(shapes, self.num_layers), names
    return self.vlora.layout(shapes, self.num_layers), names

  @nn.compact
  def __call__(self, x, *args, deterministic: bool = True, **kwargs):
    block = self._block()
    layout, names = self.layout_for(x, *args, **kwargs)
    axis_names = stack_axis_names(layout, names)

    cache = {}

    def fresh(group):
      def init_fn(rng):
        if "v" not in cache:  # one init of all groups; each group is its own named param
          zeros = jax.tree.map(jnp.zeros_like, (x, *args))
          cache["v"] = init_stack_params(rng, block, layout, zeros, dict(deterministic=True, **kwargs))
        return jax.tree.map(nn.LogicallyPartitioned, cache["v"][group], axis_names[group],
                            is_leaf=lambda n: isinstance(n, tuple))
      return init_fn

    params = {g: self.param(g, fresh(g)) for g in axis_names}
    weights = materialize(params, layout) if self.vlora is not None else params["per_layer"]

    rngs = None
    if not deterministic and self.has_rng("dropout"):
      rngs = jax.random.split(self.make_rng("dropout"), self.num_layers)

    def layer(h, xs):
      w, rng = xs
      h = block.apply({"params": w}, h, *args, deterministic=deterministic,
                      rngs={"dropout": rng} if rng is not None else None, **kwargs)
      return h, None

    policy = REMAT_POLICIES[self.remat]
    if self.remat != "none":
      layer = jax.checkpoint(layer, policy=policy, prevent_cse=not self.scan)
    if self.scan:
      x, _ = jax.lax.scan(layer, x, (weights, rngs))
    else:
      for i in range(self.num_layers):
        x, _ = layer(x, jax.tree.map(lambda a: a[i], (weights, rngs)))
    return x


def vlorafy(block: nn.Module | BlockFactory, num_layers: int, vlora: VLoRASpec | None = None,
            **stack_kwargs) -> LayerStack:
  """Turns any Flax block into a layer stack of ``num_layers`` layers, VLoRA if ``vlora`` is given.

  ``block`` is an (unbound) module instance or a factory accepting ``parent=``. The same block gives
  the dense stack with ``vlora=None``: only the parameterisation differs.
  """
  if isinstance(block, nn.Module):
    template = block
    block = lambda parent=None: template.clone(parent=parent)
  return LayerStack(block=block, num_layers=num_layers, vlora=vlora, **stack_kwargs)


def layout_from_params(stack_params, spec: VLoRASpec | None) -> Layout:
  """Recovers the layout of a stack from its parameters and the spec that made them."""
  per_layer = _flat(stack_params.get("per_layer", {}))
  base = _flat(stack_params.get("base", {}))
  shapes = {p: tuple(a.shape[1:]) for p, a in per_layer.items()}
  if spec is None:
    return dense_layout(shapes, next(iter(per_layer.values())).shape[0])
  shapes.update({p: tuple(a.shape[1:]) for p, a in base.items()})
  num_layers = next(iter(base.values())).shape[0] * spec.compound_size
  return spec.layout(shapes, num_layers)


def is_stack(tree) -> bool:
  return isinstance(tree, dict) and bool(tree) and set(tree) <= set(GROUPS) and (
      "per_layer" in tree or "base" in tree)


def merge(params, spec: VLoRASpec | None):
  """Every VLoRA stack in a params tree -> its dense ``per_layer`` form (merged inference/export).

  The result loads into the model's dense twin (``model.clone(vlora=None)``).
  """
  if is_stack(params):
    return {"per_layer": materialize(params, layout_from_params(params, spec))} if spec else params
  if isinstance(params, dict):
    return {k: merge(v, spec) for k, v in params.items()}
  return params
