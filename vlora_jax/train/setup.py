"""The first phase of a run: the checked config, the mesh, the data and the model's shapes.

`set_up` returns a `Run`, which every later phase reads. It walks once: what changes the config
(``compress.budget``'s ranks) is resolved first (`resolve`), then the config is checked, and the
model built, once; every other run is read once (`sources.Sources`), and the ``init_from`` kind
is given the built `Run`. Nothing is compiled here, and every ValueError raised here is about
the input: it leaves as a `ConfigError` or `DataError`.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from vlora_jax.runs import checkpoint_format as fmt
from vlora_jax import data as data_lib
from vlora_jax import errors
from vlora_jax.core import params as params_lib
from vlora_jax.runs import trained as trained_lib
from vlora_jax.data.pipeline import Pipeline
from vlora_jax.models.family import Family
from vlora_jax.train import compat
from vlora_jax.train import from_dense
from vlora_jax.train import init_from as init_from_lib
from vlora_jax.train import metrics as metrics_lib
from vlora_jax.train import optim, schema, sharding, state as state_lib, validate
from vlora_jax.train import teacher as teacher_lib
from vlora_jax.train import workdir as workdir_lib
from vlora_jax.train.sources import Sources


@dataclasses.dataclass
class Run:
  """What `set_up` built from the config: read by every later phase."""
  config: Any
  workdir: Path | None  # None: a run built to compile only (`without_data`)
  main: bool  # process 0: writes metrics and the summary
  plan: validate.Plan
  mesh: jax.sharding.Mesh
  pipe: Pipeline | None
  model: nn.Module
  init_fn: Callable[[jax.Array], Any]  # key -> boxed params
  abstract_params: Any
  param_shardings: Any
  opt: optim.Optimizer
  abstract_state: Any
  state_shardings: Any
  counts: dict
  dense_counts: dict | None
  meta: dict  # what every checkpoint records and every restore checks
  teacher: teacher_lib.Teacher | None = None  # config.distill: checked, its params on the host
  # The other runs set-up read (a dense run to compress), until the starting state is made.
  sources: Sources = dataclasses.field(default_factory=Sources)

  @property
  def family(self) -> Family:
    return self.plan.family

  @property
  def total_steps(self) -> int:
    return int(self.config.num_train_steps)

  @property
  def rng_impl(self) -> str:
    return self.config.rng_impl


def _zeros(structs):
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), structs)


def _dense_count(model, sample, vlora) -> dict | None:
  if vlora is None:
    return None
  return params_lib.count(params_lib.param_shapes(params_lib.dense_twin(model), *sample,
                                                  train=False))


def mesh_and_data(config):
  """``(plan, mesh, pipe)``: the config checked (`validate.check`), its device mesh, this
  process's part of its data, and the data checked against the model: where every command that
  runs a model on a config's data starts (training, ``evaluate``).

  A ValueError raised here is about the input: it leaves as a `ConfigError` or `DataError`.
  """
  pcount = jax.process_count()
  with errors.config_errors():
    plan = validate.check(config, jax.device_count(), pcount)
    mesh = sharding.make_mesh(config.mesh, shape=plan.mesh_shape)
    pipe = data_lib.build(config, process_index=jax.process_index(), process_count=pcount)
    plan.family.check_data(config.model, pipe.info)
  return plan, mesh, pipe


def _previous(workdir: Path) -> tuple[Path, dict] | None:
  """``(step directory, meta)`` of the workdir's newest checkpoint whose meta reads (a resume), or
  None."""
  try:
    step_dir, _, meta = trained_lib.open_checkpoint(workdir)
  except (errors.CheckpointError, OSError):
    return None
  return step_dir, meta


def _restore_source(config, previous) -> tuple[Path, dict, str] | None:
  """``(step directory, meta, where)`` of the checkpoint the run will restore whole: its own
  newest (a resume) or ``checkpoint.restore_from``'s; None for a fresh start."""
  if previous is not None:
    return (*previous, f"checkpoint {previous[0]} (a resume)")
  path = config.checkpoint.restore_from
  if not path:
    return None
  where = f"checkpoint.restore_from={path!r}"
  steps, asked = fmt.find(path, "checkpoint.restore_from")
  step_dir, meta = fmt.first_good(steps, fmt.read_meta, asked=asked, where=where)
  return step_dir, meta, where


