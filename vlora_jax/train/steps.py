"""The pure train and eval steps of a model family: what the trainer jits, and the benchmarks too."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from vlora_jax.models.family import Family
from vlora_jax.train import optim
from vlora_jax.train import teacher as teacher_lib


def make_train_step(model, family: Family, opt: optim.Optimizer, label_smoothing: float,
                    rng_impl: str = "threefry2x32", teacher=None):
  """The pure train step: ``(state, batch) -> (state, metrics)``.

  With a ``teacher`` (`train.teacher.Teacher`: its dense model, ``weight`` and ``temperature``)
  the step is ``(state, batch, teacher_params) -> (state, metrics)`` and its loss is
  ``(1 - weight) * task + weight * T^2 * KL(teacher || student)`` over the positions the task
  weighs, plus ``hidden_weight * hidden_loss`` on the compounds' outputs when that weight is not
  0; the teacher runs without dropout and gets no gradient.
  """

  hidden = teacher is not None and teacher.hidden_weight > 0
  # The layers' outputs are collected only for the hidden loss: otherwise nothing is sown.
  mutable = ["intermediates"] if hidden else False

  def step_fn(st, batch, teacher_params=None):
    rng, drop = jax.random.split(jax.random.wrap_key_data(st["rng"], impl=rng_impl))
    inputs = family.inputs(batch)
    if teacher is not None:
      out = teacher.model.apply({"params": teacher_params}, *inputs, train=False,
                                mutable=mutable)
      teacher_logits, t_vars = out if hidden else (out, None)
      teacher_logits, t_vars = jax.lax.stop_gradient((teacher_logits, t_vars))

    def loss_fn(p):
      out = model.apply({"params": p}, *inputs, train=True, rngs={"dropout": drop},
                        mutable=mutable)
      logits, s_vars = out if hidden else (out, None)
      s = family.sums(logits, batch, label_smoothing)
      loss = s["loss"] / s["weight"]
      if teacher is None:
        return loss, s
      ex_w = batch.get("mask", jnp.ones((logits.shape[0],), jnp.float32)).astype(jnp.float32)
      _, w = family.targets(batch, ex_w)
      t = teacher.temperature
      kl = teacher_lib.kl_sum(logits, teacher_logits, w, t) / s["weight"]
      s = dict(s, kl=kl, task_loss=loss)
      total = (1 - teacher.weight) * loss + teacher.weight * t * t * kl
      if hidden:
        h = teacher_lib.hidden_loss(teacher_lib.layer_outputs(s_vars["intermediates"]),
                                    teacher_lib.layer_outputs(t_vars["intermediates"]),
                                    teacher.ends, ex_w, family.stream_weights(batch, ex_w))
        s["hidden"] = h
        total = total + teacher.hidden_weight * h
      return total, s

    (loss, s), grads = jax.value_and_grad(loss_fn, has_aux=True)(st["params"])
    updates, opt_state = opt.tx.update(grads, st["opt_state"], st["params"])
    new_params = optax.apply_updates(st["params"], updates)
    m = {"train/loss": loss, "train/accuracy": s["correct"] / s["weight"],
         "train/grad_norm": optax.global_norm(optim.zero_frozen(grads, opt.labels)),
         "train/update_norm": optax.global_norm(updates),
         "train/param_norm": optax.global_norm(new_params),
         "train/lr": opt.schedule(st["step"])}
    if teacher is not None:  # the loss above is the mix; these are its parts
      m.update({"train/kl": s["kl"], "train/task_loss": s["task_loss"]})
    if hidden:
      m["train/hidden"] = s["hidden"]
    new = {"step": st["step"] + 1, "params": new_params, "opt_state": opt_state,
           "rng": jax.random.key_data(rng)}
    return new, m

  return step_fn


def make_eval_step(model, family: Family):
  """The pure eval step: ``(params, batch) -> sums`` (`Family.eval_sums`)."""
  def eval_fn(p, batch):
    return family.eval_sums(model, p, batch)
  return eval_fn
