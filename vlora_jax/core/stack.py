"""`vlorafy`: any Flax block -> a layer stack run as ONE scan over its layers, dense or VLoRA.

A VLoRA stack is the dense stack with a different parameterisation: the block is written once and
applied per layer with weights that come either straight from stacked per-layer parameters (dense)
or from its compound's base and low-rank factors (`layer_params`, the math in `chain.py`). Each
layer builds its own weights inside the scan, and the backward pass builds them again instead of
keeping them (`weight_policy`), so the compiled program is one scan whatever the depth, and only
one layer's weights exist at a time: VLoRA's parameter saving is a memory saving. `materialize`
builds every layer's weights at once, for merged inference and export.

Parameters of a stack (leading axes named for sharding rules):

  per_layer/<path>  [L, *shape]            ('layers', ...)  non-targeted params, full in every layer
  base/<path>       [C, *shape]            ('compound', ...) layer 0 of each compound (relaxed:
                                           the shared weight every layer adds its increment to)
  inc_a/<path>      [C, S, d_in, r]        ('compound', 'step', ..., 'rank')
  inc_b/<path>      [C, S, r, d_out]       ('compound', 'step', 'rank', ...)
  inc_vec/<path>    [C, S, d]              full-vector increments of targeted 1-D params
  lora_a/<path>     [L, d_in, r_h]         ('layers', ..., 'rank')  horizontal LoRA (`lora.py`),
  lora_b/<path>     [L, r_h, d_out]        ('layers', 'rank', ...)  only with ``lora=LoRASpec``

``S`` is the number of increments a compound has (`Layout.steps`): ``s - 1``, or ``s`` in the
relaxed mode. These group names are reserved: `params.py` groups counts by them and optimizer rules
(e.g. ``.*/inc_[ab]/.*``, ``.*/lora_[ab]/.*``) select by them.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from vlora_jax.core import chain
from vlora_jax.core import lora as lora_lib
from vlora_jax.core.params import dense_twin
from vlora_jax.core import remat as remat_lib
from vlora_jax.core.spec import Layout, VLoRASpec, dense_layout

# The groups every layer of a compound reads (leading axis ``compound``), and all of them.
SHARED_GROUPS = ("base", "inc_a", "inc_b", "inc_vec")
GROUPS = ("per_layer",) + SHARED_GROUPS + lora_lib.ADAPTER_GROUPS

REMAT_POLICIES = remat_lib.POLICIES  # by name: see vlora_jax/core/remat.py

BlockFactory = Callable[..., nn.Module]

# {stack module name: unroll factor of its layer scan}; see `unrolled`.
_UNROLL: contextvars.ContextVar[Mapping[str, int]] = contextvars.ContextVar(
    "vlora_jax_unroll_layers", default={})


@contextlib.contextmanager
def unrolled(by_stack: Mapping[str, int]):
  """Within this context (while tracing), the layer scan of each named stack is unrolled by its
  factor: the same results, a loop body that holds that many layers. XLA's cost analysis counts a
  loop body once, so the difference between an unrolled and a plain compile is one layer's cost
  (`vlora_jax.compile` counts a whole step so)."""
  token = _UNROLL.set(dict(by_stack))
  try:
    yield
  finally:
    _UNROLL.reset(token)


def _flat(tree) -> dict[str, Any]:
  return traverse_util.flatten_dict(tree, sep="/")


def _nest(flat: dict[str, Any]):
  return traverse_util.unflatten_dict(flat, sep="/")


def takes_deterministic(block: nn.Module) -> bool:
  """Whether the block's ``__call__`` accepts ``deterministic=`` (dropout on/off); a block without
  dropout need not."""
  params = inspect.signature(type(block).__call__).parameters
  return "deterministic" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _mode(block: nn.Module, deterministic: bool) -> dict:
  return {"deterministic": deterministic} if takes_deterministic(block) else {}


def block_param_shapes(block: nn.Module, *args, **kwargs):
  """``{path: ShapeDtypeStruct}`` and ``{path: logical axis names}`` of one block (no compute)."""
  boxed = jax.eval_shape(functools.partial(block.init, **kwargs), jax.random.key(0), *args)
  boxed = boxed.get("params", {})  # a block without parameters has no 'params' collection
  names = jax.tree.map(lambda b: b.names if isinstance(b, nn.LogicallyPartitioned) else None,
                       boxed, is_leaf=lambda b: isinstance(b, nn.LogicallyPartitioned))
  shapes = _flat(nn.unbox(boxed))
  names = {p: n for p, n in _flat(names).items()}
  names = {p: names.get(p) or (None,) * len(s.shape) for p, s in shapes.items()}
  return shapes, names


def materialize(stack_params, layout: Layout, lora_entries=()):
  """Stack parameters -> per-layer dense parameters ``{path: [L, *shape]}`` (as a nested dict).

  Every layer's weights exactly as the stack builds them while it runs (`layer_params`), all at
  once: the ``per_layer`` tree of a dense stack of the same block, for merged inference or export.
  With ``lora_entries`` the stack's adapters (``lora_a``/``lora_b``) are folded in too.
  ``stack_params`` may be boxed, as ``init`` returns them.
  """
  stack_params = nn.unbox(stack_params)
  p = {g: _flat(stack_params.get(g, {})) for g in GROUPS}
  shared = {g: p[g] for g in SHARED_GROUPS if p[g]}
  adapters = (p["lora_a"], p["lora_b"]) if lora_entries else None

  def build(position, per_layer, adapters_i):
    return layer_params(layout, shared, per_layer, position, adapters_i, lora_entries)

  return _nest(jax.vmap(build)(positions(layout), p["per_layer"], adapters))


def init_stack_params(key, block: nn.Module, layout: Layout, sample_args, kwargs):
  """Fresh stack parameters, each group a nested dict (unboxed).

  Every layer ``l`` is initialised as the dense model's layer ``l`` (the same key): the base of
  compound ``c`` is the dense layer ``c * s``, and the non-targeted parameters of every layer are
  the dense ones. Only those are computed: the targeted weights of the other layers are never
  built (XLA drops them from the compiled init), so there is no dense-sized transient at init.
  """
  k_layers, k_factors = jax.random.split(key)
  keys = jax.random.split(k_layers, layout.num_layers)
  s, c = layout.compound_size, layout.compounds
  full_paths = {e.path for e in layout.by_role("full")}

  @jax.jit
  def per_layer_and_base(keys):
    init_all = jax.vmap(lambda k: _flat(nn.unbox(block.init(k, *sample_args, **kwargs)["params"])))
    per_layer = {p: v for p, v in init_all(keys).items() if p in full_paths}
    base = {p: v for p, v in init_all(keys[::s]).items() if p not in full_paths}
    return per_layer, base

  groups = {g: {} for g in GROUPS}
  groups["per_layer"], groups["base"] = per_layer_and_base(keys)
  for i, e in enumerate(layout.entries):
    dtype = groups["base"][e.path].dtype if e.role != "full" else None
    if e.role == "vector":  # official: full-vector increments start at zero
      groups["inc_vec"][e.path] = jnp.zeros((c, layout.steps) + e.shape, dtype)
    elif e.role == "lowrank":
      a, b = chain.init_factors(jax.random.fold_in(k_factors, i), compounds=c, steps=layout.steps,
                                d_in=e.d_in, d_out=e.d_out, rank=e.rank, init=layout.spec.init,
                                dtype=dtype)
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
      ``block(x, *args, deterministic=..., **kwargs) -> x``, or without ``deterministic`` if its
      ``__call__`` does not take it. `vlorafy` builds this from a module.
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
    block = self._block()
    shapes, names = block_param_shapes(block, *structs, **_mode(block, True), **kwargs)
    shapes = {p: s.shape for p, s in shapes.items()}
    if not shapes:
      raise ValueError(f"vlorafy: the block {type(block).__name__} has no parameters; a layer "
                       "stack holds a block's weights per layer (VLoRA parameterises them), so "
                       "stack a block that has some")
    if self.vlora is None:
      return dense_layout(shapes, self.num_layers), names
    return self.vlora.layout(shapes, self.num_layers), names

  @nn.compact
  def __call__(self, x, *args, deterministic: bool = True, decode=None, **kwargs):
    """``x`` through every layer: ``block(x, *args, deterministic=..., **kwargs)``, in order.

    ``decode`` (see `layers.DECODE_MODES`) is passed to the block, whose per-layer ``cache``
    variables the stack keeps stacked, ``[L, ...]``, as its own ``cache/layers`` and threads
    through the scan beside the weights (call with ``mutable=["cache"]``).
    """
    block = self._block()
    # A decode call's arguments (a few tokens, a mask over the whole cache) are no whole-sequence
    # call to infer the block's shapes from: the params, which exist, say the layout.
    stored = decode is not None and not self.is_initializing()
    if stored:
      layout = layout_from_params(nn.unbox(self.variables["params"]), self.vlora)
      names = {e.path: (None,) * len(e.shape) for e in layout.entries}
    else:
      layout, names = self.layout_for(x, *args, **kwargs)
    axis_names = stack_axis_names(layout, names)

    cache = {}

    def fresh(group):
      def init_fn(rng):
        if "v" not in cache:  # one init of all groups; each group is its own named param
          zeros = jax.tree.map(jnp.zeros_like, (x, *args))
          cache["v"] = init_stack_params(rng, block, layout, zeros,
                                         dict(_mode(block, True), **kwargs))
        return jax.tree.map(nn.LogicallyPartitioned, cache["v"][group], axis_names[group],
                            is_leaf=lambda n: isinstance(n, tuple))
      return init_fn

    if stored:  # (`self.param` would check their shapes against an init from these arguments)
      params = {g: _flat(nn.unbox(self.get_variable("params", g))) for g in axis_names}
    else:
      params = {g: _flat(self.param(g, fresh(g))) for g in axis_names}

    adapters, lora_entries = None, ()
    if self.lora is not None:
      lora_entries = self.lora.layout({e.path: e.shape for e in layout.entries})
      names_a, names_b = lora_lib.axis_names(lora_entries, names)
      dtypes = {**{p: v.dtype for p, v in params.get("per_layer", {}).items()},
                **{p: v.dtype for p, v in params.get("base", {}).items()}}

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

    mode = _mode(block, deterministic)
    layer_cache = None
    if decode is not None:
      mode["decode"] = decode
      layer_cache = self.variable("cache", "layers", self._fresh_cache, block, x, args,
                                  dict(mode, **kwargs))

    def apply_block(h, weights, rng, cache_i):
      variables = {"params": _nest(weights)}
      rngs = {"dropout": rng} if rng is not None else None
      if cache_i is None:
        return block.apply(variables, h, *args, **mode, rngs=rngs, **kwargs), None
      h, updated = block.apply(dict(variables, cache=cache_i), h, *args, **mode, rngs=rngs,
                               mutable=["cache"], **kwargs)
      return h, updated["cache"]

    # Every layer's output, [L, ...], is sown into the 'intermediates' collection when it is
    # mutable: a loss on intermediate outputs (`train.teacher`) reads the compounds' ends there.
    keep_outputs = self.is_mutable_collection("intermediates")
    run_block = _with_output(apply_block) if keep_outputs else apply_block
    x, ys = run_layers(run_block, x, layout, params, rngs=rngs, adapters=adapters,
                       lora_entries=lora_entries, scan=self.scan, remat=self.remat,
                       state=None if layer_cache is None else layer_cache.value,
                       unroll=_UNROLL.get().get(self.name, 1))
    new_cache = ys
    if keep_outputs:
      new_cache, outputs = ys
      self.sow("intermediates", "layer_outputs", outputs)
    if layer_cache is not None:
      layer_cache.value = new_cache
    return x

  def _fresh_cache(self, block, x, args, kwargs):
    """Zeros shaped as ``num_layers`` of the block's ``cache`` collection for these inputs."""
    structs = jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)),
                           (x, args))
    one = jax.eval_shape(lambda x, args: block.init(jax.random.key(0), x, *args, **kwargs),
                         *structs)
    if "cache" not in one:
      raise ValueError(f"decode: the block {type(block).__name__} keeps no cache (no layer of it "
                       "decodes)")
    return jax.tree.map(lambda a: jnp.zeros((self.num_layers,) + a.shape, a.dtype), one["cache"])


