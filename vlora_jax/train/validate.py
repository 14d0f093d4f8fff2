"""Checks the whole config before anything compiles: every error names the key, value and rule.

`check` runs on the config alone (and the device count) and returns the `Plan` that the checks
built on the way: the model family, the VLoRA and LoRA specs and the mesh shape, each built once
per run. `check_data` hands the model and what the data pipeline found (image size, classes,
vocabulary) to the family. The model's own checks (ranks against shapes, compound size against
depth) run inside ``jax.eval_shape(init)`` in the trainer, still before compilation.
"""

from __future__ import annotations

import dataclasses
import re

from vlora_jax import data as data_lib
from vlora_jax import lora as lora_lib
from vlora_jax import models
from vlora_jax.models.family import Family, bad as _bad
from vlora_jax.spec import VLoRASpec
from vlora_jax.train import checkpoint, optim, sharding


RNG_IMPLS = ("threefry2x32", "rbg", "unsafe_rbg")


@dataclasses.dataclass(frozen=True)
class Plan:
  """What a checked config describes, built once and passed on.

  Attributes:
    family: the model family of ``config.model.name``.
    vlora: the VLoRA spec of ``config.model.vlora`` (None: dense).
    lora: the horizontal LoRA spec of ``config.model.lora`` (None: none).
    mesh_shape: ``(data, fsdp, tensor)`` over the run's devices.
  """
  family: Family
  vlora: VLoRASpec | None
  lora: lora_lib.LoRASpec | None
  mesh_shape: tuple[int, ...]

  def build_model(self, mcfg):
    return self.family.build(mcfg, self.vlora, self.lora)


def _positive_int(config, key: str, minimum: int = 1) -> int:
  v = config
  for k in key.split("."):
    v = v[k]
  if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
    raise _bad(key, v, f"must be an integer >= {minimum}")
  return v


def _regex(key: str, pattern) -> None:
  if not isinstance(pattern, str):
    raise _bad(key, pattern, "must be a regex string")
  try:
    re.compile(pattern)
  except re.error as e:
    raise _bad(key, pattern, f"is not a valid regex ({e})") from None


def _rules(key: str, rules) -> None:
  for i, pair in enumerate(rules or ()):
    if not isinstance(pair, (list, tuple)) or len(pair) != 2:
      raise _bad(f"{key}[{i}]", pair, "must be a (regex, multiplier) pair")
    _regex(f"{key}[{i}]", pair[0])
    if not isinstance(pair[1], (int, float)) or pair[1] < 0:
      raise _bad(f"{key}[{i}]", pair[1], "the multiplier must be a number >= 0")