def check_more_steps(config, workdir: Path, previous: dict | None,
                     step: int | None = None) -> None:
  """A finished run started again with another ``num_train_steps``, under a schedule that spans
  its step count (cosine), would jump its learning rate from the schedule's end back up: refused,
  with the way to train further (a new run from its weights). Under ``optim.schedule='constant'``
  the rate after the warmup does not depend on the step count, and the run continues to the new
  count. ``step`` is the newest checkpoint's (read from the workdir when None)."""
  before = ((previous or {}).get("config") or {}).get("num_train_steps")
  now = int(config.num_train_steps)
  if before is None or int(before) == now or config.optim.schedule == "constant":
    return
  if step is None:
    try:
      step = trained_lib.open_checkpoint(workdir)[1]
    except errors.CheckpointError:
      return
  if step < int(before):
    return  # not finished: a resume (whose other changed settings the checkpoint checks name)
  schedule = config.optim.schedule
  raise errors.ConfigError(
      f"num_train_steps={now}: the run in {str(workdir)!r} finished its num_train_steps="
      f"{before}, over which its {schedule} learning-rate schedule ran to its end; continuing "
      f"it to {now} would make the rate jump back up. To train it further, start a new run from "
      f"its weights, with a fresh warmup and schedule over the new steps: "
      f"--config.init_from=checkpoint:{workdir} --workdir {workdir}_more (or use "
      f"optim.schedule=constant, whose rate does not depend on the step count); "
      f"--config.num_train_steps={before} evaluates it again")


def resolve(config, previous: dict | None, sources: Sources) -> None:
  """Every value set-up chooses for its complete copy of the config (`schema.complete`), set
  before the rules between keys are checked, then the config locked: ``compress.budget``'s ranks
  (`from_dense.resolve_budget`: from the dense run, read through ``sources``, or from the resumed
  run's ``previous`` meta). So the check, the plan and the model are made once, from the config
  the run stores."""
  schema.check(config)  # every key well-formed before the budget reads them
  from_dense.resolve_budget(config, previous, sources)
  config.lock()


def set_up(config, workdir: Path) -> Run:
  """Resolves and checks the config, builds the mesh, the data and the model's shapes (no
  compile), each once: every other run it reads (a dense run to compress, a teacher) is read
  once, through the run's `Sources`.

  Every ValueError raised here is about the input: it leaves as a `ConfigError` or `DataError`.
  The caller's config is left as it was: set-up reads and resolves a complete copy.
  """
  config = schema.complete(config)
  previous = _previous(workdir)
  previous_meta = previous[1] if previous else None
  # Before the data are read: an instant refusal.
  check_more_steps(config, workdir, previous_meta, int(previous[0].name) if previous else None)
  sources = Sources()
  # A resumed or restored run reads its init source no more: what set-up chose from it (the
  # budget's ranks) comes from the checkpoint it restores.
  source = _restore_source(config, previous)
  fresh = source is None
  with errors.config_errors():
    resolve(config, None if fresh else source[1], sources)
  plan, mesh, pipe = mesh_and_data(config)
  with errors.config_errors():
    from_dense.check_budget(config)
    model = plan.build_model(config.model)
    if fresh:
      init_from_lib.check_init_from(config, model, sources)
    teacher = teacher_lib.check(config, plan.family, model, mesh,
                                pinned=(previous_meta or {}).get("distill_teacher"),
                                sources=sources)
    compat.check_sources(config, pipe.info, resuming=not fresh, teacher=teacher, sources=sources)
    run = _assemble(config, plan, mesh, model, pipe, teacher, Path(workdir), sources)
    if source is not None:  # every difference judged now, before anything compiles
      compat.judge_restore(source[0], source[1], run, source[2])
  logging.info("mesh %s over %d devices, %d process(es)", dict(mesh.shape), jax.device_count(),
               jax.process_count())
  metrics_lib.log(metrics_lib.overview(run.counts, run.dense_counts))
  _check_workdir(run)
  return run


