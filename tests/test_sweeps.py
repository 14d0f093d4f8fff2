"""configs/sweeps.py: every declared point is a valid run, named once."""

from __future__ import annotations

import json

import pytest

from configs import sweeps
from experiments import sweep
from vlora_jax import models
from vlora_jax import params as params_lib
from vlora_jax.train import optim, validate


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
