"""What the command lines over a trained run share (`sample`, `evaluate`, `predict`, `export`).

Every one of them answers a mistake in its input (a flag, the workdir, the step, a file) with one
line ``error: ...`` and exit status 2, no traceback (``--verbose`` adds it); anything else is a
bug: its traceback, a line saying so, and exit status 1. Ctrl-C and SIGTERM stop it at once with
one line and exit status 130 / 143, no traceback and no partial output (`exit_on_signals`). This
module imports no JAX: the checks that come before loading a run are instant.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import tempfile
import threading
import traceback
from pathlib import Path
from typing import Any, Callable, NoReturn

from vlora_jax.errors import UserError

EXIT_USER_ERROR = 2
EXIT_INTERNAL_ERROR = 1


OVERRIDES_HELP = """\
config overrides:
  --config.KEY=VALUE      set any key of the config (docs/config.md lists them), for example
                          --config.optim.lr=3e-4  --config.model.vlora.rank=4,4,2,2
                          --config.data.path=/data/tiny_shakespeare.txt  --config.progress=false
                          A key that holds text takes the text as it is, a bool true or false,
                          any other key a Python literal: a number, None, a tuple such as
                          4,4,2,2 or (0.5, 0.5, 0.5). A key the config lacks is an error that
                          names the nearest one.
"""


def with_overrides_usage(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
  """Adds ``[--config.KEY=VALUE ...]`` to the usage line, once every flag is declared."""
  parser.usage = parser.format_usage().removeprefix("usage: ").strip() + \
      " [--config.KEY=VALUE ...]"
  return parser


def add_config_arg(parser: argparse.ArgumentParser, what: str = "the experiment") -> None:
  """``--config FILE.py[:ARG]``, required."""
  parser.add_argument("--config", required=True, metavar="FILE.py[:ARG]",
                      help=f"{what}'s config file, e.g. configs/vit_digits.py or "
                      "configs/vit_digits.py:dense,r=4 (ARG goes to its get_config)")


def config_error(spec: str, e: BaseException) -> str:
  """A config file's failure to load as one line naming the file."""
  from vlora_jax.errors import UserError
  if isinstance(e, FileNotFoundError):
    return f"--config={spec!r}: {e}"
  if isinstance(e, SyntaxError):
    return f"--config={spec!r}: {e.filename}, line {e.lineno}: syntax error: {e.msg}"
  if isinstance(e, UserError):
    return one_line(e)
  return f"--config={spec!r}: {type(e).__name__}: {one_line(e)}"


def load_config(spec: str, pairs: list[tuple[str, str]], verbose: bool = False):
  """The config of ``--config SPEC`` with the ``--config.KEY=VALUE`` overrides ``pairs``
  (`overrides.split`'s) applied; any failure is one line and exit status 2."""
  from vlora_jax.config import overrides
  from vlora_jax.config import files as config_files
  try:
    config = config_files.load(spec)
  except Exception as e:  # noqa: BLE001 -- the file is the user's: whatever it raises is input
    fail(config_error(spec, e), e, verbose)
  try:
    overrides.apply(config, pairs)
  except UserError as e:
    fail(one_line(e), e, verbose)
  return config


def parse_config_command(parser: argparse.ArgumentParser, argv: list[str] | None):
  """``(args, config)`` of a command that takes ``--config`` and overrides: argparse reads the
  flags, `overrides` the ``--config.KEY=VALUE`` ones; a stray argument, a config that does not
  load and a bad override are each one line and exit status 2."""
  from vlora_jax.config import overrides
  argv = sys.argv[1:] if argv is None else list(argv)
  try:
    pairs, rest = overrides.split(argv)
  except UserError as e:
    fail(one_line(e))
  args = parser.parse_args(rest)
  return args, load_config(args.config, pairs, getattr(args, "verbose", False))


def one_line(text) -> str:
  """A multi-line message as one line (its lines joined by '; ')."""
  return "; ".join(part.strip() for part in str(text).splitlines() if part.strip())


def fail(message: str, exc: BaseException | None = None, verbose: bool = False) -> NoReturn:
  """Prints ``error: <message>`` (the traceback of ``exc`` too when ``verbose``) and exits 2."""
  if verbose and exc is not None:
    traceback.print_exception(exc)
  print(f"error: {message}", file=sys.stderr, flush=True)  # the training command's format too
  sys.exit(EXIT_USER_ERROR)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
  """The docstring as written, 100 columns, and every flag's default after its help (where it
  has one)."""

  def __init__(self, prog, indent_increment=2, max_help_position=28, width=None):
    super().__init__(prog, indent_increment, max_help_position, width or 100)

  def _get_help_string(self, action):
    text = action.help or ""
    shown = action.default is not None and action.default is not False \
        and action.default is not argparse.SUPPRESS and action.option_strings
    if shown and "default" not in text:
      text += " (default: %(default)s)"
    return text