def without_data(config, devices) -> Run:
  """The `Run` of ``config`` on ``devices`` (any: a TPU topology's too) with no data, workdir or
  teacher: what compiling the train step ahead of time needs (`vlora_jax.compile`). Nothing is
  read from disk; the batch comes from the family's shapes (`batch_shapes`)."""
  with errors.config_errors():
    config = schema.complete(config)
    config.lock()
    plan = validate.check(config, len(devices), 1)
    mesh = sharding.make_mesh(config.mesh, devices, shape=plan.mesh_shape)
    return _assemble(config, plan, mesh, plan.build_model(config.model), None, None, None)


def _assemble(config, plan, mesh, model, pipe, teacher, workdir, sources=None) -> Run:
  """The model's shapes, shardings, optimizer and state: no compute, nothing compiled."""
  sample = plan.family.sample_inputs(config.model, batch=2)
  init_fn = lambda rng: model.init({"params": rng, "dropout": rng}, *_zeros(sample),
                                   train=False)["params"]
  # Keys are made inside eval_shape too: nothing runs (or compiles) until every check passed.
  boxed = jax.eval_shape(lambda: init_fn(jax.random.key(config.seed)))
  p_shard = sharding.param_shardings(boxed, config.sharding_rules, mesh)
  abstract_params = nn.unbox(boxed)
  opt = optim.build(config.optim, abstract_params, int(config.num_train_steps))
  rng_impl = config.rng_impl
  abstract_rng = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0, impl=rng_impl)))
  abstract_state = jax.eval_shape(lambda p, r: state_lib.create(p, opt.tx, r), abstract_params,
                                  abstract_rng)
  specs = plan.family.stack_specs(model)
  # The data's description (vocabulary, image shape, normalisation, class names) is stored
  # with the model: a trained run is used without its data files (`vlora_jax.load`).
  extra = {"distill_teacher": str(teacher.checkpoint)} if teacher is not None else {}
  meta = fmt.build_meta(config, abstract_params, {k: v[0] for k, v in specs.items()},
                        pipe.info if pipe is not None else None, **extra)
  counts = params_lib.count(abstract_params, trainable=opt.trainable())
  return Run(config=config, workdir=workdir, main=jax.process_index() == 0, plan=plan,
             mesh=mesh, pipe=pipe, model=model, init_fn=init_fn,
             abstract_params=abstract_params, param_shardings=p_shard, opt=opt,
             abstract_state=abstract_state,
             state_shardings=state_lib.shardings(abstract_state, p_shard, mesh), counts=counts,
             dense_counts=_dense_count(model, sample, plan.vlora), meta=meta, teacher=teacher,
             sources=sources if sources is not None else Sources())


def batch_shapes(run: Run) -> dict[str, jax.ShapeDtypeStruct]:
  """A global train batch's shapes, split over the data-parallel axes: the pipeline's when the
  run has data, else the family's (`Family.example_batch`)."""
  b_shard = sharding.batch_sharding(run.mesh)
  one = (run.pipe.train_batch(0) if run.pipe is not None
         else run.family.example_batch(run.config.model, 1, np.random.default_rng(0)))
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct((run.config.batch_size,) + a.shape[1:],
                                                     a.dtype, sharding=b_shard), one)


def _check_workdir(run: Run) -> None:
  """Fails at start, not at the first save, when the workdir cannot take the checkpoints (on every
  process: process 0 checks)."""
  error = None
  if run.main:
    try:
      _check_writable(run)
    except errors.WorkdirError as e:
      error = e
  workdir_lib.raise_everywhere(error, f"workdir={str(run.workdir)!r} cannot take the run")


def _check_writable(run: Run) -> None:
  workdir = run.workdir
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    probe = workdir / f".write_test_{os.getpid()}"
    probe.write_bytes(b"\0" * 4096)
    probe.unlink()
  except OSError as e:
    raise errors.WorkdirError(f"workdir={str(workdir)!r}: cannot write there ({e.strerror or e}); "
                              "choose a writable --workdir") from e
  # Room for the kept checkpoints plus the one being written (params + optimizer state).
  ccfg = run.config.checkpoint
  need = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(run.abstract_state))
  need *= ccfg.keep + 1 + ccfg.keep_best
  free = shutil.disk_usage(workdir).free
  if free < need:
    raise errors.WorkdirError(
        f"workdir={str(workdir)!r}: {free / 2**20:.1f} MiB free, but the checkpoints need about "
        f"{need / 2**20:.1f} MiB (checkpoint.keep + 1 copies of the train state); free space, "
        "lower checkpoint.keep, or choose another --workdir")
