"""A trained run, read back from its workdir: ``vlora_jax.load(workdir, step=None)``.

Everything needed to run the model is stored in each checkpoint's JSON ``meta`` (written at set-up,
`vlora_jax.train.setup`): the config, the layout of every layer stack, and the data's description
(`vlora_jax.data`: the vocabulary, the image shape and normalisation, the class names). So loading
reads no data file, and no relative path of the config has to resolve.

  model, params, config, info = vlora_jax.load("runs/vit_digits")
  logits = model.apply({"params": params}, images)   # images: (pixels * scale - mean) / std

Which checkpoint: ``step=None`` the newest in ``<workdir>/checkpoints``; ``step='best'`` the best
in ``<workdir>/best`` by the run's ``checkpoint.best_metric``; an int, that step (in either).

Finding the checkpoint and reading its meta need no JAX: the command lines built on this
(`vlora_jax.export`, `vlora_jax.evaluate`, `vlora_jax.predict`) refuse a wrong workdir or step in a
fraction of a second.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from vlora_jax.errors import CheckpointError


@dataclasses.dataclass(frozen=True)
class Trained:
  """A loaded run. Unpacks as ``model, params, config, info``.

  Attributes:
    model: the unbound Flax module, built through the family registry from the stored config.
    params: host numpy arrays, unboxed: ``model.apply({'params': params}, *inputs)``.
    config: the run's config (an ``ml_collections.ConfigDict``, locked).
    info: the data's description (`vlora_jax.data`); ``{}`` for checkpoints written before it was
      stored.
    step: the checkpoint's step.
    checkpoint: its step directory.
  """
  model: Any
  params: Any
  config: Any
  info: dict
  step: int
  checkpoint: Path

  def __iter__(self):  # model, params, config, info = load(workdir): the four a user needs
    return iter((self.model, self.params, self.config, self.info))

  def to_dense(self) -> tuple[Any, Any]:
    """``(dense twin, its params)``: VLoRA and LoRA merged into plain per-layer weights
    (`stack.to_dense`), as host arrays; a dense run's own."""
    import jax
    from vlora_jax import stack
    model, variables = stack.to_dense(self.model, {"params": self.params})
    return model, jax.device_get(variables["params"])


def _finished_steps(directory: Path) -> list[int]:
  """The steps whose save completed (Orbax renames a step's temporary directory when done)."""
  if not directory.is_dir():
    return []
  return sorted(int(p.name) for p in directory.iterdir()
                if p.name.isdigit() and (p / "state").is_dir())


def _no_checkpoint(workdir: str | Path, what: str) -> CheckpointError:
  """``what`` is not there: the error names the workdir and the steps it does hold."""
  wd = Path(workdir).expanduser()
  found = {kind: _finished_steps(wd / kind) for kind in ("checkpoints", "best")}
  if not any(found.values()):
    return CheckpointError(f"workdir={str(workdir)!r} holds no checkpoint (no finished step in "
                           f"{wd / 'checkpoints'} or {wd / 'best'}): train there first, or pass "
                           "another run's workdir")
  held = ", ".join(f"{kind}/ {steps}" for kind, steps in found.items() if steps)
  return CheckpointError(f"workdir={str(workdir)!r}: {what}; the steps there are: {held}")


def read_meta(step_dir: Path) -> dict:
  """A checkpoint's JSON ``meta`` (config, stack layouts, data info, step), without JAX."""
  path = Path(step_dir) / "meta" / "metadata"
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise CheckpointError(f"checkpoint {step_dir}: its meta ({path}) does not read "
                          f"({type(e).__name__}: {e})") from None


def _best_step(workdir: Path, steps: list[int]) -> int:
  """The best of the ``best/`` steps by the run's ``checkpoint.best_metric`` and ``best_mode``
  (Orbax keeps ``checkpoint.keep_best`` of them, not only the best)."""
  ccfg = read_meta(workdir / "best" / str(steps[-1])).get("config", {}).get("checkpoint", {})
  metric, mode = ccfg.get("best_metric", "eval/accuracy"), ccfg.get("best_mode", "max")
  scores = {}
  for s in steps:
    try:
      scores[s] = float(json.loads((workdir / "best" / str(s) / "metrics" / "metrics")
                                   .read_text())[metric])
    except (OSError, ValueError, KeyError, TypeError):
      continue  # a step without its metric cannot be ranked; the others can
  if not scores:
    raise CheckpointError(f"workdir={str(workdir)!r}: no step in best/ {steps} records its "
                          f"{metric!r} (checkpoint.best_metric), so none can be called the best; "
                          "pass a step number")
  pick = max if mode == "max" else min
  return pick(scores, key=lambda s: (scores[s], s))  # ties: the later step


