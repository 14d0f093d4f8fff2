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
  1   an internal error: a bug in vlora_jax or a library, shown with its traceback.
"""

from __future__ import annotations

import os
import sys
import traceback

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config: configs/FILE.py[:ARG].",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Checkpoints, metrics and summary.json go here (resumed).")
flags.DEFINE_bool("verbose", False, "Show the traceback of input errors too.")
flags.mark_flags_as_required(["config", "workdir"])

EXIT_USER_ERROR = 2


def user_error(message: str, exc: BaseException | None = None, verbose: bool = False):
  """Prints ``error: <message>`` (with the traceback only when ``verbose``) and exits 2."""
  if verbose and exc is not None:
    traceback.print_exception(exc)
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(EXIT_USER_ERROR)


def _one_line(text: str) -> str:
  return "; ".join(part.strip() for part in str(text).splitlines() if part.strip())


def describe_flag_error(e: BaseException, argv: list[str]) -> str:
  """A flag or config-file error as one line that names the flag or the file."""
  if "Error whilst parsing config file" in str(e):
    while e.__context__ is not None:  # the config file's own error (a bad ':arg', a raise
      e = e.__context__               # inside get_config), under absl's and ml_collections'
  if isinstance(e, SyntaxError):
    return f"--config: {e.filename}, line {e.lineno}: syntax error: {e.msg}"
  if isinstance(e, KeyError) and "Did you mean" in str(e.args[0] if e.args else ""):
    name = str(e.args[0]).splitlines()[0].strip("'\"")
    override = next((a.split("=")[0] for a in argv if a.startswith("--config.")
                     and name in a.split("=")[0].split(".")), "--config.*")
    return f"{override}: no config key {name!r}; {_one_line(str(e.args[0]).split(chr(10), 1)[-1])}"
  if isinstance(e, OSError) and "Configuration is not available" in str(e):
    lines = [s.strip() for s in str(e).splitlines() if s.strip()]
    return f"--config: {lines[-1]}"
  if isinstance(e, flags.Error):
    return _one_line(e)
  return f"--config: {type(e).__name__}: {_one_line(e)}"


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with every error (flags, the config file, its overrides) as one line
  and exit status 2."""
  try:
    rest = FLAGS(argv)
    getattr(FLAGS.config, "model", None)  # a config file that failed to load raises here
    return rest
  except SystemExit:
    raise
  except Exception as e:  # noqa: BLE001 -- everything here comes from the command line
    user_error(describe_flag_error(e, argv), e, verbose="--verbose" in argv)


def main(argv):
  if len(argv) > 1:
    user_error(f"unexpected arguments: {argv[1:]} (flags are --config, --workdir, --config.KEY=...)")
  logging.set_verbosity(logging.INFO)
  from vlora_jax import errors  # after flags: keeps --help fast
  from vlora_jax.train import metrics, preemption, train_and_evaluate
  metrics.quiet_libraries()
  try:
    summary = train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except errors.UserError as e:
    # A mistake in the input, named by the message; its traceback would only show JAX/Orbax
    # internals.
    user_error(str(e), e, FLAGS.verbose)
  except errors.Preempted as e:
    print(f"vlora_jax: {e}", file=sys.stderr, flush=True)
    sys.exit(preemption.EXIT_PREEMPTED)
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
