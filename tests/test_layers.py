"""layers.FusedDense: the same parameters as the fused Linear it replaces, and the same parts."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlora_jax import layers


@pytest.mark.parametrize("parts", [2, 3])
def test_fused_dense_is_the_fused_linear_split(parts):
  d, width = 16, 8
  x = jax.random.normal(jax.random.key(0), (2, 5, d))
  fused = layers.FusedDense(parts * width, parts, ("embed", "qkv"), name="qkv")
  linear = layers.dense(parts * width, ("embed", "qkv"), "qkv", jnp.float32)
  v_fused = fused.init(jax.random.key(1), x)
  v_linear = linear.init(jax.random.key(1), x)
  # Same tree, shapes, init values and logical axis names: checkpoints and targets are unchanged.
  assert jax.tree.structure(v_fused) == jax.tree.structure(v_linear)
  for a, b in zip(jax.tree.leaves(v_fused, is_leaf=lambda t: isinstance(t, nn.Partitioned)),
                  jax.tree.leaves(v_linear, is_leaf=lambda t: isinstance(t, nn.Partitioned))):
    assert a.names == b.names
    np.testing.assert_array_equal(a.value, b.value)
  params = jax.tree.map(lambda t: t + 0.1 * jax.random.normal(jax.random.key(2), t.shape),
                        nn.unbox(v_linear))  # a non-zero bias too
  whole = linear.apply(params, x)
  got = fused.apply(params, x)
  assert len(got) == parts
  for i, part in enumerate(got):  # part i = columns [i * width, (i + 1) * width) of the fused output
    np.testing.assert_allclose(part, whole[..., i * width:(i + 1) * width], rtol=1e-6, atol=1e-6)
