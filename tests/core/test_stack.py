"""`vlorafy` on any block: layouts, scan == unrolled == a hand-built per-layer loop, remat, merge."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import chain_reference as ref
from benchmarks.core import count_eqns, hlo_ops
from chain_reference import ToyBlock
from vlora_jax.core import stack
from vlora_jax.core.spec import VLoRASpec


def _setup(spec, num_layers=6, scan=True, remat="none", seed=0):
  model = stack.vlorafy(ToyBlock(), num_layers, spec, scan=scan, remat=remat)
  x = jax.random.normal(jax.random.key(seed), (3, 5, 8))
  gate = jnp.full((1, 1, 16), 0.5)
  variables = nn.unbox(model.init(jax.random.key(seed + 1), x, gate))
  return model, variables, x, gate


def _flat(tree):
  return traverse_util.flatten_dict(tree, sep="/")


SPECS = {
    "cumulative": VLoRASpec(compound_size=3, targets=("up/kernel", "down/kernel", "ln/scale"),
                            rank=(2, 3, 1), alpha=(2.0, 1.0, 1.0)),
    "anchored_official": VLoRASpec.official(compound_size=3, targets=("up/kernel", "down/kernel"),
                                            rank=2),
    "tied": VLoRASpec(compound_size=2, targets=(".*kernel",), mode="tied"),
    "rslora_zero_b": VLoRASpec(compound_size=6, targets=("(up|down)/kernel",), rank=4,
                               scaling="rslora", init="zero_b"),
}


def test_layout_groups_and_shapes():
  _, v, _, _ = _setup(SPECS["cumulative"])
  p = _flat(v["params"])
  assert p["base/up/kernel"].shape == (2, 8, 16)             # [C, d_in, d_out]
  assert p["inc_a/up/kernel"].shape == (2, 2, 8, 2)          # [C, s-1, d_in, r]
  assert p["inc_b/down/kernel"].shape == (2, 2, 3, 8)        # per-target rank 3
  assert p["inc_vec/ln/scale"].shape == (2, 2, 8)            # full-vector increment
  assert float(jnp.abs(p["inc_vec/ln/scale"]).max()) == 0.0  # starts at zero (official)
  assert p["per_layer/up/bias"].shape == (6, 16)             # non-targeted: full in every layer
  assert p["per_layer/ln/bias"].shape == (6, 8)
  assert "inc_a/ln/scale" not in p


def _per_layer_loop(spec, params, x, gate, num_layers):
  """Reference: every layer's weights from the definitions in float64, the block applied L times."""
  out = x
  for weights in ref.layer_weights_float64(params, spec, num_layers):
    weights = {p: jnp.asarray(w, jnp.float32) for p, w in weights.items()}
    out = ToyBlock().apply({"params": traverse_util.unflatten_dict(weights, sep="/")}, out, gate)
  return out


@pytest.mark.parametrize("name", sorted(SPECS))
def test_scan_equals_unrolled_equals_hand_built_layers(name):
  spec = SPECS[name]
  model, v, x, gate = _setup(spec)
  y_scan = model.apply(v, x, gate)
  y_unrolled = model.clone(scan=False).apply(v, x, gate)
  y_ref = _per_layer_loop(spec, v["params"], x, gate, 6)
  np.testing.assert_allclose(y_scan, y_unrolled, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(y_scan, y_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("remat", ["none", "full", "dots"])
def test_gradients_scan_equal_unrolled_and_remat(remat):
  spec = SPECS["cumulative"]
  model, v, x, gate = _setup(spec, remat=remat)
  loss = lambda m: lambda p: jnp.sum(m.apply({"params": p}, x, gate) ** 2)
  g_scan = jax.grad(loss(model))(v["params"])
  g_unrolled = jax.grad(loss(model.clone(scan=False, remat="none")))(v["params"])
  for (path, a), b in zip(_flat(g_scan).items(), _flat(g_unrolled).values()):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=path)
  assert float(jnp.abs(_flat(g_scan)["inc_a/up/kernel"]).max()) > 0


def test_stop_gradient_base_in_the_stack():
  """Official: W0 gets gradient only through layer 0 of each compound."""
  spec = VLoRASpec.official(compound_size=3, targets=("up/kernel",), rank=2)
  model, v, x, gate = _setup(spec, num_layers=3)

  def loss_after_layer0(p, sg):
    m = stack.vlorafy(ToyBlock(), 3, spec.__class__(**{**spec.__dict__, "stop_gradient_base": sg}))
    w = stack.materialize(p, m.layout_for(x, gate)[0])
    return jnp.sum(w["up"]["kernel"][1:] ** 2)  # layers 1, 2 only

  g_sg = jax.grad(loss_after_layer0)(v["params"], True)
  g_free = jax.grad(loss_after_layer0)(v["params"], False)
  assert float(jnp.abs(g_sg["base"]["up"]["kernel"]).max()) == 0.0
  assert float(jnp.abs(g_free["base"]["up"]["kernel"]).max()) > 0.0


def test_zero_b_every_layer_equals_its_base():
  model, v, x, gate = _setup(SPECS["rslora_zero_b"])
  w = stack.materialize(v["params"], model.layout_for(x, gate)[0])
  for layer in range(6):
    np.testing.assert_array_equal(w["up"]["kernel"][layer], v["params"]["base"]["up"]["kernel"][0])


def test_merge_into_the_dense_twin_gives_the_same_function():
  for spec in SPECS.values():
    model, v, x, gate = _setup(spec)
    dense = model.clone(vlora=None)
    merged = stack.merge(v["params"], spec)
    assert jax.tree.structure(merged) == jax.tree.structure(
        nn.unbox(dense.init(jax.random.key(0), x, gate))["params"])
    np.testing.assert_allclose(model.apply(v, x, gate), dense.apply({"params": merged}, x, gate),
                               rtol=1e-6, atol=1e-6)


def test_layout_from_params_recovers_the_layout():
  spec = SPECS["cumulative"]
  model, v, x, gate = _setup(spec)
  assert stack.layout_from_params(v["params"], spec) == model.layout_for(x, gate)[0]


def test_block_factory_and_dropout_rngs():
  """A factory works as well as an instance; dropout gets a different key in every layer."""

  class DropBlock(nn.Module):
    @nn.compact
    def __call__(self, x, *, deterministic=True):
      return nn.Dropout(0.5)(nn.Dense(4, name="fc")(x), deterministic=deterministic)

  model = stack.vlorafy(functools.partial(DropBlock), 2, VLoRASpec(2, ("fc/kernel",), rank=2))
  x = jnp.ones((1, 4))
  v = model.init(jax.random.key(0), x)
  a = model.apply(v, x, deterministic=False, rngs={"dropout": jax.random.key(1)})
  b = model.apply(v, x, deterministic=False, rngs={"dropout": jax.random.key(2)})
  assert not np.allclose(a, b)
  np.testing.assert_array_equal(model.apply(v, x), model.apply(v, x))


@pytest.mark.parametrize("spec", [None, VLoRASpec(compound_size=4)], ids=["dense", "vlora"])
def test_program_size_does_not_grow_with_depth(spec):
  """The lowered train step of a 48-layer stack is no larger than that of a 12-layer stack."""
  from vlora_jax.models.vit import ViT

  def sizes(depth, scan=True):
    model = ViT(num_classes=4, patch_size=4, dim=32, depth=depth, num_heads=2, vlora=spec,
                scan=scan)
    x = jnp.zeros((2, 8, 8, 3))
    params = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0), x)))["params"]
    grad = jax.grad(lambda p: jnp.sum(model.apply({"params": p}, x)))
    return count_eqns(jax.make_jaxpr(grad)(params).jaxpr), hlo_ops(jax.jit(grad).lower(params))

  (e12, h12), (e48, h48) = sizes(12), sizes(48)
  assert e48 <= e12, (e12, e48)
  assert h48 <= h12, (h12, h48)
  # The measure can tell: the unrolled reference path does grow with depth.
  (u4, _), (u8, _) = sizes(4, scan=False), sizes(8, scan=False)
  assert u8 > 1.5 * u4, (u4, u8)


