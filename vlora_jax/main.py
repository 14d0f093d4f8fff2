"""Command line: ``python -m vlora_jax.main --config configs/FILE.py[:ARG] --workdir DIR``.

Any config key can be overridden: ``--config.optim.lr=3e-4 --config.model.vlora.rank=4``; the
config is locked, so a misspelt key is an error at parsing. A thin layer over
`vlora_jax.train.train_and_evaluate`, which notebooks and tests call directly.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config: configs/FILE.py[:ARG].",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Checkpoints, metrics and summary.json go here (resumed).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.INFO)
  from vlora_jax import errors  # after flags: keeps --help fast
  from vlora_jax.train import metrics, train_and_evaluate
  metrics.quiet_libraries()
  try:
    summary = train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except errors.UserError as e:
    # A mistake in the input, named by the message; its traceback would only show JAX/Orbax
    # internals. Bugs (any other exception) keep their traceback.
    logging.debug("traceback of the error below", exc_info=True)
    print(f"error: {e}\n(vlora_jax: {type(e).__name__}; --verbosity=1 shows the traceback)",
          file=sys.stderr, flush=True)
    sys.exit(2)
  print(format_summary(summary, FLAGS.workdir), flush=True)


SUMMARY_KEYS = ("step", "eval/accuracy", "eval/loss", "eval/perplexity", "eval/seq_accuracy",
                "params_total", "params_trainable", "wall_time_s", "examples_per_sec")


def format_summary(summary: dict, workdir: str) -> str:
  """The headline figures, numbers to 4 significant digits, and where the whole summary is."""
  fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else (f"{v:,}" if isinstance(v, int) else v)
  line = " ".join(f"{k}={fmt(summary[k])}" for k in SUMMARY_KEYS if summary.get(k) is not None)
  return f"{line}\nsummary: {os.path.join(workdir, 'summary.json')}"


def run():
  """The ``vlora-train`` console script."""
  app.run(main)


if __name__ == "__main__":
  run()
