"""Train a model from a config: ``vlora-train --config FILE.py[:ARG] --workdir DIR``.

  vlora-train --config configs/vit_digits.py --workdir runs/digits
  vlora-train --config configs/vit_digits.py:dense --workdir runs/digits_dense \\
      --config.num_train_steps=500 --config.model.vlora.rank=4,4,2,2

(``python -m vlora_jax.main`` is the same command.) The workdir receives the checkpoints, the best
checkpoints by the validation metric (``best/``), ``config.json``, ``metrics.jsonl``, TensorBoard
files and ``summary.json`` (with the test split's metrics, evaluated once at the end). A workdir
that holds a run resumes it; a finished run is evaluated again. A thin layer over
`vlora_jax.train.train_and_evaluate`, which notebooks call directly.

Exit status:
  0   the run finished (or was already finished: its final state is evaluated again);
  2   a mistake in the input: a flag, the config file, a config value, the data, the workdir, a
      checkpoint or an import. One line says what and where; --verbose adds the traceback;
  75  preempted (SIGTERM) or interrupted (Ctrl-C): a checkpoint of the last finished step was
      saved; rerun the same command to resume (`vlora_jax.train.preemption`);
  130 Ctrl-C before training began (set-up, the compile): one line, nothing saved;
  1   an internal error: a bug in vlora_jax or a library, shown with its traceback.
"""

from __future__ import annotations

import os
import sys
import traceback

from vlora_jax import cli

PROG = "vlora-train"


def parser() -> cli.Parser:
  p = cli.Parser(PROG, __doc__, epilog=cli.OVERRIDES_HELP, allow_abbrev=False)
  cli.add_config_arg(p)
  p.add_argument("--workdir", required=True, metavar="DIR",
                 help="checkpoints, metrics and summary.json go here; a workdir that holds a run "
                 "resumes it")
  p.add_argument("--verbose", action="store_true", help="show the traceback of input errors too")
  return cli.with_overrides_usage(p)


def _start_logging() -> None:
  """absl's INFO log to stderr (the library logs through absl) without absl's flag parsing."""
  from absl import flags, logging
  flags.FLAGS.mark_as_parsed()  # absl otherwise warns that logging came before flag parsing
  logging.set_verbosity(logging.INFO)
  logging.use_absl_handler()


def main(argv: list[str] | None = None) -> None:
  args, config = cli.parse_config_command(parser(), argv)
  _start_logging()
  from vlora_jax import errors  # after the flags: keeps --help fast
  from vlora_jax.train import metrics, preemption, train_and_evaluate
  metrics.quiet_libraries()
  try:
    summary = train_and_evaluate(config, args.workdir)
  except errors.UserError as e:
    # A mistake in the input, named by the message; its traceback would only show JAX/Orbax
    # internals.
    cli.fail(cli.one_line(e), e, args.verbose)
  except errors.Preempted as e:
    print(f"{PROG}: {e}", file=sys.stderr, flush=True)
    sys.exit(preemption.EXIT_PREEMPTED)
  except KeyboardInterrupt:  # Ctrl-C outside the training loop, whose handler saves and exits 75
    cli.stopped(PROG, "SIGINT", "before training began; nothing was saved")
  except Exception:  # noqa: BLE001 -- a bug: show where, and say that it is one
    traceback.print_exc()
    print(f"{PROG}: internal error (a bug in vlora_jax or a library, not in your input): the "
          "traceback above says where; please report it", file=sys.stderr, flush=True)
    sys.exit(1)
  print(format_summary(summary, args.workdir), flush=True)


SUMMARY_KEYS = ("step", "eval/accuracy", "eval/loss", "eval/perplexity", "eval/bits_per_char",
                "eval/seq_accuracy", "eval/seq_accuracy_teacher_forced", "test/accuracy",
                "test/loss", "test/perplexity", "test/bits_per_char", "test/seq_accuracy",
                "params_total", "params_trainable", "wall_time_s", "examples_per_sec")


def format_summary(summary: dict, workdir: str) -> str:
  """The headline figures, numbers to 4 significant digits, and where the whole summary is."""
  fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else (f"{v:,}" if isinstance(v, int) else v)
  line = " ".join(f"{k}={fmt(summary[k])}" for k in SUMMARY_KEYS if summary.get(k) is not None)
  return f"{line}\nsummary: {os.path.join(workdir, 'summary.json')}"


def run():
  """The ``vlora-train`` console script."""
  main()


if __name__ == "__main__":
  main()
