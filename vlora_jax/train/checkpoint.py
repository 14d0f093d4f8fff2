"""Checkpoints (Orbax): save, resume, restore onto another mesh, and the VLoRA layout check.

Where the starting state comes from, first match wins:

  1. the workdir's own checkpoints (``<workdir>/checkpoints``): resume, by default;
  2. ``config.checkpoint.restore_from``: an explicit checkpoint (a run's ``checkpoints`` directory,
     its workdir, or one step directory): the full state, training continues from its step;
  3. ``config.init_from`` = ``'<kind>:<arg>'``: parameters only, from a hook registered with
     `register_init_from`. Built in: ``checkpoint:<path>`` (another run's params, layout checked)
     and ``py:<module>.<function>[:<arg>]`` (any importable converter: import / compress /
     pretrained). Or the ``init_params`` callable given to ``train_and_evaluate``. The optimizer
     starts fresh at step 0;
  4. scratch: ``model.init``.

Every checkpoint holds ``state`` = {step, params, opt_state, rng} (the data position is the step)
and ``meta`` (JSON): the config and the layout of every layer stack (mode, compound size, ranks,
targets, parameter roles). Restoring into a model whose layout differs is a `CheckpointError`
naming what differs. Restores build an abstract target with the *current* shardings, so a
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
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from vlora_jax import stack as stack_lib
from vlora_jax import trained as trained_lib
# CheckpointError lives in `errors` (importable without Orbax), and is part of this interface.
from vlora_jax.errors import CheckpointError, NonFiniteLossError, UserError, WorkdirError

InitFn = Callable[..., Any]  # (arg, *, abstract_params, config) -> params (host or device arrays)
INIT_FROM: dict[str, InitFn] = {}
# (arg, *, config, model) -> None: what a kind can check from files' metadata before compiling.
INIT_CHECKS: dict[str, Callable[..., None]] = {}


def register_init_from(kind: str, check: Callable[..., None] | None = None):
  """Decorator: ``config.init_from='<kind>:<arg>'`` calls ``fn(arg, abstract_params=, config=)``.

  ``check(arg, config=, model=)``, if given, runs in set-up, before anything compiles
  (`check_init_from`): it refuses a source that cannot fit ``model`` with a `UserError`.
  """
  def deco(fn: InitFn) -> InitFn:
    INIT_FROM[kind] = fn
    if check is not None:
      INIT_CHECKS[kind] = check
    return fn
  return deco


def check_init_from(config, model) -> None:
  """Runs the set-up check of ``config.init_from``'s kind, if it has one."""
  kind, _, arg = (config.get("init_from", "") or "").partition(":")
  if kind in INIT_CHECKS:
    INIT_CHECKS[kind](arg, config=config, model=model)


def layouts(params, spec) -> dict[str, Any]:
  """``{stack path: Layout.to_json()}`` for every layer stack in a params tree (arrays or shapes).

  ``spec`` is one `VLoRASpec` (or None) for every stack, or ``{stack name: spec}`` for models
  whose stacks differ (an encoder and a decoder: from ``Family.stack_specs(model)``).
  """
  out = {}

  def walk(tree, path):
    if stack_lib.is_stack(tree):
      sp = spec.get(path[-1] if path else None) if isinstance(spec, dict) else spec
      out["/".join(path) or "."] = stack_lib.layout_from_params(tree, sp).to_json()
    elif isinstance(tree, dict):
      for k, v in tree.items():
        walk(v, path + (k,))
  walk(params, ())
  return out


def _diff(a, b, path="") -> list[str]:
  """Human-readable differences between two JSON-like values."""
  if isinstance(a, dict) and isinstance(b, dict):
    out = []
    for k in sorted(set(a) | set(b), key=str):
      p = f"{path}.{k}" if path else str(k)
      if k not in a:
        out.append(f"{p}: absent in checkpoint, {b[k]!r} now")
      elif k not in b:
        out.append(f"{p}: {a[k]!r} in checkpoint, absent now")
      else:
        out += _diff(a[k], b[k], p)
    return out
  if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
    a, b = list(a), list(b)
  return [] if a == b else [f"{path}: {a!r} in checkpoint, {b!r} now"]


def check_meta(saved: dict, current: dict, where: str) -> None:
  """Refuses a checkpoint whose stack layouts or model config differ from the current ones."""
  problems = _diff(saved.get("layout"), current.get("layout"), "layout")
  problems += _diff(saved.get("config", {}).get("model"), current.get("config", {}).get("model"),
                    "config.model")
  if problems:
    shown = "\n  ".join(problems[:12]) + ("\n  ..." if len(problems) > 12 else "")
    raise CheckpointError(
        f"checkpoint {where} does not match the current model:\n  {shown}\n"
        "Use a fresh --workdir, or set the config back to the checkpoint's values.")
  other = _diff({k: v for k, v in saved.get("config", {}).items() if k != "model"},
                {k: v for k, v in current.get("config", {}).items() if k != "model"}, "config")
  if other:
    logging.warning("checkpoint %s was written with other non-model settings: %s", where,
                    "; ".join(other[:8]))


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


def _save_args(state, meta):
  return ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))


