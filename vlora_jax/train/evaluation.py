"""The eval loop: a model's metrics over a pipeline's eval set.

One code path for the training loop (`loop.Loop.evaluate`, at every eval) and for a trained run's
checkpoint (``python -m vlora_jax.evaluate``): the jitted `steps.make_eval_step`, its sums added
over the eval batches, the family's `finalize` of the total.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from vlora_jax.core import partitioning
from vlora_jax.data.sources import DataError
from vlora_jax.train import sharding
from vlora_jax.train.steps import make_eval_step


def jit_step(model, family, mesh, param_shardings, activation_rules):
  """`make_eval_step`, jitted as training runs it: the parameters laid out by
  ``param_shardings``, the batch split over the data-parallel axes, the activations by
  ``activation_rules``, the sums replicated."""
  step = partitioning.traced_with(make_eval_step(model, family), mesh, activation_rules)
  return jax.jit(step,
                 in_shardings=(param_shardings, sharding.batch_sharding(mesh)),
                 out_shardings=sharding.replicated(mesh))


def param_shardings(model, family, config, mesh):
  """The parameters' shardings by ``config.sharding_rules`` on ``mesh``, as set-up lays them out
  for training (`setup.set_up`); nothing is compiled."""
  sample = family.sample_inputs(config.model, batch=2)
  boxed = jax.eval_shape(
      lambda *x: model.init({"params": jax.random.key(0), "dropout": jax.random.key(0)}, *x,
                            train=False)["params"], *sample)
  return sharding.param_shardings(boxed, config.sharding_rules, mesh)


def bits(metrics: dict[str, float], info: dict, prefix: str, split: str) -> dict[str, float]:
  """Text's loss in bits: ``<prefix>/bits_per_token`` (the loss over ln 2) and, where the
  characters per token of the measured ``split`` are known (the data info's ``chars_per_token``
  by split: 1 for characters), ``<prefix>/bits_per_char``. Nothing for other data."""
  loss = metrics.get(f"{prefix}/loss")
  if info.get("kind") != "text" or loss is None:
    return {}
  out = {f"{prefix}/bits_per_token": loss / math.log(2)}
  per_char = (info.get("chars_per_token") or {}).get(split)
  if per_char:
    out[f"{prefix}/bits_per_char"] = out[f"{prefix}/bits_per_token"] / per_char
  return out


def evaluate(step, family, params, pipe, mesh, progress: Any = None, split: str | None = None,
             prefix: str = "eval") -> dict[str, float]:
  """``{'eval/loss', 'eval/accuracy', ...}`` of ``params`` over one of ``pipe``'s eval sets.

  Args:
    step: the jitted eval step (`jit_step`), ``(params, global batch) -> sums``.
    family: the model's `Family`, which turns the summed statistics into means.
    params: the parameters, laid out as ``step`` takes them.
    pipe: the data (`vlora_jax.data.Pipeline`); this process reads its part of every eval batch.
    mesh: the device mesh the batches are spread over.
    progress: anything with ``update(n)`` (a `metrics.Progress`), told of every batch; or None.
    split: the eval set: None the pipeline's ``eval_split`` (validation unless the config says
      otherwise), or 'validation' / 'test'.
    prefix: the metrics' prefix ('eval'; the trainer's final test evaluation uses 'test').
  """
  acc = None
  for local in pipe.eval_batches(split):
    s = step(params, sharding.global_batch(local, mesh))
    acc = s if acc is None else jax.tree.map(jnp.add, acc, s)
    if progress is not None:
      progress.update(1)
  if acc is None:
    raise DataError("the eval set is empty: nothing to evaluate (see data.eval_examples and the "
                    "data's splits)")
  metrics = family.finalize(jax.device_get(acc), prefix)
  return {**metrics, **bits(metrics, pipe.info, prefix, split or pipe.eval_split)}
