"""The workdir's checkpoint manager (Orbax): save, resume, and restore onto another mesh.

Where the starting state comes from, first match wins:

  1. the workdir's own checkpoints (``<workdir>/checkpoints``): resume, by default;
  2. ``config.checkpoint.restore_from``: an explicit checkpoint (a run's ``checkpoints`` directory,
     its workdir, or one step directory): the full state, training continues from its step;
  3. ``config.init_from`` = ``'<kind>:<arg>'``: parameters only (`init_from.py`); the optimizer
     starts fresh at step 0;
  4. scratch: ``model.init``.

The format of a step (its ``state`` and its JSON ``meta``) and the fingerprints that verify it are
`vlora_jax.runs.checkpoint_format`'s. Set-up judges a resume or a restore against the stored meta
before anything compiles (`compat.judge_restore`); each restore checks the model again
(`compat.check_model`). Restores build an abstract target with the *current* shardings, so a
checkpoint written on 8 devices restores on 1 and the reverse.

Nothing is lost:

* Atomic saves: Orbax writes each step into ``<step>.orbax-checkpoint-tmp-*`` and renames it when
  complete; unfinished directories are never listed as steps (and are cleaned up at start), and
  old steps are deleted only after the new one is complete, so a crash mid-save costs at most
  that save, never the last good checkpoint.
* Verified restores: every save records a fingerprint of each array of the state (two integer
  sums of its bits, the second position-weighted: independent of the sharding, so it verifies a
  restore onto another mesh) in ``meta``. A newest checkpoint that fails to read or to match its
  fingerprint (a truncated or deleted file, a bit flip) is moved to ``<workdir>/checkpoints.bad``
  with a warning that says why, and the run resumes from the newest good one. A ``best/`` step
  whose small files do not read (its metrics, metadata, or a missing item) is moved to
  ``<workdir>/best.bad`` the same way when the run starts (`Checkpointer`): Orbax reads every
  step's metrics when it opens the directory, and one bad file would stop the run.
* Only finite states are saved (`NonFiniteLossError` otherwise), and a save that fails (disk full,
  permissions) is a `WorkdirError` naming the step that failed and the last good checkpoint,
  which is kept. Async saves are checked too: at the next save of the same kind, at `wait` and at
  `close`.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from vlora_jax.runs import checkpoint_format as fmt
# CheckpointError lives in `errors` (importable without Orbax), and is part of this interface.
from vlora_jax.errors import CheckpointError, NonFiniteLossError, UserError, WorkdirError
from vlora_jax.train import compat


def abstract(tree, shardings):
  """Arrays or shapes + shardings -> ShapeDtypeStructs on the current mesh (a restore target)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def _manager(directory: Path, *, keep: int, async_save: bool = True,
             best_metric: str | None = None, best_mode: str = "max") -> ocp.CheckpointManager:
  opts = ocp.CheckpointManagerOptions(
      max_to_keep=keep, enable_async_checkpointing=async_save,
      best_fn=(lambda m: float(m[best_metric])) if best_metric else None, best_mode=best_mode,
      keep_checkpoints_without_metrics=not best_metric, cleanup_tmp_directories=True)
  return ocp.CheckpointManager(directory.absolute(), options=opts)


