"""Where training reports go: ``metrics.jsonl``, TensorBoard event files, a progress bar and
``summary.json`` (`write_json`).

Only process 0 writes (the others get a no-op `Writer` and no bar). TensorBoard files come from
tensorboardX (clu's writers import TensorFlow).
"""

from __future__ import annotations

import json
import math
import resource
import sys
from pathlib import Path

from absl import logging


def write_json(path: Path, obj) -> None:
  """Atomic JSON write (tmp file + rename): a reader never sees half a file."""
  tmp = path.with_suffix(path.suffix + ".tmp")
  tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
  tmp.replace(path)


def peak_rss_gib() -> float:
  """This process's peak resident memory so far, in GiB (Linux reports KiB, macOS bytes)."""
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return peak / (2 ** 30 if sys.platform == "darwin" else 2 ** 20)


class Writer:
  """Scalars to ``<workdir>/metrics.jsonl`` (one JSON object per line) and ``<workdir>/tb``."""

  def __init__(self, workdir: str | Path, enabled: bool = True, tensorboard: bool = True):
    self.enabled = enabled
    self._jsonl = self._tb = None
    if not enabled:
      return
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    self._jsonl = open(workdir / "metrics.jsonl", "a", encoding="utf-8")
    if tensorboard:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(str(workdir / "tb"))

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self.enabled:
      return
    clean = {k: float(v) for k, v in scalars.items()}
    self._jsonl.write(json.dumps({"step": int(step), **clean}) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in clean.items():
        if math.isfinite(v):
          self._tb.add_scalar(k, v, int(step))

  def text(self, tag: str, text: str) -> None:
    if self.enabled and self._tb is not None:
      self._tb.add_text(tag, text, 0)

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


class Progress:
  """A tqdm bar over the train steps (step, loss, accuracy, throughput); silent when disabled."""

  def __init__(self, total: int, initial: int, enabled: bool):
    self.bar = None
    self.postfix: dict[str, str] = {}
    if enabled:
      from tqdm.auto import tqdm
      self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
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
