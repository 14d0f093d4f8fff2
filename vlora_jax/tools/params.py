"""Parameter table of a config's model: dense vs VLoRA counts by group, and the ratio.

  python -m vlora_jax.tools.params --config configs/vit_cifar10.py
  python -m vlora_jax.tools.params --config configs/vit_cifar10.py --config.model.vlora.rank=4

Builds ``vlora_jax.models.build(config.model)`` and counts parameters from shapes only
(``jax.eval_shape``: nothing is allocated or compiled), for the model and for its dense twin (the same
architecture with every stack dense). With the official choices and the CIFAR config (img 32,
patch 4, D 192, 3 heads, 3 compounds x 4, rank 8, 10 classes) it prints VLoRA 1,602,634 and dense
5,362,762.
"""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

from vlora_jax import models, params

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file with get_config(arg); its config.model is counted.",
    lock_config=True)


def describe(mcfg) -> str:
  """The table for ``config.model`` as text: groups, totals, bytes, ratio and a summary line."""
  model = models.build(mcfg)
  t = params.table(model, *models.sample_inputs(mcfg))
  m, d = t["model"]["total"], t["dense"]["total"]
  spec = getattr(model, "vlora", None)
  lines = [f"model: {mcfg.name}", params.format_table(t), ""]
  if spec is None:
    lines.append(f"dense model: {d:,} parameters (VLoRA disabled)")
  else:
    # Models whose stacks differ (encoder / decoder) say so per stack.
    for name, (s, _) in model.stack_specs().items():
      ranks = s.rank if isinstance(s.rank, int) else list(s.rank)
      lines.append(f"VLoRA {name}: {s.mode}, compound size {s.compound_size}, rank {ranks}, "
                   f"targets {list(s.targets)}")
    lines.append(f"VLoRA {m:,} vs dense {d:,}: ratio {t['ratio']:.4f} "
                 f"({100 * (1 - t['ratio']):.1f}% fewer parameters)")
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  if "model" not in config:
    raise ValueError(f"{flags.FLAGS['config'].config_filename}: the config has no 'model' field")
  try:
    print(describe(config.model))
  except ValueError as e:  # a bad config: the message names the key; no traceback needed
    sys.exit(f"error: {e}")


def run():
  """The ``vlora-params`` console script."""
  flags.mark_flags_as_required(["config"])
  app.run(main)


if __name__ == "__main__":
  run()