class Checkpointer:
  """The workdir's checkpoints: the latest few (resume) and, optionally, the best few by a metric.

  Attributes:
    latest: manager of ``<workdir>/checkpoints`` (keeps ``checkpoint.keep``; the trainer saves
      every ``checkpoint.every_steps`` and at the last step).
    best: manager of ``<workdir>/best`` (``checkpoint.keep_best`` by ``checkpoint.best_metric``),
      or None.
  """

  def __init__(self, workdir: str | Path, ccfg, meta: dict):
    self.dir = Path(workdir)
    self.meta = meta
    async_save = ccfg.get("async_save", True)
    self.latest = _manager(self.dir / "checkpoints", keep=ccfg.get("keep", 2),
                           async_save=async_save)
    # The steps of the newest saves (async: they may still be writing).
    self._writing = self._writing_best = None
    self._closed = False
    self.best = None
    if ccfg.get("keep_best", 0) and ccfg.get("best_metric"):
      self._set_aside_bad_best(ccfg.best_metric)
      self.best = _manager(self.dir / "best", keep=ccfg.keep_best, async_save=async_save,
                           best_metric=ccfg.best_metric, best_mode=ccfg.get("best_mode", "max"))

  def latest_step(self) -> int | None:
    return self.latest.latest_step()

  def last_good(self) -> str:
    """For messages: the newest finished checkpoint, or 'none'.

    Read from the directory (Orbax renames a step's temporary directory when its save is
    complete), without waiting for a save in flight: Orbax raises a failed async save's error only
    once, so a wait here would hide it from the wait that reports it.
    """
    d = self.dir / "checkpoints"
    steps = [int(p.name) for p in d.iterdir() if p.name.isdigit()] if d.is_dir() else []
    return str(d / str(max(steps))) if steps else "none"

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
    prints, finite = fingerprint(state)
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
                         args=_save_args(state, meta), force=True)

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
                         args=_save_args(state, meta), metrics=metrics, force=True)

  def restore(self, step: int, target) -> Any:
    return restore_state(self.latest, step, target, self.meta, str(self.dir / "checkpoints"))

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
      except CheckpointError:
        raise
      except CorruptCheckpoint as e:
        reason = str(e)
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


_MASK = np.uint64(2**32 - 1)
_GOLDEN = np.uint64(2654435761)  # Knuth's multiplicative hash: spreads the position weights


def _bits(a: np.ndarray) -> np.ndarray:
  """An array's bits as uint64 values (one per element; 8-byte elements fold to 32 bits)."""
  if a.dtype == np.bool_:
    return a.astype(np.uint64)
  size = a.dtype.itemsize
  v = a.view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[size]).astype(np.uint64)
  return (v & _MASK) + (v >> np.uint64(32)) if size == 8 else v


def _shard_sums(data: np.ndarray, index: tuple, shape: tuple) -> tuple[int, int, bool]:
  """(sum, position-weighted sum, all finite) of one shard; weights use its global positions."""
  u = _bits(np.ascontiguousarray(data))
  linear = np.zeros(data.shape, np.uint64)
  for d, sl in enumerate(index):  # row-major global index, by broadcasting (no big temporaries)
    stride = np.uint64(int(np.prod(shape[d + 1:], dtype=np.int64)))
    pos = np.arange(data.shape[d], dtype=np.uint64) + np.uint64(sl.start or 0)
    linear += (pos * stride).reshape((-1,) + (1,) * (data.ndim - d - 1))
  weights = (linear * _GOLDEN + np.uint64(1)) & _MASK
  finite = not np.issubdtype(data.dtype, np.floating) or bool(np.isfinite(data).all())
  # uint64 sums wrap mod 2**64, a multiple of 2**32: the low 32 bits are exact.
  return int(u.sum(dtype=np.uint64)), int((u * weights).sum(dtype=np.uint64)), finite


def fingerprint(tree) -> tuple[dict[str, list[int]], bool]:
  """``({leaf path: [sum, weighted sum] mod 2**32}, all finite)`` of a state.

  Integer sums are exact and order-free, so the result does not depend on the sharding, the
  device count or the summation order: a checkpoint written on 8 devices verifies on 1. Each
  process sums the shards it holds (one copy of each: ``replica_id == 0``), with weights from
  their global positions; processes add their sums. Computed on the host from the shards (which
  a save copies to the host anyway): nothing to compile (a jitted version cost seconds of compile
  per state structure on CPU).
  """
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  sums = np.zeros((len(flat), 2), np.uint64)
  finite = True
  for i, (_, x) in enumerate(flat):
    if isinstance(x, jax.Array):
      parts = [(np.asarray(s.data), s.index) for s in x.addressable_shards if s.replica_id == 0]
    else:
      x = np.asarray(x)
      parts = [(x, (slice(None),) * x.ndim)]
    for data, index in parts:
      a, b, ok = _shard_sums(data, index, x.shape)
      sums[i] += np.array([a & 0xFFFFFFFF, b & 0xFFFFFFFF], np.uint64)
      finite &= ok
  if jax.process_count() > 1:
    sums = np.sum(multihost_utils.process_allgather(sums), axis=0, dtype=np.uint64)
    finite = bool(np.all(multihost_utils.process_allgather(np.asarray(finite))))
  sums &= _MASK
  return {jax.tree_util.keystr(p): [int(v) for v in sums[i]] for i, (p, _) in enumerate(flat)}, \
      finite


