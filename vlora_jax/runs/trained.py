"""A trained run, read back from its workdir: ``vlora_jax.load(workdir, step=None)``.

Everything needed to run the model is stored in each checkpoint's JSON ``meta`` (written at set-up,
`vlora_jax.train.setup`; the format is `vlora_jax.runs.checkpoint_format`): the config, the layout
of every layer stack, and the data's description (`vlora_jax.data`: the vocabulary, the image
shape and normalisation, the class names). So loading reads no data file, and no relative path of
the config has to resolve.

  model, params, config, info = vlora_jax.load("runs/vit_digits")
  logits = model.apply({"params": params}, images)   # images: (pixels * scale - mean) / std

Which checkpoint: ``step=None`` the newest in ``<workdir>/checkpoints``; ``step='best'`` the best
in ``<workdir>/best`` by the run's ``checkpoint.best_metric``; an int, that step (in either).

Every load is verified against the checkpoint's fingerprints. A damaged newest (or best) step is
skipped, with a warning naming it and why, for the next good one, as a resumed run does; a step
asked for by number is that step or a `CheckpointError`.

Finding the checkpoint and reading its meta need no JAX: the command lines built on this
(`vlora_jax.export`, `vlora_jax.evaluate`, `vlora_jax.predict`) refuse a wrong workdir or step in a
fraction of a second.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from vlora_jax.runs import checkpoint_format as fmt
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
    meta: the checkpoint's JSON meta.
  """
  model: Any
  params: Any
  config: Any
  info: dict
  step: int
  checkpoint: Path
  meta: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

  def __iter__(self):  # model, params, config, info = load(workdir): the four a user needs
    return iter((self.model, self.params, self.config, self.info))

  def to_dense(self) -> tuple[Any, Any]:
    """``(dense twin, its params)``: VLoRA and LoRA merged into plain per-layer weights
    (`stack.to_dense`), as host arrays; a dense run's own."""
    import jax
    from vlora_jax.core import stack
    model, variables = stack.to_dense(self.model, {"params": self.params})
    return model, jax.device_get(variables["params"])


def _prefixed(where: str | None):
  """A context in which a `CheckpointError` gets ``where: `` in front (a source run's flag)."""
  import contextlib

  @contextlib.contextmanager
  def ctx():
    try:
      yield
    except CheckpointError as e:
      if where is None:
        raise
      raise type(e)(f"{where}: {e}") from None
  return ctx()


def open_checkpoint(workdir, step: int | str | None = None, *,
                    where: str | None = None) -> tuple[Path, int, dict]:
  """``(step directory, step, meta)`` of the checkpoint ``load`` starts from: the first of
  `checkpoint_format.candidates` whose meta reads (the arrays are not read). A `CheckpointError`
  names the workdir and the steps it holds (after ``where``, if given)."""
  with _prefixed(where):
    step_dir, meta = fmt.first_good(fmt.candidates(workdir, step), fmt.read_meta,
                                    asked=isinstance(step, int), where=f"workdir={str(workdir)!r}")
  return step_dir, int(step_dir.name), meta


def source_meta(workdir, where: str, step_dir: Path | None = None) -> tuple[Path, dict]:
  """``(step directory, meta)`` of another run that a run starts from or learns from (a
  compressed dense run, a teacher): its newest checkpoint whose meta reads, or ``step_dir``.
  Nothing but the meta is read; a missing checkpoint is a `CheckpointError` prefixed by
  ``where``."""
  if step_dir is None:
    step_dir, _, meta = open_checkpoint(workdir, where=where)
  else:
    with _prefixed(where):
      meta = fmt.read_meta(step_dir)
  return Path(step_dir), meta


def _as_tuples(info: dict) -> dict:
  """JSON lists back to the tuples the pipeline's info holds (image_shape, mean, class_names)."""
  return {k: tuple(v) if isinstance(v, list) else v for k, v in info.items()}


def _read(step_dir: Path) -> Trained:
  """One step as a `Trained`, its params verified (`DamagedCheckpoint` if they are not)."""
  import flax.linen as nn
  import jax
  import ml_collections
  from absl import logging

  from vlora_jax import models
  from vlora_jax.core.params import params_mismatch

  meta = fmt.read_meta(step_dir)
  config = ml_collections.ConfigDict(meta["config"])
  config.lock()
  try:
    fam = models.family(config.model.name)
    model = fam.build_from_config(config.model)
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    raise CheckpointError(f"checkpoint {step_dir}: its config does not build a model "
                          f"({type(e).__name__}: {e})") from e
  params = fmt.read_state(step_dir, meta=meta)["params"]
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
  return Trained(model=model, params=params, config=config,
                 info=_as_tuples(meta.get("data") or {}), step=int(step_dir.name),
                 checkpoint=step_dir, meta=meta)


def load_step(step_dir, where: str | None = None) -> Trained:
  """One step directory as a `Trained`, verified: no other step is tried."""
  with _prefixed(where):
    return _read(Path(step_dir))


def load(workdir, step: int | str | None = None, *, where: str | None = None) -> Trained:
  """A run's model, parameters, config and data info from its checkpoint (see the module doc).

  ``where`` (a source run's flag, ``"distill.teacher='runs/x'"``) prefixes the errors.

  Raises:
    CheckpointError: no such workdir, no checkpoint there, no such step (the message names the
      steps that exist), a step asked for by number that is damaged, no step that reads back, or
      a checkpoint whose config no longer builds a model its parameters fit.
  """
  with _prefixed(where):
    steps = fmt.candidates(workdir, step)
    return fmt.first_good(steps, _read, asked=isinstance(step, int),
                          where=f"workdir={str(workdir)!r}")[1]
