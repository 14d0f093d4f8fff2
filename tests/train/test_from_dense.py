"""``init_from='compress:<dense run>'``: a VLoRA run started from a trained dense run's checkpoint,
compressed into its spec (plain or whitened SVD, calibrated on the run's own train batches)."""

import json

import numpy as np
import pytest
from helpers_train import tiny

import vlora_jax
from vlora_jax import data as data_lib, models
from vlora_jax.core import params as params_lib
from vlora_jax.errors import CheckpointError, ConfigError
from vlora_jax.train import train_and_evaluate
from vlora_jax.train.from_dense import params_from_dense_run

slow = pytest.mark.slow  # the tests on a trained dense run


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("from_dense") / "dense"
  # Trained past chance, so that what a student inherits from it shows in its loss.
  train_and_evaluate(tiny("vit", **{"model.vlora.enabled": False, "num_train_steps": 100,
                                    "optim.lr": 1e-2, "optim.warmup_steps": 5}), workdir)
  return workdir


def _student(dense_run, **overrides):
  # A constant rate: some runs are resumed with more steps, which a cosine schedule refuses.
  return tiny("vit", **{"init_from": f"compress:{dense_run}", "optim.schedule": "constant",
                        **overrides})


@slow
@pytest.mark.parametrize("increments", ["svd", "whitened"])
def test_full_rank_compression_computes_the_dense_function(dense_run, increments):
  config = _student(dense_run, **{"model.vlora.rank": 16, "compress.increments": increments})
  params = params_from_dense_run(str(dense_run), abstract_params=None, config=config)
  student = models.build(config.model)
  dense_model, dense_params, _, _ = vlora_jax.load(dense_run)
  batch = data_lib.build(config).train_batch(0)
  got = student.apply({"params": params}, batch["image"])
  want = dense_model.apply({"params": dense_params}, batch["image"])
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@slow
def test_a_run_starts_from_the_compressed_dense_model(dense_run, tmp_path):
  config = _student(dense_run, **{"compress.increments": "whitened", "num_train_steps": 1,
                                  "compress.calibration_batches": 2})
  summary = train_and_evaluate(config, tmp_path / "student")
  assert summary["origin"] == f"init_from compress:{dense_run}"
  # It starts from what the dense run learned: after the same one step, far better than from
  # scratch.
  scratch = train_and_evaluate(_student(dense_run, **{"num_train_steps": 1, "init_from": ""}),
                               tmp_path / "scratch")
  assert summary["eval/loss"] < scratch["eval/loss"] - 0.3, (summary["eval/loss"],
                                                             scratch["eval/loss"])


@slow
def test_a_model_that_is_not_the_dense_twin_is_refused(dense_run):
  config = _student(dense_run, **{"model.dim": 32})
  with pytest.raises(CheckpointError, match="not this run's dense twin"):
    params_from_dense_run(str(dense_run), abstract_params=None, config=config)
  with pytest.raises(CheckpointError, match="no VLoRA stack"):
    params_from_dense_run(str(dense_run), abstract_params=None,
                          config=_student(dense_run, **{"model.vlora.enabled": False}))


@slow
def test_compress_and_heal_with_distillation_resumes_and_saves_no_teacher(dense_run, tmp_path):
  """Start from the compressed dense run, distil from it, stop after 2 steps; the rerun to 4
  resumes (the teacher loaded again from its workdir), and no checkpoint holds the teacher."""
  from vlora_jax.runs import checkpoint_format
  workdir = tmp_path / "heal"
  config = lambda steps: _student(dense_run, **{
      "compress.increments": "whitened", "compress.calibration_batches": 2,
      "distill.teacher": str(dense_run), "distill.weight": 0.7, "distill.temperature": 2.0,
      "num_train_steps": steps, "checkpoint.every_steps": 2})
  first = train_and_evaluate(config(2), workdir)
  assert first["origin"] == f"init_from compress:{dense_run}"
  second = train_and_evaluate(config(4), workdir)
  assert second["start_step"] == 2 and second["step"] == 4 and second["origin"].startswith(
      "resumed")
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert any("train/kl" in r for r in rows)
  state = checkpoint_format.read_path(str(workdir / "checkpoints" / "4"), params_only=False)
  assert set(state) == {"step", "params", "opt_state", "rng"}


def test_a_dense_run_that_does_not_fit_is_refused_in_set_up_before_compile(tmp_path):
  """From the dense run's stored config alone (its checkpoint holds only the meta here)."""
  from test_distill import _fake_run
  from vlora_jax.train.setup import set_up
  dense = _fake_run(tmp_path / "dense", tiny("vit", **{"model.vlora.enabled": False,
                                                        "model.dim": 32}))
  with pytest.raises(CheckpointError, match="not this run's dense twin.*blocks"):
    set_up(_student(dense), tmp_path / "student")
  lm = _fake_run(tmp_path / "lm", tiny("lm"))
  with pytest.raises(CheckpointError, match="that run is a model.name='lm'"):
    set_up(_student(lm), tmp_path / "student2")


