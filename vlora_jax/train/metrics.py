"""Where training reports go: ``metrics.jsonl``, TensorBoard event files, a progress bar and
``summary.json`` (`write_json`).

Only process 0 writes (the others get a no-op `Writer` and no bar). TensorBoard files come from
tensorboardX (clu's writers import TensorFlow).
"""

from __future__ import annotations

import errno
import json
import math
import os
import resource
import sys
from pathlib import Path

from absl import logging

from vlora_jax import errors


def write_json(path: Path, obj) -> None:
  """Atomic JSON write (`outputs.write_json`: a temporary file beside it, then a rename): a reader
  never sees half a file, and a failed write (a full disk) is an `OutputError` that leaves
  nothing behind."""
  from vlora_jax.runs import outputs
  outputs.write_json(Path(path), obj, Path(path).name)  # "summary.json='/run/summary.json': ..."


def peak_rss_gib() -> float:
  """This process's peak resident memory so far, in GiB (Linux reports KiB, macOS bytes)."""
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return peak / (2 ** 30 if sys.platform == "darwin" else 2 ** 20)


class Writer:
  """Scalars to ``<workdir>/metrics.jsonl`` (one JSON object per line) and ``<workdir>/tb``.

  ``metrics.jsonl`` never holds half a line or a step twice:

  * each row is one ``os.write`` of the whole line to a file opened for appending; a write that
    fails or comes up short (disk full, a file size limit) is cut off again and raised as a
    `WorkdirError`;
  * a run that starts from a checkpoint at ``resume_step`` first keeps only the complete rows of
    the steps up to it (a run that died wrote rows past its last checkpoint; they are written
    again); a start at 0 keeps nothing. With ``redo_eval`` (a finished run started again: it
    only evaluates) the eval rows at ``resume_step`` go too, as the fresh eval replaces them.
    ``resume_step=None`` appends to the file as it is.

  TensorBoard event files are left as they are: a resumed run adds an event file, and TensorBoard
  shows the last value written for a step.
  """

  def __init__(self, workdir: str | Path, enabled: bool = True, tensorboard: bool = True,
               resume_step: int | None = None, redo_eval: bool = False):
    self.enabled = enabled
    self._fd, self._tb = -1, None
    if not enabled:
      return
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    self.path = workdir / "metrics.jsonl"
    if resume_step is not None:
      _cut_back(self.path, resume_step, redo_eval)
    self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    if tensorboard:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(str(workdir / "tb"))

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self.enabled:
      return
    clean = {k: float(v) for k, v in scalars.items()}
    self._append((json.dumps({"step": int(step), **clean}) + "\n").encode(), int(step))
    if self._tb is not None:
      for k, v in clean.items():
        if math.isfinite(v):
          self._tb.add_scalar(k, v, int(step))

  def _append(self, line: bytes, step: int) -> None:
    """One write of the whole line; on failure the file is cut back to where it was."""
    size = os.fstat(self._fd).st_size  # this process is the file's only writer (run.lock)
    error = None
    try:
      n = os.write(self._fd, line)
      if n == len(line):
        return
      cause = f"only {n} of {len(line)} bytes written"
    except OSError as e:
      error = e
      cause = f"{errno.errorcode.get(e.errno, 'error')}: {e.strerror or e}"
    try:
      os.ftruncate(self._fd, size)
      cut = "cut back to its last complete row"
    except OSError as e:
      cut = (f"not cut back ({e.strerror or e}); its incomplete last line is dropped when the run "
             "resumes")
    raise errors.WorkdirError(
        f"{self.path}: writing the metrics of step {step} failed ({cause}); the file was {cut}. "
        "The checkpoints are untouched: free space (or raise the file size limit), then rerun "
        "the same command to resume.") from error

  def text(self, tag: str, text: str) -> None:
    if self.enabled and self._tb is not None:
      self._tb.add_text(tag, text, 0)

  def close(self) -> None:
    if self._fd >= 0:
      os.close(self._fd)
      self._fd = -1
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def _row(line: bytes) -> dict | None:
  """A metrics row (a JSON object with an integer step), or None."""
  try:
    row = json.loads(line)
  except ValueError:
    return None
  ok = isinstance(row, dict) and isinstance(row.get("step"), int) \
      and not isinstance(row["step"], bool)
  return row if ok else None