def _with_output(apply_block):
  """``apply_block`` that returns its layer's output beside its state: the scan stacks both."""
  def run(h, weights, rng, state_i):
    h, state_i = apply_block(h, weights, rng, state_i)
    return h, (state_i, h)
  return run


def weight_policy(remat: str, weight_shapes=frozenset()):
  """The remat policy of one layer: ``remat`` for its activations, its weights always rebuilt.

  `chain.layer_weight` (each constructed weight) is staged as one `chain.REBUILT_IN_BACKWARD`
  equation; answering "recompute" for it keeps the weights out of the saved residuals. Its inputs
  are the stack's bases (the same array for every layer: saved once, without a copy) and small
  factors. A block that computes in bf16 casts each float32 weight down first; those casts (a
  float32 operand of one of the block's ``weight_shapes``) are recomputed too, or the backward pass
  would keep a bf16 copy of every layer's weights. An activation of such a shape would only be
  cast again in the backward pass: the policy decides what is kept, never what is computed.
  """
  saves = REMAT_POLICIES[remat] or jax.checkpoint_policies.everything_saveable

  def policy(prim, *avals, **params):
    if prim.name == chain.REBUILT_IN_BACKWARD:
      return False
    if (prim.name == "convert_element_type" and avals[0].dtype == jnp.float32
        and tuple(avals[0].shape) in weight_shapes):
      return False
    return saves(prim, *avals, **params)

  return policy


