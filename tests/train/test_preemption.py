"""SIGTERM / SIGINT: the run finishes its step, saves, exits 75; the rerun loses no step and ends
bitwise-equal to an uninterrupted run. A second signal exits at once.

The trials send real signals to this process (the handler runs in the main thread, as in a
launch) at steps drawn from a seeded generator, one of them in the middle of a save; one test
preempts the command line in a subprocess.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers_train import ROOT, tiny

from vlora_jax import errors
from vlora_jax.runs import checkpoint_format
from vlora_jax.train import checkpoint as ckpt_lib
from vlora_jax.train import loop as loop_lib
from vlora_jax.train import preemption, train_and_evaluate

STEPS = 12


def _config():
  return tiny("vit", num_train_steps=STEPS, **{"checkpoint.every_steps": 5})


def _params(workdir):
  return checkpoint_format.read_path(str(workdir))["params"]


def _same_bits(a, b) -> bool:
  import jax
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(la) == len(lb) and all(np.array_equal(np.asarray(x).view(np.uint8),
                                                   np.asarray(y).view(np.uint8))
                                    for x, y in zip(la, lb))


def _metric_steps(workdir) -> list[int]:
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return [r["step"] for r in rows if "train/loss" in r]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  wd = tmp_path_factory.mktemp("straight")
  train_and_evaluate(_config(), wd)
  return _params(wd)


# Seeded "random" steps: two SIGTERMs and a SIGINT.
_RNG = random.Random(18)
TRIALS = [(signal.SIGTERM, _RNG.randint(1, STEPS - 2)), (signal.SIGINT, _RNG.randint(1, STEPS - 2)),
          (signal.SIGTERM, _RNG.randint(1, STEPS - 2))]


@pytest.mark.parametrize("sig,at", TRIALS, ids=[f"{s.name}@{a}" for s, a in TRIALS])
def test_signal_saves_and_the_rerun_is_bitwise_equal(sig, at, straight, tmp_path, monkeypatch):
  absorb = loop_lib.Loop.absorb

  def absorb_then_signal(self, step_done, m):
    absorb(self, step_done, m)
    if step_done == at:
      os.kill(os.getpid(), sig)

  monkeypatch.setattr(loop_lib.Loop, "absorb", absorb_then_signal)
  before = signal.getsignal(sig)
  with pytest.raises(errors.Preempted) as info:
    train_and_evaluate(_config(), tmp_path)
  stopped = info.value.step
  assert at <= stopped <= at + 2, (at, stopped)  # the step in flight finishes, nothing more
  assert info.value.signal_name == sig.name
  assert (tmp_path / "checkpoints" / str(stopped)).is_dir()  # saved at the step it stopped
  assert signal.getsignal(sig) is before  # the handler in place before the run is back

  monkeypatch.setattr(loop_lib.Loop, "absorb", absorb)
  summary = train_and_evaluate(_config(), tmp_path)
  assert summary["start_step"] == stopped and summary["step"] == STEPS
  assert _same_bits(_params(tmp_path), straight)
  steps = _metric_steps(tmp_path)
  assert steps == sorted(set(steps)) and steps[-1] == STEPS, steps  # no step lost or twice


def test_signal_during_a_save(straight, tmp_path, monkeypatch):
  save = ckpt_lib.Checkpointer.save

  def signal_then_save(self, step, state):
    if step == 5:  # the interval save: the signal arrives while it is being written
      os.kill(os.getpid(), signal.SIGTERM)
    return save(self, step, state)

  monkeypatch.setattr(ckpt_lib.Checkpointer, "save", signal_then_save)
  with pytest.raises(errors.Preempted) as info:
    train_and_evaluate(_config(), tmp_path)
  assert info.value.step == 5
  monkeypatch.setattr(ckpt_lib.Checkpointer, "save", save)
  assert train_and_evaluate(_config(), tmp_path)["start_step"] == 5
  assert _same_bits(_params(tmp_path), straight)


def test_a_second_signal_exits_at_once(monkeypatch):
  exits = []
  monkeypatch.setattr(os, "_exit", lambda code: exits.append(code))
  with preemption.Watcher() as w:
    w._handle(signal.SIGTERM, None)
    assert w.requested(3) and not exits
    w._handle(signal.SIGINT, None)
  assert exits == [128 + signal.SIGINT]


def test_a_signal_after_the_last_step_lets_the_run_finish(tmp_path, monkeypatch):
  absorb = loop_lib.Loop.absorb

  def absorb_then_signal(self, step_done, m):
    absorb(self, step_done, m)
    if step_done == 2:
      os.kill(os.getpid(), signal.SIGTERM)

  monkeypatch.setattr(loop_lib.Loop, "absorb", absorb_then_signal)
  assert train_and_evaluate(tiny("vit"), tmp_path)["step"] == 2  # 2 is the last step


TINY_FLAGS = ["--config.model.dim=16", "--config.model.depth=2", "--config.model.num_heads=2",
              "--config.model.vlora.compound_size=2", "--config.model.vlora.rank=2",
              "--config.batch_size=16", "--config.eval_batch_size=32",
              "--config.data.eval_examples=64", "--config.optim.warmup_steps=1",
              "--config.log_every_steps=1", "--config.eval_every_steps=0",
              "--config.checkpoint.keep_best=0", "--config.checkpoint.every_steps=100000",
              "--config.progress=False", "--config.tensorboard=False"]


@pytest.mark.slow
def test_the_command_line_exits_75_and_the_rerun_resumes(tmp_path):
  cmd = [sys.executable, "-m", "vlora_jax.main", "--config=configs/vit_digits.py",
         f"--workdir={tmp_path}", "--config.num_train_steps=100000", *TINY_FLAGS]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  metrics = tmp_path / "metrics.jsonl"
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
      break
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=240)
  assert proc.returncode == preemption.EXIT_PREEMPTED, err[-3000:]
  assert "Traceback" not in err
  last = err.strip().splitlines()[-1]
  assert last.startswith("vlora-train: stopped by SIGTERM after step "), last
  stopped = int(last.split("after step ")[1].split(";")[0])
  assert (tmp_path / "checkpoints" / str(stopped)).is_dir()

  # The rerun: the same command with the end moved near, so that it finishes.
  cmd[-len(TINY_FLAGS) - 1] = f"--config.num_train_steps={stopped + 2}"
  rerun = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["start_step"] == stopped and summary["step"] == stopped + 2


TWO_HOSTS = """
import json, os
from helpers_train import tiny
from vlora_jax import errors
from vlora_jax.train import train_and_evaluate
import jax
try:
  train_and_evaluate(tiny("vit", num_train_steps=100000, **{"checkpoint.every_steps": 100000}),
                     os.environ["WORKDIR"])
  print("RESULT " + json.dumps({"process": jax.process_index(), "step": None}), flush=True)
