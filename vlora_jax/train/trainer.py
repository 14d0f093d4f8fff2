"""``train_and_evaluate(config, workdir)``: the whole training run, in labelled phases.

  0. distributed start-up (when the environment or ``config.distributed`` asks for it)
  1. validate the config (``ValueError`` naming the key), build the mesh and the data pipeline
  2. shapes: ``jax.eval_shape(init)`` (the model's VLoRA checks run here) -> shardings
  3. state: resume / explicit checkpoint / init-from / scratch (see `checkpoint.py`), born sharded
  4. the loop: jitted step with donation, metrics, NaN stop, periodic eval and checkpoints
  5. final eval, last checkpoint, ``summary.json``

Only process 0 writes metrics and the summary; every process takes part in checkpoints (Orbax
coordinates them) and returns the same summary dict.
"""

from __future__ import annotations

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
from vlora_jax import lora as lora_lib
from vlora_jax import models
from vlora_jax import params as params_lib
from vlora_jax.train import checkpoint as ckpt_lib
from vlora_jax.train import metrics as metrics_lib
from vlora_jax.train import optim, sharding, state as state_lib, tasks, validate


NonFiniteLossError = errors.NonFiniteLossError  # re-exported: part of the trainer's interface


def _config_json(config) -> dict:
  return json.loads(config.to_json_best_effort())


def _zeros(structs):
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), structs)


def _dense_count(model, sample, mcfg) -> dict | None:
  if mcfg.get("vlora") is None or not mcfg.vlora.get("enabled", True):
    return None
  try:
    shapes = params_lib.param_shapes(params_lib.dense_twin(model), *sample, train=False)
  except Exception as e:  # a model without a ``vlora`` field: no dense twin to count
    logging.warning("no dense-equivalent count: %s", e)
    return None
  return params_lib.count(shapes)


def make_train_step(model, name: str, tx, sched, label_tree, label_smoothing: float,
                    rng_impl: str = "threefry2x32"):
  """The pure train step: ``(state, batch) -> (state, metrics)``."""
  trainable = lambda tree: jax.tree.map(
      lambda x, l: x if l != optim.FROZEN else jnp.zeros_like(x), tree, label_tree)

  def step_fn(st, batch):
    rng, drop = jax.random.split(jax.random.wrap_key_data(st["rng"], impl=rng_impl))

    def loss_fn(p):
      logits = model.apply({"params": p}, *tasks.inputs(name, batch), train=True,
                           rngs={"dropout": drop})
      s = tasks.sums(name, logits, batch, label_smoothing)
      return s["loss"] / s["weight"], s

    (loss, s), grads = jax.value_and_grad(loss_fn, has_aux=True)(st["params"])
    updates, opt_state = tx.update(grads, st["opt_state"], st["params"])
    new_params = optax.apply_updates(st["params"], updates)
    m = {"train/loss": loss, "train/accuracy": s["correct"] / s["weight"],
         "train/grad_norm": optax.global_norm(trainable(grads)),
         "train/update_norm": optax.global_norm(updates),
         "train/param_norm": optax.global_norm(new_params),
         "train/lr": sched(st["step"])}
    new = {"step": st["step"] + 1, "params": new_params, "opt_state": opt_state,
           "rng": jax.random.key_data(rng)}
    return new, m

  return step_fn


def make_eval_step(model, name: str):
  def eval_fn(p, batch):
    logits = model.apply({"params": p}, *tasks.inputs(name, batch), train=False)
    return tasks.sums(name, logits, batch)
  return eval_fn


def _once_options() -> dict:
  """XLA options for programs that run once (init): on CPU, skipping LLVM's optimisations cuts
  the compile of a threefry-heavy init from ~15 s to ~3 s for a 4-layer ViT; run time is nil."""
  return {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else {}


def _check_workdir(workdir: Path, abstract_state, ccfg, main: bool) -> None:
  """Fails at start, not at the first save, when the workdir cannot take the checkpoints."""
  if not main:
    return
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    probe = workdir / f".write_test_{os.getpid()}"
    probe.write_bytes(b"\0" * 4096)
    probe.unlink()
  except OSError as e:
    raise errors.WorkdirError(f"workdir={str(workdir)!r}: cannot write there ({e.strerror or e}); "
                              "choose a writable --workdir") from e
  # Room for the kept checkpoints plus the one being written (params + optimizer state).
  need = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract_state))
  need *= ccfg.get("keep", 2) + 1 + (ccfg.get("keep_best", 0) or 0)
  free = shutil.disk_usage(workdir).free
  if free < need:
    raise errors.WorkdirError(
        f"workdir={str(workdir)!r}: {free / 2**20:.1f} MiB free, but the checkpoints need about "
        f"{need / 2**20:.1f} MiB (checkpoint.keep + 1 copies of the train state); free space, "
        "lower checkpoint.keep, or choose another --workdir")


