"""configs/sweeps.py: every declared point is a valid run, named once."""

from __future__ import annotations

import sys

import pytest
from helpers_train import ROOT

sys.path.insert(0, str(ROOT / "experiments"))
import sweep  # noqa: E402  experiments/sweep.py
from configs import sweeps  # noqa: E402
from vlora_jax.train import validate  # noqa: E402


@pytest.mark.parametrize("name", sorted(sweeps.SWEEPS))
def test_every_point_loads_and_validates(name):
  points = sweeps.get(name)
  ids = [p["id"] for p in points]
  assert len(ids) == len(set(ids)), f"{name}: a point id twice"
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
