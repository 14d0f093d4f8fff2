"""Preemption: SIGTERM (how TPU/GPU pods and schedulers preempt) and SIGINT (Ctrl-C) end a run
cleanly instead of losing every step since the last interval checkpoint.

On the first signal the loop finishes the step it is in, saves a checkpoint at that step, waits
for it, flushes the metrics and raises `errors.Preempted`; the command line exits with
`EXIT_PREEMPTED` (75, ``EX_TEMPFAIL``: "try again"), so a requeue loop can tell "saved, rerun me"
from a failure. Rerunning the same command resumes bitwise-equal to an uninterrupted run. A second
signal exits at once (status 128 + signal number), keeping whatever checkpoint is complete: saves
are atomic.

Multi-host: every host must save at the same step. JAX's preemption service (started by
``jax.distributed.initialize``) owns SIGTERM there: it catches the notice on any host, agrees on a
step across hosts, and `multihost_utils.reached_preemption_sync_point` turns true at that step on
all of them. So with several processes we install no SIGTERM handler, and Ctrl-C on one host is
passed to that service as a SIGTERM.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

import jax
from absl import logging
from jax.experimental import multihost_utils

EXIT_PREEMPTED = 75
SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _name(signum: int) -> str:
  return signal.Signals(signum).name


class Watcher:
  """Catches the stop signals for the duration of a ``with`` block; `requested` polls them.

  Handlers can only be installed from the main thread: elsewhere (a notebook's worker thread)
  the watcher is inert and signals keep their usual effect.
  """

  def __init__(self):
    self.signum: int | None = None
    self._previous: dict[int, object] = {}
    self._multi = jax.process_count() > 1

  def __enter__(self) -> "Watcher":
    if threading.current_thread() is not threading.main_thread():
      return self
    for s in ((signal.SIGINT,) if self._multi else SIGNALS):
      self._previous[s] = signal.signal(s, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    self._previous.clear()

  def _handle(self, signum, frame) -> None:
    del frame
    if self.signum is not None:  # the second signal: the user means now
      print(f"vlora-train: second {_name(signum)}: exiting now; the last complete checkpoint is "
            "kept", file=sys.stderr, flush=True)
      os._exit(128 + signum)
    self.signum = signum
    if self._multi:  # let JAX's preemption service agree on the step with the other hosts
      os.kill(os.getpid(), signal.SIGTERM)
    logging.warning("%s received: finishing this step, saving a checkpoint, then exiting "
                    "(a second signal exits at once)", _name(signum))

  def requested(self, step: int) -> bool:
    """Whether to stop after ``step`` (called once per step, by every process, in order)."""
    if not self._multi:
      return self.signum is not None
    try:
      return multihost_utils.reached_preemption_sync_point(step)
    except RuntimeError:  # no preemption service (jax_enable_preemption_service off)
      return False

  @property
  def signal_name(self) -> str:
    return _name(self.signum) if self.signum is not None else "SIGTERM"
