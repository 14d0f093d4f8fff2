"""Horizontal LoRA on any layer stack (dense or VLoRA): adapters, freezing, adapter files.

VLoRA re-parameterises a stack *across* layers; ordinary (horizontal) LoRA adds a low-rank update to
the weights of every layer. The two compose: `stack.LayerStack` takes a `LoRASpec` and adds, inside
its scan, ``scale * A_l @ B_l`` to the layer-``l`` weight that the stack's own parameterisation
(dense ``per_layer`` or VLoRA) produced, in the same low-rank product as the VLoRA increments
(`stack.layer_params`). Adapter parameters of a stack:

  lora_a/<path>  [L, d_in, r]   ('layers', ..., 'rank')
  lora_b/<path>  [L, r, d_out]  ('layers', 'rank', ...)   zero at init: the adapted model starts
                                                          equal to the base model

Around that: `optimizer` freezes everything but chosen params (by regex on ``/``-joined paths) with
no optimizer state for frozen ones; `save_adapters` / `load_adapters` move only the adapter leaves
through an ``.npz``. Folding adapters (and VLoRA) into plain dense weights is `stack.merge`, and
`models.to_dense` for a whole model: both sit above this module, which the stack imports.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from vlora_jax.core import chain
from vlora_jax.core import params as params_lib
from vlora_jax.core.spec import VIT_TARGETS, match_targets

ADAPTER_GROUPS = ("lora_a", "lora_b")
# Default trainable set of `optimizer`: the adapters only.
ADAPTERS_REGEX = r"(.*/)?lora_[ab]/.*"
_SPEC_KEY = "__lora_spec__"  # where `save_adapters` stores the spec inside the .npz


@dataclasses.dataclass(frozen=True)
class LoRAEntry:
  """One adapted weight of a block."""
  path: str
  shape: tuple[int, ...]
  d_in: int
  d_out: int
  rank: int
  scale: float


@dataclasses.dataclass(frozen=True)
class LoRASpec:
  """Horizontal LoRA adapters on every layer of a stack.

  Attributes:
    targets: regexes full-matched against ``/``-joined parameter paths inside one block (e.g.
      ``attn/qkv/kernel``); each must match at least one parameter with >= 2 axes.
    rank: adapter rank ``r_h`` (same for every target).
    alpha: scale numerator: the update is ``(alpha / r) A @ B``; ``None`` means ``alpha = r``
      (scale 1, whatever the rank).
  """

  targets: tuple[str, ...] = VIT_TARGETS
  rank: int = 8
  alpha: float | None = None

  def __post_init__(self):
    targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
    object.__setattr__(self, "targets", targets)
    if not targets:
      raise ValueError("lora.targets is empty: give at least one parameter-path pattern")
    for i, t in enumerate(targets):
      try:
        re.compile(t)
      except re.error as e:
        raise ValueError(f"lora.targets[{i}]={t!r} is not a valid regex ({e})") from None
    if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
      raise ValueError(f"lora.rank={self.rank!r}: must be an integer >= 1")
    if self.alpha is not None and (isinstance(self.alpha, bool) or
                                   not isinstance(self.alpha, (int, float)) or not self.alpha > 0):
      raise ValueError(f"lora.alpha={self.alpha!r}: must be a number > 0 (or None for alpha = rank)")

  @property
  def scale(self) -> float:
    return 1.0 if self.alpha is None else chain.lora_scale(float(self.alpha), self.rank)

  def matches(self, path: str) -> bool:
    return any(re.fullmatch(t, path) for t in self.targets)

  def restrict(self, paths) -> "LoRASpec | None":
    """This spec with only the targets that match one of ``paths`` (None if none does).

    For models with several different blocks (encoder and decoder): one spec, each stack gets the
    targets that exist in its block.
    """
    kept = tuple(t for t in self.targets if any(re.fullmatch(t, p) for p in paths))
    return dataclasses.replace(self, targets=kept) if kept else None

  def layout(self, shapes: Mapping[str, Sequence[int]]) -> tuple[LoRAEntry, ...]:
    """Matches the targets against one block's ``{path: shape}`` (sorted by path)."""
    entries = []
    for path, shape, hit in match_targets("lora.targets", self.targets, shapes):
      if hit is None:
        continue
      if len(shape) < 2:
        raise ValueError(f"lora.targets[{hit}]={self.targets[hit]!r} matches {path!r} of shape "
                         f"{shape}: adapters need a weight with at least two axes")
      d_in, d_out = math.prod(shape[:-1]), shape[-1]
      if self.rank > min(d_in, d_out):
        raise ValueError(f"lora.rank={self.rank} for {path!r} (shape {shape}): must be between 1 "
                         f"and min(d_in, d_out)={min(d_in, d_out)}")
      entries.append(LoRAEntry(path, shape, d_in, d_out, self.rank, self.scale))
    return tuple(entries)

  def to_json(self) -> dict:
    return {"targets": list(self.targets), "rank": self.rank, "alpha": self.alpha}


def spec_from_config(lcfg) -> LoRASpec | None:
  """``config.model.lora`` (enabled, targets, rank, alpha) -> a `LoRASpec`, or None."""
  if lcfg is None or not lcfg.get("enabled", True):
    return None
  kw = {k: lcfg[k] for k in ("targets", "rank", "alpha") if k in lcfg}
  if isinstance(kw.get("targets"), list):
    kw["targets"] = tuple(kw["targets"])
  return LoRASpec(**kw)


