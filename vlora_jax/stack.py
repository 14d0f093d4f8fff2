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
  lora_a/<path>     [L, d_in, r_h]         ('layers', ..., 'rank')  horizontal LoRA (`lora.py`),
  lora_b/<path>     [L, r_h, d_out]        ('layers', 'rank', ...)  only with ``lora=LoRASpec``

These group names are reserved: `params.py` groups counts by them and optimizer rules
(e.g. ``.*/inc_[ab]/.*``, ``.*/lora_[ab]/.*``) select by them.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from vlora_jax import chain
from vlora_jax import lora as lora_lib
from vlora_jax.spec import Layout, VLoRASpec, dense_layout

GROUPS = ("per_layer", "base", "inc_a", "inc_b", "inc_vec") + lora_lib.ADAPTER_GROUPS

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
    lora: horizontal LoRA adapters on top of the weights of every layer (`lora.LoRASpec`); added
      per layer inside the scan, so the adapted stack is never materialised as a whole.
  """

  block: BlockFactory
  num_layers: int
  vlora: VLoRASpec | None = None
  scan: bool = True
  remat: str = "none"
  lora: lora_lib.LoRASpec | None = None

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

    adapters, lora_entries = None, ()
    if self.lora is not None:
      lora_entries = self.lora.layout({e.path: e.shape for e in layout.entries})
      names_a, names_b = lora_lib.axis_names(lora_entries, names)
      dtypes = {e.path: _flat(weights)[e.path].dtype for e in lora_entries}

      def fresh_lora(i, axes):
        def init_fn(rng):
          ab = lora_lib.init_adapters(rng, lora_entries, self.num_layers)
          ab = {p: v.astype(dtypes[p]) for p, v in ab[i].items()}
          return jax.tree.map(nn.LogicallyPartitioned, _nest(ab), _nest(axes),
                              is_leaf=lambda n: isinstance(n, tuple))
        return init_fn

      adapters = tuple(_flat(self.param(g, fresh_lora(i, axes)))
                       for i, (g, axes) in enumerate(zip(lora_lib.ADAPTER_GROUPS,
                                                         (names_a, names_b))))

    rngs = None
    if not deterministic and self.has_rng("dropout"):
      rngs = jax.random.split(self.make_rng("dropout"), self.num_layers)

    def layer(h, xs):
      w, rng, ab = xs
      if ab is not None:  # this layer's adapters only: W_l + scale * A_l @ B_l
        w = lora_lib.add_adapters(w, ab[0], ab[1], lora_entries)
      h = block.apply({"params": w}, h, *args, deterministic=deterministic,
                      rngs={"dropout": rng} if rng is not None else None, **kwargs)
      return h, None

    policy = REMAT_POLICIES[self.remat]
    if self.remat != "none":
      layer = jax.checkpoint(layer, policy=policy, prevent_cse=not self.scan)
    if self.scan:
      x, _ = jax.lax.scan(layer, x, (weights, rngs, adapters))
    else:
      for i in range(self.num_layers):
        x, _ = layer(x, jax.tree.map(lambda a: a[i], (weights, rngs, adapters)))
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


def merge(params, spec, lora=None):
  """Every VLoRA stack in a params tree -> its dense ``per_layer`` form (merged inference/export).

  The result loads into the model's dense twin (``model.clone(vlora=None)``). Stacks with LoRA
  adapters (``lora_a``/``lora_b``) need ``lora``; the adapters are folded into the weights and the
  result loads into ``model.clone(vlora=None, lora=None)``. ``spec`` and ``lora`` are either one
  spec for every stack or a ``{stack module name: spec}`` dict (models whose stacks differ, e.g.
  an encoder and a decoder).
  """
  def pick(s, name, what):
    if not isinstance(s, Mapping):
      return s
    if name not in s:
      raise ValueError(f"merge: {what} is given per stack {sorted(s)} but has no entry for the "
                       f"stack {name!r}")
    return s[name]

  def go(tree, name):
    if is_stack(tree):
      return _merge_stack(tree, pick(spec, name, "spec"), pick(lora, name, "lora"))
    if isinstance(tree, dict):
      return {k: go(v, k) for k, v in tree.items()}
    return tree

  return go(params, None)


def _merge_stack(params, spec, lora):
  has_adapters = any(g in params for g in lora_lib.ADAPTER_GROUPS)
  if spec is None and not has_adapters:
    return params
  per_layer = materialize(params, layout_from_params(params, spec)) if spec else params["per_layer"]
  if has_adapters:
    if lora is None:
      raise ValueError("merge: this stack has LoRA adapters (lora_a/lora_b) but lora=None; pass "
                       "the model's LoRASpec")
    shapes = {p: tuple(a.shape[1:]) for p, a in _flat(per_layer).items()}
    entries = lora.layout(shapes)
    a, b = _flat(params["lora_a"]), _flat(params["lora_b"])
    if set(a) != {e.path for e in entries} or any(a[e.path].shape[-1] != e.rank for e in entries):
      raise ValueError(f"merge: adapters {sorted(a)} (ranks {[v.shape[-1] for v in a.values()]}) "
                       f"do not match lora targets {list(lora.targets)} at rank {lora.rank}")
    per_layer = lora_lib.add_adapters(per_layer, a, b, entries)
  return {"per_layer": per_layer}