def _cut_back(path: Path, resume_step: int, redo_eval: bool) -> None:
  """Rewrites ``path`` (atomically) with only the rows a run starting at ``resume_step`` keeps."""
  try:
    data = path.read_bytes()
  except FileNotFoundError:
    return
  *lines, tail = data.split(b"\n")  # tail: what follows the last newline (half a row, or b"")
  kept, past, redone, broken = [], 0, 0, int(bool(tail.strip()))
  for line in lines:
    row = _row(line)
    if row is None:
      broken += bool(line.strip())
    elif row["step"] > resume_step or resume_step == 0:  # at 0 nothing was resumed
      past += 1
    elif redo_eval and row["step"] == resume_step and any(k.startswith(("eval/", "test/"))
                                                          for k in row):
      redone += 1
    else:
      kept.append(line + b"\n")
  if len(kept) == len(lines) and not tail:
    return
  tmp = path.with_name(path.name + ".tmp")
  with open(tmp, "wb") as f:
    f.write(b"".join(kept))
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
  logging.info("%s: starting at step %d: kept %d rows; dropped %d past that step, %d eval rows "
               "to be redone, %d incomplete or unreadable lines", path, resume_step, len(kept),
               past, redone, broken)


class Progress:
  """A tqdm bar on stderr over the train steps (step, loss, accuracy, throughput), or over other
  units (``unit``: the eval batches of ``python -m vlora_jax.evaluate``); silent when disabled."""

  def __init__(self, total: int, initial: int, enabled: bool, unit: str = "step",
               desc: str | None = None):
    self.bar = None
    self.postfix: dict[str, str] = {}
    if enabled:
      from tqdm.auto import tqdm
      self.bar = tqdm(total=total, initial=initial, unit=unit, desc=desc, dynamic_ncols=True,
                      file=sys.stderr, mininterval=0.5)

  def update(self, n: int, **postfix) -> None:
    if self.bar is None:
      return
    if postfix:  # merged: throughput and eval accuracy stay shown between their updates
      self.postfix.update({k: (f"{v:.4g}" if isinstance(v, float) else str(v))
                           for k, v in postfix.items()})
      self.bar.set_postfix(self.postfix, refresh=False)
    self.bar.update(n)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()


def overview(counts: dict, dense: dict | None) -> str:
  """The parameter overview logged at start: total, trainable, groups, dense equivalent."""
  lines = [f"params: total {counts['total']:,}  trainable {counts['trainable']:,}  "
           f"({counts['bytes'] / 2**20:.2f} MiB)"]
  lines.append("  by group: " + ", ".join(f"{g} {n:,}" for g, n in counts["groups"].items() if n))
  if dense is not None:
    lines.append(f"  dense-equivalent (same architecture, every stack dense): {dense['total']:,} "
                 f"-> this model is {counts['total'] / dense['total']:.2%} of it")
  return "\n".join(lines)


def log(msg: str) -> None:
  logging.info("%s", msg)


class _DropLibraryInfo:
  """absl-handler filter: hides INFO lines from Orbax and JAX internals (warnings still show)."""
  NOISY = ("/orbax/", "/jax/_src/", "/absl/")

  def filter(self, record) -> bool:
    import logging as pylogging
    if record.levelno >= pylogging.WARNING:
      return True
    return not any(s in record.pathname for s in self.NOISY)


def quiet_libraries() -> None:
  """Keeps the console readable: our INFO lines, the libraries' warnings.

  absl logs through the Python logger ``absl``; JAX's own loggers (such as the backend probe's
  "Unable to initialize backend 'tpu'") reach the console through absl's handler on the root
  logger. The filter goes on both.
  """
  import logging as pylogging
  for target in (pylogging.getLogger("absl"), logging.get_absl_handler()):
    if not any(isinstance(f, _DropLibraryInfo) for f in target.filters):
      target.addFilter(_DropLibraryInfo())
