"""VLoRA's parameter savings are memory savings: the structure of the compiled train step (no timing).

If the stack built every layer's weights before the layer scan again (and kept them, and their
gradients, for the backward pass), a VLoRA train step would need more memory than the dense one at
a weight-dominated size, and its temporaries would grow with depth by a layer's weights per layer.
These checks read XLA's memory analysis of the compiled step; nothing runs.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest

from vlora_jax.core import layers, stack
from vlora_jax.core.spec import VLoRASpec

DIM, TOKENS = 256, 8  # weight-dominated: 0.8M weights a layer, 2k activations a layer


@functools.lru_cache(maxsize=None)  # the dense figures serve both parametrisations
def compiled_memory(spec, depth, remat="none"):
  """``(temp bytes, argument bytes, parameter bytes)`` of a donated AdamW train step of a stack."""
  model = stack.vlorafy(layers.EncoderBlock(DIM, num_heads=4, mlp_dim=4 * DIM), depth, spec,
                        remat=remat)
  x = jax.ShapeDtypeStruct((1, TOKENS, DIM), jnp.float32)
  params = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0), jnp.zeros(x.shape))))
  params = params["params"]
  tx = optax.adamw(1e-3)

  def step(p, opt_state, x):
    grads = jax.grad(lambda p: jnp.sum(model.apply({"params": p}, x) ** 2))(p)
    updates, opt_state = tx.update(grads, opt_state, p)
    return optax.apply_updates(p, updates), opt_state

  opt_state = jax.eval_shape(tx.init, params)
  m = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt_state, x).compile().memory_analysis()
  param_bytes = sum(p.size * p.dtype.itemsize for p in jax.tree.leaves(params))
  return m.temp_size_in_bytes, m.argument_size_in_bytes, param_bytes


@pytest.mark.parametrize("spec", [VLoRASpec(compound_size=4, rank=8),
                                  VLoRASpec.official(compound_size=4, rank=8)],
                         ids=["cumulative", "official"])
def test_vlora_train_step_needs_less_memory_than_dense_and_no_weights_per_layer(spec):
  dense = {d: compiled_memory(None, d) for d in (12, 24)}
  vlora = {d: compiled_memory(spec, d) for d in (12, 24)}
  d_temp, d_arg, _ = dense[24]
  v_temp, v_arg, _ = vlora[24]
  assert v_temp + v_arg < 0.5 * (d_temp + d_arg), (vlora[24], dense[24])

  # Depth 12 -> 24: temporaries grow by the gradients (parameter-sized) and the activations. What
  # the dense step's temporaries add beyond its gradients is the activations' growth; VLoRA's may
  # not add more than that (building the weights of 12 more layers would add 3 MB a layer).
  grow = lambda m: (m[24][0] - m[12][0]) - (m[24][2] - m[12][2])
  assert grow(vlora) <= grow(dense) + 2 * DIM * 4 * DIM * 4, (grow(vlora), grow(dense))


def test_init_builds_no_dense_twin():
  """A VLoRA stack's init computes only its own parameters: its compiled temporaries stay below
  the dense twin's weights (initialising all L layers in full and keeping every s-th would not)."""
  def init_memory(spec):
    model = stack.vlorafy(layers.EncoderBlock(DIM, num_heads=4, mlp_dim=4 * DIM), 24, spec)
    init = jax.jit(lambda: nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, TOKENS, DIM)))))
    m = init.lower().compile().memory_analysis()
    return m.temp_size_in_bytes, m.output_size_in_bytes

  _, dense_out = init_memory(None)
  temp, out = init_memory(VLoRASpec(compound_size=4, rank=8))
  assert out < 0.3 * dense_out
  assert temp < 0.6 * dense_out, (temp, dense_out)
