"""``config.init_from = '<kind>:<arg>'``: where a run's parameters come from when it does not
resume (the optimizer starts fresh at step 0). A kind is a hook registered with
`register_init_from`:

  checkpoint:<path>                  another run's params (its workdir, its checkpoints directory
                                     or a step directory; verified, layout checked)
  py:<module>.<function>[:<arg>]     any importable converter: import / compress / pretrained
  compress:<workdir>                 a trained dense run compressed into this run's VLoRA spec
                                     (`from_dense.py`)

A kind may also register a check that set-up runs before anything compiles (`check_init_from`).
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

from vlora_jax import checkpoint_format as fmt
from vlora_jax.errors import CheckpointError
from vlora_jax.train import compat

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


@register_init_from("checkpoint")
def _params_from_checkpoint(arg: str, *, abstract_params, config, meta: dict | None = None):
  """``init_from='checkpoint:<path>'``: the params of another run (layout checked), nothing else."""
  del abstract_params, config
  where = f"init_from='checkpoint:{arg}'"
  steps, asked = fmt.find(arg, where)

  def read(step_dir):
    if meta is not None:
      saved = fmt.read_meta(step_dir)
      problems = compat.layout_problems(saved.get("layout"), meta.get("layout"))
      if problems:
        raise CheckpointError(f"{where}: the stack layout differs: " + "; ".join(problems[:12]))
    return fmt.read_state(step_dir)["params"]

  return fmt.first_good(steps, read, asked=asked, where=where)[1]


@register_init_from("py")
def _params_from_python(arg: str, *, abstract_params, config):
  """``init_from='py:<module>.<function>[:<arg>]'``: any importable hook, no registration needed.

  Called as ``function(arg, abstract_params=..., config=...)``; e.g. a converter that imports
  PyTorch weights or compresses a dense checkpoint into VLoRA.
  """
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
    raise ValueError(f"init_from={spec!r}: unknown kind {kind!r}; registered are "
                     f"{sorted(INIT_FROM)} (format '<kind>:<arg>', e.g. "
                     "'checkpoint:/path/to/workdir')")
  fn = INIT_FROM[kind]
  kwargs = dict(abstract_params=abstract_params, config=config)
  if fn is _params_from_checkpoint:
    kwargs["meta"] = meta
  return fn(arg, **kwargs)
