"""``init_from='compress:<workdir of a trained run>'``: a VLoRA run that starts from a dense model.

The trained run's newest checkpoint (`vlora_jax.load`; a VLoRA or LoRA run is merged to its dense
weights first) is compressed into this run's VLoRA spec, stack by stack (`convert.compress`: each
stack under its own spec, e.g. a decoder's with cross-attention targets). ``config.compress``
chooses how:

  base                 first | mean | auto: each compound's base
  increments           svd | whitened | zero: the rank-r increments
  calibration_batches  for ``whitened``: this run's first train batches, run through the dense
                       model to get every targeted matrix's input second moment
                       (`convert.calibrate`)
  damping              for ``whitened``: the relative floor on that second moment's eigenvalues
  budget               > 0: ``model.vlora.rank`` is replaced, in set-up's resolution (before the
                       config is checked), by one rank per target that fits this fraction of the
                       dense parameters (`resolve_budget`)

The dense model must be this run's dense twin: the same family and the same parameter shapes, or
the error names the first leaves that differ; `check_dense_run` checks it in set-up, from the
dense run's stored config, before anything compiles.

In a run, the dense run is read through the run's `sources.Sources`: its meta once, its verified
checkpoint once, whether the budget, the check, the compression or a teacher reads it
(`check_source`, `params_for_run`: the kind ``compress`` of `init_from.KINDS`).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
from absl import logging

from vlora_jax import errors
from vlora_jax.train.sources import Sources


def _where(arg: str) -> str:
  return f"init_from='compress:{arg}'"


def check_dense_run(arg: str, *, config, model, sources: Sources | None = None) -> None:
  """Refuses, from its stored config alone, a run that ``model`` (this run's VLoRA model) cannot be
  compressed from: another family, no VLoRA stack here, LoRA here, or not this model's dense twin
  (the first differing parameter shapes are named). ``sources``: where the meta is read once."""
  from vlora_jax import models
  from vlora_jax.core.params import params_mismatch

  where = _where(arg)
  _, source = (sources or Sources()).config(arg, where)
  name = source.get("model", {}).get("name")
  if name != config.model.name:
    raise errors.CheckpointError(f"{where}: that run is a model.name={name!r}, this one a "
                                 f"model.name={config.model.name!r}")
  if not any(s for s, _ in model.stack_specs().values()):
    raise errors.CheckpointError(f"{where}: this run's model has no VLoRA stack "
                                 "(model.vlora.enabled=False): there is nothing to compress into")
  if model.lora is not None:
    raise errors.CheckpointError(f"{where}: model.lora is enabled; compression makes the VLoRA "
                                 "parameters only, so start without LoRA adapters")
  fam = models.family(name)
  sample = fam.sample_inputs(config.model, batch=1)
  dense_shapes = lambda m: jax.eval_shape(  # noqa: E731
      lambda *x: nn.unbox(m.clone(vlora=None, lora=None).init(jax.random.key(0), *x))["params"],
      *sample)
  problems = params_mismatch(dense_shapes(fam.build_from_config(source.model)),
                             dense_shapes(model))
  if problems:
    raise errors.CheckpointError(f"{where}: that run's model is not this run's dense twin: "
                                 + "; ".join(problems[:6]))


def check_source(arg: str, *, config, model, sources: Sources) -> None:
  """`check_dense_run`, once per set-up: the dense twin does not depend on the ranks, so a run
  whose budget checked the source at its configured ranks is not checked again at its resolved
  ones."""
  sources.checked("dense twin", arg,
                  lambda: check_dense_run(arg, config=config, model=model, sources=sources))


def check_budget(config) -> None:
  """Refuses ``compress.budget`` without a compress init (a ValueError: a config error): in
  set-up, once the config is checked, as the budget has nothing to choose ranks from."""
  fraction = float(config.compress.budget or 0.0)
  kind = (config.init_from or "").partition(":")[0]
  if fraction and kind != "compress":
    raise ValueError(f"compress.budget={fraction}: it chooses the ranks of a compressed dense "
                     "run; set init_from='compress:<workdir of a trained dense run>', or "
                     "compress.budget=0")


def resolve_budget(config, previous: dict | None = None, sources: Sources | None = None) -> bool:
  """``compress.budget`` f > 0: sets ``config.model.vlora.rank`` to one rank per target, the
  largest whose model has at most f of the dense run's parameters, given by residual energy
  (`convert.compress.budget_ranks_tree`, plain energies from the compress base, whatever the
  increments: for whitened increments, ranks by whitened energies were better on some probes and
  worse on others, digits and CIFAR-10 teachers, so the cheaper rule stays). The resolved
  ranks are what the run's checkpoints store: a resumed run (``previous``: the meta of its newest
  checkpoint) takes them from there, without reading the dense run again. True if it set them.

  Runs in set-up's resolution, on a complete config whose keys each passed the schema, before the
  rules between keys are checked (`validate.check`; then `check_budget` refuses a budget without a
  compress init) and the model is built: so both happen once, at the resolved ranks. The dense run is checked against the model at the configured ranks first (the dense
  twin does not depend on them) and read through ``sources``, which the compression reuses.
  Raises ValueError (a config error) for a model whose stacks do not share one spec, or when no
  ranks fit the budget.
  """
  fraction = config.compress.budget or 0.0
  if not fraction:
    return False
  kind, _, arg = (config.init_from or "").partition(":")
  if kind != "compress":
    return False  # `check_budget` refuses a budget without a compress init
  fraction = float(fraction)
  from vlora_jax import models
  from vlora_jax.convert.compress import budget_ranks_tree
  stored = ((previous or {}).get("config") or {}).get("model", {}).get("vlora", {}).get("rank")
  if stored is not None:
    config.model.vlora.rank = tuple(stored) if isinstance(stored, list) else stored
    return True
  sources = sources or Sources()
  # Built at the configured ranks for its stacks' specs and the dense twin: never initialised.
  student = models.family(config.model.name).build_from_config(config.model)
  check_source(arg, config=config, model=student, sources=sources)
  specs = {s for s, _ in student.stack_specs().values() if s is not None}
  if len(specs) != 1:
    raise ValueError(f"compress.budget={fraction}: the model's stacks have different VLoRA specs "
                     "(e.g. a decoder's cross-attention targets); give model.vlora.rank instead")
  _, dense = sources.dense(arg, _where(arg))
  base = config.compress.base
  try:
    budget = budget_ranks_tree(dense, specs.pop(), fraction,
                               base="first" if base == "auto" else base)
  except ValueError as e:
    raise ValueError(f"compress.budget={fraction}: {e}") from None
  ranks = tuple(int(budget.ranks[t]) for t in budget.spec.targets)
  config.model.vlora.rank = ranks
  logging.info("compress.budget=%s: model.vlora.rank=%s (%d params, %.1f%% of the dense %d)",
               fraction, ranks, budget.count, 100 * budget.fraction, budget.dense)
  return True


def _calibrate(config, dense_model, dense, specs, pipe=None) -> dict:
  """With ``compress.increments='whitened'``: ``{stack: {path: [L, d_in, d_in]}}``, the targeted
  matrices' input second moments over the run's first ``compress.calibration_batches`` train
  batches (`convert.calibrate`); otherwise ``{}``. ``pipe``: the whole data's pipeline, when the
  caller has it (else it is built from the config)."""
  how = config.compress
  if how.increments != "whitened":
    return {}
  from vlora_jax import data as data_lib, models
  from vlora_jax.convert import calibrate
  fam = models.family(config.model.name)
  pipe = pipe if pipe is not None else data_lib.build(config)
  batches = [fam.inputs(pipe.train_batch(i))
             for i in range(int(how.calibration_batches))]
  targets = tuple({t for s in specs if s is not None for t in s.targets})
  return calibrate.input_covariances(dense_model, dense, batches, targets=targets)


def _compress(arg: str, config, student, dense_model, dense, pipe=None) -> dict:
  """The VLoRA params of ``student``: every stack of ``dense`` compressed into its spec."""
  from vlora_jax.convert.compress import compress

  specs = {name: s for name, (s, _) in student.stack_specs().items()}
  how = config.compress
  increments = how.increments
  covariances = _calibrate(config, dense_model, dense, specs.values(), pipe)
  out = dict(dense)
  for name, spec in specs.items():
    if spec is None:
      continue
    done = compress(dense[name], spec, base=how.base, increments=increments,
                    covariances=covariances.get(name), damping=how.damping, seed=int(config.seed))
    out[name] = done.params
    said = f"weight error {np.mean(done.total):.4f}"
    if done.out_total is not None:
      said += f", output error {np.mean(done.out_total):.4f}"
    logging.info("%s: stack %r compressed (%s increments, base %s): mean relative %s", _where(arg),
                 name, increments, how.base, said)
  return out


def params_from_dense_run(arg: str, *, abstract_params, config):
  """The VLoRA params of ``config``'s model, compressed from the run in workdir ``arg``: on its
  own, outside a run (a run uses `params_for_run`)."""
  del abstract_params  # the trainer checks the result against it
  from vlora_jax import models

  student = models.family(config.model.name).build_from_config(config.model)
  sources = Sources()
  check_dense_run(arg, config=config, model=student, sources=sources)
  dense_model, dense = sources.dense(arg, _where(arg))
  return _compress(arg, config, student, dense_model, dense)


def params_for_run(arg: str, run) -> dict:
  """``init_from='compress:<arg>'`` of a built `setup.Run`: its model, its sources (the dense run
  the set-up checked, and read if the budget did), its data for the calibration (one process's
  pipeline holds the whole data; several processes each build the whole, so that every one
  compresses the same)."""
  check_source(arg, config=run.config, model=run.model, sources=run.sources)
  dense_model, dense = run.sources.dense(arg, _where(arg))
  pipe = run.pipe if jax.process_count() == 1 else None
  return _compress(arg, run.config, run.model, dense_model, dense, pipe)
