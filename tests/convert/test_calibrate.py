"""Calibration covariances: each targeted matrix's input second moment, per stack and layer, taken
from the model's own unrolled run, against hand-run blocks; and what whitened compression does
with them."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlora_jax.convert import calibrate
from vlora_jax.convert.compress import compress_tree
from vlora_jax.models.lm import LM
from vlora_jax.core.spec import VIT_TARGETS, VLoRASpec

L, D = 4, 16


@pytest.fixture(scope="module")
def lm():
  model = LM(vocab_size=11, max_len=12, dim=D, depth=L, num_heads=2)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 11, (5, 12)), jnp.int32)
  params = nn.unbox(model.init(jax.random.key(0), tokens))["params"]
  batches = [(tokens[:3],), (tokens[3:],)]
  return model, params, tokens, batches, calibrate.input_covariances(model, params, batches,
                                                                     targets=VIT_TARGETS)


def _second_moment(x):
  x = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
  return x.T @ x / len(x)


def test_every_layer_of_every_target_against_hand_run_blocks(lm):
  """The blocks run one by one from the stack's per-layer weights, their Dense inputs read from
  Flax's captured intermediates (outputs of the norms and of fc1; attention's output by hand)."""
  model, params, tokens, _, covs = lm
  assert set(covs) == {"blocks"} and set(covs["blocks"]) == set(VIT_TARGETS)
  h = params["embed"]["embedding"][tokens] + params["pos_embed"][:, :tokens.shape[1]]
  block = model.block()
  per_layer = params["blocks"]["per_layer"]
  for layer in range(L):
    weights = jax.tree.map(lambda a: a[layer], per_layer)
    out, state = block.apply({"params": weights}, h, capture_intermediates=True,
                             mutable=["intermediates"])
    got = state["intermediates"]
    norm1 = got["norm1"]["__call__"][0]
    fc1 = got["mlp"]["fc1"]["__call__"][0]
    norm2 = got["norm2"]["__call__"][0]
    want = {"attn/qkv/kernel": norm1, "mlp/fc1/kernel": norm2,
            "mlp/fc2/kernel": nn.gelu(fc1, approximate=False)}
    for path, x in want.items():
      np.testing.assert_allclose(covs["blocks"][path][layer], _second_moment(x), rtol=1e-4,
                                 atol=1e-6, err_msg=f"{path} layer {layer}")
    h = out
  assert covs["blocks"]["mlp/fc2/kernel"].shape == (L, 4 * D, 4 * D)


def test_whitened_compression_with_calibrated_covariances_lowers_the_output_error(lm):
  model, params, _, _, covs = lm
  spec = VLoRASpec(compound_size=2, rank=2, mode="anchored", targets=VIT_TARGETS)
  _, plain = compress_tree(params, spec, covariances=covs)
  _, white = compress_tree(params, spec, increments="whitened", covariances=covs)
  p, w = plain["blocks"], white["blocks"]
  later = np.arange(L) % 2 == 1  # the layers with an increment
  assert (w.out_total[later] <= p.out_total[later] + 1e-9).all()
  assert (w.total[later] >= p.total[later] - 1e-9).all()  # the price: weight error


def test_bad_calls(lm):
  model, params, _, batches, _ = lm
  with pytest.raises(ValueError, match="give the dense model"):
    calibrate.input_covariances(model.clone(vlora=VLoRASpec(compound_size=2)), params, batches,
                                targets=VIT_TARGETS)
  with pytest.raises(ValueError, match="batches is empty"):
    calibrate.input_covariances(model, params, [], targets=VIT_TARGETS)
  with pytest.raises(ValueError, match="match no Dense kernel"):
    calibrate.input_covariances(model, params, batches, targets=(r"nothing/kernel",))


def test_a_bfloat16_model_is_calibrated_in_float32(lm):
  """A bf16 model's layers would run under jax.checkpoint (its inputs tracers): calibration runs
  the same params in float32, so it gives the float32 model's covariances."""
  model, params, _, batches, covs = lm
  got = calibrate.input_covariances(model.clone(dtype=jnp.bfloat16), params, batches,
                                    targets=VIT_TARGETS)
  for path in VIT_TARGETS:
    np.testing.assert_array_equal(got["blocks"][path], covs["blocks"][path])
