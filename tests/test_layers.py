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


@pytest.mark.parametrize("shape", [(6, 16), (2, 5, 16), (2, 3, 4, 16)])
def test_flat_dot_general_is_dot_general(shape):
  """Values and all gradients equal plain ``lax.dot_general`` (it only reshapes around one dot)."""
  x = jax.random.normal(jax.random.key(0), shape)
  w = jax.random.normal(jax.random.key(1), (16, 8))
  dims = (((x.ndim - 1,), (0,)), ((), ()))
  f = lambda fn: lambda x, w: jnp.sum(jnp.sin(fn(x, w, dims)))
  np.testing.assert_allclose(layers.flat_dot_general(x, w, dims),
                             jax.lax.dot_general(x, w, dims), rtol=1e-6, atol=1e-6)
  for got, want in zip(jax.grad(f(layers.flat_dot_general), (0, 1))(x, w),
                       jax.grad(f(jax.lax.dot_general), (0, 1))(x, w)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # Other dimension numbers (here a batch dim) pass through to lax.dot_general unchanged.
  batched = (((2,), (1,)), ((0,), (0,)))
  wb = jax.random.normal(jax.random.key(2), (2, 16, 8))
  if x.ndim == 3:
    np.testing.assert_array_equal(layers.flat_dot_general(x, wb, batched),
                                  jax.lax.dot_general(x, wb, batched))


def _transposes_in_weight_grad(dot_general) -> int:
  x, w = jnp.ones((8, 32, 64)), jnp.ones((64, 96))
  dims = (((2,), (0,)), ((), ()))
  grad = jax.jit(jax.grad(lambda x, w: jnp.sum(jnp.tanh(dot_general(x, w, dims)) ** 2), (0, 1)))
  return grad.lower(x, w).compile().as_text().count(" transpose(")


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the copies are an XLA:CPU matter")
def test_flat_dot_general_spares_the_weight_gradient_its_transposed_copy():
  """Why `flat_dot_general` exists: with 3-D inputs XLA:CPU copies a transposed operand into the
  weight-gradient dot; flattened, the dot reads both operands in place."""
  if _transposes_in_weight_grad(jax.lax.dot_general) == 0:
    pytest.skip("this XLA no longer transposes for the 3-D weight gradient: the flattening is moot")
  assert _transposes_in_weight_grad(layers.flat_dot_general) == 0
