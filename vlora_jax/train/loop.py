"""The steps of a run, from its start to ``config.num_train_steps``, and what they report.

Periodic evaluations read the data's eval split (validation unless the config says otherwise),
and so does ``best/``; the test split is evaluated once, after the last step (``test/*``). A run
that starts from given weights (``init_from``: a compressed or imported model) is evaluated at
step 0 too, before it trains (``init/eval/*``, ``init/test/*``).
"""

from __future__ import annotations

import math
import time

import jax

from vlora_jax import errors
from vlora_jax.train import checkpoint as ckpt_lib
from vlora_jax.train import evaluation
from vlora_jax.train import metrics as metrics_lib
from vlora_jax.train import preemption, sharding
from vlora_jax.train.setup import Run

NonFiniteLossError = errors.NonFiniteLossError


def _finite(m: dict) -> bool:
  return all(math.isfinite(float(m[k])) for k in ("train/loss", "train/grad_norm",
                                                   "train/param_norm"))


class Loop:
  """The steps from ``start`` to ``config.num_train_steps``, with what they report.

  The host reads each step's metrics one step late (while the next one runs). Throughput windows
  count training time only: eval and checkpoint time are taken out.
  """

  def __init__(self, run: Run, train_step, ckpt: ckpt_lib.Checkpointer, start: int,
               evaluate_start: bool = False):
    self.run, self.train_step, self.ckpt, self.start = run, train_step, ckpt, start
    # With no step to train, the final evaluation is the step-0 one: it is not done twice.
    self.evaluate_start = evaluate_start and start == 0 < run.total_steps
    config = run.config
    # A resumed run first drops the rows it writes again (a finished run: its eval at `start`).
    self.writer = metrics_lib.Writer(run.workdir, enabled=run.main,
                                     tensorboard=config.tensorboard,
                                     resume_step=start, redo_eval=start >= run.total_steps)
    if start == 0:
      self.writer.text("config", "```\n" + str(config) + "\n```")
    # A finished run that is started again only evaluates: no bar of finished steps.
    self.bar = metrics_lib.Progress(run.total_steps, start,
                                    enabled=(run.main and config.progress
                                             and start < run.total_steps))
    self.tokens_per_example = run.family.tokens_per_example(run.pipe.info)
    self.eval_step = evaluation.jit_step(run.model, run.family, run.mesh, run.param_shardings,
                                         run.config.activation_rules)
    self.window: list[dict] = []
    self.last_train: dict[str, float] = {}
    self.eval_metrics: dict[str, float] = {}
    self.test_metrics: dict[str, float] = {}
    self.init_metrics: dict[str, float] = {}
    self.t_eval = self.t_ckpt = 0.0
    self.t_first: float | None = None  # when the first step (the compile) finished
    self.t_window = time.time()
    self.step = start

  def evaluate(self, params, split: str | None = None, prefix: str = "eval") -> dict[str, float]:
    return evaluation.evaluate(self.eval_step, self.run.family, params, self.run.pipe,
                               self.run.mesh, split=split, prefix=prefix)

  def evaluate_test(self, params) -> dict[str, float]:
    """The test split's metrics (``test/*``): the eval split's own where that is the test split,
    none where the data hold no test split (a text source with ``data.test_fraction=0``)."""
    if "test" not in self.run.pipe.eval_splits:
      return {}
    if self.run.pipe.eval_split == "test" and self.eval_metrics:
      return {"test/" + k[len("eval/"):]: v for k, v in self.eval_metrics.items()}
    return self.evaluate(params, "test", "test")

  def evaluate_init(self, params) -> None:
    """The starting model's metrics at step 0 (``init/eval/*``, ``init/test/*``), before any
    training: what a compressed or imported model was worth before it trained."""
    t0 = time.time()
    m = self.evaluate(params)
    if self.run.pipe.eval_split == "test":
      m.update({"test/" + k[len("eval/"):]: v for k, v in m.items()})
    elif "test" in self.run.pipe.eval_splits:
      m.update(self.evaluate(params, "test", "test"))
    self.writer.write(0, m)
    self.init_metrics = {f"init/{k}": v for k, v in m.items()}
    self.t_eval += time.time() - t0

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
    final state. On SIGTERM / SIGINT it saves after the current step and raises `Preempted`."""
    config, mesh = self.run.config, self.run.mesh
    every_eval = config.eval_every_steps
    if self.evaluate_start:
      self.evaluate_init(st["params"])
    it = self.run.pipe.train_batches(self.start)
    pending = None
    with preemption.Watcher() as watcher:
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
        if self.step < self.run.total_steps and watcher.requested(self.step):
          if pending is not None:
            self.absorb(*pending)
          self.stop(st, saved=do_ckpt, signal_name=watcher.signal_name)
    if pending is not None:
      self.absorb(*pending)
    t0 = time.time()
    if not self.eval_metrics:  # eval off, or nothing left to train
      self.eval_metrics = self.evaluate(st["params"])
      self.writer.write(self.step, self.eval_metrics)
    self.test_metrics = self.evaluate_test(st["params"])  # once, at the end
    if self.test_metrics:  # data without a test split have none
      self.writer.write(self.step, self.test_metrics)
    self.t_eval += time.time() - t0
    self.bar.close()
    t1 = time.time()
    self.ckpt.wait()
    self.ckpt.close()
    self.t_ckpt += time.time() - t1
    return st

  def stop(self, st, saved: bool, signal_name: str):
    """Preempted: the state after this step is saved (unless it just was) and written to disk
    before `Preempted` leaves; the metrics so far are on disk."""
    self.bar.close()
    if not saved:
      self.ckpt.save(self.step, st)
    self.ckpt.wait()
    where = self.ckpt.last_good()
    self.ckpt.close()
    self.writer.close()
    raise errors.Preempted(self.step, signal_name, where)
