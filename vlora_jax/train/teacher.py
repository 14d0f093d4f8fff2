"""Knowledge distillation from a frozen teacher: ``config.distill``.

  distill.teacher       the workdir of a trained run of the same family ('' = no distillation)
  distill.weight        w: loss = (1 - w) * task loss + w * T^2 * KL(teacher || student)
  distill.temperature   T: both distributions are softened by it (Hinton et al. 2015; the T^2
                        keeps the gradient's scale as T changes)

The teacher is the trained run's newest checkpoint, merged to dense weights (`stack.to_dense`),
frozen, and sharded by the run's own sharding rules. It is an argument of the train step, not a
part of the train state, so it is never saved in the student's checkpoints: a resumed run loads it
again from its workdir. `check` runs in the set-up phase, from the teacher's stored config and
shapes alone: a teacher of another family, or one that reads other inputs or predicts other
classes, is refused before anything is compiled.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vlora_jax import errors
from vlora_jax import trained as trained_lib


@dataclasses.dataclass
class Teacher:
  """The teacher of a run: its dense model, its parameters' shapes and shardings, and where it
  comes from. `load` gives the parameters."""
  workdir: str
  checkpoint: Any  # its step directory
  model: nn.Module  # the dense model (VLoRA / LoRA merged)
  source_model: nn.Module  # the model as trained, whose params the checkpoint holds
  abstract_params: Any
  shardings: Any
  weight: float
  temperature: float

  def load(self):
    """The teacher's dense parameters, on the devices, sharded."""
    from vlora_jax import stack
    params = trained_lib.read_step_state(self.checkpoint)["params"]
    merged = stack.to_dense(self.source_model, {"params": params})[1]["params"]
    return jax.device_put(merged, self.shardings)


def check(config, family, student, mesh) -> Teacher | None:
  """The run's `Teacher` from ``config.distill`` (None when off), checked against the student."""
  from vlora_jax import models
  from vlora_jax.train import sharding
  dcfg = config.get("distill")
  if dcfg is None or not dcfg.get("teacher"):
    return None
  where = f"distill.teacher={dcfg.teacher!r}"
  try:
    step_dir, _ = trained_lib.find_checkpoint(dcfg.teacher)
  except errors.CheckpointError as e:
    raise errors.CheckpointError(f"{where}: {e}") from None
  tcfg = ml_collections.ConfigDict(trained_lib.read_meta(step_dir).get("config", {}))
  name = tcfg.get("model", {}).get("name")
  if name != config.model.name:
    raise errors.ConfigError(f"{where} is a model.name={name!r} run; the student is a "
                             f"model.name={config.model.name!r}: a teacher must be of the same "
                             "family")
  source = models.family(name).build_from_config(tcfg.model)
  dense = source.clone(vlora=None, lora=None)
  inputs = family.sample_inputs(config.model, batch=1)
  t_inputs = family.sample_inputs(tcfg.model, batch=1)
  if [(s.shape, s.dtype) for s in inputs] != [(s.shape, s.dtype) for s in t_inputs]:
    raise errors.ConfigError(f"{where} reads inputs {[s.shape for s in t_inputs]}; the student "
                             f"reads {[s.shape for s in inputs]}: they must be the same")
  boxed = jax.eval_shape(lambda *x: dense.init(jax.random.key(0), *x, train=False)["params"],
                         *inputs)
  t_out = jax.eval_shape(lambda p, *x: dense.apply({"params": p}, *x), nn.unbox(boxed), *inputs)
  s_out = jax.eval_shape(lambda *x: student.init_with_output(jax.random.key(0), *x,
                                                             train=False)[0], *inputs)
  if t_out.shape != s_out.shape:
    raise errors.ConfigError(f"{where} predicts logits of shape {t_out.shape}; the student "
                             f"{s_out.shape}: the teacher must predict the same classes")
  return Teacher(workdir=dcfg.teacher, checkpoint=step_dir, model=dense, source_model=source,
                 abstract_params=nn.unbox(boxed),
                 shardings=sharding.param_shardings(boxed, config.sharding_rules, mesh),
                 weight=float(dcfg.get("weight", 0.5)),
                 temperature=float(dcfg.get("temperature", 1.0)))


def kl_sum(student_logits, teacher_logits, weight, temperature: float):
  """``sum_positions weight * KL(softmax(t / T) || softmax(s / T))``, in float32."""
  t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
  s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
  kl = jnp.sum(jnp.exp(t) * (t - s), axis=-1)
  return jnp.sum(kl * weight)
