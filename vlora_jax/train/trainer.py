"""``train_and_evaluate(config, workdir)``: the whole training run, as its phases.

  set_up              (`setup.py`) the checked config (`validate.Plan`), the mesh, the
                      data, and the model's shapes: every error so far is about the input, and
                      nothing has compiled yet
  compile_train_step  the jitted train step, compiled ahead of time: its memory is known (and
                      logged) before the state exists
  start_state         resume, ``restore_from``, ``init_from`` / ``init_params``, or scratch
  Loop                (`loop.py`) the steps: metrics, NaN stop, periodic eval and checkpoints
  summarize           the summary dict and ``summary.json``

Only process 0 writes metrics and the summary; every process takes part in checkpoints (Orbax
coordinates them) and returns the same summary dict.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import flax.linen as nn
import jax
from absl import logging

from vlora_jax.platform import cpu_malloc
from vlora_jax import errors
from vlora_jax.core import partitioning
from vlora_jax.core.params import params_mismatch
from vlora_jax.train import checkpoint as ckpt_lib
from vlora_jax.train import init_from as init_from_lib
from vlora_jax.train import metrics as metrics_lib
from vlora_jax.train import schema, sharding, state as state_lib
from vlora_jax.train import workdir as workdir_lib
from vlora_jax.train.loop import Loop
from vlora_jax.train import setup as setup_lib
from vlora_jax.train.setup import Run, set_up
from vlora_jax.train.steps import make_eval_step, make_train_step

__all__ = ["NonFiniteLossError", "Run", "compile_train_step", "make_eval_step", "make_train_step",
           "set_up", "start_state", "summarize", "train_and_evaluate"]

NonFiniteLossError = errors.NonFiniteLossError  # re-exported: part of the trainer's interface


# ------------------------------------------------------------------------------------------ compile


def _compiled_bytes(compiled) -> int:
  """Temp + argument + output - alias bytes of a compiled step (0 where XLA does not say)."""
  m = compiled.memory_analysis()
  if m is None:
    return 0
  return (m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes
          - m.alias_size_in_bytes)


def lower_train_step(run: Run) -> jax.stages.Lowered:
  """The train step as training runs it, traced and lowered for the run's mesh: donated state,
  the state's and the batch's shardings, the activations pinned by ``config.activation_rules``;
  the teacher's params (distillation) an argument, never a part of the state."""
  step_fn = make_train_step(run.model, run.family, run.opt,
                            run.config.label_smoothing, run.rng_impl, run.teacher,
                            run.config.grad_accum_steps)
  batch = setup_lib.batch_shapes(run)
  in_shardings = (run.state_shardings, sharding.batch_sharding(run.mesh))
  args = (_state_target(run), batch)
  if run.teacher is not None:
    in_shardings += (run.teacher.shardings,)
    args += (ckpt_lib.abstract(run.teacher.abstract_params, run.teacher.shardings),)
  step_fn = partitioning.traced_with(step_fn, run.mesh, run.config.activation_rules)
  return jax.jit(step_fn, in_shardings=in_shardings,
                 out_shardings=(run.state_shardings, sharding.replicated(run.mesh)),
                 donate_argnums=(0,)).lower(*args)


def compile_train_step(run: Run):
  """The donated, sharded train step, compiled; on a CPU the allocator is fitted to its size
  (`vlora_jax/platform/cpu_malloc.py`). Returns ``(compiled step, compile seconds)``."""
  t0 = time.time()
  step = lower_train_step(run).compile()
  seconds = time.time() - t0
  step_bytes = _compiled_bytes(step)
  logging.info("train step compiled in %.1f s (%.2f GiB a step)", seconds, step_bytes / 2**30)
  if jax.default_backend() == "cpu" and not cpu_malloc.fit(step_bytes) and cpu_malloc.wanted():
    logging.info("allocator: glibc defaults (the kept-memory settings cost up to twice the "
                 "step's memory)")
  return step, seconds


def _state_target(run: Run):
  return ckpt_lib.abstract(run.abstract_state, run.state_shardings)


# -------------------------------------------------------------------------------------------- start


