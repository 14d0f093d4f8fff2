"""Logical axis names -> mesh shardings, for parameters and for activations.

Model code names the axes of every parameter (``embed``, ``mlp``, ``qkv``, ``heads``, ``vocab``;
the layer stack adds ``layers``, ``compound``, ``step``, ``rank``) and of every large activation
(``batch``, ``length``, ``embed``, ``heads``, ``kv``, ``mlp``, ``vocab``). Two rule tables in the
config map the names onto the mesh axes: ``config.sharding_rules`` for parameters and
``config.activation_rules`` for activations. They differ where the two should: FSDP shards the
weights along ``embed`` but the activations along ``batch``, so that each device keeps the
activations of its own sequences only and its cost stays flat as the pod grows.

`constrain` is how model code pins an activation: it is the identity until the trainer (or any
caller) enters `activation_sharding` around tracing, so a model applied eagerly, in a notebook or
a test, carries no sharding. Written here rather than taken from ``flax.linen.spmd``: flax's
``with_logical_constraint`` needs a global mesh and fails on a dimension that the mesh axes do not
divide (a vocabulary of 65, four heads on eight devices); `spec_for` replicates such a dimension,
the same choice that parameters get.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, Iterator, Sequence

import jax
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec as P

Rules = dict[str, Any]  # logical name -> a mesh axis, a tuple of them, or None

# The activations' names (the parameters' are in configs/default.py beside their rules).
BATCH, LENGTH, EMBED, HEADS, KV, MLP, VOCAB = "batch", "length", "embed", "heads", "kv", "mlp", "vocab"
RESIDUAL = (BATCH, LENGTH, EMBED)  # the residual stream [B, T, D] between layers
ATTENTION_HEADS = (BATCH, LENGTH, HEADS, KV)  # queries, keys, values [B, T, H, head_dim]

_ACTIVE: contextvars.ContextVar[tuple[jax.sharding.Mesh, Rules] | None] = contextvars.ContextVar(
    "vlora_jax_activation_sharding", default=None)


def rules_dict(rules) -> Rules:
  """A rule table (pairs of logical name -> mesh axis / axes / None) -> a dict."""
  out = {}
  for name, axes in rules:
    out[name] = None if axes is None else (axes if isinstance(axes, str) else tuple(axes))
  return out


def spec_for(shape: Sequence[int], names: Sequence[str | None] | None, rules: Rules,
             mesh: jax.sharding.Mesh) -> P:
  """A PartitionSpec for one array, from the logical names of its dimensions.

  Each mesh axis goes to one dimension at most: to the name that comes first in the rule table.
  So a rule may list a fallback axis (``('mlp', ('tensor', 'fsdp'))``) that a name earlier in the
  table (``embed``) takes where the array has both, and that the array's other dimension gets
  where it has not (a VLoRA factor). A dimension keeps the longest prefix of its free axes whose
  sizes divide it (all of them, usually; none for a vocabulary of 65 on 8 devices), and an axis
  it cannot keep stays free for the dimensions after it.
  """
  if not names:
    return P()
  order = {name: i for i, name in enumerate(rules)}
  used, parts = set(), [None] * len(names)
  for i in sorted(range(len(names)), key=lambda i: (order.get(names[i], len(order)), i)):
    axes = rules.get(names[i]) if names[i] is not None else None
    axes = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
    axes = tuple(a for a in axes if a not in used and mesh.shape[a] > 1)
    while axes and shape[i] % math.prod(mesh.shape[a] for a in axes):
      logging.log_first_n(logging.INFO, "sharding: dim %d not divisible by mesh axes %s: "
                          "dropping %s", 20, shape[i], axes, axes[-1])
      axes = axes[:-1]
    used.update(axes)
    parts[i] = None if not axes else (axes[0] if len(axes) == 1 else axes)
  return P(*parts)


@contextlib.contextmanager
def activation_sharding(mesh: jax.sharding.Mesh, rules) -> Iterator[None]:
  """Within this context, `constrain` pins activations to ``mesh`` by ``rules`` (a rule table or
  a dict). Enter it around the tracing of a jitted step (``jit(...).lower``), not around the
  call of the compiled step."""
  token = _ACTIVE.set((mesh, rules if isinstance(rules, dict) else rules_dict(rules)))
  try:
    yield
  finally:
    _ACTIVE.reset(token)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """``x`` with its sharding pinned by the logical ``names`` of its axes (one per axis), inside
  `activation_sharding`; ``x`` itself outside it."""
  active = _ACTIVE.get()
  if active is None:
    return x
  if len(names) != x.ndim:
    raise ValueError(f"constrain: {len(names)} axis names {tuple(names)} for an array of shape "
                     f"{x.shape}")
  mesh, rules = active
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec_for(x.shape, names, rules,
                                                                          mesh)))


def traced_with(fn, mesh: jax.sharding.Mesh, rules):
  """``fn`` whose body runs inside `activation_sharding`: jit it, and whenever it is traced its
  activations are pinned by ``rules`` on ``mesh``. No rules: ``fn`` itself (GSPMD chooses)."""
  rules = rules if isinstance(rules, dict) else rules_dict(rules)
  if not rules:
    return fn

  def wrapped(*args, **kwargs):
    with activation_sharding(mesh, rules):
      return fn(*args, **kwargs)

  return wrapped


def per_shard(fn, names: Sequence[str | None], *args):
  """``fn(*args)`` run on every device's shard (``jax.shard_map``), the arguments and the result
  split by the same logical ``names``: for kernels that GSPMD cannot partition (Pallas). Outside
  `activation_sharding`, ``fn(*args)`` on whole arrays."""
  active = _ACTIVE.get()
  if active is None:
    return fn(*args)
  mesh, rules = active
  spec = spec_for(args[0].shape, names, rules, mesh)
  return jax.shard_map(fn, mesh=mesh, in_specs=(spec,) * len(args), out_specs=spec,
                       check_vma=False)(*args)