def check(config, num_devices: int, process_count: int = 1) -> Plan:
  """Raises a `ConfigError` (a ValueError) on the first bad key; returns the run's `Plan`."""
  m = config.model
  if m.name not in models.FAMILIES:
    raise _bad("model.name", m.name, f"allowed are {sorted(models.FAMILIES)}")
  family = models.FAMILIES[m.name]
  if m.get("dtype", "float32") not in models.DTYPES:
    raise _bad("model.dtype", m.dtype, f"allowed are {list(models.DTYPES)}")
  for key in ("model.dim", "model.depth", "model.num_heads"):
    _positive_int(config, key)
  if m.dim % m.num_heads:
    raise _bad("model.num_heads", m.num_heads, f"must divide model.dim={m.dim}")
  if not isinstance(m.get("mlp_ratio", 4.0), (int, float)) or not m.get("mlp_ratio", 4.0) > 0:
    raise _bad("model.mlp_ratio", m.mlp_ratio, "must be a number > 0")
  if not 0 <= m.get("dropout", 0.0) < 1:
    raise _bad("model.dropout", m.dropout, "must be in [0, 1)")
  family.check_config(m)
  vlora = models.vlora_spec(m.get("vlora"))  # the specs validate themselves, naming the key
  lora = lora_lib.spec_from_config(m.get("lora"))

  if config.get("rng_impl", "threefry2x32") not in RNG_IMPLS:
    raise _bad("rng_impl", config.rng_impl, f"allowed are {list(RNG_IMPLS)}")

  d = config.data
  if d.source not in data_lib.SOURCES:
    raise _bad("data.source", d.source, f"allowed are {list(data_lib.SOURCES)}")
  if d.source not in family.sources:
    raise _bad("data.source", d.source, f"model.name={m.name!r} reads {list(family.sources)}")
  if d.source == "tfds" and not d.get("tfds_name"):
    raise _bad("data.tfds_name", d.get("tfds_name"), "name a TFDS dataset, e.g. 'cifar10'")
  if d.source in ("npz", "text") and not d.get("path"):
    raise _bad("data.path", d.get("path"), f"data.source={d.source!r} needs a local file path")

  _positive_int(config, "num_train_steps", 0)
  _positive_int(config, "batch_size")
  _positive_int(config, "eval_batch_size")
  _positive_int(config, "log_every_steps")
  _positive_int(config, "eval_every_steps", 0)

  o = config.optim
  if not isinstance(o.lr, (int, float)) or not o.lr > 0:
    raise _bad("optim.lr", o.lr, "must be a number > 0")
  if o.get("weight_decay", 0.0) < 0:
    raise _bad("optim.weight_decay", o.weight_decay, "must be >= 0")
  for k in ("b1", "b2"):
    if not 0 <= o.get(k, 0.9) < 1:
      raise _bad(f"optim.{k}", o[k], "must be in [0, 1)")
  if o.get("schedule", "cosine") not in optim.SCHEDULES:
    raise _bad("optim.schedule", o.schedule, f"allowed are {list(optim.SCHEDULES)}")
  _positive_int(config, "optim.warmup_steps", 0)
  if o.get("grad_clip_norm", 0.0) < 0:
    raise _bad("optim.grad_clip_norm", o.grad_clip_norm, "must be >= 0 (0 turns clipping off)")
  if not 0 <= o.get("min_lr_ratio", 0.0) <= 1:
    raise _bad("optim.min_lr_ratio", o.min_lr_ratio, "must be in [0, 1]")
  if o.get("freeze"):
    _regex("optim.freeze", o.freeze)
  _rules("optim.lr_mults", o.get("lr_mults"))
  _rules("optim.wd_mults", o.get("wd_mults"))

  shape = sharding.mesh_shape(config.mesh, num_devices)  # names mesh.<axis> on error
  for i, pair in enumerate(config.sharding_rules):
    axes = pair[1]
    axes = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
    for a in axes:
      if a not in sharding.MESH_AXES:
        raise _bad(f"sharding_rules[{i}]", tuple(pair), f"mesh axes are {list(sharding.MESH_AXES)}")
  dp = shape[0] * shape[1]
  for key in ("batch_size", "eval_batch_size"):
    b = config[key]
    if b % dp:
      raise _bad(key, b, f"must be divisible by the data-parallel size mesh.data * mesh.fsdp = {dp}")
    if b % process_count:
      raise _bad(key, b, f"must be divisible by the process count {process_count}")

  c = config.checkpoint
  _positive_int(config, "checkpoint.every_steps")
  _positive_int(config, "checkpoint.keep")
  _positive_int(config, "checkpoint.keep_best", 0)
  if c.get("best_mode", "max") not in ("max", "min"):
    raise _bad("checkpoint.best_mode", c.best_mode, "allowed are ['max', 'min']")
  if c.get("keep_best", 0) and not str(c.get("best_metric", "")).startswith("eval/"):
    raise _bad("checkpoint.best_metric", c.get("best_metric"),
               "keep_best needs an eval metric such as 'eval/accuracy'")
  if c.get("keep_best", 0) and not config.eval_every_steps:
    raise _bad("checkpoint.keep_best", c.keep_best, "needs periodic eval (eval_every_steps > 0)")
  init = config.get("init_from", "") or ""
  if init and ":" not in init:
    raise _bad("init_from", init, "format '<kind>:<arg>', e.g. 'checkpoint:/path/to/workdir'")
  if init and init.partition(":")[0] not in checkpoint.INIT_FROM:
    raise _bad("init_from", init, f"unknown kind {init.partition(':')[0]!r}; registered are "
               f"{sorted(checkpoint.INIT_FROM)} (vlora_jax.train.checkpoint.register_init_from)")
  return Plan(family, vlora, lora, shape)


def check_data(config, info: dict) -> None:
  """The model against what the data pipeline found: the family's rules."""
  models.family(config.model.name).check_data(config.model, info)
