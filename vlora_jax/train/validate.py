"""Checks the whole config before anything compiles: every error names the key, value and rule.

`check` runs on the config alone (and the device count), once a run has resolved it (set-up's
`setup.resolve`: ``compress.budget``'s ranks are in it), and returns the `Plan` that the checks
built on the way: the model family, the VLoRA and LoRA specs and the mesh shape, each built once
per run. `check_data` hands the model and what the data pipeline found (image size, classes,
vocabulary) to the family. The model's own checks (ranks against shapes, compound size against
depth) run inside ``jax.eval_shape(init)`` in the trainer, still before compilation.
"""

from __future__ import annotations

import dataclasses

from vlora_jax.core import lora as lora_lib
from vlora_jax import models
from vlora_jax.config.keys import bad as _bad
from vlora_jax.models.family import Family
from vlora_jax.core.spec import VLoRASpec
from vlora_jax.train import init_from as init_from_lib
from vlora_jax.train import schema, sharding


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


def check(config, num_devices: int, process_count: int = 1) -> Plan:
  """Raises a `ConfigError` (a ValueError) on the first bad key; returns the run's `Plan`.

  First every key on its own (`schema.check`: type, range, choices), then the rules between keys.
  """
  schema.check(config)
  m = config.model
  family = models.FAMILIES[m.name]
  if m.dim % m.num_heads:
    raise _bad("model.num_heads", m.num_heads, f"must divide model.dim={m.dim}")
  if int(m.dim * m.mlp_ratio) < 1:
    raise _bad("model.mlp_ratio", m.mlp_ratio, f"gives an MLP of width 0 at model.dim={m.dim}")
  vlora = models.vlora_spec(m.get("vlora"))  # the specs validate themselves, naming the key
  lora = lora_lib.spec_from_config(m.get("lora"))
  if vlora is not None and vlora.compound_size < 2 and vlora.mode != "tied":
    raise _bad("model.vlora.compound_size", vlora.compound_size,
               "must be >= 2: with 1 every layer has a full weight of its own, the dense model "
               "(relaxed would add an increment to it); set model.vlora.enabled=False for it")

  d = config.data
  if d.source not in family.sources:
    raise _bad("data.source", d.source, f"model.name={m.name!r} reads {list(family.sources)}")
  if d.source == "tfds" and not d.tfds_name:
    raise _bad("data.tfds_name", d.tfds_name, "name a TFDS dataset, e.g. 'cifar10'")
  if d.source in ("npz", "text", "tokenized") and not d.path:
    raise _bad("data.path", d.path, f"data.source={d.source!r} needs a local file path")
  if d.source == "reverse" and d.min_len >= m.max_len:
    raise _bad("data.min_len", d.min_len, f"must be < model.max_len={m.max_len} (room for EOS)")
  if d.source == "reverse" and d.vocab_size > m.vocab_size:
    raise _bad("data.vocab_size", d.vocab_size, f"must be <= model.vocab_size={m.vocab_size}")

  shape = sharding.mesh_shape(config.mesh, num_devices)  # names mesh.<axis> on error
  for table in ("sharding_rules", "activation_rules"):
    for i, pair in enumerate(config[table]):
      if not isinstance(pair, (list, tuple)) or len(pair) != 2 or not isinstance(pair[0], str):
        raise _bad(f"{table}[{i}]", pair, "must be a (logical axis, mesh axes) pair")
      axes = pair[1]
      axes = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
      for a in axes:
        if a not in sharding.MESH_AXES:
          raise _bad(f"{table}[{i}]", tuple(pair), f"mesh axes are {list(sharding.MESH_AXES)}")
  dp = shape[0] * shape[1]
  for key in ("batch_size", "eval_batch_size"):
    b = config[key]
    if b % dp:
      raise _bad(key, b, f"must be divisible by the data-parallel size mesh.data * mesh.fsdp = {dp}")
    if b % process_count:
      raise _bad(key, b, f"must be divisible by the process count {process_count}")
  accum = config.grad_accum_steps
  if config.batch_size % (accum * dp):
    raise _bad("grad_accum_steps", accum, f"times the data-parallel size {dp} must divide "
               f"batch_size={config.batch_size}: each microbatch is split over the devices")

  c = config.checkpoint
  if c.keep_best and not str(c.best_metric).startswith("eval/"):
    raise _bad("checkpoint.best_metric", c.best_metric,
               "keep_best needs an eval metric such as 'eval/accuracy'")
  if c.keep_best and not config.eval_every_steps:
    raise _bad("checkpoint.keep_best", c.keep_best, "needs periodic eval (eval_every_steps > 0)")
  init = config.init_from or ""
  if init and ":" not in init:
    raise _bad("init_from", init, "format '<kind>:<arg>', e.g. 'checkpoint:/path/to/workdir'")
  if init and init.partition(":")[0] not in init_from_lib.KINDS:
    raise _bad("init_from", init, f"unknown kind {init.partition(':')[0]!r}; registered are "
               f"{sorted(init_from_lib.KINDS)} (vlora_jax.train.init_from.register_init_from)")
  return Plan(family, vlora, lora, shape)


def check_data(config, info: dict) -> None:
  """The model against what the data pipeline found: the family's rules."""
  models.family(config.model.name).check_data(config.model, info)