except errors.Preempted as e:
  print("RESULT " + json.dumps({"process": jax.process_index(), "step": e.step}), flush=True)
"""


@pytest.mark.slow
def test_two_hosts_stop_at_the_same_step(tmp_path):
  """SIGTERM to one of two jax.distributed processes: JAX's preemption service tells the other,
  and both save at one agreed step."""
  from helpers_train import free_port, result, run_py
  port = free_port()
  procs = [run_py(TWO_HOSTS, wait=False, env={
      "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2",
      "JAX_PROCESS_ID": str(i), "WORKDIR": str(tmp_path)}) for i in range(2)]
  metrics = tmp_path / "metrics.jsonl"
  deadline = time.time() + 240
  while time.time() < deadline and not (metrics.exists()
                                        and len(metrics.read_text().splitlines()) >= 3):
    time.sleep(0.2)
  procs[1].send_signal(signal.SIGTERM)
  steps = []
  for p in procs:
    try:
      out, _ = p.communicate(timeout=240)
    finally:
      if p.poll() is None:
        p.kill()
    assert p.returncode == 0, out[-3000:]
    steps.append(result(out)["step"])
  assert steps[0] is not None and steps[0] == steps[1], steps
  assert sorted(int(d.name) for d in (tmp_path / "checkpoints").iterdir()) == [steps[0]]
