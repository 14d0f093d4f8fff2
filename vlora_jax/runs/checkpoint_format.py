"""The checkpoint format: where a run keeps its checkpoints, which steps are finished, the JSON meta
of each, its arrays, and the fingerprints that verify them. Training (`vlora_jax.train`) writes
this format; every reader (`vlora_jax.load`, the commands, compress sources, teachers,
``restore_from``) reads it through here.

A run's workdir holds ``checkpoints/<step>`` (the newest few) and ``best/<step>`` (the best few
by a metric). A step directory holds two Orbax items:

  state  {step, params, opt_state, rng}: the arrays (the data position is the step)
  meta   JSON: ``config`` (the run's config), ``layout`` (every layer stack's VLoRA layout),
         ``data`` (the data's description: vocabulary, image shape, normalisation, class names),
         ``params_total``, ``fingerprint`` (two integer sums of every array's bits, one
         position-weighted) and the step

A step is finished when its ``state`` directory exists: Orbax writes a step into a temporary
directory and renames it when complete.

Every read is verified: `read_state` compares the arrays it reads with their fingerprint, and a
step that does not read (truncated data, a missing manifest, a meta that is not the expected JSON)
or does not match is a `DamagedCheckpoint`, never a library's traceback. `first_good` goes from
the newest step to older ones as resume does (saying which it skipped and why); a step asked for
by number is that step or an error.

Listing steps and reading the meta need no JAX: the commands refuse a wrong workdir or step in a
fraction of a second.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from vlora_jax.errors import CheckpointError

CHECKPOINTS = "checkpoints"
BEST = "best"
# The directories of a workdir that hold checkpoints (and the damaged ones moved aside): no
# command writes inside them.
STEP_DIRS = (CHECKPOINTS, BEST, CHECKPOINTS + ".bad", BEST + ".bad")


class DamagedCheckpoint(CheckpointError):
  """A step that does not read back (truncated, half-written, a meta that is not the expected
  JSON) or whose arrays differ from their saved fingerprint."""


# ------------------------------------------------------------------------------------- paths


def nonempty_path(text, flag: str) -> Path:
  """``text`` as a path; an empty one (which would mean the current directory) is refused."""
  if text is None or not str(text).strip():
    raise CheckpointError(f"{flag}={str(text or '')!r}: empty; give a run's directory")
  return Path(text).expanduser()


def finished_steps(directory: Path) -> list[int]:
  """The steps of ``directory`` (a ``checkpoints`` or ``best`` directory) whose save completed."""
  directory = Path(directory)
  if not directory.is_dir():
    return []
  return sorted(int(p.name) for p in directory.iterdir()
                if p.name.isdigit() and (p / "state").is_dir())


def is_step_dir(path: Path) -> bool:
  return path.name.isdigit() and (path / "state").is_dir()


def inside_checkpoints(path: Path) -> Path | None:
  """The checkpoint directory of a run (``<workdir>/checkpoints``, ``best`` or their ``.bad``)
  that ``path`` lies in, or None. Symbolic links are followed."""
  p = Path(path).expanduser().absolute().resolve()
  for d in (p, *p.parents):
    if d.name in STEP_DIRS and (finished_steps(d) or (d.parent / CHECKPOINTS).is_dir()):
      return d
    if is_step_dir(d):
      return d
  return None


def _no_checkpoint(workdir: Path, label: str, what: str) -> CheckpointError:
  """``what`` is not there: the error names the workdir and the steps it does hold."""
  found = {kind: finished_steps(workdir / kind) for kind in (CHECKPOINTS, BEST)}
  if not any(found.values()):
    return CheckpointError(f"workdir={label!r} holds no checkpoint (no finished step in "
                           f"{workdir / CHECKPOINTS} or {workdir / BEST}): train there first, or "
                           "pass another run's workdir")
  held = ", ".join(f"{kind}/ {steps}" for kind, steps in found.items() if steps)
  return CheckpointError(f"workdir={label!r}: {what}; the steps there are: {held}")


def _best_order(workdir: Path, steps: list[int]) -> list[int]:
  """The ``best/`` steps, best first by the run's ``checkpoint.best_metric`` and ``best_mode``
  (ties: the later step). Steps whose meta or metric does not read come last, newest first."""
  ccfg = {}
  for s in reversed(steps):
    try:
      ccfg = read_meta(workdir / BEST / str(s))["config"].get("checkpoint", {})
      break
    except CheckpointError:
      continue
  from vlora_jax.config import defaults  # here: the module reads metas without JAX
  base = defaults.get_config().checkpoint  # a run stored without the keys had these
  metric, mode = ccfg.get("best_metric", base.best_metric), ccfg.get("best_mode", base.best_mode)
  scores = {}
  for s in steps:
    try:
      scores[s] = float(json.loads((workdir / BEST / str(s) / "metrics" / "metrics")
                                   .read_text())[metric])
    except (OSError, ValueError, KeyError, TypeError):
      continue  # a step without its metric cannot be ranked; the others can
  if not scores:
    raise CheckpointError(f"workdir={str(workdir)!r}: no step in best/ {steps} records its "
                          f"{metric!r} (checkpoint.best_metric), so none can be called the best; "
                          "pass a step number")
  sign = -1.0 if mode == "max" else 1.0
  ranked = sorted(scores, key=lambda s: (sign * scores[s], -s))
  return ranked + sorted((s for s in steps if s not in scores), reverse=True)


def candidates(workdir, step: int | str | None = None, flag: str = "workdir") -> list[Path]:
  """The step directories a reader may use, in order: the newest first (``step=None``), the best
  first (``'best'``), or the one step asked for (an int, in ``checkpoints`` or ``best``).

  Raises a `CheckpointError` naming the workdir and the steps it holds when there is none.
  """
  label = str(workdir)
  wd = nonempty_path(workdir, flag)
  if not wd.is_dir():
    raise CheckpointError(f"{flag}={label!r}: no such directory")
  if step is None:
    latest = finished_steps(wd / CHECKPOINTS)
    if not latest:
      raise _no_checkpoint(wd, label, f"no checkpoint in {wd / CHECKPOINTS} (pass step='best' "
                           "or a step number)")
    return [wd / CHECKPOINTS / str(s) for s in reversed(latest)]
  if step == "best":
    best = finished_steps(wd / BEST)
    if not best:
      raise _no_checkpoint(wd, label, f"no best checkpoint in {wd / BEST} (the run kept none: "
                           "checkpoint.keep_best=0?)")
    return [wd / BEST / str(s) for s in _best_order(wd, best)]
  if isinstance(step, bool) or not isinstance(step, int):
    raise CheckpointError(f"step={step!r}: allowed are None (the newest checkpoint), 'best', or a "
                          "step number")
  for kind in (CHECKPOINTS, BEST):
    if step in finished_steps(wd / kind):
      return [wd / kind / str(step)]
  raise _no_checkpoint(wd, label, f"no checkpoint of step {step}")


def find(path, flag: str = "checkpoint") -> tuple[list[Path], bool]:
  """A workdir, a ``checkpoints`` (or ``best``) directory or one step directory -> ``(step
  directories newest first, whether one step was named)``."""
  label = str(path)
  p = nonempty_path(path, flag)
  if not p.exists():
    raise CheckpointError(f"{flag}={label!r}: no such directory")
  if is_step_dir(p):
    return [p], True
  if (p / CHECKPOINTS).is_dir():
    p = p / CHECKPOINTS
  steps = finished_steps(p)
  if not steps:
    raise CheckpointError(f"{flag}={label!r} holds no finished checkpoint (expected a run's "
                          "workdir, its checkpoints directory, or a step directory with a 'state' "
                          "item)")
  return [p / str(s) for s in reversed(steps)], False


# -------------------------------------------------------------------------------------- meta


def read_meta(step_dir) -> dict:
  """A step's JSON meta (config, stack layouts, data info, step): a JSON object with a ``config``
  object, or a `DamagedCheckpoint`."""
  path = Path(step_dir) / "meta" / "metadata"
  try:
    meta = json.loads(path.read_text())
  except (OSError, UnicodeDecodeError, ValueError) as e:
    raise DamagedCheckpoint(f"checkpoint {step_dir}: its meta ({path}) does not read "
                            f"({type(e).__name__}: {first_line(e)})") from None
  if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
    what = (f"a JSON {type(meta).__name__}" if not isinstance(meta, dict)
            else "an object without a config")
    raise DamagedCheckpoint(f"checkpoint {step_dir}: its meta ({path}) is {what}, not the "
                            "checkpoint's description")
  if not isinstance(meta.get("data") or {}, dict) or not isinstance(meta.get("layout") or {},
                                                                     dict):
    raise DamagedCheckpoint(f"checkpoint {step_dir}: its meta ({path}) holds a 'data' or "
                            "'layout' that is not an object")
  return meta


def layouts(params, spec) -> dict[str, Any]:
  """``{stack path: Layout.to_json()}`` for every layer stack in a params tree (arrays or shapes).

  ``spec`` is one `VLoRASpec` (or None) for every stack, or ``{stack name: spec}`` for models
  whose stacks differ (an encoder and a decoder: from ``Family.stack_specs(model)``).
  """
  from vlora_jax.core import stack as stack_lib
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


def build_meta(config, params, spec, data_info: dict | None, **extra) -> dict:
  """The meta every checkpoint of a run stores (without the per-save ``step`` and ``fingerprint``):
  its config as JSON, the layout of every layer stack of ``params`` (arrays or shapes) under
  ``spec`` (see `layouts`), the data's description and the parameter count; ``extra`` adds keys
  (``distill_teacher``, ``exported_from``, ...)."""
  from vlora_jax.core import params as params_lib
  meta = {"config": json.loads(config.to_json_best_effort()), "layout": layouts(params, spec),
          "data": data_info, "params_total": params_lib.count(params)["total"]}
  meta.update(extra)
  return meta


def save_args(state, meta: dict):
  """Orbax's arguments that write one step: the ``state`` arrays and the ``meta`` JSON."""
  import orbax.checkpoint as ocp
  return ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))