class Checkpointer:
  """The workdir's checkpoints: the latest few (resume) and, optionally, the best few by a metric.

  Attributes:
    latest: manager of ``<workdir>/checkpoints`` (keeps ``checkpoint.keep``; the trainer saves
      every ``checkpoint.every_steps`` and at the last step).
    best: manager of ``<workdir>/best`` (``checkpoint.keep_best`` by ``checkpoint.best_metric``),
      or None.
  """

  def __init__(self, workdir: str | Path, meta: dict, *, keep: int, async_save: bool = True,
               keep_best: int = 0, best_metric: str = "", best_mode: str = "max"):
    self.dir = Path(workdir)
    self.meta = meta
    self.latest = _manager(self.dir / fmt.CHECKPOINTS, keep=keep, async_save=async_save)
    # The steps of the newest saves (async: they may still be writing).
    self._writing = self._writing_best = None
    self._closed = False
    self.best = None
    if keep_best and best_metric:
      self._set_aside_bad_best(best_metric)
      self.best = _manager(self.dir / "best", keep=keep_best, async_save=async_save,
                           best_metric=best_metric, best_mode=best_mode)

  @classmethod
  def of_config(cls, workdir: str | Path, ccfg, meta: dict) -> "Checkpointer":
    """The checkpoints a run's (complete) ``config.checkpoint`` asks for."""
    return cls(workdir, meta, keep=ccfg.keep, async_save=ccfg.async_save,
               keep_best=ccfg.keep_best, best_metric=ccfg.best_metric, best_mode=ccfg.best_mode)

  def last_good(self) -> str:
    """For messages: the newest finished checkpoint, or 'none'.

    Read from the directory (Orbax renames a step's temporary directory when its save is
    complete), without waiting for a save in flight: Orbax raises a failed async save's error only
    once, so a wait here would hide it from the wait that reports it.
    """
    d = self.dir / fmt.CHECKPOINTS
    steps = fmt.finished_steps(d)
    return str(d / str(steps[-1])) if steps else "none"

  def _set_aside_bad_best(self, metric: str) -> None:
    """Moves the ``best/`` steps that Orbax could not open (or that lack an item) to
    ``best.bad``, before the manager opens the directory; the latest checkpoints are unaffected."""
    d = self.dir / "best"
    if jax.process_index() == 0 and d.is_dir():
      bad = {int(p.name): why for p in sorted(d.iterdir())
             if p.name.isdigit() and (why := _best_problem(p, metric))}
      if bad:
        moved = self._move_aside("best", bad)
        logging.warning("moved %d damaged best checkpoint(s) from %s to %s: %s", len(bad), d,
                        moved, "; ".join(f"step {s}: {why}" for s, why in sorted(bad.items())))
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("vlora_jax.checkpoint.best_checked")

  def _checked_meta(self, step: int, state, **extra) -> dict:
    prints, finite = fmt.fingerprint(state)
    if not finite:
      raise NonFiniteLossError(f"the state at step {step} has non-finite values: not saved. "
                               f"Last good checkpoint: {self.last_good()}")
    return dict(self.meta, step=int(step), fingerprint=prints, **extra)

  def _guarded(self, what: str, fn, *args, **kwargs):
    """Runs a save (or waits for one); a failure becomes a `WorkdirError` naming what is kept."""
    try:
      return fn(*args, **kwargs)
    except UserError:
      raise
    except Exception as e:  # noqa: BLE001 -- Orbax/tensorstore raise many types for I/O failures
      try:
        kept = self.last_good()
      except Exception:  # noqa: BLE001 -- the manager may be in the failed state too
        kept = "the newest step directory in " + str(self.dir / "checkpoints")
      raise WorkdirError(f"{what} in {self.dir} failed ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}). The last good checkpoint "
                         f"is kept: {kept}. Free space or fix permissions, then rerun the same "
                         "command to resume.") from e

  def save(self, step: int, state) -> bool:
    """Saves ``state`` at ``step`` (the caller decides when: interval or last step)."""
    meta = self._checked_meta(step, state)
    # The previous save finishes in the background: wait for it here (Orbax would anyway), so
    # that its failure is reported as its own.
    self._guarded(f"saving checkpoint step {self._writing} (in the background)",
                  self.latest.wait_until_finished)
    self._writing = step
    return self._guarded(f"saving checkpoint step {step}", self.latest.save, step,
                         args=fmt.save_args(state, meta), force=True)

  def save_best(self, step: int, state, metrics: dict[str, float]) -> bool:
    if self.best is None:
      return False
    meta = self._checked_meta(step, state, metrics=metrics)
    self._guarded(f"saving best checkpoint step {self._writing_best} (in the background)",
                  self.best.wait_until_finished)
    if step in self.best.all_steps():
      # Left by an earlier attempt at this step (a run that died, or that resumed from an older
      # checkpoint): this save replaces it, as Orbax refuses to save a step twice.
      logging.info("replacing the best checkpoint of step %d from an earlier attempt", step)
      self._guarded(f"replacing best checkpoint step {step}", self.best.delete, step)
    self._writing_best = step
    return self._guarded(f"saving best checkpoint step {step}", self.best.save, step,
                         args=fmt.save_args(state, meta), metrics=metrics, force=True)

  def restore(self, step: int, target) -> Any:
    return restore_state(self.latest, step, target, self.meta, str(self.dir / fmt.CHECKPOINTS))

  def restore_latest(self, target) -> tuple[int, Any] | None:
    """``(step, state)`` of the newest checkpoint that reads back and verifies; None if none exist.

    Newer checkpoints that fail (unreadable, or arrays that differ from their fingerprint) are
    moved to ``<workdir>/checkpoints.bad`` with a warning. A layout that differs from the model's
    is not corruption: that `CheckpointError` propagates. If no checkpoint is good, nothing is
    moved and a `CheckpointError` lists each step and why.
    """
    skipped: list[tuple[int, str]] = []
    for step in sorted(self.latest.all_steps(), reverse=True):
      state, reason = None, None
      try:
        state = self.restore(step, target)
      except fmt.DamagedCheckpoint as e:
        reason = str(e)
      except CheckpointError:
        raise
      except Exception as e:  # noqa: BLE001 -- any read failure means: not this one
        reason = f"unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
      if _all_agree(reason is None):
        if skipped:
          moved = self._quarantine([s for s, _ in skipped])
          logging.warning("skipped %d newer checkpoint(s) that failed to restore, moved to %s: %s; "
                          "resuming from step %d", len(skipped), moved,
                          "; ".join(f"step {s}: {r}" for s, r in skipped), step)
        return step, state
      skipped.append((step, reason or "failed on another process"))
    if skipped:
      raise CheckpointError(
          f"no checkpoint in {self.dir / 'checkpoints'} restores:\n  "
          + "\n  ".join(f"step {s}: {r}" for s, r in skipped)
          + "\nNothing was moved. Move the directory aside (or use a fresh --workdir) to start over.")
    return None

  def _quarantine(self, steps: list[int]) -> Path:
    """Moves bad step directories of ``checkpoints`` out of Orbax's sight (every process)."""
    bad = self._move_aside("checkpoints", steps)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("vlora_jax.checkpoint.quarantine")
    self.latest.reload()
    return bad

  def _move_aside(self, kind: str, steps) -> Path:
    """Process 0 moves ``<workdir>/<kind>/<step>`` to ``<workdir>/<kind>.bad/<step>-<time>``
    (kept for inspection, never deleted); the callers synchronize the processes."""
    bad = self.dir / f"{kind}.bad"
    if jax.process_index() == 0:
      bad.mkdir(exist_ok=True)
      for s in steps:
        shutil.move(str(self.dir / kind / str(s)), str(bad / f"{s}-{int(time.time())}"))
    return bad

  def wait(self):
    """Waits for the saves in flight; a failed one is a `WorkdirError` naming its step."""
    self._guarded(f"saving checkpoint step {self._writing} (in the background)",
                  self.latest.wait_until_finished)
    if self.best is not None:
      self._guarded(f"saving best checkpoint step {self._writing_best} (in the background)",
                    self.best.wait_until_finished)

  def close(self):
    """Waits for the saves in flight (checked as in `wait`), then closes; a second call does
    nothing."""
    if self._closed:
      return
    self._closed = True
    try:
      self.wait()
    finally:  # after a failed wait too: Orbax raises a save's error once, closing does not hide it
      self._guarded("closing the checkpoint manager", self.latest.close)
      if self.best is not None:
        self._guarded("closing the best-checkpoint manager", self.best.close)


