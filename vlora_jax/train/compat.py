"""Where a run meets a stored one: what may differ between a checkpoint and the run that resumes
or restores it, and between the data of two runs. Judged in set-up, from the stored meta and the
arrays' shapes alone, before anything compiles.

**Resume and ``checkpoint.restore_from``** (`judge_restore`): the stored config and the new one
are compared key by key.

  refused   a key that changes what the checkpoint's arrays are or mean: the model's keys (but
            `COMPUTE_ONLY`: how it computes, not what its parameters are), ``rng_impl`` (the
            stored key's bits), and any key that gives the train state another structure (an
            optimizer setting that adds or drops optimizer state: the stored shapes are compared
            with the new run's); and data whose ids or pixels mean something else (`data_changes`).
            One line names every refused key with its two values.
  accepted  everything else (learning rate, steps, batch size, mesh, eval and checkpoint settings,
            where the data files are): one log line names each key and its two values.

**Data identity** (`data_changes`): two data descriptions (a checkpoint's ``meta['data']``, a
pipeline's ``info``) agree when token ids and pixels mean the same: the vocabulary or tokenizer
and its special ids, the image shape, the normalisation, the class names. Where the files are and
how many examples they hold do not matter: a moved file with the same content is the same data.
Compared wherever two runs meet: a resume, ``restore_from``, an ``init_from`` source, a teacher,
and ``vlora_jax.evaluate`` on other data.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from absl import logging

from vlora_jax.runs import checkpoint_format as fmt
from vlora_jax.errors import CheckpointError
from vlora_jax.train import schema

# Model keys that change how the model computes (memory, precision, regularisation, loop form),
# not what its parameters are or mean.
COMPUTE_ONLY = ("model.remat", "model.attention", "model.dtype", "model.dropout", "model.scan",
                "model.vlora.stop_gradient_base", "model.vlora.init", "model.lora.dropout")
# Top-level keys outside the model whose change alters what a checkpoint's arrays mean.
STATE_KEYS = ("rng_impl",)
# Layout fields that only training reads (the same as the model keys above).
_LAYOUT_TRAINING_ONLY = ("stop_gradient_base", "init")

# The fields of a data description that say what ids and pixels mean, and what each is to the model.
IDENTITY = {
    "kind": "the kind of data",
    "image_shape": "the model's input images",
    "mean": "the inputs' normalisation",
    "std": "the inputs' normalisation",
    "class_names": "what the label ids mean",
    "vocab": "what the token ids mean",
    "vocab_size": "the token ids",
    "tokenizer": "what the token ids mean",
    "bos_id": "the special token ids",
    "eos_id": "the special token ids",
    "special_tokens": "the special token ids",
}


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
  """``{'a': {'b': 1}}`` -> ``{'a.b': 1}``; lists and tuples as lists (JSON has no tuples)."""
  out = {}
  for k, v in tree.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(flatten(v, key + "."))
    else:
      out[key] = _plain(v)
  return out


def _plain(v):
  return [_plain(x) for x in v] if isinstance(v, (list, tuple)) else v


def changes(saved: dict, current: dict) -> dict[str, tuple[Any, Any]]:
  """``{dotted key: (stored value, new value)}`` of every key that differs; a key one side lacks
  has the value `ABSENT` there."""
  a, b = flatten(saved), flatten(current)
  return {k: (a.get(k, ABSENT), b.get(k, ABSENT)) for k in sorted(set(a) | set(b))
          if a.get(k, ABSENT) != b.get(k, ABSENT)}


def stored_config(saved: dict) -> dict:
  """A checkpoint meta's config with every key it lacks at its default (`schema.complete`): a
  run stored before a key existed ran with that value, and is compared as it ran."""
  return schema.complete(saved.get("config") or {}).to_dict()


class _Absent:
  def __repr__(self):
    return "absent"


ABSENT = _Absent()


def _shown(items: dict[str, tuple[Any, Any]], limit: int = 8) -> str:
  text = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in list(items.items())[:limit])
  return text + (f"; and {len(items) - limit} more" if len(items) > limit else "")


def defines_state(key: str) -> bool:
  """Whether a config key, changed, changes what a checkpoint's arrays are or mean (a model key
  outside `COMPUTE_ONLY`, or one of `STATE_KEYS`)."""
  if key in STATE_KEYS:
    return True
  return key.startswith("model.") and not any(key == k or key.startswith(k + ".")
                                              for k in COMPUTE_ONLY)


# ------------------------------------------------------------------------------ data identity


def data_changes(stored: dict | None, found: dict | None) -> dict[str, tuple[Any, Any]]:
  """The `IDENTITY` fields in which two data descriptions differ (a field either lacks, or class
  names one data set does not give, cannot be compared and count as equal)."""
  out = {}
  for key in IDENTITY:
    old, new = (stored or {}).get(key), (found or {}).get(key)
    if old is None or new is None or _plain(old) == _plain(new):
      continue
    out[key] = (old, new)
  return out


def _short(key: str, value) -> str:
  if key in ("vocab", "tokenizer") and isinstance(value, str):
    return f"{len(value)} characters {value[:40]!r}{'...' if len(value) > 40 else ''}"
  return repr(_plain(value))


def describe_data_changes(diff: dict[str, tuple[Any, Any]], old_name: str, new_name: str) -> str:
  """One line: each differing field, its two values, and what it is to the model."""
  return "; ".join(f"{k}: {_short(k, old)} in {old_name}, {_short(k, new)} in {new_name} "
                   f"({IDENTITY[k]})" for k, (old, new) in diff.items())


def check_same_data(stored: dict | None, found: dict | None, where: str, old_name: str,
                    new_name: str) -> None:
  """Refuses data that mean something else than the stored description says (`data_changes`)."""
  diff = data_changes(stored, found)
  if diff:
    raise CheckpointError(f"{where}: the data differ in what ids or pixels mean: "
                          f"{describe_data_changes(diff, old_name, new_name)}. Use data that "
                          "mean the same (the same vocabulary, image shape, normalisation and "
                          "classes)")


def check_sources(config, info: dict | None, resuming: bool, teacher=None, sources=None) -> None:
  """The data of the runs this run starts from (``init_from``'s ``compress:`` and ``checkpoint:``
  sources, not read by a resumed run) and learns from (``teacher``, the run's `teacher.Teacher`:
  its checkpoint's meta) against this run's data. ``sources`` (the run's `sources.Sources`): the
  compressed dense run's meta, opened once in set-up."""
  kind, _, arg = (config.init_from or "").partition(":")
  if kind in ("compress", "checkpoint") and not resuming:
    where = f"init_from={config.init_from!r}"
    if kind == "compress" and sources is not None:
      meta = sources.meta(arg, where)[1]  # the set-up's check opened it: a workdir
    else:
      meta = _source_meta(arg, where)
    check_same_data(meta.get("data"), info, where, "that run", "this run's data")
  if teacher is not None:
    where = f"distill.teacher={config.distill.teacher!r}"
    check_same_data(teacher.source.meta.get("data"), info, where, "the teacher's data",
                    "this run's data")


def _source_meta(arg: str, where: str) -> dict:
  try:
    return fmt.meta_at(arg, "workdir")
  except CheckpointError as e:
    raise type(e)(f"{where}: {e}") from None


# ------------------------------------------------------------------------------- the train state


def _leaves(tree) -> dict[str, tuple[tuple[int, ...], str]]:
  """``{canonical leaf path: (shape, dtype)}`` of arrays, shapes or Orbax's array metadata."""
  import jax
  flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is None)[0]
  return {fmt.canonical_path(jax.tree_util.keystr(p)): (tuple(x.shape), str(np.dtype(x.dtype)))
          for p, x in flat if hasattr(x, "shape")}


def state_differences(stored_tree, abstract_state) -> list[str]:
  """Where a stored train state and the one this run builds differ in leaves, shapes or dtypes."""
  a, b = _leaves(stored_tree), _leaves(abstract_state)
  out = []
  for k in sorted(set(a) | set(b)):
    if k not in b:
      out.append(f"{k} only in the checkpoint")
    elif k not in a:
      out.append(f"{k} only in this run")
    elif a[k] != b[k]:
      out.append(f"{k}: {a[k][1]}{list(a[k][0])} in the checkpoint, {b[k][1]}{list(b[k][0])} "
                 "in this run")
  return out


def layout_problems(saved: dict | None, current: dict | None) -> list[str]:
  """The stack layouts' differences, leaving out the fields only training reads."""
  def strip(layouts):
    out = json.loads(json.dumps(layouts or {}))
    for layout in out.values():
      for field in _LAYOUT_TRAINING_ONLY:
        (layout.get("vlora") or {}).pop(field, None)
    return out
  diff = changes(strip(saved), strip(current))
  return [f"layout.{k}: {old!r} -> {new!r}" for k, (old, new) in diff.items()]


def check_model(saved: dict, current: dict, where: str) -> None:
  """Refuses, in one line, a checkpoint whose model keys (outside `COMPUTE_ONLY`), ``rng_impl``
  or stack layouts differ from the current run's: what its arrays are or mean."""
  diff = changes(stored_config(saved), current.get("config") or {})
  refused = {k: v for k, v in diff.items() if defines_state(k) and ABSENT not in v}
  problems = [_shown(refused)] if refused else []
  if not refused:  # the layouts follow from the model keys: shown only when those agree
    problems += layout_problems(saved.get("layout"), current.get("layout"))[:4]
  if problems:
    raise CheckpointError(
        f"{where} was written with other values of keys that define what it holds: "
        f"{'; '.join(problems)}. Set these keys back to the checkpoint's values, or use a fresh "
        "--workdir")


def judge_restore(step_dir: Path, saved: dict, run, where: str) -> None:
  """A resume or ``restore_from`` of ``step_dir`` (whose meta is ``saved``) by ``run`` (a
  `setup.Run`), judged key by key before anything compiles (see the module doc). The accepted
  changes are logged; the refused ones are one `CheckpointError`."""
  check_model(saved, run.meta, where)
  if run.pipe is not None:
    check_same_data(saved.get("data"), run.pipe.info, where, "the checkpoint", "this run's data")
  diff = changes(stored_config(saved), run.meta.get("config") or {})
  try:
    stored = fmt.stored_tree(step_dir)
  except fmt.DamagedCheckpoint:
    stored = None  # the restore skips a damaged step (and says so); nothing to compare here
  if stored is not None:
    differs = state_differences(stored, run.abstract_state)
    if differs:
      culprits = {k: v for k, v in diff.items() if not k.startswith("model.")}
      keys = (f"the keys that differ: {_shown(culprits)}" if culprits
              else "no config key differs (a checkpoint of another version?)")
      raise CheckpointError(
          f"{where} holds a train state of another structure than this config builds "
          f"({'; '.join(differs[:3])}{'; ...' if len(differs) > 3 else ''}); {keys}. Set "
          "these keys back to the checkpoint's values, or use a fresh --workdir")
  accepted = {k: v for k, v in diff.items() if not (defines_state(k) and ABSENT not in v)}
  if accepted:
    logging.warning("%s: continuing with changed settings, which do not change what the "
                    "checkpoint holds: %s", where, _shown(accepted, limit=20))