def find_checkpoint(workdir: str | Path, step: int | str | None = None) -> tuple[Path, int]:
  """``(step directory, step)`` of a run's checkpoint: the newest (``None``), the best
  (``'best'``) or a given step; a `CheckpointError` naming the workdir and the steps it holds."""
  wd = Path(workdir).expanduser()
  if not wd.is_dir():
    raise CheckpointError(f"workdir={str(workdir)!r}: no such directory")
  latest = _finished_steps(wd / "checkpoints")
  if step is None:
    if not latest:
      raise _no_checkpoint(workdir, f"no checkpoint in {wd / 'checkpoints'} (pass step='best' or "
                           "a step number)")
    return wd / "checkpoints" / str(latest[-1]), latest[-1]
  if step == "best":
    best = _finished_steps(wd / "best")
    if not best:
      raise _no_checkpoint(workdir, f"no best checkpoint in {wd / 'best'} (the run kept none: "
                           "checkpoint.keep_best=0?)")
    s = _best_step(wd, best)
    return wd / "best" / str(s), s
  if isinstance(step, bool) or not isinstance(step, int):
    raise CheckpointError(f"step={step!r}: allowed are None (the newest checkpoint), 'best', or a "
                          "step number")
  for kind in ("checkpoints", "best"):
    if step in _finished_steps(wd / kind):
      return wd / kind / str(step), step
  raise _no_checkpoint(workdir, f"no checkpoint of step {step}")


def source_run(workdir: str | Path, where: str, step_dir: Path | None = None):
  """``(step directory, stored config)`` of another run that a run starts from or learns from
  (a compressed dense run, a teacher): its newest checkpoint, or ``step_dir``. Nothing but the
  meta is read; a missing checkpoint is a `CheckpointError` prefixed by ``where``."""
  import ml_collections
  if step_dir is None:
    try:
      step_dir, _ = find_checkpoint(workdir)
    except CheckpointError as e:
      raise CheckpointError(f"{where}: {e}") from None
  return step_dir, ml_collections.ConfigDict(read_meta(step_dir).get("config", {}))


def read_step_state(step_dir: Path, params_only: bool = True) -> dict:
  """A checkpoint step's state (or only ``{'params': ...}``) as host numpy arrays, on any device
  count (`train.checkpoint.read_state` finds the step; here it is given)."""
  import jax
  import numpy as np
  import orbax.checkpoint as ocp
  item = (Path(step_dir) / "state").absolute()
  # The item's own metadata (the handler's): the checkpointer's would look for a step-level
  # metadata file in the item directory and warn that there is none.
  tree = ocp.PyTreeCheckpointHandler().metadata(item).tree
  if params_only:
    tree = {"params": tree["params"]}
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  return ocp.PyTreeCheckpointer().restore(item, args=ocp.args.PyTreeRestore(
      item=tree, restore_args=restore_args, partial_restore=params_only))


def _as_tuples(info: dict) -> dict:
  """JSON lists back to the tuples the pipeline's info holds (image_shape, mean, class_names)."""
  return {k: tuple(v) if isinstance(v, list) else v for k, v in info.items()}


def load(workdir: str | Path, step: int | str | None = None) -> Trained:
  """A run's model, parameters, config and data info from its checkpoint (see the module doc).

  Raises:
    CheckpointError: no such workdir, no checkpoint there, no such step (the message names the
      steps that exist), or a checkpoint whose config no longer builds a model its parameters fit.
  """
  step_dir, s = find_checkpoint(workdir, step)
  meta = read_meta(step_dir)
  if not isinstance(meta.get("config"), dict):
    raise CheckpointError(f"checkpoint {step_dir}: its meta holds no config")
  # JAX, Orbax and the models only now: the checks above are instant.
  import flax.linen as nn
  import jax
  import ml_collections
  from absl import logging

  from vlora_jax import models
  from vlora_jax.params import params_mismatch

  config = ml_collections.ConfigDict(meta["config"])
  config.lock()
  try:
    fam = models.family(config.model.name)
    model = fam.build_from_config(config.model)
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    raise CheckpointError(f"checkpoint {step_dir}: its config does not build a model "
                          f"({type(e).__name__}: {e})") from e
  params = read_step_state(step_dir)["params"]
  # The stored params must fit the model this version builds from the stored config.
  init = lambda *x: nn.unbox(model.init(jax.random.key(0), *x, train=False)["params"])
  want = jax.eval_shape(init, *fam.sample_inputs(config.model, batch=1))
  problems = params_mismatch(params, want)
  if problems:
    raise CheckpointError(f"checkpoint {step_dir}: its params do not fit the model its config "
                          "builds now: " + "; ".join(problems[:6]))
  if "data" not in meta:
    logging.warning("checkpoint %s was written before the data info was stored with it: info is "
                    "empty (the vocabulary and normalisation are in the data files alone)",
                    step_dir)
  return Trained(model=model, params=params, config=config, info=_as_tuples(meta.get("data", {})),
                 step=s, checkpoint=step_dir)