def _best_problem(step_dir: Path, metric: str) -> str | None:
  """Why Orbax cannot open (or rank) a ``best/<step>`` directory, or None.

  Reads the small JSON files: the metrics Orbax ranks the steps by, the step's metadata, and the
  metadata of the ``meta`` and ``state`` items. The arrays are not read (that would cost a
  restore of every best state at every start).
  """
  for rel in ("metrics/metrics", "_CHECKPOINT_METADATA", "meta/metadata", "state/_METADATA"):
    path = step_dir / rel
    if rel == "_CHECKPOINT_METADATA" and not path.exists():
      continue  # not written by older Orbax versions
    try:
      obj = json.loads(path.read_text())
      if not isinstance(obj, dict):
        return f"{rel} holds a JSON {type(obj).__name__}, not an object"
      if rel == "metrics/metrics":
        float(obj[metric])
    except FileNotFoundError:
      return f"{rel} is missing"
    except KeyError:
      return f"{rel} has no {metric!r}"
    except (OSError, ValueError, TypeError) as e:
      return f"{rel} does not read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
  return None


def _all_agree(ok: bool) -> bool:
  """True only if every process says ``ok`` (they may read different shards of a checkpoint)."""
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))


def restore_state(mngr: ocp.CheckpointManager, step: int, target, meta: dict, where: str):
  """Checks the model of ``meta`` against the checkpoint's (`compat.check_model`), restores
  ``state`` onto ``target``'s shardings and verifies it against its fingerprint. A step that does
  not read or does not match is a `DamagedCheckpoint`."""
  where = f"checkpoint {Path(where) / str(step)}"
  try:
    saved = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  except Exception as e:  # noqa: BLE001 -- Orbax raises many types for a file it cannot parse
    raise fmt.DamagedCheckpoint(f"{where}: its meta does not read ({type(e).__name__}: "
                                f"{fmt.first_line(e)})") from None
  if not isinstance(saved, dict) or not isinstance(saved.get("config"), dict):
    raise fmt.DamagedCheckpoint(f"{where}: its meta is not the checkpoint's description")
  compat.check_model(saved, meta, where)
  try:
    state = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target)))["state"]
  except Exception as e:  # noqa: BLE001 -- tensorstore and Orbax raise many types for bad files
    raise fmt.DamagedCheckpoint(f"{where}: its arrays do not read ({type(e).__name__}: "
                                f"{fmt.first_line(e)})") from None
  reason = fmt.mismatch(state, saved)  # every restore is verified: resume and restore_from alike
  if reason:
    raise fmt.DamagedCheckpoint(f"{where}: {reason}")
  return state


def restore_path(path: str, target, meta: dict):
  """The full state from an explicit checkpoint path (`checkpoint_format.find`): a workdir or a
  ``checkpoints`` directory gives its newest good step (damaged ones are skipped, with a
  warning), a step directory that step."""
  steps, asked = fmt.find(path, "checkpoint.restore_from")

  def restore(step_dir: Path):
    with ocp.CheckpointManager(step_dir.parent.absolute(), options=ocp.CheckpointManagerOptions(
        read_only=True)) as mngr:
      return restore_state(mngr, int(step_dir.name), target, meta, str(step_dir.parent))

  return fmt.first_good(steps, restore, asked=asked,
                        where=f"checkpoint.restore_from={path!r}")[1]
