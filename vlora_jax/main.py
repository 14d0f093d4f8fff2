"""Command line: ``python -m vlora_jax.main --config configs/FILE.py[:ARG] --workdir DIR``.

Any config key can be overridden: ``--config.optim.lr=3e-4 --config.model.vlora.rank=4``; the
config is locked, so a misspelt key is an error at parsing. A thin layer over
`vlora_jax.train.train_and_evaluate`, which notebooks and tests call directly.

Exit status:
  0   the run finished (or was already finished: its final state is evaluated again);
  2   a mistake in the input: a flag, the config file, a config value, the data, the workdir, a
      checkpoint or an import. One line says what and where; ``--verbose`` adds the traceback;
  75  preempted (SIGTERM) or interrupted (Ctrl-C): a checkpoint of the last finished step was
      saved; rerun the same command to resume (`vlora_jax.train.preemption`);
  130 Ctrl-C before training began (set-up, the compile): one line, nothing saved;
  1   an internal error: a bug in vlora_jax or a library, shown with its traceback.
"""

from __future__ import annotations

import os
import sys
import traceback

from absl import app, flags, logging
from ml_collections import config_flags

from vlora_jax import cli

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config: configs/FILE.py[:ARG].",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Checkpoints, metrics and summary.json go here (resumed).")
flags.DEFINE_bool("verbose", False, "Show the traceback of input errors too.")
flags.mark_flags_as_required(["config", "workdir"])

def parse_flags(argv: list[str]) -> list[str]:
  return cli.parse_config_flags(FLAGS, argv)


def main(argv):
  if len(argv) > 1:
    cli.fail(f"unexpected arguments: {argv[1:]} (flags are --config, --workdir, --config.KEY=...)")
  logging.set_verbosity(logging.INFO)
  from vlora_jax import errors  # after flags: keeps --help fast
  from vlora_jax.train import metrics, preemption, train_and_evaluate
  metrics.quiet_libraries()
  try:
    summary = train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except errors.UserError as e:
    # A mistake in the input, named by the message; its traceback would only show JAX/Orbax
    # internals.
    cli.fail(str(e), e, FLAGS.verbose)
  except errors.Preempted as e:
    print(f"vlora_jax: {e}", file=sys.stderr, flush=True)
    sys.exit(preemption.EXIT_PREEMPTED)
  except KeyboardInterrupt:  # Ctrl-C outside the training loop, whose handler saves and exits 75
    cli.stopped("vlora_jax", "SIGINT", "before training began; nothing was saved")
  except Exception:  # noqa: BLE001 -- a bug: show where, and say that it is one
    traceback.print_exc()
    print("vlora_jax: internal error (a bug in vlora_jax or a library, not in your input): the "
          "traceback above says where; please report it", file=sys.stderr, flush=True)
    sys.exit(1)
  print(format_summary(summary, FLAGS.workdir), flush=True)


SUMMARY_KEYS = ("step", "eval/accuracy", "eval/loss", "eval/perplexity", "eval/seq_accuracy",
                "eval/seq_accuracy_teacher_forced", "params_total", "params_trainable", "wall_time_s", "examples_per_sec")


def format_summary(summary: dict, workdir: str) -> str:
  """The headline figures, numbers to 4 significant digits, and where the whole summary is."""
  fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else (f"{v:,}" if isinstance(v, int) else v)
  line = " ".join(f"{k}={fmt(summary[k])}" for k in SUMMARY_KEYS if summary.get(k) is not None)
  return f"{line}\nsummary: {os.path.join(workdir, 'summary.json')}"


def run():
  """The ``vlora-train`` console script."""
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  run()
