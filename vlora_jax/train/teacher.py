"""Knowledge distillation from a frozen teacher: ``config.distill``.

  distill.teacher       the workdir of a trained run of the same family ('' = no distillation)
  distill.weight        w: loss = (1 - w) * task loss + w * T^2 * KL(teacher || student)
  distill.temperature   T: both distributions are softened by it (Hinton et al. 2015; the T^2
                        keeps the gradient's scale as T changes)
  distill.hidden_weight  h: adds h * (the students' and the teacher's residual streams at every
                        compound's end, compared: `hidden_loss`), the per-compound loss of
                        compress-and-heal; the teacher must then have the student's depth and
                        width (checked in set-up)

The teacher is the trained run's newest good checkpoint (verified against its fingerprints; a
damaged newer one is skipped with a warning), merged to dense weights (`stack.to_dense`), frozen,
and sharded by the run's own sharding rules. It is an argument of the train step, not a
part of the train state, so it is never saved in the student's checkpoints: the student's meta
records which checkpoint it is (``distill_teacher``), and a resumed run loads that one again.
`check` runs in the set-up phase: from the teacher's stored config and shapes alone, a teacher of
another family, or one that reads other inputs or predicts other classes, is refused; then its
parameters are read (on the host) and verified, all before anything is compiled.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlora_jax import errors
from vlora_jax.train.sources import Sources


@dataclasses.dataclass
class Teacher:
  """The teacher of a run: its dense model, its parameters' shapes and shardings, and where it
  comes from. `load` gives the parameters."""
  workdir: str
  checkpoint: Any  # its step directory
  model: nn.Module  # the dense model (VLoRA / LoRA merged)
  abstract_params: Any
  shardings: Any
  weight: float
  temperature: float
  hidden_weight: float = 0.0
  # {stack name: indices of the layers whose outputs the hidden loss compares}: each compound's
  # last layer (every layer of a dense stack).
  ends: dict = dataclasses.field(default_factory=dict)
  source: Any = None  # the verified `trained.Trained` of the checkpoint (host arrays)

  def load(self):
    """The teacher's dense parameters (its checkpoint's, verified and checked against its stored
    config), on the devices, sharded."""
    return jax.device_put(self.source.to_dense()[1], self.shardings)


def check(config, family, student, mesh, pinned: str | None = None,
          sources: Sources | None = None) -> Teacher | None:
  """The run's `Teacher` from ``config.distill`` (None when off), checked against the student.

  ``pinned``: the teacher checkpoint a resumed run started with (its meta's ``distill_teacher``).
  While it lies in the configured teacher's workdir it is used again, even if that run has trained
  on or rotated it away (then the error says so): a resumed student never changes teachers
  silently. A teacher set to another workdir is taken at its newest checkpoint.

  ``sources``: the run's reads of other runs: a teacher that is also the run's compressed dense
  run is opened and loaded once.
  """
  from vlora_jax import models
  from vlora_jax.train import sharding
  dcfg = config.distill
  if not dcfg.teacher:
    return None
  where = f"distill.teacher={dcfg.teacher!r}"
  teacher_dir = Path(dcfg.teacher).expanduser().resolve()
  step_dir = None
  pinned_here = bool(pinned) and teacher_dir in Path(pinned).resolve().parents
  if pinned_here:
    step_dir = Path(pinned)
    if not step_dir.is_dir():
      raise errors.CheckpointError(
          f"{where}: this run started distilling from {pinned}, which is gone; a resumed run "
          "keeps its teacher. Start in a fresh workdir to distil from that run's newest "
          "checkpoint")
  sources = sources or Sources()
  step_dir, tcfg = sources.config(dcfg.teacher, where, step_dir)
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
  hidden_weight = float(dcfg.hidden_weight)
  ends = {}
  if hidden_weight > 0:
    ends = _check_streams(where, dense, nn.unbox(boxed), student, inputs)
  # The parameters last: every refusal above needs the stored config alone.
  run = sources.load(dcfg.teacher, where, step_dir if pinned_here else None)
  return Teacher(workdir=dcfg.teacher, checkpoint=run.checkpoint, source=run, model=dense,
                 abstract_params=nn.unbox(boxed),
                 shardings=sharding.param_shardings(boxed, config.sharding_rules, mesh),
                 weight=float(dcfg.weight), temperature=float(dcfg.temperature),
                 hidden_weight=hidden_weight,
                 ends=ends)


def layer_outputs(intermediates) -> dict[str, jax.Array]:
  """``{stack name: [L, ...] every layer's output}`` from a model's ``intermediates`` collection
  (`stack.LayerStack` sows them there when that collection is mutable)."""
  found = {}

  def walk(tree, path):
    for k, v in tree.items():
      if k == "layer_outputs":
        found["/".join(path)] = v[-1]
      elif isinstance(v, dict):
        walk(v, path + (k,))

  walk(intermediates, ())
  return found


def _check_streams(where, dense, dense_params, student, inputs) -> dict[str, tuple[int, ...]]:
  """The compound ends of every student stack, once the teacher's streams match it in shape."""
  def streams(model, params, *x):
    if params is None:
      params = nn.unbox(model.init(jax.random.key(0), *x, train=False)["params"])
    _, v = model.apply({"params": params}, *x, train=False, mutable=["intermediates"])
    return layer_outputs(v["intermediates"])

  t = jax.eval_shape(lambda p, *x: streams(dense, p, *x), dense_params, *inputs)
  s = jax.eval_shape(lambda *x: streams(student, None, *x), *inputs)
  if set(t) != set(s) or any(t[k].shape != s[k].shape for k in s):
    shapes = lambda d: {k: tuple(v.shape) for k, v in d.items()}  # noqa: E731
    raise errors.ConfigError(
        f"{where} with distill.hidden_weight>0: the teacher's layer outputs {shapes(t)} "
        f"[layers, batch, ...] differ from the student's {shapes(s)}: the per-compound loss "
        "needs a teacher of the student's depth and width (or distill.hidden_weight=0)")
  specs = student.stack_specs()
  ends = {}
  for name, out in s.items():
    size = specs[name][0].compound_size if specs.get(name, (None,))[0] is not None else 1
    ends[name] = tuple(range(size - 1, out.shape[0], size))
  return ends


def hidden_loss(student_outputs, teacher_outputs, ends, example_weight, position_weights=None):
  """The per-compound loss: at every compound's last layer, the squared distance between the
  student's and the teacher's outputs relative to the teacher's squared norm, per example
  (scale-free across widths and depths), averaged over the examples by ``example_weight`` [B],
  then over the compound ends of every stack. In float32.

  ``position_weights``: ``{stack name: [B, T]}`` weights of a stack's positions (the family's
  `stream_weights`: a seq2seq batch's padding weighs 0); a stack not in it counts every position.
  """
  position_weights = position_weights or {}
  terms = []
  for name, idx in ends.items():
    idx = jnp.asarray(idx)
    s = student_outputs[name][idx].astype(jnp.float32)  # [E, B, T, ..., D]
    t = teacher_outputs[name][idx].astype(jnp.float32)
    d = jnp.sum((s - t) ** 2, axis=tuple(range(3, s.ndim)))  # [E, B, T]
    n = jnp.sum(t ** 2, axis=tuple(range(3, s.ndim)))
    w = position_weights.get(name)
    w = jnp.ones(d.shape[1:], jnp.float32) if w is None else w.astype(jnp.float32)
    rel = jnp.sum(d * w, axis=2) / jnp.maximum(jnp.sum(n * w, axis=2), 1e-12)  # [E, B]
    terms.append(jnp.sum(rel * example_weight, axis=1) / jnp.maximum(jnp.sum(example_weight),
                                                                      1e-12))
  return jnp.mean(jnp.concatenate(terms))


def kl_sum(student_logits, teacher_logits, weight, temperature: float):
  """``sum_positions weight * KL(softmax(t / T) || softmax(s / T))``, in float32."""
  t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
  s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
  kl = jnp.sum(jnp.exp(t) * (t - s), axis=-1)
  return jnp.sum(kl * weight)
