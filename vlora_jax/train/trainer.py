"""``train_and_evaluate(config, workdir)``: the whole training run, as its phases.

  set_up              distributed start-up, the checked config (`validate.Plan`), the mesh, the
                      data, and the model's shapes: every error so far is about the input, and
                      nothing has compiled yet
  compile_train_step  the jitted train step, compiled ahead of time: its memory is known (and
                      logged) before the state exists
  start_state         resume, ``restore_from``, ``init_from`` / ``init_params``, or scratch
  Loop                the steps: metrics, NaN stop, periodic eval and checkpoints
  summarize           the summary dict and ``summary.json``

Only process 0 writes metrics and the summary; every process takes part in checkpoints (Orbax
coordinates them) and returns the same summary dict.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from absl import logging

from vlora_jax import cpu_malloc
from vlora_jax import data as data_lib
from vlora_jax import errors
from vlora_jax import params as params_lib
from vlora_jax.data.pipeline import Pipeline
from vlora_jax.models.family import Family
from vlora_jax.train import checkpoint as ckpt_lib
from vlora_jax.train import metrics as metrics_lib
from vlora_jax.train import optim, sharding, state as state_lib, validate


NonFiniteLossError = errors.NonFiniteLossError  # re-exported: part of the trainer's interface


def make_train_step(model, family: Family, opt: optim.Optimizer, label_smoothing: float,
                    rng_impl: str = "threefry2x32"):
  """The pure train step: ``(state, batch) -> (state, metrics)``."""

  def step_fn(st, batch):
    rng, drop = jax.random.split(jax.random.wrap_key_data(st["rng"], impl=rng_impl))

    def loss_fn(p):
      logits = model.apply({"params": p}, *family.inputs(batch), train=True,
                           rngs={"dropout": drop})
      s = family.sums(logits, batch, label_smoothing)
      return s["loss"] / s["weight"], s

    (loss, s), grads = jax.value_and_grad(loss_fn, has_aux=True)(st["params"])
    updates, opt_state = opt.tx.update(grads, st["opt_state"], st["params"])
    new_params = optax.apply_updates(st["params"], updates)
    m = {"train/loss": loss, "train/accuracy": s["correct"] / s["weight"],
         "train/grad_norm": optax.global_norm(optim.zero_frozen(grads, opt.labels)),
         "train/update_norm": optax.global_norm(updates),
         "train/param_norm": optax.global_norm(new_params),
         "train/lr": opt.schedule(st["step"])}
    new = {"step": st["step"] + 1, "params": new_params, "opt_state": opt_state,
           "rng": jax.random.key_data(rng)}
    return new, m

  return step_fn


def make_eval_step(model, family: Family):
  def eval_fn(p, batch):
    logits = model.apply({"params": p}, *family.inputs(batch), train=False)
    return family.sums(logits, batch)
  return eval_fn


# ------------------------------------------------------------------------------------- set up


@dataclasses.dataclass
class Run:
  """What `set_up` built from the config: read by every later phase."""
  config: Any
  workdir: Path
  main: bool  # process 0: writes metrics and the summary
  plan: validate.Plan
  mesh: jax.sharding.Mesh
  pipe: Pipeline
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

  @property
  def family(self) -> Family:
    return self.plan.family

  @property
  def total_steps(self) -> int:
    return int(self.config.num_train_steps)

  @property
  def rng_impl(self) -> str:
    return self.config.get("rng_impl", "threefry2x32")


def _zeros(structs):
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), structs)


def _dense_count(model, sample, vlora) -> dict | None:
  if vlora is None:
    return None
  return params_lib.count(params_lib.param_shapes(params_lib.dense_twin(model), *sample,
                                                  train=False))


def set_up(config, workdir: Path) -> Run:
  """Checks the config, builds the mesh, the data and the model's shapes (no compile).

  Every ValueError raised here is about the input: it leaves as a `ConfigError` or `DataError`.
  """
  pcount = jax.process_count()
  with errors.config_errors():
    plan = validate.check(config, jax.device_count(), pcount)
    mesh = sharding.make_mesh(config.mesh, shape=plan.mesh_shape)
    pipe = data_lib.build(config, process_index=jax.process_index(), process_count=pcount)
    plan.family.check_data(config.model, pipe.info)

    model = plan.build_model(config.model)
    sample = plan.family.sample_inputs(config.model, batch=2)
    init_fn = lambda rng: model.init({"params": rng, "dropout": rng}, *_zeros(sample),
                                     train=False)["params"]
    # Keys are made inside eval_shape too: nothing runs (or compiles) until every check passed.
    boxed = jax.eval_shape(lambda: init_fn(jax.random.key(config.seed)))
    p_shard = sharding.param_shardings(boxed, config.sharding_rules, mesh)
    abstract_params = nn.unbox(boxed)
    opt = optim.build(config.optim, abstract_params, int(config.num_train_steps))
    rng_impl = config.get("rng_impl", "threefry2x32")
    abstract_rng = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0, impl=rng_impl)))
    abstract_state = jax.eval_shape(lambda p, r: state_lib.create(p, opt.tx, r), abstract_params,
                                    abstract_rng)
    specs = plan.family.stack_specs(model)
    meta = {"config": json.loads(config.to_json_best_effort()),
            "layout": ckpt_lib.layouts(abstract_params, {k: v[0] for k, v in specs.items()})}
    counts = params_lib.count(abstract_params, trainable=opt.trainable())
    meta["params_total"] = counts["total"]
    run = Run(config=config, workdir=Path(workdir), main=jax.process_index() == 0, plan=plan,
              mesh=mesh, pipe=pipe, model=model, init_fn=init_fn,
              abstract_params=abstract_params, param_shardings=p_shard, opt=opt,
              abstract_state=abstract_state,
              state_shardings=state_lib.shardings(abstract_state, p_shard, mesh), counts=counts,
              dense_counts=_dense_count(model, sample, plan.vlora), meta=meta)
  logging.info("mesh %s over %d devices, %d process(es)", dict(mesh.shape), jax.device_count(),
               pcount)
  metrics_lib.log(metrics_lib.overview(counts, run.dense_counts))
  _check_workdir(run)
  return run


def _check_workdir(run: Run) -> None:
  """Fails at start, not at the first save, when the workdir cannot take the checkpoints."""
  if not run.main:
    return
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
  need *= ccfg.get("keep", 2) + 1 + (ccfg.get("keep_best", 0) or 0)
  free = shutil.disk_usage(workdir).free
  if free < need:
    raise errors.WorkdirError(
        f"workdir={str(workdir)!r}: {free / 2**20:.1f} MiB free, but the checkpoints need about "
        f"{need / 2**20:.1f} MiB (checkpoint.keep + 1 copies of the train state); free space, "
        "lower checkpoint.keep, or choose another --workdir")


# ------------------------------------------------------------------------------------- compile


def _compiled_bytes(compiled) -> int:
  """Temp + argument + output - alias bytes of a compiled step (0 where XLA does not say)."""
  m = compiled.memory_analysis()
  if m is None:
    return 0
  return (m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes
          - m.alias_size_in_bytes)


def compile_train_step(run: Run):
  """The donated, sharded train step, compiled; on a CPU the allocator is fitted to its size
  (`vlora_jax/cpu_malloc.py`). Returns ``(compiled step, compile seconds)``."""
  b_shard = sharding.batch_sharding(run.mesh)
  batch_struct = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct((run.config.batch_size,) + a.shape[1:], a.dtype,
                                     sharding=b_shard),
      run.pipe.train_batch(0))
  step_fn = make_train_step(run.model, run.family, run.opt,
                            run.config.get("label_smoothing", 0.0), run.rng_impl)
  t0 = time.time()
  step = jax.jit(step_fn, in_shardings=(run.state_shardings, b_shard),
                 out_shardings=(run.state_shardings, sharding.replicated(run.mesh)),
                 donate_argnums=(0,)).lower(_state_target(run), batch_struct).compile()
  seconds = time.time() - t0
  step_bytes = _compiled_bytes(step)
  logging.info("train step compiled in %.1f s (%.2f GiB a step)", seconds, step_bytes / 2**30)
  if jax.default_backend() == "cpu" and not cpu_malloc.fit(step_bytes) and cpu_malloc.wanted():
    logging.info("allocator: glibc defaults (the kept-memory settings cost up to twice the "
                 "step's memory)")
  return step, seconds


def _state_target(run: Run):
  return ckpt_lib.abstract(run.abstract_state, run.state_shardings)


# ------------------------------------------------------------------------------------- start


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
  if config.checkpoint.get("restore_from"):
    st = ckpt_lib.restore_path(config.checkpoint.restore_from, target, run.meta)
    return st, f"restored {config.checkpoint.restore_from}"
  if init_params is not None or config.get("init_from"):
    if init_params is not None:
      p = init_params(abstract_params=run.abstract_params, config=config)
      origin = "init_params callable"
    else:
      p = ckpt_lib.init_from(config.init_from, abstract_params=run.abstract_params,
                             config=config, meta=run.meta)
      origin = f"init_from {config.init_from}"
    got = jax.tree.map(lambda x: (tuple(x.shape), jnp.dtype(x.dtype)), p)
    want = jax.tree.map(lambda x: (tuple(x.shape), jnp.dtype(x.dtype)), run.abstract_params)
    if got != want:
      raise ckpt_lib.CheckpointError(f"{origin}: params do not match the model's shapes")
    from_params = jax.jit(lambda q: state_lib.create(q, tx, rng_data),
                          in_shardings=(run.param_shardings,), out_shardings=run.state_shardings)
    return from_params(jax.device_put(p, run.param_shardings)), origin
  init_state = jax.jit(lambda k: state_lib.create(nn.unbox(run.init_fn(k)), tx, rng_data),
                       out_shardings=run.state_shardings).lower(init_key)
  return init_state.compile(compiler_options=_once_options())(init_key), "scratch"


# ------------------------------------------------------------------------------------- loop


def _finite(m: dict) -> bool:
  return all(math.isfinite(float(m[k])) for k in ("train/loss", "train/grad_norm",
                                                   "train/param_norm"))


class Loop:
  """The steps from ``start`` to ``config.num_train_steps``, with what they report.

  The host reads each step's metrics one step late (while the next one runs). Throughput windows
  count training time only: eval and checkpoint time are taken out.
  """

  def __init__(self, run: Run, train_step, ckpt: ckpt_lib.Checkpointer, start: int):
    self.run, self.train_step, self.ckpt, self.start = run, train_step, ckpt, start
    config = run.config
    self.writer = metrics_lib.Writer(run.workdir, enabled=run.main,
                                     tensorboard=config.get("tensorboard", True))
    if start == 0:
      self.writer.text("config", "```\n" + str(config) + "\n```")
    # A finished run that is started again only evaluates: no bar of finished steps.
    self.bar = metrics_lib.Progress(run.total_steps, start,
                                    enabled=(run.main and config.get("progress", True)
                                             and start < run.total_steps))
    self.tokens_per_example = run.family.tokens_per_example(run.pipe.info)
    self.eval_step = jax.jit(make_eval_step(run.model, run.family),
                             in_shardings=(run.param_shardings, sharding.batch_sharding(run.mesh)),
                             out_shardings=sharding.replicated(run.mesh))
    self.window: list[dict] = []
    self.last_train: dict[str, float] = {}
    self.eval_metrics: dict[str, float] = {}
    self.t_eval = self.t_ckpt = 0.0
    self.t_first: float | None = None  # when the first step (the compile) finished
    self.t_window = time.time()
    self.step = start

  def evaluate(self, params) -> dict[str, float]:
    acc = None
    for local in self.run.pipe.eval_batches():
      s = self.eval_step(params, sharding.global_batch(local, self.run.mesh))
      acc = s if acc is None else jax.tree.map(jnp.add, acc, s)
    return self.run.family.finalize(jax.device_get(acc), "eval")

  def absorb(self, step_done: int, m_dev) -> None:
    """Host side of one finished step: NaN stop, progress, periodic logging."""
    m = {k: float(v) for k, v in jax.device_get(m_dev).items()}
    if not _finite(m):
      self.bar.close()
      self.ckpt.wait()
      self.writer.write(step_done, m)
      self.writer.close()
      raise NonFiniteLossError(
          f"non-finite training metrics at step {step_done} ({m}); stopped without saving. "
          f"Last good checkpoint: {self.ckpt.last_good()}")
    if self.t_first is None:
      self.t_first = self.t_window = time.time()
      self.window.clear()
    else:
      self.window.append(m)
    self.bar.update(1, loss=m["train/loss"], acc=m["train/accuracy"])
    if step_done % self.run.config.log_every_steps == 0 or step_done == self.run.total_steps:
      self._log_window(step_done, m)

  def _log_window(self, step_done: int, m: dict) -> None:
    keys = ("train/loss", "train/accuracy")
    n = max(len(self.window), 1)
    avg = ({k: sum(w[k] for w in self.window) / n for k in keys} if self.window
           else {k: m[k] for k in keys})
    dt = time.time() - self.t_window
    out = {**m, **avg, "host/peak_rss_gib": metrics_lib.peak_rss_gib()}
    if self.window and dt > 0:
      out["train/examples_per_sec"] = len(self.window) * self.run.config.batch_size / dt
      out["train/steps_per_sec"] = len(self.window) / dt
      if self.tokens_per_example:
        out["train/tokens_per_sec"] = out["train/examples_per_sec"] * self.tokens_per_example
      self.bar.update(0, ex_s=out["train/examples_per_sec"])
    self.writer.write(step_done, out)
    self.last_train = out
    self.window.clear()
    self.t_window = time.time()

  def eval_and_save(self, st, do_eval: bool, do_ckpt: bool) -> None:
    t0 = time.time()
    if do_eval:
      self.eval_metrics = self.evaluate(st["params"])
      self.writer.write(self.step, self.eval_metrics)
      self.bar.update(0, eval_acc=self.eval_metrics["eval/accuracy"])
      self.t_eval += time.time() - t0
    t1 = time.time()
    if do_ckpt:
      self.ckpt.save(self.step, st)
    if do_eval:
      self.ckpt.save_best(self.step, st, self.eval_metrics)
    self.t_ckpt += time.time() - t1
    self.t_window += time.time() - t0

  def __call__(self, st):
    """Trains to the last step, then evaluates if the loop did not at that step; returns the
    final state."""
    config, mesh = self.run.config, self.run.mesh
    every_eval = config.eval_every_steps
    it = self.run.pipe.train_batches(self.start)
    pending = None
    while self.step < self.run.total_steps:
      st, m = self.train_step(st, sharding.global_batch(next(it), mesh))
      if pending is not None:  # one step behind: the host reads step t-1 while t runs
        self.absorb(*pending)
      self.step += 1
      pending = (self.step, m)
      do_eval = bool(every_eval) and (self.step % every_eval == 0
                                      or self.step == self.run.total_steps)
      do_ckpt = (self.step % config.checkpoint.every_steps == 0
                 or self.step == self.run.total_steps)
      if do_eval or do_ckpt:
        self.absorb(*pending)
        pending = None
        self.eval_and_save(st, do_eval, do_ckpt)
    if pending is not None:
      self.absorb(*pending)
    if not self.eval_metrics:  # eval off, or nothing left to train
      t0 = time.time()
      self.eval_metrics = self.evaluate(st["params"])
      self.writer.write(self.step, self.eval_metrics)
      self.t_eval += time.time() - t0
    self.bar.close()
    t1 = time.time()
    self.ckpt.wait()
    self.ckpt.close()
    self.t_ckpt += time.time() - t1
    return st


# ------------------------------------------------------------------------------------- summary


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
      **loop.eval_metrics,
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


# ------------------------------------------------------------------------------------- the run


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
  sharding.maybe_initialize_distributed(config.get("distributed"))  # before any other JAX call
  run = set_up(config, Path(workdir))
  train_step, t_compile = compile_train_step(run)
  ckpt = ckpt_lib.Checkpointer(run.workdir, config.checkpoint, run.meta)
  st, origin = start_state(run, ckpt, init_params)
  start = int(jax.device_get(st["step"]))
  logging.info("state: %s at step %d (%.1f s since start)", origin, start, time.time() - t_start)
  if start >= run.total_steps:
    logging.info("the run in %s is complete (step %d of %d): evaluating its final state only",
                 run.workdir, start, run.total_steps)
  loop = Loop(run, train_step, ckpt, start)
  loop(st)
  summary = summarize(run, loop, origin, t_start, t_compile)
  loop.writer.close()
  logging.info("summary: %s", {k: v for k, v in summary.items() if k != "params_groups"})
  return summary
