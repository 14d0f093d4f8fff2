"""The pure train and eval steps of a model family: what the trainer jits, and the benchmarks too."""

from __future__ import annotations

import jax
import optax

from vlora_jax.models.family import Family
from vlora_jax.train import optim


def make_train_step(model, family: Family, opt: optim.Optimizer, label_smoothing: float,
                    rng_impl: str = "threefry2x32"):
  """The pure train step: ``(state, batch) -> (state, metrics)``."""

  def step_fn(st, batch):
    rng, drop = jax.random.split(jax.random.wrap_key_data(st["rng"], impl=rng_impl))

    def loss_fn(p):
      logits = model.apply({"params": p}, *family.inputs(batch), train=True,
                           rngs={"dropout": drop})
      s = family.sums(logits, batch, label_smoothing)
      return s["loss"] / s["weight"], s

    (loss, s), grads = jax.value_and_grad(loss_fn, has_aux=True)(st["params"])
    updates, opt_state = opt.tx.update(grads, st["opt_state"], st["params"])
    new_params = optax.apply_updates(st["params"], updates)
    m = {"train/loss": loss, "train/accuracy": s["correct"] / s["weight"],
         "train/grad_norm": optax.global_norm(optim.zero_frozen(grads, opt.labels)),
         "train/update_norm": optax.global_norm(updates),
         "train/param_norm": optax.global_norm(new_params),
         "train/lr": opt.schedule(st["step"])}
    new = {"step": st["step"] + 1, "params": new_params, "opt_state": opt_state,
           "rng": jax.random.key_data(rng)}
    return new, m

  return step_fn


def make_eval_step(model, family: Family):
  """The pure eval step: ``(params, batch) -> sums`` (`Family.eval_sums`)."""
  def eval_fn(p, batch):
    return family.eval_sums(model, p, batch)
  return eval_fn
