"""The pure train and eval steps of a model family: what the trainer jits, and the benchmarks too."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from vlora_jax.models.family import Family
from vlora_jax.train import optim
from vlora_jax.train import teacher as teacher_lib


def make_train_step(model, family: Family, opt: optim.Optimizer, label_smoothing: float,
                    rng_impl: str = "threefry2x32", teacher=None, grad_accum_steps: int = 1):
  """The pure train step: ``(state, batch) -> (state, metrics)``.

  With a ``teacher`` (`train.teacher.Teacher`: its dense model, ``weight`` and ``temperature``)
  the step is ``(state, batch, teacher_params) -> (state, metrics)`` and its loss is
  ``(1 - weight) * task + weight * T^2 * KL(teacher || student)`` over the positions the task
  weighs, plus ``hidden_weight * hidden_loss`` on the compounds' outputs when that weight is not
  0; the teacher runs without dropout and gets no gradient.

  ``grad_accum_steps`` > 1 splits the batch into that many microbatches, run one after another
  by a scan inside the step, and applies one update with their gradients: the step's activations
  are those of one microbatch, so the global batch and the per-step memory are chosen apart.
  Each microbatch's gradient weighs by its share of the batch's loss weight, so the update is
  the whole batch's (exactly, for the task loss and the KL).
  """

  hidden = teacher is not None and teacher.hidden_weight > 0
  # The layers' outputs are collected only for the hidden loss: otherwise nothing is sown.
  mutable = ["intermediates"] if hidden else False

  def loss_and_grads(params, batch, drop, teacher_params):
    """``((loss, sums), grads)`` of one (micro)batch; the loss is its weighted mean."""
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
      ex_w = _example_weight(batch, logits.shape[0])
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

    return jax.value_and_grad(loss_fn, has_aux=True)(params)

  # The sums that are means of their microbatch (the rest are sums over examples).
  means = ("kl", "task_loss", "hidden")

  def accumulated(params, batch, drop, teacher_params):
    """`loss_and_grads` of the whole batch, one microbatch at a time."""
    micro = jax.tree.map(lambda a: split_microbatches(a, grad_accum_steps), batch)
    _, w = family.targets(batch, _example_weight(batch, _batch_size(batch)))
    total_weight = jnp.sum(w)

    def one(carry, xs):
      i, mb = xs
      (loss, s), g = loss_and_grads(params, mb, jax.random.fold_in(drop, i), teacher_params)
      share = s["weight"] / total_weight
      scaled = {k: (v * share if k in means else v) for k, v in s.items()}
      add = lambda acc, new: jax.tree.map(jnp.add, acc, new)
      return add(carry, (loss * share, scaled, jax.tree.map(lambda x: x * share, g))), None

    zeros = jax.eval_shape(lambda: loss_and_grads(
        params, jax.tree.map(lambda a: a[0], micro), drop, teacher_params))
    zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), zeros)
    (loss, s, grads), _ = jax.lax.scan(
        one, (zeros[0][0], zeros[0][1], zeros[1]), (jnp.arange(grad_accum_steps), micro))
    return (loss, s), grads

  def step_fn(st, batch, teacher_params=None):
    rng, drop = jax.random.split(jax.random.wrap_key_data(st["rng"], impl=rng_impl))
    run = loss_and_grads if grad_accum_steps == 1 else accumulated
    (loss, s), grads = run(st["params"], batch, drop, teacher_params)
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


def _batch_size(batch) -> int:
  return jax.tree.leaves(batch)[0].shape[0]


def _example_weight(batch, size: int):
  return batch.get("mask", jnp.ones((size,), jnp.float32)).astype(jnp.float32)


def split_microbatches(a: jax.Array, n: int) -> jax.Array:
  """``[B, ...]`` -> ``[n, B / n, ...]``, microbatch ``i`` the rows ``i, i + n, i + 2n, ...``:
  each device's slice of the batch holds its share of every microbatch, so the split moves no
  data across devices."""
  b = a.shape[0]
  if b % n:
    raise ValueError(f"grad_accum_steps={n} does not divide the batch of {b}")
  return jnp.moveaxis(a.reshape((b // n, n) + a.shape[1:]), 1, 0)


def make_eval_step(model, family: Family):
  """The pure eval step: ``(params, batch) -> sums`` (`Family.eval_sums`)."""
  def eval_fn(p, batch):
    return family.eval_sums(model, p, batch)
  return eval_fn