def _once_options() -> dict:
  """XLA options for programs that run once (init): on CPU, skipping LLVM's optimisations cuts
  the compile of a threefry-heavy init from ~15 s to ~3 s for a 4-layer ViT; run time is nil."""
  return {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else {}


def start_state(run: Run, ckpt: ckpt_lib.Checkpointer,
                init_params: Callable[..., Any] | None) -> tuple[Any, str]:
  """The starting train state, born sharded, and where it came from. The first that applies:

    1. the newest checkpoint of the workdir that verifies (a resume);
    2. ``checkpoint.restore_from`` (a whole train state);
    3. ``init_params`` or ``config.init_from`` (params only; a fresh optimizer);
    4. random init.
  """
  config, tx = run.config, run.opt.tx
  # Dropout keys may use a cheaper generator (rbg: no threefry to compile; see
  # configs/default.py); parameter init always uses threefry.
  init_key, train_key = jax.random.split(jax.random.key(config.seed))
  train_key = jax.random.key(int(jax.random.randint(train_key, (), 0, 2**31 - 1)),
                             impl=run.rng_impl)
  rng_data = jax.random.key_data(train_key)
  target = _state_target(run)

  resumed = ckpt.restore_latest(target)
  if resumed is not None:
    latest, st = resumed
    return st, f"resumed {run.workdir / 'checkpoints' / str(latest)}"
  if config.checkpoint.restore_from:
    st = ckpt_lib.restore_path(config.checkpoint.restore_from, target, run.meta)
    return st, f"restored {config.checkpoint.restore_from}"
  if init_params is not None or config.init_from:
    if init_params is not None:
      p = init_params(abstract_params=run.abstract_params, config=config)
      origin = "init_params callable"
    else:
      origin = f"init_from {config.init_from}"
      try:
        p = init_from_lib.params(config.init_from, run)
      except errors.UserError:
        raise
      except (ImportError, AttributeError, LookupError, OSError, TypeError, ValueError) as e:
        # The hook is named by the config: a module that does not import, a file it cannot
        # read or a value it refuses is about the input.
        raise errors.CheckpointError(f"init_from={config.init_from!r} failed: "
                                       f"{type(e).__name__}: {e}") from e
    problems = params_mismatch(p, run.abstract_params)
    if problems:
      raise errors.CheckpointError(f"{origin}: the params do not fit the model: "
                                     + "; ".join(problems[:6])
                                     + (f"; and {len(problems) - 6} more" if len(problems) > 6
                                        else ""))
    from_params = jax.jit(lambda q: state_lib.create(q, tx, rng_data),
                          in_shardings=(run.param_shardings,), out_shardings=run.state_shardings)
    return from_params(jax.device_put(p, run.param_shardings)), origin
  init_state = jax.jit(lambda k: state_lib.create(nn.unbox(run.init_fn(k)), tx, rng_data),
                       out_shardings=run.state_shardings).lower(init_key)
  return init_state.compile(compiler_options=_once_options())(init_key), "scratch"


# ------------------------------------------------------------------------------------------ summary


def _init_row(run: Run) -> dict:
  """``init/*``: the step-0 evaluation of a model given to start from, as ``metrics.jsonl``
  holds it (a resumed run did it before it was stopped); empty for a run from scratch."""
  path = run.workdir / "metrics.jsonl"
  if not run.main or not path.exists():
    return {}
  for line in path.read_text().splitlines():
    try:
      row = json.loads(line)
    except ValueError:
      continue
    if row.get("step") == 0 and any(k.startswith("eval/") for k in row):
      return {f"init/{k}": v for k, v in row.items() if k.startswith(("eval/", "test/"))}
  return {}



def summarize(run: Run, loop: Loop, origin: str, t_start: float, t_compile: float) -> dict:
  """The run's summary; process 0 writes it to ``<workdir>/summary.json``."""
  config = run.config
  t_end = time.time()
  steps_run = loop.step - loop.start
  timed_steps = max(steps_run - 1, 0)  # the first step includes compilation
  train_time = max((t_end - (loop.t_first or t_end)) - loop.t_eval - loop.t_ckpt, 0.0)
  ex_s = timed_steps * config.batch_size / train_time if timed_steps and train_time > 0 else None
  tok = loop.tokens_per_example
  dense = run.dense_counts or run.counts
  summary = {
      "step": int(loop.step), "start_step": loop.start, "origin": origin,
      "params_total": run.counts["total"], "params_trainable": run.counts["trainable"],
      "params_groups": run.counts["groups"],
      "params_dense_equivalent": dense["total"],
      "eval_split": run.pipe.eval_split,  # what eval/* measured; test/* is the test split
      **loop.eval_metrics, **loop.test_metrics, **(loop.init_metrics or _init_row(run)),
      **{k: v for k, v in loop.last_train.items() if k in ("train/loss", "train/accuracy")},
      "wall_time_s": t_end - t_start, "train_time_s": train_time,
      "compile_and_first_step_s": (loop.t_first - t_start) if loop.t_first else None,
      "compile_train_step_s": t_compile,
      "eval_time_s": loop.t_eval, "checkpoint_time_s": loop.t_ckpt,
      "examples_per_sec": ex_s,
      "tokens_per_sec": ex_s * tok if ex_s and tok else None,
      "devices": jax.device_count(), "processes": jax.process_count(),
      "mesh": dict(run.mesh.shape), "batch_size": config.batch_size,
      # Of process 0, over the whole run: training, eval and checkpoint writing.
      "peak_rss_gib": metrics_lib.peak_rss_gib(),
  }
  previous = run.workdir / "summary.json"
  if steps_run == 0 and run.main and previous.exists():
    # Nothing trained now (a finished run, resumed): keep the training figures of the run that
    # did the training; the eval metrics are fresh.
    old = json.loads(previous.read_text())
    carried = ("wall_time_s", "train_time_s", "compile_and_first_step_s", "compile_train_step_s",
               "examples_per_sec", "tokens_per_sec", "train/loss", "train/accuracy")
    summary.update({k: old[k] for k in carried if k in old})
    summary["last_invocation_wall_s"] = t_end - t_start
  if run.main:
    metrics_lib.write_json(run.workdir / "summary.json", summary)
  return summary


# ------------------------------------------------------------------------------------------ the run


def train_and_evaluate(config, workdir: str | Path, *,
                       init_params: Callable[..., Any] | None = None) -> dict[str, Any]:
  """Trains and evaluates the model described by ``config``; writes into ``workdir``.

  Args:
    config: an experiment config (``configs/*.py``'s ``get_config``).
    workdir: checkpoints, ``metrics.jsonl``, TensorBoard files and ``summary.json`` go here; a
      workdir with checkpoints is resumed.
    init_params: optional ``fn(abstract_params=, config=) -> params`` used instead of random init
      when there is no checkpoint to resume (`start_state`; overrides ``config.init_from``).

  Returns:
    The summary (also written to ``<workdir>/summary.json`` by process 0).
  """
  t_start = time.time()
  if workdir is None or not str(workdir).strip():  # Path('') is the current directory
    raise errors.WorkdirError(f"workdir={str(workdir or '')!r}: empty; give the run's directory")
  config = schema.complete(config)
  sharding.maybe_initialize_distributed(config.distributed.initialize)  # before any other JAX call
  run = set_up(config, Path(workdir))
  # From here the workdir is this run's alone (`workdir.py`): a second run is refused before it
  # writes anything. set_up wrote only a probe file named by its pid, already deleted.
  with workdir_lib.hold(run.workdir, run.main):
    if run.main:  # what this run was told, readable without vlora_jax (the checkpoints hold it too)
      metrics_lib.write_json(run.workdir / "config.json", run.meta["config"])
    train_step, t_compile = compile_train_step(run)
    ckpt = ckpt_lib.Checkpointer.of_config(run.workdir, run.config.checkpoint, run.meta)
    loop = None
    try:
      st, origin = start_state(run, ckpt, init_params)
      run.sources.release()  # the other runs' arrays: the teacher keeps its own
      start = int(jax.device_get(st["step"]))
      logging.info("state: %s at step %d (%.1f s since start)", origin, start,
                   time.time() - t_start)
      if start >= run.total_steps:
        logging.info("the run in %s is complete (step %d of %d): evaluating its final state only",
                     run.workdir, start, run.total_steps)
      if run.teacher is not None and start < run.total_steps:  # a finished run only evaluates
        teacher_params = run.teacher.load()
        logging.info("distilling from %s (weight %g, temperature %g)", run.teacher.checkpoint,
                     run.teacher.weight, run.teacher.temperature)
        compiled = train_step
        train_step = lambda st, batch: compiled(st, batch, teacher_params)
      # A model the config names to start from (a compressed dense run, an import, another
      # run's checkpoint) is measured first.
      loop = Loop(run, train_step, ckpt, start, evaluate_start=origin.startswith("init_from"))
      loop(st)
      summary = summarize(run, loop, origin, t_start, t_compile)
    except BaseException:
      # Before the lock goes: the save in flight finishes (its failure is logged; the error in
      # flight is the one reported) and the files close, so no later run meets this one's writes.
      try:
        ckpt.close()
      except Exception as e:  # noqa: BLE001
        logging.error("%s", e)
      if loop is not None:
        loop.writer.close()
      raise
    loop.writer.close()
  logging.info("summary: %s", {k: v for k, v in summary.items() if k != "params_groups"})
  return summary