# ----------------------------------------------------------------------------- stack-level math


def init_adapters(key, entries: Sequence[LoRAEntry], num_layers: int, dtype=jnp.float32):
  """``({path: A [L, d_in, r]}, {path: B [L, r, d_out]})``: A kaiming-uniform, B zero (LoRA)."""
  a, b = {}, {}
  for i, e in enumerate(entries):
    a[e.path] = chain.kaiming_uniform_a_sqrt5(jax.random.fold_in(key, i),
                                              (num_layers, e.d_in, e.rank), e.d_in, dtype)
    b[e.path] = jnp.zeros((num_layers, e.rank, e.d_out), dtype)
  return a, b


def axis_names(entries: Sequence[LoRAEntry], names: Mapping[str, tuple]):
  """Logical names: the layers axis, the weight's own in/out names, and a replicated 'rank'."""
  a, b = {}, {}
  for e in entries:
    n = tuple(names[e.path])
    a[e.path] = ("layers", n[0] if len(n) == 2 else None, "rank")
    b[e.path] = ("layers", "rank", n[-1])
  return a, b


# ----------------------------------------------------------------------------- paths and freezing


def labels(params, trainable: str | Sequence[str] = ADAPTERS_REGEX):
  """A tree like ``params`` of ``'train'`` / ``'freeze'``: a leaf trains if its path full-matches
  one of the ``trainable`` regexes."""
  trains = params_lib.path_matcher(trainable, "trainable")
  return params_lib.label_tree(params, lambda path: "train" if trains(path) else "freeze")


def optimizer(tx: optax.GradientTransformation, params,
              trainable: str | Sequence[str] = ADAPTERS_REGEX) -> optax.GradientTransformation:
  """``tx`` on the trainable params, zero updates and NO optimizer state for the rest.

  ``optax.multi_transform`` hands ``tx`` only the trainable leaves (the others are masked out), so
  e.g. Adam's moments exist for the adapters alone; frozen leaves go through ``set_to_zero``, which
  has no state. Raises if nothing is trainable (a regex typo would otherwise train nothing).
  """
  lab = labels(params, trainable)
  if "train" not in jax.tree.leaves(lab):
    raise ValueError(f"trainable={trainable!r} matches no parameter; paths look like "
                     f"{sorted(_flat(params))[:4]}")
  return optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, lab)


# ----------------------------------------------------------------------------- adapter files


def _flat(params) -> dict[str, Any]:
  return traverse_util.flatten_dict(nn.unbox(params), sep="/")


def _is_adapter(path: str) -> bool:
  return any(part in ADAPTER_GROUPS for part in path.split("/"))


def adapters(params) -> dict[str, Any]:
  """``{path: array}`` of the adapter leaves (``lora_a`` / ``lora_b``) of a params tree."""
  return {p: v for p, v in _flat(params).items() if _is_adapter(p)}


def save_adapters(path: str | os.PathLike, params, spec: LoRASpec | None = None) -> dict[str, Any]:
  """Writes only the adapter leaves of ``params`` to an ``.npz`` (keys are param paths).

  With ``spec`` the file also records it, and `load_adapters` refuses a different one.
  Returns what was written.
  """
  out = {p: np.asarray(v) for p, v in adapters(params).items()}
  if not out:
    raise ValueError("params hold no LoRA adapters (no 'lora_a'/'lora_b' leaves) to save")
  extra = {_SPEC_KEY: np.asarray(json.dumps(spec.to_json()))} if spec is not None else {}
  with open(path, "wb") as f:  # a file object: np.savez would append '.npz' to a bare name
    np.savez(f, **out, **extra)
  return out


def load_adapters(path: str | os.PathLike, params, spec: LoRASpec | None = None):
  """``params`` (unboxed) with its adapter leaves replaced by those saved at ``path``.

  The file must hold exactly the adapter paths of ``params`` with the same shapes; every mismatch
  is listed in one error.
  """
  with np.load(path) as f:
    saved = {k: f[k] for k in f.files}
  saved_spec = saved.pop(_SPEC_KEY, None)
  if spec is not None and saved_spec is not None:
    got = json.loads(str(saved_spec))
    if got != spec.to_json():
      raise ValueError(f"{path}: adapters were saved with lora spec {got}, not {spec.to_json()}")
  flat = _flat(params)
  want = {p: v for p, v in flat.items() if _is_adapter(p)}
  problems = [f"missing in file: {p}" for p in sorted(set(want) - set(saved))]
  problems += [f"not in params: {p}" for p in sorted(set(saved) - set(want))]
  problems += [f"shape of {p}: file {saved[p].shape}, params {want[p].shape}"
               for p in sorted(set(want) & set(saved)) if saved[p].shape != want[p].shape]
  if problems:
    raise ValueError(f"{path}: adapters do not fit the params:\n  " + "\n  ".join(problems))
  for p in want:
    flat[p] = jnp.asarray(saved[p], dtype=want[p].dtype)
  return traverse_util.unflatten_dict(flat, sep="/")