# ------------------------------------------------------------------------------- fingerprints


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
  import jax.numpy as jnp  # its dtype tree: numpy's does not count bfloat16 as floating
  finite = not jnp.issubdtype(data.dtype, jnp.inexact) or bool(np.isfinite(data).all())
  # uint64 sums wrap mod 2**64, a multiple of 2**32: the low 32 bits are exact.
  return int(u.sum(dtype=np.uint64)), int((u * weights).sum(dtype=np.uint64)), finite


def fingerprint(tree) -> tuple[dict[str, list[int]], bool]:
  """``({leaf path: [sum, weighted sum] mod 2**32}, all finite)`` of a state.

  Integer sums are exact and order-free, so the result does not depend on the sharding, the
  device count or the summation order: a checkpoint written on 8 devices verifies on 1. Each
  process sums its share (`_local_sums`) and the processes add their sums. Computed on the host
  from the shards (which a save copies to the host anyway): nothing to compile (a jitted version
  cost seconds of compile per state structure on CPU).
  """
  import jax
  from jax.experimental import multihost_utils
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  sums, finite = _local_sums([x for _, x in flat], jax.process_index())
  if jax.process_count() > 1:
    sums = np.sum(multihost_utils.process_allgather(sums), axis=0, dtype=np.uint64)
    finite = bool(np.all(multihost_utils.process_allgather(np.asarray(finite))))
  sums &= _MASK
  return {jax.tree_util.keystr(p): [int(v) for v in sums[i]] for i, (p, _) in enumerate(flat)}, \
      finite


