"""Training: ``train_and_evaluate(config, workdir)`` and its parts (one job per module).

  trainer     the run, in phases           setup       phase 1: checked config, mesh, data, shapes
  steps       the pure train / eval steps  loop        the steps and what they report
  validate    config checks before compile optim       AdamW, schedules, regex groups, freezing
  sharding    mesh, rules, multi-host      state       train state and shardings
  checkpoint  Orbax save / resume / restore / layout check
  metrics     metrics.jsonl, TensorBoard, progress bar, summary.json

What a model is trained to do (inputs, loss, metrics) belongs to its family (`models.family`).
"""

from vlora_jax.train.trainer import NonFiniteLossError, train_and_evaluate

__all__ = ["train_and_evaluate", "NonFiniteLossError", "load_config"]


def load_config(spec: str, **overrides):
  """``'configs/vit_digits.py:dense'`` -> the config, as ``--config`` would load it (for notebooks).

  ``overrides`` are dotted keys, e.g. ``load_config('configs/vit_digits.py', **{'optim.lr': 1e-3})``.
  """
  from vlora_jax.config.files import load
  return load(spec, **overrides)
