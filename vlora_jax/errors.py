"""Errors in what the user gave (config, data, checkpoints, workdir), as opposed to bugs.

Every one of them carries a message that names the key or path, the value, and what is allowed;
the command line prints that message alone (no traceback: the traceback would point into
JAX/Orbax internals, not at the mistake) and exits with status 2. Library callers catch them as
`UserError`, or as the built-in type each also is (``ValueError``, ``OSError``, ...), so code
written against the built-in types keeps working.
"""

from __future__ import annotations

import contextlib


class UserError(Exception):
  """Base of the errors the user fixes by changing their input."""


class ConfigError(UserError, ValueError):
  """A config key with a value that is not allowed (raised before anything compiles)."""


class CheckpointError(UserError, ValueError):
  """A checkpoint that is missing, or does not fit the current model or config."""


class WorkdirError(UserError, OSError):
  """The workdir cannot hold the run: not writable, not enough space, or a save that failed."""


@contextlib.contextmanager
def config_errors():
  """Within the set-up (config, data, model shapes), a ``ValueError`` is about the input.

  Model and spec checks raise plain ``ValueError`` (they are usable without this package's
  trainer); during set-up they are re-raised as `ConfigError`, chained, so the command line can
  tell them from bugs and report them without a traceback.
  """
  try:
    yield
  except UserError:
    raise
  except ValueError as e:
    raise ConfigError(str(e)) from e


class NonFiniteLossError(UserError, FloatingPointError):
  """Training stopped on a NaN/Inf loss, gradient or parameter; nothing non-finite was saved."""


class Preempted(Exception):
  """The run stopped on SIGTERM / SIGINT after saving a checkpoint at ``step``: rerun to resume.

  Not a `UserError`: nothing is wrong with the input. The command line exits with
  `vlora_jax.train.preemption.EXIT_PREEMPTED`.
  """

  def __init__(self, step: int, signal_name: str, checkpoint: str):
    super().__init__(f"stopped by {signal_name} after step {step}; saved {checkpoint}. Rerun the "
                     "same command to resume.")
    self.step, self.signal_name, self.checkpoint = step, signal_name, checkpoint