def _compiled_bytes(compiled) -> int:
  """Temp + argument + output - alias bytes of a compiled step (0 where XLA does not say)."""
  m = compiled.memory_analysis()
  if m is None:
    return 0
  return (m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes
          - m.alias_size_in_bytes)


def _finite(m: dict) -> bool:
  return all(math.isfinite(float(m[k])) for k in ("train/loss", "train/grad_norm",
                                                   "train/param_norm"))


def train_and_evaluate(config, workdir: str | Path, *,
                       init_params: Callable[..., Any] | None = None) -> dict[str, Any]:
  """Trains and evaluates the model described by ``config``; writes into ``workdir``.

  Args:
    config: an experiment config (``configs/*.py``'s ``get_config``).
    workdir: checkpoints, ``metrics.jsonl``, TensorBoard files and ``summary.json`` go here; a
      workdir with checkpoints is resumed.
    init_params: optional ``fn(abstract_params=, config=) -> params`` used instead of random init
      when there is no checkpoint to resume (precedence 3 in `checkpoint.py`; overrides
      ``config.init_from``).

  Returns:
    The summary (also written to ``<workdir>/summary.json`` by process 0).
  """
  t_start = time.time()
  # 0. distributed start-up: must precede every other JAX call.
  sharding.maybe_initialize_distributed(config.get("distributed"))
  workdir = Path(workdir)
  pid, pcount = jax.process_index(), jax.process_count()
  main = pid == 0

  # 1-2 run under config_errors: a ValueError raised while setting up is about the input.
  with errors.config_errors():
    # 1. config, mesh, data.
    validate.check(config, jax.device_count(), pcount)
    mesh = sharding.make_mesh(config.mesh)
    pipe = data_lib.build(config, process_index=pid, process_count=pcount)
    validate.check_data(config, pipe.info)
    name = config.model.name

    # 2. shapes first: model errors surface here, before any compile.
    model = models.build(config.model)
    sample = models.sample_inputs(config.model, batch=2)
    init_fn = lambda rng: model.init({"params": rng, "dropout": rng}, *_zeros(sample),
                                     train=False)["params"]
    rng_impl = config.get("rng_impl", "threefry2x32")
    # Keys are made inside eval_shape too: nothing runs (or compiles) until every check has passed.
    boxed = jax.eval_shape(lambda: init_fn(jax.random.key(config.seed)))
    p_shard = sharding.param_shardings(boxed, config.sharding_rules, mesh)
    abstract_params = nn.unbox(boxed)
    total_steps = int(config.num_train_steps)
    tx, sched = optim.build(config.optim, abstract_params, total_steps)
    label_tree, _ = optim.groups(abstract_params, config.optim)
    abstract_rng = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0, impl=rng_impl)))
    abstract_state = jax.eval_shape(lambda p, r: state_lib.create(p, tx, r), abstract_params,
                                    abstract_rng)
    s_shard = state_lib.shardings(abstract_state, p_shard, mesh)

    spec, _ = lora_lib.stack_specs(model)  # one VLoRASpec, or one per stack (encoder/decoder)
    counts = params_lib.count(abstract_params, trainable=optim.trainable_fn(config.optim))
    dense = _dense_count(model, sample, config.model)
    meta = {"config": _config_json(config), "layout": ckpt_lib.layouts(abstract_params, spec),
            "params_total": counts["total"]}
    logging.info("mesh %s over %d devices, %d process(es)", dict(mesh.shape), jax.device_count(),
                 pcount)
    metrics_lib.log(metrics_lib.overview(counts, dense))
  _check_workdir(workdir, abstract_state, config.checkpoint, main)

  # 3. the train step, compiled ahead of time: its cost is known (and logged) before the state
  # exists, and on a CPU the allocator settings are fitted to it (vlora_jax/cpu_malloc.py).
  b_shard = sharding.batch_sharding(mesh)
  rep = sharding.replicated(mesh)
  target = ckpt_lib.abstract(abstract_state, s_shard)
  batch_struct = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct((config.batch_size,) + a.shape[1:], a.dtype,
                                     sharding=b_shard),
      pipe.train_batch(0))
  t0 = time.time()
  train_step = jax.jit(
      make_train_step(model, name, tx, sched, label_tree, config.get("label_smoothing", 0.0),
                      rng_impl),
      in_shardings=(s_shard, b_shard), out_shardings=(s_shard, rep), donate_argnums=(0,),
  ).lower(target, batch_struct).compile()
  t_compile = time.time() - t0
  step_bytes = _compiled_bytes(train_step)
  logging.info("train step compiled in %.1f s (%.2f GiB a step)", t_compile, step_bytes / 2**30)
  if jax.default_backend() == "cpu" and not cpu_malloc.fit(step_bytes) and cpu_malloc.wanted():
    logging.info("allocator: glibc defaults (the kept-memory settings cost up to twice the "
                 "step's memory)")

  # 4. the starting state, born sharded. Dropout keys may use a cheaper generator (rbg: no
  # threefry to compile; see configs/default.py); parameter init always uses threefry.
  init_key, train_key = jax.random.split(jax.random.key(config.seed))
  train_key = jax.random.key(int(jax.random.randint(train_key, (), 0, 2**31 - 1)), impl=rng_impl)
  rng_data = jax.random.key_data(train_key)
  ckpt = ckpt_lib.Checkpointer(workdir, config.checkpoint, meta)
  from_params = jax.jit(lambda p: state_lib.create(p, tx, rng_data), in_shardings=(p_shard,),
                        out_shardings=s_shard)
  origin = "scratch"
  resumed = ckpt.restore_latest(target)  # the newest checkpoint that verifies (see checkpoint.py)
  if resumed is not None:
    latest, st = resumed
    origin = f"resumed {workdir / 'checkpoints' / str(latest)}"
  elif config.checkpoint.get("restore_from"):
    st = ckpt_lib.restore_path(config.checkpoint.restore_from, target, meta)
    origin = f"restored {config.checkpoint.restore_from}"
  elif init_params is not None or config.get("init_from"):
    if init_params is not None:
      p = init_params(abstract_params=abstract_params, config=config)
      origin = "init_params callable"
    else:
      p = ckpt_lib.init_from(config.init_from, abstract_params=abstract_params, config=config,
                             meta=meta)
      origin = f"init_from {config.init_from}"
    got = jax.tree.map(lambda x: (tuple(x.shape), jnp.dtype(x.dtype)), p)
    want = jax.tree.map(lambda x: (tuple(x.shape), jnp.dtype(x.dtype)), abstract_params)
    if got != want:
      raise ckpt_lib.CheckpointError(f"{origin}: params do not match the model's shapes")
    st = from_params(jax.device_put(p, p_shard))
  else:
    init_state = jax.jit(lambda k: state_lib.create(nn.unbox(init_fn(k)), tx, rng_data),
                         out_shardings=s_shard).lower(init_key)
    st = init_state.compile(compiler_options=_once_options())(init_key)
  start = int(jax.device_get(st["step"]))
  logging.info("state: %s at step %d (%.1f s since start)", origin, start, time.time() - t_start)

  # 5. the loop.
  eval_step = jax.jit(make_eval_step(model, name), in_shardings=(p_shard, b_shard),
                      out_shardings=rep)

  def evaluate(params) -> dict[str, float]:
    acc = None
    for local in pipe.eval_batches():
      s = eval_step(params, sharding.global_batch(local, mesh))
      acc = s if acc is None else jax.tree.map(jnp.add, acc, s)
    return tasks.finalize(name, jax.device_get(acc), "eval")

  writer = metrics_lib.Writer(workdir, enabled=main, tensorboard=config.get("tensorboard", True))
  if start == 0:
    writer.text("config", "```\n" + str(config) + "\n```")
  bar = metrics_lib.Progress(total_steps, start, enabled=main and config.get("progress", True))
  tok_per_ex = pipe.info.get("tokens_per_example", 1) if name != "vit" else 1
  every_log, every_eval = config.log_every_steps, config.eval_every_steps
  window: list[dict] = []
  last_train: dict[str, float] = {}
  eval_metrics: dict[str, float] = {}
  t_eval = t_ckpt = 0.0
  t_first = None  # when the first step (the compile) finished
  t_window = time.time()

  def absorb(step_done: int, m_dev) -> None:
    """Host side of one finished step: NaN stop, progress, periodic logging."""
    nonlocal t_first, t_window, last_train
    m = {k: float(v) for k, v in jax.device_get(m_dev).items()}
    if not _finite(m):
      bar.close()
      ckpt.wait()
      writer.write(step_done, m)
      writer.close()
      raise NonFiniteLossError(
          f"non-finite training metrics at step {step_done} ({m}); stopped without saving. "
          f"Last good checkpoint: {ckpt.last_good()}")
    if t_first is None:
      t_first = time.time()
      t_window = t_first
      window.clear()
    else:
      window.append(m)
    bar.update(1, loss=m["train/loss"], acc=m["train/accuracy"])
    if step_done % every_log == 0 or step_done == total_steps:
      n = max(len(window), 1)
      avg = {k: sum(w[k] for w in window) / n for k in ("train/loss", "train/accuracy")} \
          if window else {k: m[k] for k in ("train/loss", "train/accuracy")}
      now = time.time()
      dt = now - t_window
      out = {**m, **avg, "host/peak_rss_gib": metrics_lib.peak_rss_gib()}
      if window and dt > 0:
        out["train/examples_per_sec"] = len(window) * config.batch_size / dt
        out["train/steps_per_sec"] = len(window) / dt
        if name != "vit":
          out["train/tokens_per_sec"] = out["train/examples_per_sec"] * tok_per_ex
        bar.update(0, ex_s=out["train/examples_per_sec"])
      writer.write(step_done, out)
      last_train = out
      window.clear()
      t_window = time.time()

  it = pipe.train_batches(start)
  pending = None
  step = start
  while step < total_steps:
    batch = sharding.global_batch(next(it), mesh)
    st, m = train_step(st, batch)
    if pending is not None:  # one step behind: the host reads step t-1 while t runs
      absorb(*pending)
    pending = (step + 1, m)
    step += 1
    do_eval = every_eval and (step % every_eval == 0 or step == total_steps)
    do_ckpt = step % config.checkpoint.every_steps == 0 or step == total_steps
    if do_eval or do_ckpt:
      absorb(*pending)
      pending = None
      t0 = time.time()
      if do_eval:
        eval_metrics = evaluate(st["params"])
        writer.write(step, eval_metrics)
        bar.update(0, eval_acc=eval_metrics["eval/accuracy"])
        t_eval += time.time() - t0
      t1 = time.time()
      if do_ckpt:
        ckpt.save(step, st)
      if do_eval:
        ckpt.save_best(step, st, eval_metrics)
      t_ckpt += time.time() - t1
      t_window += time.time() - t0  # throughput windows count training time only
  if pending is not None:
    absorb(*pending)
  # 6. final eval when the loop did none at the last step (eval off, or nothing left to train).
  if not eval_metrics:
    t0 = time.time()
    eval_metrics = evaluate(st["params"])
    writer.write(step, eval_metrics)
    t_eval += time.time() - t0
  bar.close()
  t1 = time.time()
  ckpt.wait()
  ckpt.close()
  t_ckpt += time.time() - t1

  t_end = time.time()
  steps_run = step - start
  timed_steps = max(steps_run - 1, 0)  # the first step includes compilation
  train_time = max((t_end - (t_first or t_end)) - t_eval - t_ckpt, 0.0)
  ex_s = timed_steps * config.batch_size / train_time if timed_steps and train_time > 0 else None
  summary = {
      "step": int(step), "start_step": start, "origin": origin,
      "params_total": counts["total"], "params_trainable": counts["trainable"],
      "params_groups": counts["groups"],
      "params_dense_equivalent": dense["total"] if dense else counts["total"],
      **eval_metrics,
      **{k: v for k, v in last_train.items() if k in ("train/loss", "train/accuracy")},
      "wall_time_s": t_end - t_start, "train_time_s": train_time,
      "compile_and_first_step_s": (t_first - t_start) if t_first else None,
      "compile_train_step_s": t_compile,
      "eval_time_s": t_eval, "checkpoint_time_s": t_ckpt,
      "examples_per_sec": ex_s,
      "tokens_per_sec": ex_s * tok_per_ex if ex_s and name != "vit" else None,
      "devices": jax.device_count(), "processes": pcount, "mesh": dict(mesh.shape),
      "batch_size": config.batch_size,
      # Of process 0, over the whole run: training, eval and checkpoint writing.
      "peak_rss_gib": metrics_lib.peak_rss_gib(),
  }
  previous = workdir / "summary.json"
  if steps_run == 0 and main and previous.exists():
    # Nothing trained now (a finished run, resumed): keep the training figures of the run that
    # did the training; the eval metrics are fresh.
    old = json.loads(previous.read_text())
    carried = ("wall_time_s", "train_time_s", "compile_and_first_step_s", "compile_train_step_s",
               "examples_per_sec", "tokens_per_sec", "train/loss", "train/accuracy")
    summary.update({k: old[k] for k in carried if k in old})
    summary["last_invocation_wall_s"] = t_end - t_start
  if main:
    ckpt_lib.write_json(workdir / "summary.json", summary)
  writer.close()
  logging.info("summary: %s", {k: v for k, v in summary.items() if k != "params_groups"})
  return summary