def _local_sums(leaves: list, process: int) -> tuple[np.ndarray, bool]:
  """This process's share of `fingerprint`'s sums: of a `jax.Array`, the shards it holds (one
  copy of each: ``replica_id == 0``), weighted by their global positions; of a host array (a
  checkpoint read into numpy, which every process holds whole), the whole array on process 0
  only, so that adding the processes' sums counts it once."""
  import jax
  sums = np.zeros((len(leaves), 2), np.uint64)
  finite = True
  for i, x in enumerate(leaves):
    if isinstance(x, jax.Array):
      parts = [(np.asarray(s.data), s.index) for s in x.addressable_shards if s.replica_id == 0]
    else:
      x = np.asarray(x)
      parts = [(x, (slice(None),) * x.ndim)] if process == 0 else []
    for data, index in parts:
      a, b, ok = _shard_sums(data, index, x.shape)
      sums[i] += np.array([a & 0xFFFFFFFF, b & 0xFFFFFFFF], np.uint64)
      finite &= ok
  return sums, finite


_KEY_PART = re.compile(r"\['((?:[^'\\]|\\.)*)'\]|\[(\d+)\]|\.(\w+)")


def canonical_path(path: str) -> str:
  """A fingerprint's leaf path with dict keys, indices and attributes alike (``a/0/count``): a
  state read back as plain dicts and lists names its leaves as the saved optax tuples did."""
  return "/".join(next(g for g in m.groups() if g is not None) for m in _KEY_PART.finditer(path))


def mismatch(state, meta: dict) -> str | None:
  """Why ``state`` (a whole state, or only ``{'params': ...}``) differs from the fingerprint in
  its ``meta``, or None (also when none was saved: checkpoints of older versions)."""
  want = meta.get("fingerprint")
  if want is None:
    return None
  if not isinstance(want, dict):
    return "its meta's fingerprint is not an object"
  want = {canonical_path(k): v for k, v in want.items()}
  got = {canonical_path(k): v for k, v in fingerprint(state)[0].items()}
  read = {k.split("/", 1)[0] for k in got}  # the items read: a params-only read skips the rest
  bad = sorted(k for k in set(want) | set(got)
               if k.split("/", 1)[0] in read and want.get(k) != got.get(k))
  return f"arrays differ from their saved fingerprint: {bad[:4]}" if bad else None