def positions(layout: Layout):
  """``(compound, step)`` of every layer, int32 ``[L]`` each: where a layer's weights come from."""
  layer = np.arange(layout.num_layers, dtype=np.int32)
  return jnp.asarray(layer // layout.compound_size), jnp.asarray(layer % layout.compound_size)


def layer_params(layout: Layout, shared, per_layer, position, adapters=None, lora_entries=(),
                 factored: bool = False):
  """The block parameters ``{path: array}`` of one layer of the stack.

  Args:
    layout: the stack's layout.
    shared: the stack's compound-level groups, flat: ``{"base": {path: [C, *shape]},
      "inc_a": {path: [C, S, d_in, r]}, "inc_b": ..., "inc_vec": ...}`` (empty when dense).
    per_layer: this layer's non-targeted parameters ``{path: [*shape]}``.
    position: the layer's ``(compound, step)`` (`positions`; traced ints are fine).
    adapters: this layer's horizontal LoRA factors ``({path: A}, {path: B})``, or None.
    lora_entries: the adapters' `lora.LoRAEntry`s.
    factored: give a 2-D targeted weight whose base is detached in some layers as a
      `chain.LowRankWeight` (the block's `layers.Dense` multiplies by its parts), not as an array.

  Every targeted weight is its compound's base plus one low-rank product
  (`chain.layer_weight`), in which the layer's VLoRA increments and its LoRA adapter sit side by
  side; a non-targeted weight with an adapter is that weight plus the adapter's product.
  """
  spec = layout.spec
  weights = dict(per_layer)
  terms = {e.path: [] for e in layout.entries}  # path -> [(static description, inputs)]
  c, k = position if spec else (None, None)
  increments = layout.by_role("vector", "lowrank") if layout.steps else ()
  for e in increments:  # (no steps, as one layer a compound has: bases only)
    if e.role == "vector":
      terms[e.path].append((("vector", (("mode", spec.mode),)),
                            (shared["inc_vec"][e.path], c, k)))
    else:
      terms[e.path].append((("increments", (("mode", spec.mode), ("scale", e.scale))),
                            (shared["inc_a"][e.path], shared["inc_b"][e.path], c, k)))
  for e in lora_entries:
    terms[e.path].append((("adapter", (("scale", e.scale),)),
                          (adapters[0][e.path], adapters[1][e.path])))
  # The official stop-gradient: W0 learns from layer 0 of its compound alone (tied layers are W0
  # itself, which learns from all of them; a relaxed spec refuses it).
  gate = None
  if spec is not None and spec.stop_gradient_base and spec.mode != "tied":
    gate = (k == 0).astype(jnp.float32)
  for e in layout.entries:
    described, inputs = zip(*terms[e.path]) if terms[e.path] else ((), ())
    if e.role != "full" and factored and gate is not None and described and len(e.shape) == 2:
      weights[e.path] = chain.factored_weight(shared["base"][e.path], c, described, inputs, gate)
    elif e.role != "full":
      weights[e.path] = chain.layer_weight(shared["base"][e.path], c, described, inputs, gate)
    elif described:  # a dense weight with an adapter
      weights[e.path] = chain.layer_weight(per_layer[e.path], None, described, inputs)
  return weights


def run_layers(apply_block, x, layout: Layout, params, *, rngs=None, adapters=None,
               lora_entries=(), scan: bool = True, remat: str = "none", state=None,
               unroll: int = 1):
  """Runs the stack: ``x, state_l = apply_block(x, layer_params(...), rng, state_l)`` for every
  layer ``l`` in order; returns ``(x, new state)``.

  ONE scan over the layers, dense or VLoRA, so the program grows with neither the depth nor the
  compound size. Each layer's weights are built inside the layer from its compound's slice of the
  bases and factors, under `weight_policy`, and rebuilt in the backward pass instead of kept: only
  one layer's weights exist at a time, and the gradient of the bases accumulates in place into
  one ``[C, ...]`` buffer. ``scan=False`` runs the same layer function in a Python loop.

  Args:
    apply_block: ``(h, weights {path: array}, rng or None, state or None) -> (h, state)``.
    params: the stack's groups, flat: ``{group: {path: array}}``.
    rngs: ``[L]`` dropout keys, or None.
    adapters: ``({path: A [L, ...]}, {path: B [L, ...]})`` horizontal LoRA factors, or None.
    state: a pytree of ``[L, ...]`` arrays that each layer reads its slice of and replaces (a KV
      cache), or None.
    unroll: layers per iteration of the scan (``jax.lax.scan``'s ``unroll``).
  """
  shared = {g: params[g] for g in SHARED_GROUPS if g in params}

  def layer(h, shared, xs):
    position, per_layer, rng, adapters_i, state_i = xs
    h = remat_lib.tag(h, remat_lib.LAYER_INPUT)  # what the backward pass restarts each layer from
    weights = layer_params(layout, shared, per_layer, position, adapters_i, lora_entries,
                           factored=True)
    return apply_block(h, weights, rng, state_i)

  # A dense float32 stack keeps nothing it could rebuild, and skips the checkpoint (whose
  # residual bookkeeping costs XLA:CPU ~2% of the CIFAR step); a narrower activation dtype means
  # the block casts its weights down, and those casts are worth rebuilding.
  rebuilds = layout.spec is not None or bool(lora_entries)
  if rebuilds or remat != "none" or jnp.dtype(x.dtype) != jnp.float32:
    weight_shapes = frozenset(e.shape for e in layout.entries if len(e.shape) > 1)
    layer = jax.checkpoint(layer, policy=weight_policy(remat, weight_shapes), prevent_cse=not scan)
  xs = (positions(layout), params.get("per_layer", {}), rngs, adapters, state)
  if scan:
    return jax.lax.scan(lambda h, xs_i: layer(h, shared, xs_i), x, xs, unroll=unroll)
  states = []
  for i in range(layout.num_layers):
    x, state_i = layer(x, shared, jax.tree.map(lambda a: a[i], xs))
    states.append(state_i)
  return x, jax.tree.map(lambda *a: jnp.stack(a), *states)  # None when every layer's is


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
  """Recovers the layout of a stack from its parameters (boxed, as ``init`` returns them, or
  not) and the spec that made them."""
  stack_params = nn.unbox(stack_params)
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

  `to_dense` is the call that reads the specs from the model; this is the step under it. The
  result loads into the model's `dense_twin`. Stacks with LoRA adapters (``lora_a``/``lora_b``)
  need ``lora``; the adapters are folded into the weights. ``spec`` and ``lora`` are either one
  spec for every stack or a ``{stack module name: spec}`` dict (models whose stacks differ, e.g.
  an encoder and a decoder). ``params`` may be boxed, as ``init`` returns them.
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

  return go(nn.unbox(params), None)


def _merge_stack(params, spec, lora):
  has_adapters = any(g in params for g in lora_lib.ADAPTER_GROUPS)
  if spec is None and not has_adapters:
    return params
  layout = layout_from_params(params, spec)
  entries = ()
  if has_adapters:
    if lora is None:
      raise ValueError("merge: this stack has LoRA adapters (lora_a/lora_b) but lora=None; pass "
                       "the model's LoRASpec")
    entries = lora.layout({e.path: e.shape for e in layout.entries})
    a = _flat(params["lora_a"])
    if set(a) != {e.path for e in entries} or any(a[e.path].shape[-1] != e.rank for e in entries):
      raise ValueError(f"merge: adapters {sorted(a)} (ranks {[v.shape[-1] for v in a.values()]}) "
                       f"do not match lora targets {list(lora.targets)} at rank {lora.rank}")
  return {"per_layer": materialize(params, layout, entries)}


def _specs(model: nn.Module):
  """``(vlora, lora)`` for merging ``model``'s params: one pair for a bare `LayerStack`, else
  ``{stack name: ...}`` dicts from the model's ``stack_specs()``."""
  if isinstance(model, LayerStack):
    return model.vlora, model.lora
  if not hasattr(model, "stack_specs"):
    raise TypeError(f"to_dense: {type(model).__name__} is neither a vlorafy stack nor a model "
                    "with stack_specs() ({stack name: (vlora, lora)}); merge its params with "
                    "stack.merge(params, spec, lora)")
  specs = model.stack_specs()
  return {k: v[0] for k, v in specs.items()}, {k: v[1] for k, v in specs.items()}


def to_dense(model: nn.Module, variables):
  """``(dense twin, its variables)``: VLoRA increments and LoRA adapters folded into plain
  per-layer weights, once.

  ``dense_twin.apply(dense_variables, ...)`` computes what ``model.apply(variables, ...)`` does
  (up to float rounding), with no increment or adapter math at inference. ``model`` is a
  `vlorafy` stack (it knows its spec) or any model with ``stack_specs()``; ``variables`` is what
  ``init`` returns (``{'params': ...}``, boxed or not) or the params alone, and the result is of
  the same kind, unboxed.
  """
  vlora, lora = _specs(model)
  unboxed = nn.unbox(variables)
  is_variables = isinstance(unboxed, Mapping) and "params" in unboxed and not is_stack(unboxed)
  params = unboxed["params"] if is_variables else unboxed
  merged = merge(params, vlora, lora)
  return dense_twin(model), ({**unboxed, "params": merged} if is_variables else merged)
