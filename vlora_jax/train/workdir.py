"""One run per workdir: ``<workdir>/run.lock``, held for the whole of `train_and_evaluate`.

Two runs writing into one workdir would interleave their ``metrics.jsonl`` rows, delete each
other's checkpoints and resume from each other's steps. The run that starts first holds an
exclusive ``flock`` on ``run.lock`` (process 0 of a multi-host run, which writes the metrics and
the summary and leads the checkpoint saves) and writes who it is into the file:
``{"pid", "host", "started"}``. A second run is refused with a `WorkdirError` naming that holder,
before it writes anything.

The kernel drops a flock when its process ends in any way (SIGKILL, the OOM killer, a crash), so a
dead run never blocks its workdir: its ``run.lock`` still names it, but the lock is free, and the
next run takes it over with a warning naming the dead holder. A run that ends (normally or by an
error) empties the file while it still holds the lock.

The lock is advisory: it keeps out other vlora_jax runs, not ``rm``, ``rsync`` or other programs.
On a network file system it is as good as that file system's locking. NFS (v4, or v3 with lockd)
turns flock into a server-side lock that holds across machines; a machine that dies keeps its lock
until the server's lease runs out (about 90 s on NFSv4), so a rerun right after a crash may be
refused for that long. Mounts that keep locks local to one machine (NFS with ``nolock`` or
``local_lock``, Lustre with ``localflock``) and some FUSE file systems do not keep runs on two
machines apart. Where flock is not supported at all (ENOLCK, EOPNOTSUPP, ENOSYS), the run goes on
unprotected, with a warning.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
from pathlib import Path

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from vlora_jax.errors import WorkdirError

LOCK_NAME = "run.lock"
_UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)


def _read(fd: int) -> dict:
  """The holder's record in the lock file ({} when empty or not JSON: e.g. a holder that is
  between taking the lock and writing it)."""
  try:
    data = os.pread(fd, 4096, 0)
    holder = json.loads(data) if data.strip() else {}
    return holder if isinstance(holder, dict) else {}
  except (OSError, ValueError):
    return {}


def _who(holder: dict) -> str:
  return (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, started "
          f"{holder.get('started', '?')}")


class Lock:
  """A held ``run.lock``: `release` empties the file, then unlocks it."""

  def __init__(self, path: Path, fd: int):
    self.path, self.fd = path, fd

  def release(self) -> None:
    if self.fd < 0:
      return
    with contextlib.suppress(OSError):  # an empty file tells the next run that this one ended
      os.ftruncate(self.fd, 0)
    os.close(self.fd)  # closing the last descriptor drops the flock
    self.fd = -1


def acquire(workdir: str | Path) -> Lock | None:
  """Takes ``<workdir>/run.lock`` or raises `WorkdirError` naming the run that holds it.

  None when the file system does not support locks (the run goes on, with a warning).
  """
  workdir = Path(workdir)
  path = workdir / LOCK_NAME
  try:
    # os.open's descriptors are not inherited by exec'd children, which would keep the lock alive.
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  except OSError as e:
    raise WorkdirError(f"workdir={str(workdir)!r}: cannot create {LOCK_NAME} "
                       f"({e.strerror or e}); choose a writable --workdir") from e
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    holder = _read(fd)
    os.close(fd)
    same = holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname()
    raise WorkdirError(
        f"workdir={str(workdir)!r} is in use by another run: {_who(holder)}"
        + (" (this process: a train_and_evaluate call that has not returned)" if same else "")
        + f"; it holds {path}. Two runs in one workdir would mix their metrics and checkpoints. "
        "Wait for that run to end or stop it, or choose another --workdir (the lock of a run "
        "that died is released by the system and taken over).") from None
  except OSError as e:
    os.close(fd)
    if e.errno in _UNSUPPORTED:
      logging.warning("%s: the file system does not support locks (%s): nothing keeps a second "
                      "run out of this workdir", path, e.strerror)
      return None
    raise WorkdirError(f"workdir={str(workdir)!r}: cannot lock {LOCK_NAME} ({e.strerror or e})"
                       ) from e
  previous = _read(fd)
  if previous:
    logging.warning("%s was left by a run that did not end cleanly (%s) and no longer holds it: "
                    "taking it over", path, _who(previous))
  me = {"pid": os.getpid(), "host": socket.gethostname(),
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
  os.ftruncate(fd, 0)
  os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
  return Lock(path, fd)


def raise_everywhere(error: Exception | None, what: str) -> None:
  """Raises on every process if process 0 found ``error`` (the others would otherwise wait for
  process 0 at the next collective, forever); ``what`` says it on the other processes."""
  if jax.process_count() > 1:
    failed = bool(multihost_utils.broadcast_one_to_all(np.asarray(error is not None)))
    if failed and error is None:
      error = WorkdirError(f"{what} (process 0's log says why)")
  if error is not None:
    raise error


@contextlib.contextmanager
def hold(workdir: str | Path, main: bool = True):
  """Holds the workdir's lock for the ``with`` block; process 0 (``main``) takes it.

  On several processes, all of them learn whether process 0 got it: if not, every process raises
  (the others would otherwise wait for process 0 forever).
  """
  lock, error = None, None
  if main:
    try:
      lock = acquire(workdir)
    except WorkdirError as e:
      error = e
  raise_everywhere(error, f"workdir={str(workdir)!r}: process 0 could not take {LOCK_NAME}")
  try:
    yield lock
  finally:
    if lock is not None:
      lock.release()