class CorruptCheckpoint(Exception):
  """A checkpoint whose arrays read back but differ from the fingerprint saved with them."""


def verify(state, saved: dict) -> str | None:
  """None if ``state`` matches the fingerprint in its ``meta`` (or none was saved), else why."""
  want = saved.get("fingerprint")
  if want is None:  # a checkpoint saved without one (by an older version): nothing to compare
    return None
  got, _ = fingerprint(state)
  bad = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
  return f"arrays differ from their saved fingerprint: {bad[:4]}" if bad else None


def _all_agree(ok: bool) -> bool:
  """True only if every process says ``ok`` (they may read different shards of a checkpoint)."""
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))


def restore_state(mngr: ocp.CheckpointManager, step: int, target, meta: dict, where: str):
  """Checks ``meta`` against the checkpoint's, restores ``state`` onto ``target``'s shardings and
  verifies it against its fingerprint (`CorruptCheckpoint` if it differs)."""
  saved = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  check_meta(saved, meta, f"{where} step {step}")
  state = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(target)))["state"]
  reason = verify(state, saved)  # every restore is verified: resume and restore_from alike
  if reason:
    raise CorruptCheckpoint(f"{where} step {step}: {reason}")
  return state


def resolve(path: str) -> tuple[Path, int]:
  """A workdir, a ``checkpoints`` directory or one step directory -> (manager dir, step)."""
  p = Path(path).expanduser()
  if not p.exists():
    raise CheckpointError(f"checkpoint.restore_from={path!r}: no such directory")
  if (p / "checkpoints").is_dir():
    p = p / "checkpoints"
  if p.name.isdigit() and (p / "state").exists():
    return p.parent, int(p.name)
  steps = sorted(int(c.name) for c in p.iterdir() if c.name.isdigit() and (c / "state").exists())
  if not steps:
    raise CheckpointError(f"checkpoint path {path!r} holds no finished checkpoint "
                          "(expected step directories with a 'state' item)")
  return p, steps[-1]


def restore_path(path: str, target, meta: dict):
  """The full state from an explicit checkpoint path (see `resolve`)."""
  d, step = resolve(path)
  with ocp.CheckpointManager(d.absolute(), options=ocp.CheckpointManagerOptions(
      read_only=True)) as mngr:
    return restore_state(mngr, step, target, meta, str(d))


def read_meta(path: str) -> dict:
  """The JSON ``meta`` (config, layout, step) of a checkpoint (see `resolve` for ``path``)."""
  d, step = resolve(path)
  return json.loads((d / str(step) / "meta" / "metadata").read_text())


def read_state(path: str, params_only: bool = True) -> dict:
  """A checkpoint's state (or only ``{'params': ...}``) as host numpy arrays, on any device count.

  For export, comparisons and params-only init: no target and no mesh are needed.
  """
  d, step = resolve(path)
  return trained_lib.read_step_state(d / str(step), params_only)


@register_init_from("checkpoint")
def _params_from_checkpoint(arg: str, *, abstract_params, config, meta: dict | None = None):
  """``init_from='checkpoint:<path>'``: the params of another run (layout checked), nothing else."""
  del abstract_params, config
  if meta is not None:
    saved = read_meta(arg)
    problems = _diff(saved.get("layout"), meta.get("layout"), "layout")
    if problems:
      raise CheckpointError(f"init_from='checkpoint:{arg}': the stack layout differs:\n  "
                            + "\n  ".join(problems[:12]))
  return read_state(arg)["params"]


@register_init_from("py")
def _params_from_python(arg: str, *, abstract_params, config):
  """``init_from='py:<module>.<function>[:<arg>]'``: any importable hook, no registration needed.

  Called as ``function(arg, abstract_params=..., config=...)``; e.g. a converter that imports
  PyTorch weights or compresses a dense checkpoint into VLoRA.
  """
  import importlib
  target, _, rest = arg.partition(":")
  module, _, fn = target.rpartition(".")
  if not module:
    raise ValueError(f"init_from='py:{arg}': expected 'py:<module>.<function>[:<arg>]'")
  hook = getattr(importlib.import_module(module), fn)
  return hook(rest, abstract_params=abstract_params, config=config)


def init_from(spec: str, *, abstract_params, config, meta: dict):
  """Runs the ``config.init_from`` hook named by ``'<kind>:<arg>'``."""
  kind, _, arg = spec.partition(":")
  if kind not in INIT_FROM:
    raise ValueError(f"init_from={spec!r}: unknown kind {kind!r}; registered are {sorted(INIT_FROM)} "
                     "(format '<kind>:<arg>', e.g. 'checkpoint:/path/to/workdir')")
  fn = INIT_FROM[kind]
  kwargs = dict(abstract_params=abstract_params, config=config)
  if fn is _params_from_checkpoint:
    kwargs["meta"] = meta
  return fn(arg, **kwargs)
