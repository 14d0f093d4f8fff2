"""experiments/layer_drift.py on real (tiny) trained runs, against the drift computed by hand."""

from __future__ import annotations


import numpy as np
import pytest
from helpers_train import tiny

from experiments import layer_drift
from vlora_jax.runs import checkpoint_format
from vlora_jax.train import train_and_evaluate

pytestmark = pytest.mark.slow  # subprocesses and trained runs: `pytest -m slow`

# Two compounds of 3 layers (two increments each: a cumulative layer 2 sums them), and a large
# learning rate so that the increments move in 3 steps.
SIZE = {"model.depth": 6, "model.vlora.compound_size": 3, "num_train_steps": 3, "optim.lr": 3e-2}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  out = {}
  for mode in ("cumulative", "dense"):
    d = tmp_path_factory.mktemp(mode)
    over = {"model.vlora.enabled": False} if mode == "dense" else {"model.vlora.mode": mode}
    train_and_evaluate(tiny("vit", **SIZE, **over), d)
    out[mode] = str(d)
  return out


def test_cumulative_drift_is_the_norm_of_the_summed_increments(runs):
  r = layer_drift.drift(runs["cumulative"])
  assert r["variant"] == "cumulative" and r["rank"] == 2 and r["s"] == 3
  p = checkpoint_format.read_path(runs["cumulative"])["params"]["blocks"]
  for target in ("attn/qkv/kernel", "mlp/fc2/kernel"):
    w0 = layer_drift._get(p["base"], target)                  # [C, in, out]
    a, b = layer_drift._get(p["inc_a"], target), layer_drift._get(p["inc_b"], target)
    inc = np.einsum("ckir,ckro->ckio", a, b) / 2               # alpha 1 / rank 2: [C, 2, in, out]
    summed = np.cumsum(inc, axis=1)                            # layer k: W_0 + inc_1 + .. + inc_k
    want = [np.mean([np.linalg.norm(summed[c, k]) / np.linalg.norm(w0[c]) for c in range(2)])
            for k in range(2)]
    got = r["drift"][f"blocks/{target}"]
    assert got == pytest.approx(want, rel=1e-5) and min(got) > 0


def test_dense_layers_drift_like_independent_matrices(runs):
  dense = layer_drift.drift(runs["dense"])
  assert dense["variant"] == "dense" and len(dense["drift"]) == 4
  # independently initialised layers differ by about sqrt(2) of their norm
  assert all(0.8 < x < 2.0 for d in dense["drift"].values() for x in d)
  assert dense["rank"] is None
  md = layer_drift.markdown([dense])
  assert f"| {runs['dense']} | dense | blocks/attn/qkv/kernel | " in md
  with pytest.raises(ValueError, match="do not form compounds of 4"):
    layer_drift.drift(runs["dense"], compound_size=4)  # 6 layers
  assert layer_drift.drift(runs["dense"], compound_size=2)["s"] == 2
