"""layers.flat_dot_general, the dot of every Linear: equal to lax.dot_general, and why it exists."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlora_jax.core import layers


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


def test_gelu_is_exact_gelu_with_its_float64_derivative():
  x = jnp.linspace(-9.0, 9.0, 4001, dtype=jnp.float32)
  np.testing.assert_array_equal(layers.gelu(x), jax.nn.gelu(x, approximate=False))
  from scipy.special import erf
  xd = np.asarray(x, np.float64)
  want = 0.5 * (1 + erf(xd / np.sqrt(2))) + xd * np.exp(-xd * xd / 2) / np.sqrt(2 * np.pi)
  np.testing.assert_allclose(jax.vmap(jax.grad(layers.gelu))(x), want, rtol=0, atol=3e-7)
  # forward mode too (a custom_jvp, not a custom_vjp)
  _, tangent = jax.jvp(layers.gelu, (x,), (jnp.full_like(x, 2.0),))
  np.testing.assert_allclose(tangent, 2 * want, rtol=0, atol=6e-7)


def test_gelu_keeps_one_residual_where_autodiff_keeps_more(capsys):
  """What a scanned stack stacks per layer for its backward pass: one array of the
  pre-activation's shape, not the ``erfc`` intermediates."""
  from jax.ad_checkpoint import print_saved_residuals
  x = jnp.ones((4, 16), jnp.float32)

  def wide(f):
    print_saved_residuals(f, x)
    return [line for line in capsys.readouterr().out.splitlines() if "f32[4,16]" in line]
  assert len(wide(layers.gelu)) == 1
  assert len(wide(lambda v: jax.nn.gelu(v, approximate=False))) >= 2


def test_layer_norm_against_float64_values_gradients_and_residuals(capsys):
  """`layers.LayerNorm` (its own derivative rule, `layers.normalize`) against a float64 numpy
  LayerNorm, and the one ``x``-sized residual it keeps (``nn.LayerNorm`` keeps three)."""
  import flax.linen as nn
  from jax.ad_checkpoint import print_saved_residuals
  rng = np.random.default_rng(3)
  x, dy = rng.normal(2.0, 3.0, size=(4, 7, 16)), rng.normal(size=(4, 7, 16))
  scale, bias = rng.normal(1.0, 0.1, size=16), rng.normal(0.0, 0.1, size=16)
  norm = layers.layer_norm("n", jnp.float32)
  params = {"params": {"scale": jnp.asarray(scale, jnp.float32),
                       "bias": jnp.asarray(bias, jnp.float32)}}
  f32 = lambda v: jnp.asarray(v, jnp.float32)
  y, vjp = jax.vjp(lambda x, p: norm.apply(p, x), f32(x), params)
  dx, dp = vjp(f32(dy))
  mu = x.mean(-1, keepdims=True)
  inv = 1 / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + layers.LN_EPS)
  x_hat = (x - mu) * inv
  g = dy * scale
  want_dx = inv * (g - g.mean(-1, keepdims=True) - x_hat * (g * x_hat).mean(-1, keepdims=True))
  np.testing.assert_allclose(y, x_hat * scale + bias, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dx, want_dx, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(dp["params"]["scale"], (dy * x_hat).sum((0, 1)), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(dp["params"]["bias"], dy.sum((0, 1)), rtol=1e-5, atol=1e-4)

  def wide(f):
    print_saved_residuals(f, f32(x), params)
    return [line for line in capsys.readouterr().out.splitlines() if "f32[4,7,16]" in line]
  assert len(wide(lambda x, p: norm.apply(p, x))) == 1
  assert len(wide(lambda x, p: nn.LayerNorm(epsilon=layers.LN_EPS).apply(p, x))) >= 2
