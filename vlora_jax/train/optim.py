"""The optimizer from ``config.optim``: its update rule, warmup + cosine, clipping, per-path rules.

``optim.name`` picks optax's update rule; every one takes the schedule's learning rate and a
decoupled weight decay (``optim.weight_decay`` times the rate, as AdamW's):

  adamw      optax.adamw (b1, b2, eps)
  adafactor  optax.adafactor (factored second moments, updates relative to each parameter's
             scale: rates near 1e-2 are usual)
  lion       optax.lion (b1, b2; the paper's b2 is 0.99, and its rate 3-10x below AdamW's)
  sgd        momentum SGD (optim.momentum, optim.nesterov)

Rules select parameters by regex, full-matched against ``/``-joined paths such as
``blocks/inc_a/attn/qkv/kernel`` or ``head/bias`` (the stack's group names ``base``, ``inc_a``,
``inc_b``, ``inc_vec``, ``per_layer`` make VLoRA parts easy to select):

  optim.freeze    one regex; matching params are frozen: ``optax.set_to_zero`` inside
                  ``optax.multi_transform``, so they get no optimizer state at all
  optim.lr_mults  ((regex, multiplier), ...): first match wins, default 1
  optim.wd_mults  ((regex, multiplier), ...): multiplies ``optim.weight_decay``; first match wins

Every (lr multiplier, weight-decay multiplier) pair becomes one optax group. Clipping is by the
global norm of the trainable gradients only (frozen ones are zeroed first).
"""

from __future__ import annotations

import re
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from vlora_jax.core import params as params_lib

FROZEN = "frozen"
SCHEDULES = ("cosine", "constant")
OPTIMIZERS = ("adamw", "adafactor", "lion", "sgd")


def paths(tree) -> dict[str, Any]:
  """``{'a/b/c': leaf}`` of a nested params dict."""
  return traverse_util.flatten_dict(tree, sep="/")


def _first(rules, path: str, default: float) -> float:
  for pattern, value in rules or ():
    if re.fullmatch(pattern, path):
      return float(value)
  return default


def _frozen(ocfg) -> Callable[[str], bool]:
  """``path -> bool``: matched by the ``optim.freeze`` regex (empty: nothing is frozen)."""
  return params_lib.path_matcher(ocfg.freeze or "", "optim.freeze")


def groups(params, ocfg) -> tuple[Any, dict[str, tuple[float, float]]]:
  """A tree like ``params`` of group labels, and ``{label: (lr_mult, wd_mult)}``.

  Labels are ``'frozen'`` or ``'lr<m>_wd<w>'`` (readable in logs).
  """
  frozen = _frozen(ocfg)
  mults = {}

  def label(path):
    if frozen(path):
      return FROZEN
    m = (_first(ocfg.lr_mults, path, 1.0), _first(ocfg.wd_mults, path, 1.0))
    name = f"lr{m[0]:g}_wd{m[1]:g}"
    mults[name] = m
    return name

  tree = params_lib.label_tree(params, label)
  _check_patterns(list(paths(params)), ocfg)
  return tree, mults


def _check_patterns(all_paths: list[str], ocfg) -> None:
  """A pattern that selects no parameter is a mistake (a typo, another model's names), as a VLoRA
  target that matches nothing is: refused, naming the key and showing the paths there are."""
  rules = [("optim.freeze", ocfg.freeze or "")]
  for key in ("lr_mults", "wd_mults"):
    rules += [(f"optim.{key}[{i}]", pair[0]) for i, pair in enumerate(ocfg[key] or ())]
  for key, pattern in rules:
    if pattern and not any(re.fullmatch(pattern, p) for p in all_paths):
      shown = ", ".join(all_paths[:6]) + (", ..." if len(all_paths) > 6 else "")
      raise ValueError(f"{key}={pattern!r} matches no parameter; patterns are full-matched "
                       f"against paths such as {shown}")


def schedule(ocfg, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to ``lr``, then cosine to ``lr * min_lr_ratio`` (or constant)."""
  lr, warmup = float(ocfg.lr), int(ocfg.warmup_steps)
  if ocfg.schedule == "constant":
    if not warmup:
      return optax.constant_schedule(lr)
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup),
                                 optax.constant_schedule(lr)], [warmup])
  return optax.warmup_cosine_decay_schedule(
      0.0, lr, warmup, max(total_steps, warmup + 1), lr * float(ocfg.min_lr_ratio))


def zero_frozen(tree, label_tree):
  """``tree`` (params-shaped) with its frozen leaves zeroed."""
  return jax.tree.map(lambda u, l: jnp.zeros_like(u) if l == FROZEN else u, tree, label_tree)


def _zero_frozen(label_tree) -> optax.GradientTransformation:
  """Zeroes frozen gradients so that clipping sees the trainable ones only."""
  def update(updates, state, params=None):
    del params
    return zero_frozen(updates, label_tree), state
  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


class Optimizer(NamedTuple):
  """The optimizer of a run. ``labels`` is the one group-label tree that the transformation, the
  train step's metrics and the parameter counts all read."""
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  labels: Any

  def trainable(self) -> Callable[[str], bool]:
    """``path -> bool``: whether the parameter at a ``/``-joined path trains (for counts)."""
    flat = paths(self.labels)
    return lambda path: flat[path] != FROZEN


def update_rule(ocfg, lr, weight_decay: float) -> optax.GradientTransformation:
  """``optim.name``'s transformation at learning rate ``lr`` (a number or a schedule), with
  decoupled weight decay ``weight_decay`` (times the rate)."""
  name, b1, b2 = ocfg.name, ocfg.b1, ocfg.b2
  if name == "adamw":
    return optax.adamw(lr, b1=b1, b2=b2, eps=ocfg.eps, weight_decay=weight_decay)
  if name == "lion":
    return optax.lion(lr, b1=b1, b2=b2, weight_decay=weight_decay)
  if name == "adafactor":
    # optax adds adafactor's decay after the rate: scaled here by the rate, as AdamW's is.
    rate = (lambda count: weight_decay * lr(count)) if callable(lr) else weight_decay * lr
    return optax.adafactor(lr, weight_decay_rate=rate if weight_decay else None)
  if name == "sgd":
    return optax.chain(optax.trace(decay=float(ocfg.momentum),
                                   nesterov=bool(ocfg.nesterov)),
                       optax.add_decayed_weights(weight_decay),
                       optax.scale_by_learning_rate(lr))
  raise ValueError(f"optim.name={name!r}: allowed are {list(OPTIMIZERS)}")


def build(ocfg, params, total_steps: int) -> Optimizer:
  """``config.optim`` and the (abstract) params -> the run's `Optimizer`."""
  sched = schedule(ocfg, total_steps)
  label_tree, mults = groups(params, ocfg)
  inner = {FROZEN: optax.set_to_zero()}
  wd = float(ocfg.weight_decay)
  for g, (lr_mult, wd_mult) in sorted(mults.items()):
    lr = sched if lr_mult == 1.0 else (lambda c, m=lr_mult: sched(c) * m)
    inner[g] = update_rule(ocfg, lr, wd * wd_mult)
  parts = [_zero_frozen(label_tree)]
  if ocfg.grad_clip_norm:
    parts.append(optax.clip_by_global_norm(float(ocfg.grad_clip_norm)))
  parts.append(optax.multi_transform(inner, label_tree))
  return Optimizer(optax.chain(*parts), sched, label_tree)