class Parser(argparse.ArgumentParser):
  """argparse whose errors are one line and exit 2, like every input error (not argparse's usage
  text); the module's docstring is its ``--help``."""

  def __init__(self, prog: str, doc: str | None, **kwargs):
    super().__init__(prog=prog, description=doc, formatter_class=HelpFormatter, **kwargs)

  def error(self, message):
    fail(f"{message} (see --help)")


def add_run_args(parser: argparse.ArgumentParser) -> None:
  """``--workdir``, ``--step`` and ``--verbose``: which run and checkpoint, and how errors show."""
  parser.add_argument("--workdir", required=True, help="the run's workdir")
  parser.add_argument("--step", default=None,
                      help="a step number, or 'best' (<workdir>/best); default: the newest")
  parser.add_argument("--verbose", action="store_true", help="show the traceback of input errors")


def step(text: str | None) -> int | str | None:
  """``--step``: None (the newest), 'best', or a step number; anything else exits 2."""
  if text is None or text == "best":
    return text
  if not text.isdigit():
    fail(f"--step={text!r}: allowed are a step number or 'best'")
  return int(text)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def stopped(prog: str, signal_name: str, said: str) -> NoReturn:
  """Ends the process on a stop signal: the outputs being written removed, one line, status 128 +
  the signal's number. At once, from any state: no traceback, and no teardown of threads that
  are still in XLA (a compile) or writing."""
  from vlora_jax.runs import outputs
  outputs.remove_pending()
  print(f"{prog}: stopped by {signal_name}; {said}", file=sys.stderr, flush=True)
  os._exit(128 + signal.Signals[signal_name].value)


def _stop(prog: str, said: str):
  def handler(signum, frame):
    del frame
    stopped(prog, signal.Signals(signum).name, said)
  return handler


@contextlib.contextmanager
def exit_on_signals(prog: str, said: str = "nothing was written"):
  """Within the block, Ctrl-C (SIGINT) and SIGTERM end the process with one line (``prog: stopped
  by SIGINT; <said>``) and status 128 + the signal (130, 143), after removing the outputs being
  written. Inert outside the main thread (handlers can be set only there)."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  previous = {s: signal.signal(s, _stop(prog, said)) for s in STOP_SIGNALS}
  try:
    yield
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)


def in_worker(fn: Callable[..., Any], *args, **kwargs) -> Any:
  """``fn(*args, **kwargs)`` in a worker thread while this one waits: Python runs signal handlers
  in the main thread only between its own steps, so a main thread inside a long XLA compile would
  answer Ctrl-C only after it. Returns the result or raises the worker's exception."""
  done: dict[str, Any] = {}

  def work():
    try:
      done["value"] = fn(*args, **kwargs)
    except BaseException as e:  # noqa: BLE001 -- handed to the waiting thread as it is
      done["error"] = e

  worker = threading.Thread(target=work, name="vlora_jax-command", daemon=True)
  worker.start()
  while worker.is_alive():
    worker.join(0.1)
  if "error" in done:
    raise done["error"]
  return done["value"]


def guarded(prog: str, verbose: bool, fn: Callable[..., Any], *args, **kwargs) -> Any:
  """``fn(*args, **kwargs)``; a `UserError` exits 2 with its one line, any other exception is an
  internal error: its traceback, a line saying it is a bug, exit 1. Ctrl-C and SIGTERM exit 130 /
  143 with one line (`exit_on_signals`); ``fn`` runs in a worker thread so that they are answered
  at once (`in_worker`)."""
  try:
    with exit_on_signals(prog):
      return in_worker(fn, *args, **kwargs)
  except UserError as e:
    fail(one_line(e), e, verbose)
  except Exception:  # noqa: BLE001 -- a bug: show where, and say that it is one
    traceback.print_exc()
    print(f"{prog}: internal error (a bug in vlora_jax or a library, not in your input): the "
          "traceback above says where; please report it", file=sys.stderr, flush=True)
    sys.exit(EXIT_INTERNAL_ERROR)


def writable_dir(directory: Path, flag: str, error: Callable[[str], UserError]) -> None:
  """Creates ``directory`` (and its parents) and checks that a file can be written there;
  otherwise raises ``error(message)``, the message starting with ``flag`` (``--out='...'``)."""
  above = next(p for p in (directory, *directory.parents) if p.exists())
  if not above.is_dir():  # mkdir would say only 'File exists'
    raise error(f"{flag}: {str(above)!r} is a file, not a directory")
  try:
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=directory):  # a name of its own: no other file is touched
      pass
  except OSError as e:
    raise error(f"{flag}: cannot write in {str(directory)!r} ({e.strerror or e})") from None
