"""``config.init_from = '<kind>:<arg>'``: where a run's parameters come from when it does not
resume (the optimizer starts fresh at step 0). The kinds are the entries of `KINDS`:

  checkpoint:<path>                  another run's params (its workdir, its checkpoints directory
                                     or a step directory; verified, layout checked)
  py:<module>.<function>[:<arg>]     any importable converter: import / compress / pretrained
  compress:<workdir>                 a trained dense run compressed into this run's VLoRA spec
                                     (`from_dense.py`)

Each kind is one function of the built run (`setup.Run`: its config, model, mesh, data pipeline,
meta, and the `sources.Sources` that read every other run once), so no hook builds the model or
reads a source again. A kind may also have a check that set-up runs before anything compiles
(`check_init_from`). `register_init_from` adds a kind written against the ``py:`` hooks'
signature.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable

from vlora_jax.runs import checkpoint_format as fmt
from vlora_jax.errors import CheckpointError
from vlora_jax.train import compat
from vlora_jax.train import from_dense
from vlora_jax.train.sources import Sources


@dataclasses.dataclass(frozen=True)
class Kind:
  """One kind of ``init_from``.

  Attributes:
    params: ``(arg, run) -> params`` (host or device arrays; the trainer checks them against the
      run's shapes), given the built `setup.Run`.
    check: ``(arg, *, config, model, sources) -> None``, or None: refuses in set-up, before
      anything compiles, a source that cannot fit ``model`` (a `UserError`).
  """
  params: Callable[[str, Any], Any]
  check: Callable[..., None] | None = None


def _params_from_checkpoint(arg: str, run):
  """``init_from='checkpoint:<path>'``: the params of another run (layout checked against the
  run's meta), nothing else."""
  where = f"init_from='checkpoint:{arg}'"
  steps, asked = fmt.find(arg, where)

  def read(step_dir):
    saved = fmt.read_meta(step_dir)
    problems = compat.layout_problems(saved.get("layout"), run.meta.get("layout"))
    if problems:
      raise CheckpointError(f"{where}: the stack layout differs: " + "; ".join(problems[:12]))
    return fmt.read_state(step_dir)["params"]

  return fmt.first_good(steps, read, asked=asked, where=where)[1]


def _params_from_python(arg: str, run):
  """``init_from='py:<module>.<function>[:<arg>]'``: any importable hook, no registration needed.

  Called as ``function(arg, abstract_params=..., config=...)``; e.g. a converter that imports
  PyTorch weights or compresses a dense checkpoint into VLoRA.
  """
  target, _, rest = arg.partition(":")
  module, _, fn = target.rpartition(".")
  if not module:
    raise ValueError(f"init_from='py:{arg}': expected 'py:<module>.<function>[:<arg>]'")
  hook = getattr(importlib.import_module(module), fn)
  return hook(rest, abstract_params=run.abstract_params, config=run.config)


KINDS: dict[str, Kind] = {
    "checkpoint": Kind(_params_from_checkpoint),
    "compress": Kind(from_dense.params_for_run, check=from_dense.check_source),
    "py": Kind(_params_from_python),
}


def register_init_from(kind: str, check: Callable[..., None] | None = None):
  """Decorator: adds the kind ``kind`` to `KINDS`, for ``fn(arg, abstract_params=, config=)`` (a
  ``py:`` hook's signature).

  ``check(arg, config=, model=)``, if given, runs in set-up, before anything compiles
  (`check_init_from`): it refuses a source that cannot fit ``model`` with a `UserError`.
  """
  def deco(fn):
    def params(arg, run):
      return fn(arg, abstract_params=run.abstract_params, config=run.config)

    def checked(arg, *, config, model, sources):
      del sources
      check(arg, config=config, model=model)

    KINDS[kind] = Kind(params, checked if check is not None else None)
    return fn
  return deco


def check_init_from(config, model, sources: Sources | None = None) -> None:
  """Runs the set-up check of ``config.init_from``'s kind, if it has one."""
  kind, _, arg = (config.init_from or "").partition(":")
  if kind in KINDS and KINDS[kind].check is not None:
    KINDS[kind].check(arg, config=config, model=model, sources=sources or Sources())


def params(spec: str, run):
  """The params of the ``config.init_from`` kind named by ``'<kind>:<arg>'``, for the built
  ``run``."""
  kind, _, arg = spec.partition(":")
  if kind not in KINDS:
    raise ValueError(f"init_from={spec!r}: unknown kind {kind!r}; registered are "
                     f"{sorted(KINDS)} (format '<kind>:<arg>', e.g. "
                     "'checkpoint:/path/to/workdir')")
  return KINDS[kind].params(arg, run)