# ------------------------------------------------------------------------------------ reading


def first_line(e: BaseException) -> str:
  return str(e).strip().splitlines()[0] if str(e).strip() else ""


def stored_tree(step_dir):
  """The tree of a step's ``state`` as Orbax's metadata describes it (shapes and dtypes, no
  arrays read); a `DamagedCheckpoint` if it does not read."""
  import orbax.checkpoint as ocp
  item = (Path(step_dir) / "state").absolute()
  try:
    # The item's own metadata (the handler's): the checkpointer's would look for a step-level
    # metadata file in the item directory and warn that there is none.
    return ocp.PyTreeCheckpointHandler().metadata(item).tree
  except Exception as e:  # noqa: BLE001 -- Orbax raises many types for a file it cannot parse
    raise DamagedCheckpoint(f"checkpoint {step_dir}: its state's metadata does not read "
                            f"({type(e).__name__}: {first_line(e)})") from None


def read_state(step_dir, params_only: bool = True, meta: dict | None = None) -> dict:
  """A step's state (or only ``{'params': ...}``) as host numpy arrays, on any device count,
  verified against its fingerprint (the step's own meta unless ``meta`` is given).

  Raises `DamagedCheckpoint` when the step does not read or does not match.
  """
  import jax
  import orbax.checkpoint as ocp
  step_dir = Path(step_dir)
  meta = read_meta(step_dir) if meta is None else meta
  tree = stored_tree(step_dir)
  if not isinstance(tree, dict) or "params" not in tree:
    raise DamagedCheckpoint(f"checkpoint {step_dir}: its state holds no params")
  if params_only:
    tree = {"params": tree["params"]}
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  try:
    state = ocp.PyTreeCheckpointer().restore(
        (step_dir / "state").absolute(), args=ocp.args.PyTreeRestore(
            item=tree, restore_args=restore_args, partial_restore=params_only))
  except Exception as e:  # noqa: BLE001 -- tensorstore and Orbax raise many types for bad files
    raise DamagedCheckpoint(f"checkpoint {step_dir}: its arrays do not read "
                            f"({type(e).__name__}: {first_line(e)})") from None
  why = mismatch(state, meta)
  if why:
    raise DamagedCheckpoint(f"checkpoint {step_dir}: {why}")
  return state


def first_good(steps: Iterable[Path], read: Callable[[Path], Any], *, asked: bool,
               where: str) -> tuple[Path, Any]:
  """``(step directory, read(step directory))`` of the first step that reads.

  ``read`` raises `DamagedCheckpoint` for a step that does not read or verify: the next one is
  tried, and a warning names the steps skipped and why (as resume does). Any other error
  propagates. With ``asked`` (a step named by number) there is no other step to try: its damage
  is the error. When none reads, the `DamagedCheckpoint` lists every step and why.
  """
  from absl import logging
  skipped: list[tuple[Path, str]] = []
  for step_dir in steps:
    try:
      out = read(step_dir)
    except DamagedCheckpoint as e:
      if asked:
        raise DamagedCheckpoint(f"{where}: the step asked for is damaged: {e}") from None
      skipped.append((step_dir, str(e)))
      continue
    if skipped:
      logging.warning("%s: skipped %d damaged checkpoint(s), using %s instead: %s", where,
                      len(skipped), step_dir, "; ".join(why for _, why in skipped))
    return step_dir, out
  raise DamagedCheckpoint(f"{where}: no checkpoint reads back: "
                          + "; ".join(why for _, why in skipped))


def read_path(path, params_only: bool = True, flag: str = "checkpoint") -> dict:
  """The verified state of a workdir's newest good step, a ``checkpoints`` directory's, or one
  step directory's (`find`)."""
  steps, asked = find(path, flag)
  return first_good(steps, lambda d: read_state(d, params_only), asked=asked,
                    where=f"{flag}={str(path)!r}")[1]


def meta_at(path, flag: str = "checkpoint") -> dict:
  """The meta of a workdir's newest step whose meta reads (or of the step directory given)."""
  steps, asked = find(path, flag)
  return first_good(steps, read_meta, asked=asked, where=f"{flag}={str(path)!r}")[1]