@slow
def test_a_budget_chooses_the_ranks_and_a_resumed_run_keeps_them(dense_run, tmp_path):
  config = _student(dense_run, **{"compress.budget": 0.75, "num_train_steps": 1})
  summary = train_and_evaluate(config, tmp_path / "student")
  dense = json.loads((dense_run / "summary.json").read_text())["params_total"]
  assert summary["params_total"] <= 0.75 * dense
  ranks = vlora_jax.load(tmp_path / "student").config.model.vlora.rank
  assert isinstance(ranks, (list, tuple)) and len(ranks) == 4
  for t in range(4):  # the budget is spent: one more rank of any target breaks it
    bumped = _student(dense_run, **{"model.vlora.rank": tuple(r + (i == t)
                                                             for i, r in enumerate(ranks))})
    shapes = params_lib.param_shapes(models.build(bumped.model),
                                     *models.sample_inputs(bumped.model), train=False)
    assert params_lib.count(shapes)["total"] > 0.75 * dense, (t, ranks)
  again = _student(dense_run, **{"compress.budget": 0.75, "num_train_steps": 2})
  assert train_and_evaluate(again, tmp_path / "student")["step"] == 2  # same ranks: resumes
  whitened = _student(dense_run, **{"compress.budget": 0.75, "num_train_steps": 1,
                                    "compress.increments": "whitened",
                                    "compress.calibration_batches": 2})
  assert train_and_evaluate(whitened, tmp_path / "whitened")["params_total"] <= 0.75 * dense
  with pytest.raises(ConfigError, match="compress.budget=0.5: .*below the smallest"):
    train_and_evaluate(_student(dense_run, **{"compress.budget": 0.5}), tmp_path / "small")


def test_a_budget_without_a_compress_init_is_refused_in_set_up(tmp_path):
  from vlora_jax.train.setup import set_up
  with pytest.raises(ConfigError, match=r"compress.budget=0.3: .* set init_from='compress:"):
    set_up(tiny("vit", **{"compress.budget": 0.3}), tmp_path / "run")


@slow
def test_a_resumed_run_keeps_its_teacher_and_needs_no_dense_run(dense_run, tmp_path):
  """The student's meta pins the teacher checkpoint it started with: a newer teacher checkpoint
  is not picked up on resume, and once the dense run is gone, a compressed run without a teacher
  still resumes (its ranks from its own checkpoint) while one with a teacher says what is gone."""
  import shutil
  from vlora_jax.train.setup import set_up
  source = tmp_path / "dense"
  shutil.copytree(dense_run, source)
  plain = _student(source, **{"compress.budget": 0.75, "num_train_steps": 1})
  train_and_evaluate(plain, tmp_path / "plain")
  healed = _student(source, **{"distill.teacher": str(source), "num_train_steps": 1})
  train_and_evaluate(healed, tmp_path / "healed")
  first = source / "checkpoints" / "100"
  shutil.copytree(first, source / "checkpoints" / "109")  # the teacher trains on
  assert set_up(_student(source, **{"distill.teacher": str(source), "num_train_steps": 2}),
                tmp_path / "healed").teacher.checkpoint == first
  shutil.rmtree(source)
  # Restored elsewhere, the run reads neither its dense run nor the budget's ranks from it.
  moved = set_up(_student(source, **{"compress.budget": 0.75, "num_train_steps": 2,
                                     "checkpoint.restore_from": str(tmp_path / "plain")}),
                 tmp_path / "moved")
  assert tuple(moved.config.model.vlora.rank) == tuple(
      vlora_jax.load(tmp_path / "plain").config.model.vlora.rank)
  again = _student(source, **{"compress.budget": 0.75, "num_train_steps": 2})
  assert train_and_evaluate(again, tmp_path / "plain")["step"] == 2
  with pytest.raises(CheckpointError, match="which is gone; a resumed run keeps its teacher"):
    train_and_evaluate(_student(source, **{"distill.teacher": str(source),
                                           "num_train_steps": 2}), tmp_path / "healed")


@slow
def test_compress_and_heal_killed_mid_run_resumes_to_the_uninterrupted_result(tmp_path):
  """``python -m vlora_jax.main`` compressing a dense run and distilling from it, SIGKILLed after
  its first checkpoint and rerun, ends bitwise where the same command run uninterrupted ends."""
  import os
  import signal
  import subprocess
  import sys
  import time
  from experiments import kill_trials

  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(kill_trials.ROOT),
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  config = kill_trials.FLAGS[0].split(":")[0]
  dense = tmp_path / "dense"
  heal = [f"{config}:vlora,r=2,s=2,steps=12", *kill_trials.FLAGS[1:],
          f"--config.init_from=compress:{dense}", "--config.compress.increments=whitened",
          "--config.compress.calibration_batches=2", f"--config.distill.teacher={dense}",
          "--config.distill.hidden_weight=0.5"]

  def launch(workdir, flags):
    return subprocess.Popen([sys.executable, "-m", "vlora_jax.main", f"--workdir={workdir}",
                             *flags], cwd=kill_trials.ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)

  def finish(workdir, flags):
    out = launch(workdir, flags).communicate(timeout=600)[0]
    assert (workdir / "summary.json").exists(), out[-3000:]

  finish(dense, [f"{config}:dense,steps=8", *kill_trials.FLAGS[1:]])
  finish(tmp_path / "reference", heal)
  victim = tmp_path / "victim"
  proc = launch(victim, heal)
  deadline = time.time() + 300
  while not (victim / "checkpoints" / "4").exists() and proc.poll() is None:
    assert time.time() < deadline, "no checkpoint of step 4 within 300 s"
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.communicate()
  assert not (victim / "summary.json").exists(), "the run finished before its kill"
  finish(victim, heal)
  assert "resumed" in json.loads((victim / "summary.json").read_text())["origin"]
  assert kill_trials.compare(victim, tmp_path / "reference") == []
