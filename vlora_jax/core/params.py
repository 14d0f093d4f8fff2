"""Counting parameters by group, selecting them by path, and the dense twin of a VLoRA model.

Groups follow the stack's reserved names (see `stack.py`): ``base`` (layer 0 of every compound),
``increments`` (``inc_a``, ``inc_b``, ``inc_vec``), ``per_layer`` (non-targeted params, full in every
layer of a stack), ``lora`` (horizontal LoRA adapters ``lora_a``, ``lora_b``, see `lora.py`) and
``other`` (embeddings, heads, final norms: outside any stack).
"""

from __future__ import annotations

import re
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

GROUP_OF = {"base": "base", "inc_a": "increments", "inc_b": "increments",
            "inc_vec": "increments", "per_layer": "per_layer", "lora_a": "lora", "lora_b": "lora"}
GROUP_ORDER = ("base", "increments", "per_layer", "lora", "other")


def group_of(path: str) -> str:
  for part in path.split("/"):
    if part in GROUP_OF:
      return GROUP_OF[part]
  return "other"


def path_str(path) -> str:
  """A jax key path -> ``a/b/c`` (dict keys only, so boxed and unboxed trees read the same)."""
  return "/".join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def path_matcher(patterns: str | Sequence[str], field: str) -> Callable[[str], bool]:
  """``path -> bool``: whether a ``/``-joined path full-matches one of the regexes ``patterns``.

  The rule behind ``optim.freeze`` and the trainable set of `lora.optimizer` (one helper, so the
  two cannot drift apart). ``''`` or ``()`` matches nothing. A bad regex raises ``ValueError``
  naming ``field``.
  """
  pats = [p for p in ((patterns,) if isinstance(patterns, str) else tuple(patterns)) if p]
  compiled = []
  for p in pats:
    try:
      compiled.append(re.compile(p))
    except re.error as e:
      raise ValueError(f"{field}={p!r} is not a valid regex ({e})") from None
  return lambda path: any(c.fullmatch(path) for c in compiled)


def label_tree(params, label_of: Callable[[str], Any]):
  """A tree like ``params`` whose leaves are ``label_of(path)`` (e.g. optax group labels).

  A boxed leaf (``nn.Partitioned``) gets a plain label, so the result is a valid label tree for
  optax on the boxed and the unboxed params alike.
  """
  return jax.tree_util.tree_map_with_path(lambda path, _: label_of(path_str(path)), params,
                                          is_leaf=lambda x: isinstance(x, nn.Partitioned))


def count(params, trainable: Callable[[str], bool] | None = None) -> dict[str, Any]:
  """``{'total', 'trainable', 'bytes', 'groups': {group: n}}`` of a params tree (arrays or shapes)."""
  flat = traverse_util.flatten_dict(nn.unbox(params), sep="/")
  groups = {g: 0 for g in GROUP_ORDER}
  total = train = nbytes = 0
  for path, leaf in flat.items():
    n = int(np.prod(leaf.shape))
    total += n
    nbytes += n * np.dtype(leaf.dtype).itemsize
    groups[group_of(path)] += n
    if trainable is None or trainable(path):
      train += n
  return {"total": total, "trainable": train, "bytes": nbytes, "groups": groups}


def param_shapes(model: nn.Module, *sample_args, **kwargs):
  """The model's params as ShapeDtypeStructs (no compute, no memory)."""
  init = lambda k, *args: model.init(k, *args, **kwargs)
  return nn.unbox(jax.eval_shape(init, jax.random.key(0), *sample_args))["params"]


def dense_twin(model: nn.Module) -> nn.Module:
  """The dense twin of ``model``: the same architecture with every stack dense and no adapters,
  the module that `stack.to_dense`'s merged weights load into. ``model`` is a `vlorafy` stack or
  any family's model (each has the fields ``vlora`` and ``lora``)."""
  return model.clone(vlora=None, lora=None)


def table(model: nn.Module, *sample_args, **kwargs) -> dict[str, Any]:
  """Counts of ``model`` and of its dense twin, and their ratio."""
  vl = count(param_shapes(model, *sample_args, **kwargs))
  dense = count(param_shapes(dense_twin(model), *sample_args, **kwargs))
  return {"model": vl, "dense": dense, "ratio": vl["total"] / dense["total"]}


def format_table(t: dict[str, Any]) -> str:
  """A small plain-text table of `table`'s result."""
  m, d = t["model"], t["dense"]
  rows = [("group", "model", "dense")]
  rows += [(g, f"{m['groups'][g]:,}", f"{d['groups'][g]:,}") for g in GROUP_ORDER
           if g != "lora" or m["groups"][g] or d["groups"][g]]  # no adapter row without adapters
  rows += [("total", f"{m['total']:,}", f"{d['total']:,}"),
           ("bytes", f"{m['bytes']:,}", f"{d['bytes']:,}"),
           ("ratio", f"{t['ratio']:.4f}", "1.0000")]
  w = [max(len(r[i]) for r in rows) for i in range(3)]
  return "\n".join(f"{a:<{w[0]}}  {b:>{w[1]}}  {c:>{w[2]}}" for a, b, c in rows)


def params_mismatch(params, abstract_params) -> list[str]:
  """Each leaf of ``params`` that the model lacks, needs, or has with another shape or dtype."""
  flat = lambda t: {jax.tree_util.keystr(k): v for k, v in
                    jax.tree_util.tree_flatten_with_path(t)[0]}
  got, want = flat(params), flat(abstract_params)
  out = [f"{k}: missing (the model needs {want[k].shape} {jnp.dtype(want[k].dtype)})"
         for k in want if k not in got]
  out += [f"{k}: not a parameter of the model" for k in got if k not in want]
  for k in sorted(set(got) & set(want)):
    g, w = got[k], want[k]
    if tuple(g.shape) != tuple(w.shape):
      out.append(f"{k}: shape {tuple(g.shape)}, the model needs {tuple(w.shape)}")
    elif jnp.dtype(g.dtype) != jnp.dtype(w.dtype):
      out.append(f"{k}: dtype {jnp.dtype(g.dtype)}, the model needs {jnp.dtype(w.dtype)}")
  return out
