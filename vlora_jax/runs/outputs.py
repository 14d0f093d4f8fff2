"""Files the commands write (exports, ``eval.json``, summaries, sidecars, reports): whole or not at
all, never inside a run's checkpoints, and never over a file that the command did not write.

* **Atomic.** `atomic_file` and `atomic_dir` give a temporary path in the target's own directory
  (``.<name>.vlora-tmp-<pid>-<n>``); it is renamed onto the target when complete, and removed on
  any failure or interrupt (`remove_pending`, which the commands' signal handler calls). A reader
  never sees half a file, an earlier good file stays until the new one is complete, and an
  interrupted command can be rerun: temporaries left by a process that no longer runs are removed
  first.
* **Failures of the disk** (full, a file size limit, permissions, a read-only file system) are an
  `OutputError`, a `UserError`: one line naming the path, and nothing left behind. `check_room`
  refuses before anything is written when the free space or the file size limit (``ulimit -f``)
  is below what will be written: a writer in a library's threads (Orbax) fails less tidily.
* **Contained** (`check_target`): nothing is written inside a run's ``checkpoints/`` or
  ``best/``, nor over its own records (``summary.json``, ``metrics.jsonl``, ``run.lock``); an
  existing target that the command did not write (its ``owned`` test says) is refused unless the
  caller passes ``overwrite``.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import resource
import shutil
import time
from pathlib import Path
from typing import Callable, Iterator

from vlora_jax.runs import checkpoint_format as fmt
from vlora_jax.errors import UserError

TMP_MARK = ".vlora-tmp-"
RUN_RECORDS = ("summary.json", "metrics.jsonl", "run.lock")

_pending: set[Path] = set()  # temporaries being written: removed if the process is interrupted
_set_aside: dict[Path, Path] = {}  # an earlier output moved aside -> where it goes back
_counter = itertools.count()


class OutputError(UserError, OSError):
  """An output the command cannot write where it was asked to (or may not write there)."""


def _temporary(path: Path) -> Path:
  return path.parent / f".{path.name}{TMP_MARK}{os.getpid()}-{next(_counter)}"


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _remove(path: Path) -> None:
  if path.is_dir() and not path.is_symlink():
    shutil.rmtree(path, ignore_errors=True)
  else:
    with contextlib.suppress(FileNotFoundError):
      path.unlink()


def remove_stale(path: Path) -> list[Path]:
  """Removes the temporaries of ``path`` left by processes that no longer run (an interrupted
  write); returns them."""
  gone = []
  if not path.parent.is_dir():
    return gone
  for tmp in path.parent.glob(f".{path.name}{TMP_MARK}*"):
    pid = tmp.name.rsplit(TMP_MARK, 1)[1].split("-")[0]
    # Ours but not being written: left by an earlier process that had our pid (a container's
    # processes often get the same one).
    ours_left = pid.isdigit() and int(pid) == os.getpid() and tmp not in _pending
    if pid.isdigit() and (not _alive(int(pid)) or ours_left):
      _remove(tmp)
      gone.append(tmp)
  return gone


def _remove_settled(path: Path, seconds: float = 2.0) -> None:
  """Removes ``path``, again while a library's threads that failed to write may still be adding
  files to it."""
  deadline = time.time() + seconds
  _remove(path)
  while path.exists() and time.time() < deadline:
    time.sleep(0.05)
    _remove(path)


def remove_pending() -> None:
  """Removes every temporary this process is writing (on an interrupt: no partial output), and
  puts back an earlier output that a replacement had moved aside but not yet replaced."""
  for tmp in list(_pending):
    _remove(tmp)
    _pending.discard(tmp)
  for old, path in list(_set_aside.items()):
    if old.exists() and not path.exists():
      os.replace(old, path)
    else:
      _remove(old)
    _set_aside.pop(old, None)


def disk_error(path: Path, flag: str, e: BaseException) -> OutputError:
  """An I/O failure of a write as one line naming the path (the disk, not a bug)."""
  why = getattr(e, "strerror", None) or fmt.first_line(e) or type(e).__name__
  return OutputError(f"{flag}={str(path)!r}: cannot write it ({why}); nothing was written. Free "
                     "space, raise the file size limit or choose another path, then rerun")


@contextlib.contextmanager
def atomic_file(path: Path, flag: str) -> Iterator[Path]:
  """Yields a temporary path beside ``path``; renamed onto ``path`` when the block completes,
  removed when it fails. An `OSError` of the block is an `OutputError` naming ``flag``."""
  path = Path(path)
  remove_stale(path)
  tmp = _temporary(path)
  _pending.add(tmp)
  try:
    yield tmp
    os.replace(tmp, path)
  except OutputError:
    raise  # a nested write's own error names its own file
  except OSError as e:
    raise disk_error(path, flag, e) from None
  finally:
    if tmp.exists():
      _remove(tmp)
    _pending.discard(tmp)


@contextlib.contextmanager
def atomic_dir(path: Path, flag: str) -> Iterator[Path]:
  """Yields a new temporary directory beside ``path``; it replaces ``path`` (an earlier output,
  `check_target` allowed it) when the block completes, and is removed when it fails."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  remove_stale(path)
  tmp = _temporary(path)
  old = _temporary(path)
  _pending.add(tmp)
  try:
    tmp.mkdir()
    yield tmp
    if path.exists():
      _set_aside[old] = path  # an interrupt from here on puts it back (`remove_pending`)
      os.replace(path, old)  # the earlier output goes only once the new one is complete
    os.replace(tmp, path)
  except OSError as e:
    raise disk_error(path, flag, e) from None
  finally:
    if old.exists() and not path.exists():  # a failure or an interrupt between the renames
      os.replace(old, path)  # put the earlier output back
    if tmp.exists():
      _remove_settled(tmp)
    if old.exists() and path.exists():  # never the only copy of the earlier output
      _remove_settled(old)
    _pending.discard(tmp)
    _set_aside.pop(old, None)


