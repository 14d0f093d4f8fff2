"""configs/sweeps.py: every declared point is a valid run, named once."""

from __future__ import annotations

import json

import pytest

from configs import sweeps
from experiments import sweep
from vlora_jax import models
from vlora_jax.core import params as params_lib
from vlora_jax.train import load_config, optim, validate


@pytest.mark.parametrize("name", sorted(sweeps.SWEEPS))
def test_every_point_loads_and_validates(name):
  points = sweeps.get(name)
  ids = [p["id"] for p in points]
  assert len(ids) == len(set(ids)), f"{name}: a point id twice"
  # tables and plots group runs by their tags: two points with the same tags would pool as seeds
  tags = [json.dumps(p["tags"], sort_keys=True) for p in points]
  assert len(tags) == len(set(tags)), f"{name}: two points with the same tags"
  for p in points:
    config = sweep._config(p, None)  # pylint: disable=protected-access
    validate.check(config, num_devices=1)  # raises a ConfigError naming the field
    assert config.seed == p["tags"]["seed"]
    assert bool(config.model.vlora.enabled) == (p["tags"]["variant"] != "dense")
    if p["tags"]["rank"] is not None:
      assert config.model.vlora.rank == p["tags"]["rank"]


def test_unknown_sweep_names_the_declared_ones():
  with pytest.raises(ValueError, match="paper_digits"):
    sweeps.get("paper_digitz")


def test_factor_lr_multiplies_the_low_rank_factors_only():
  p = sweeps.point("digits", "cumulative", 0, rank=2, factor_lr=4.0)
  config = sweep._config(p, None)  # pylint: disable=protected-access
  params = params_lib.param_shapes(models.build(config.model), *models.sample_inputs(config.model))
  labels, mults = optim.groups(params, config.optim)
  boosted = {path for path, label in optim.paths(labels).items() if mults[label][0] == 4.0}
  assert boosted and all("/inc_a/" in x or "/inc_b/" in x for x in boosted)
  assert len(boosted) == sum("/inc_" in x and "/inc_vec/" not in x for x in optim.paths(labels))
  assert p["id"] == "digits/cumulative_r2_s4_flr4/seed0" and p["tags"]["factor_lr"] == 4.0


def _with_new_key(config):
  with config.unlocked():
    config.distill.some_new_option = 0.0
  return config


def test_a_finished_point_is_reused_only_for_its_own_config(tmp_path, monkeypatch):
  tiny = {"model.dim": 16, "model.depth": 2, "model.num_heads": 2,
          "model.vlora.compound_size": 2, "model.vlora.rank": 2, "batch_size": 16,
          "eval_batch_size": 32, "data.eval_examples": 32, "num_train_steps": 2,
          "eval_every_steps": 0, "checkpoint.keep_best": 0, "progress": False,
          "tensorboard": False}
  point = {"id": "toy/cumulative/seed0", "config": "configs/vit_digits.py", "overrides": tiny,
           "tags": {"dataset": "toy", "variant": "cumulative", "seed": 0}}
  monkeypatch.setattr(sweeps, "get", lambda name: [point])
  logged = []
  rows = sweep.run("toy", tmp_path, log=logged.append)
  assert len(rows) == 1 and rows[0]["step"] == 2
  assert rows[0]["config_hash"] == sweep.config_hash(sweep._config(point, None))  # pylint: disable=protected-access
  assert rows[0]["revision"] and rows[0]["revision"] != "unknown"
  assert sweep.run("toy", tmp_path, log=logged.append) == rows  # reused: nothing trains again
  assert logged == ["[1/1] toy/cumulative/seed0"]
  (tmp_path / "toy" / point["id"] / "point.json").unlink()  # a run from before the record:
  assert [r["step"] for r in sweep.collect("toy", tmp_path)] == [2]  # its checkpoint's config

  # The defaults gained a key since (a new option): the stored config still equals the declared
  # one on every key it has, so the point stays finished.
  monkeypatch.setattr(sweep, "_config", lambda p, extra: _with_new_key(load_config(
      str(sweep.ROOT / p["config"]), **p["overrides"])))
  assert [r["step"] for r in sweep.collect("toy", tmp_path)] == [2]
  monkeypatch.undo()
  monkeypatch.setattr(sweeps, "get", lambda name: [point])

  point["overrides"] = {**tiny, "optim.lr": 0.5}  # the declaration changed: the row is refused
  assert sweep.collect("toy", tmp_path) == []
  sweep.run("toy", tmp_path, log=logged.append)
  assert "SKIPPED" in logged[-1] and "move the workdir away" in logged[-1]
  point["overrides"] = {**tiny, "num_train_steps": 3}  # longer now: not finished, but started
  sweep.run("toy", tmp_path, log=logged.append)      # under another config: not resumed
  assert "SKIPPED" in logged[-1] and "started with a config other" in logged[-1]