class PlainMLP(nn.Module):
  """A block whose ``__call__`` has no ``deterministic`` argument (no dropout)."""

  @nn.compact
  def __call__(self, x):
    h = nn.gelu(nn.Dense(16, name="up")(x))
    return x + nn.Dense(8, name="down")(h)


def test_a_block_without_deterministic_stacks_trains_and_merges():
  spec = VLoRASpec(compound_size=2, targets=("up/kernel", "down/kernel"), rank=2)
  x = jax.random.normal(jax.random.key(0), (3, 8))
  model = stack.vlorafy(PlainMLP(), 4, spec)
  boxed = model.init(jax.random.key(1), x)
  y = model.apply(boxed, x, deterministic=False)  # the stack's own switch is simply not passed on
  g = jax.grad(lambda p: jnp.sum(model.apply({"params": p}, x) ** 2))(nn.unbox(boxed)["params"])
  assert float(jnp.abs(_flat(g)["inc_a/up/kernel"]).max()) > 0
  # merge and materialize take the boxed params that init returns
  merged = stack.merge(boxed["params"], spec)
  dense = model.clone(vlora=None)
  np.testing.assert_allclose(dense.apply({"params": merged}, x), y, rtol=1e-6, atol=1e-6)
  layers = stack.materialize(boxed["params"], model.layout_for(x)[0])
  assert layers["up"]["kernel"].shape == (4, 8, 16)


class _ToyBlockOfOurDense(ToyBlock):
  """`ToyBlock` with `layers.Dense`, which multiplies by a `chain.LowRankWeight`'s parts."""

  @nn.compact
  def __call__(self, x, gate, *, deterministic=True):
    from vlora_jax.core import layers
    h = layers.Dense(2 * self.width, name="up")(nn.LayerNorm(name="ln")(x))
    h = jnp.tanh(h) * gate
    return x + layers.Dense(self.width, name="down")(h)


@pytest.mark.parametrize("scan", [True, False])
@pytest.mark.parametrize("mode", ["anchored", "cumulative"])
def test_factored_weights_give_the_merged_weights_function_and_gradients(scan, mode):
  """A detached-base stack hands `layers.Dense` its weights as parts (`chain.lowrank_matmul`),
  `nn.Dense` the merged arrays: the same outputs and gradients, base layers and the rest."""
  spec = VLoRASpec.official(compound_size=3, targets=("up/kernel", "down/kernel"), rank=2,
                            mode=mode)
  merged, v, x, gate = _setup(spec, scan=scan)
  factored = stack.vlorafy(_ToyBlockOfOurDense(), 6, spec, scan=scan)
  loss = lambda m: lambda p: jnp.sum(jnp.sin(m.apply({"params": p}, x, gate)))
  np.testing.assert_allclose(factored.apply(v, x, gate), merged.apply(v, x, gate), rtol=1e-6)
  g_merged = jax.grad(loss(merged))(v["params"])
  g_factored = jax.grad(loss(factored))(v["params"])
  for (path, a), b in zip(_flat(g_factored).items(), _flat(g_merged).values()):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=path)
  assert float(jnp.abs(_flat(g_factored)["base/up/kernel"]).max()) > 0