def write_bytes(path: Path, data: bytes, flag: str) -> Path:
  with atomic_file(path, flag) as tmp:
    with open(tmp, "wb") as f:
      f.write(data)
  return path


def write_json(path: Path, obj, flag: str) -> Path:
  """``obj`` as indented JSON, atomically."""
  text = json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n"
  return write_bytes(path, text.encode(), flag)


def check_room(path: Path, nbytes: int, flag: str) -> None:
  """Refuses, before anything is written, an output of about ``nbytes`` (in one file, at most)
  that the file size limit (``ulimit -f``) or the free space beside ``path`` cannot take."""
  limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
  if limit != resource.RLIM_INFINITY and nbytes > limit:
    raise OutputError(f"{flag}={str(path)!r}: the file size limit (ulimit -f) is {limit:,} bytes, "
                      f"and this output is about {nbytes:,}; nothing was written. Raise the "
                      "limit, then rerun")
  directory = next(p for p in (Path(path).absolute(), *Path(path).absolute().parents)
                   if p.exists())
  free = shutil.disk_usage(directory).free
  if nbytes > free:
    raise OutputError(f"{flag}={str(path)!r}: {free:,} bytes free there, and this output is about "
                      f"{nbytes:,}; nothing was written. Free space or choose another path, "
                      "then rerun")


def read_json_object(path: Path) -> dict | None:
  """The JSON object in a file, or None (not JSON, not an object, not readable)."""
  try:
    obj = json.loads(Path(path).read_text())
  except (OSError, UnicodeDecodeError, ValueError):
    return None
  return obj if isinstance(obj, dict) else None


def _run_workdir(path: Path) -> bool:
  return (path / fmt.CHECKPOINTS).is_dir() or (path / fmt.BEST).is_dir()


def check_target(path, flag: str, *, kind: str, owned: Callable[[Path], bool],
                 overwrite: bool = False, writer: str = "this command") -> Path:
  """Refuses an output path before anything is computed; returns it, its directory created.

  ``kind`` is ``'file'`` or ``'dir'``. Refused: an empty path; a path inside a run's
  ``checkpoints/`` or ``best/`` (or their ``.bad``), or one of a run's records; a file where a
  directory is expected or the reverse; a directory that holds a run; an existing target that
  ``owned`` does not recognise as this command's output, unless ``overwrite``; a directory that
  cannot be written.
  """
  if path is None or not str(path).strip():
    raise OutputError(f"{flag}={str(path or '')!r}: empty; give the path to write")
  path = Path(path).expanduser()
  inside = fmt.inside_checkpoints(path)
  if inside is not None:
    raise OutputError(f"{flag}={str(path)!r} lies inside a run's checkpoints ({inside}); "
                      "choose a path outside them")
  parent = path.absolute().parent
  if path.name in RUN_RECORDS and _run_workdir(parent):
    raise OutputError(f"{flag}={str(path)!r} is one of the run's own records in {parent}; "
                      "choose another path")
  if path.exists() or path.is_symlink():
    if kind == "file" and path.is_dir():
      raise OutputError(f"{flag}={str(path)!r} is a directory; {writer} writes a file there")
    if kind == "dir" and not path.is_dir():
      raise OutputError(f"{flag}={str(path)!r} is a file; {writer} writes a directory there")
    if kind == "dir" and _run_workdir(path) and not owned(path):
      raise OutputError(f"{flag}={str(path)!r} holds a run; choose a new directory")
    empty_dir = kind == "dir" and not any(path.iterdir())
    if not empty_dir and not owned(path) and not overwrite:
      raise OutputError(f"{flag}={str(path)!r} exists and was not written by {writer}; pass "
                        "--overwrite to replace it, or choose another path")
  _writable(parent, flag, path)
  return path


def _writable(directory: Path, flag: str, path: Path) -> None:
  above = next((p for p in (directory, *directory.parents) if p.exists()), None)
  if above is not None and not above.is_dir():
    raise OutputError(f"{flag}={str(path)!r}: {str(above)!r} is a file, not a directory")
  try:
    directory.mkdir(parents=True, exist_ok=True)
    probe = _temporary(directory / "probe")
    probe.write_bytes(b"")
    probe.unlink()
  except OSError as e:
    raise OutputError(f"{flag}={str(path)!r}: cannot write in {str(directory)!r} "
                      f"({e.strerror or e})") from None
