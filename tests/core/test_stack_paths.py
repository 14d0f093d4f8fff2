"""The layer stack, which builds each layer's weights inside the layer scan, against three references,
in values and in gradients: the prefix-sum path (every layer's weights built first by a prefix sum
over the increments, then the dense stack), the unrolled stack, and float64 weights written from the definitions.

Every mode, stop-gradient on and off, 1-D targets, horizontal LoRA on top, remat none / full / dots,
and bf16 compute with the chain in float32. Every parameter is perturbed first, so that zero-initialised
factors (``inc_vec``, ``lora_b``) carry gradient through the math they feed.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import chain_reference as ref
from chain_reference import ToyBlock
from vlora_jax.core import layers, stack
from vlora_jax.core.lora import LoRASpec
from vlora_jax.core.spec import VLoRASpec

L = 6
TARGETS = ("up/kernel", "down/kernel", "ln/scale")  # two matrices and a 1-D target
SPECS = {
    "cumulative": VLoRASpec(compound_size=3, targets=TARGETS, rank=(2, 3, 1), alpha=(2.0, 1.0, 1.0)),
    "cumulative_sg": VLoRASpec(compound_size=3, targets=TARGETS, rank=2, stop_gradient_base=True),
    "anchored": VLoRASpec(compound_size=3, targets=TARGETS, rank=2, mode="anchored"),
    "official": VLoRASpec.official(compound_size=3, targets=TARGETS, rank=(2, 2, 1)),
    "tied": VLoRASpec(compound_size=2, targets=(".*kernel",), mode="tied", stop_gradient_base=True),
    "one_compound": VLoRASpec(compound_size=6, targets=("(up|down)/kernel",), rank=4,
                              scaling="rslora"),
    "one_layer_compounds": VLoRASpec(compound_size=1, targets=TARGETS, rank=2, mode="anchored"),
    "dense": None,
}
LORA = LoRASpec(targets=("up/kernel", "down/kernel"), rank=2, alpha=4.0)

CASES = [(name, None, "none") for name in SPECS if name != "dense"] + [
    ("cumulative", None, "full"), ("cumulative", None, "dots"),
    ("official", None, "full"), ("official", None, "dots"),
    ("cumulative", LORA, "none"), ("official", LORA, "dots"), ("tied", LORA, "none"),
    ("dense", LORA, "none"), ("dense", LORA, "full"),
]
# The unrolled stack runs the same layer function; test_stack.py holds it to the scan for every
# mode and remat. Here: the cases it does not cover.
UNROLLED = {("one_compound", None, "none"), ("cumulative", LORA, "none"),
            ("official", LORA, "dots"), ("dense", LORA, "full")}


def _flat(tree):
  return traverse_util.flatten_dict(tree, sep="/")


def _setup(spec, lora, remat="none", scan=True):
  model = stack.vlorafy(ToyBlock(), L, spec, scan=scan, remat=remat, lora=lora)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(3, 5, 8)), jnp.float32)
  gate = jnp.asarray(rng.uniform(0.5, 1.5, size=(1, 1, 16)), jnp.float32)
  cot = jnp.asarray(rng.normal(size=(3, 5, 8)), jnp.float32)
  params = nn.unbox(model.init(jax.random.key(1), x, gate))["params"]
  params = jax.tree.map(lambda p: p + 0.1 * jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
  return model, params, (x, gate, cot)


def _loss(model, data):
  x, gate, cot = data
  return lambda p: jnp.sum(model.apply({"params": p}, x, gate) * cot)


def _prefix_sum_loss(model, data, lora):
  """The materialise-then-run reference: every layer's weights by the prefix-sum chain first, then
  the dense stack on them."""
  x, gate, cot = data
  dense = model.clone(vlora=None, lora=None)

  def loss(p):
    layout = stack.layout_from_params(p, model.vlora)
    entries = lora.layout({e.path: e.shape for e in layout.entries}) if lora else ()
    per_layer = traverse_util.unflatten_dict(ref.materialize_prefix_sum(p, layout, entries), sep="/")
    return jnp.sum(dense.apply({"params": {"per_layer": per_layer}}, x, gate) * cot)
  return loss


def _float64_loss(spec, data, lora):
  x, gate, cot = data

  def loss(p):
    h = jnp.asarray(x, jnp.float64)
    for w in ref.layer_weights_x64(p, spec, L, lora):
      h = ToyBlock().apply({"params": traverse_util.unflatten_dict(w, sep="/")}, h,
                           jnp.asarray(gate, jnp.float64))
    return jnp.sum(h * jnp.asarray(cot, jnp.float64))
  return loss


def _assert_trees_close(got, want, what, tol=1e-5):
  """Every leaf within ``tol``, relative to the larger of 1 and the leaf's largest magnitude (float32
  sums of terms of ~30 leave absolute errors of ~1e-5 in small entries)."""
  got, want = _flat(got), _flat(want)
  assert set(got) == set(want), what
  for path in got:
    a, b = np.asarray(got[path], np.float64), np.asarray(want[path], np.float64)
    scale = max(1.0, float(np.abs(b).max())) if b.size else 1.0
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol * scale, err_msg=f"{what}: {path}")


@pytest.mark.parametrize("name,lora,remat", CASES,
                         ids=[f"{n}-{'lora' if lo else 'nolora'}-{r}" for n, lo, r in CASES])
def test_values_and_gradients_equal_every_reference(name, lora, remat):
  spec = SPECS[name]
  model, params, data = _setup(spec, lora, remat)
  value, grads = jax.value_and_grad(_loss(model, data))(params)
  assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads) if g.size)

  if (name, lora, remat) in UNROLLED:
    unrolled = model.clone(scan=False)
    u_value, u_grads = jax.value_and_grad(_loss(unrolled, data))(params)
    np.testing.assert_allclose(value, u_value, rtol=1e-5)
    _assert_trees_close(grads, u_grads, "unrolled")

  p_value, p_grads = jax.value_and_grad(_prefix_sum_loss(model, data, lora))(params)
  np.testing.assert_allclose(value, p_value, rtol=1e-5)
  _assert_trees_close(grads, p_grads, "prefix-sum path")

  with jax.enable_x64(True):
    params64 = jax.tree.map(lambda p: jnp.asarray(p, jnp.float64), params)
    f_value, f_grads = jax.value_and_grad(_float64_loss(spec, data, lora))(params64)
  np.testing.assert_allclose(value, f_value, rtol=1e-5)
  _assert_trees_close(grads, f_grads, "float64")


def test_stop_gradient_base_only_layer_zero_trains_the_base():
  """Official: a loss on layers k >= 1 alone gives the base no gradient at all; without it, some."""
  spec = SPECS["official"]
  model, params, data = _setup(spec, None)
  layout = stack.layout_from_params(params, spec)

  def later_layers(p, s):
    weights = stack.materialize(p, stack.layout_from_params(p, s))
    return jnp.sum(weights["up"]["kernel"][np.r_[1:3, 4:6]] ** 2)

  g_sg = jax.grad(later_layers)(params, spec)
  g_free = jax.grad(later_layers)(params, VLoRASpec(**{**spec.__dict__, "stop_gradient_base": False}))
  assert layout.spec.stop_gradient_base
  assert float(jnp.abs(g_sg["base"]["up"]["kernel"]).max()) == 0.0
  assert float(jnp.abs(g_free["base"]["up"]["kernel"]).max()) > 0.0


def test_materialize_builds_the_weights_the_stack_runs_with():
  for name, lora in (("cumulative", LORA), ("official", None), ("tied", LORA)):
    spec = SPECS[name]
    model, params, (x, gate, _) = _setup(spec, lora)
    layout = stack.layout_from_params(params, spec)
    entries = lora.layout({e.path: e.shape for e in layout.entries}) if lora else ()
    merged = _flat(stack.materialize(params, layout, entries))
    want = ref.materialize_prefix_sum(params, layout, entries)
    _assert_trees_close(merged, want, name, tol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["cumulative", "official"])
def test_bf16_compute_chain_in_float32(name):
  """bf16 matmuls, float32 parameters and chain: the weights the stack builds are the float32
  prefix-sum weights, and the bf16 outputs and gradients match the prefix-sum path to bf16 rounding."""
  spec = VLoRASpec(**{**SPECS[name].__dict__, "targets": ("attn/qkv/kernel", "mlp/fc1/kernel",
                                                           "norm1/scale")})
  block = layers.EncoderBlock(dim=16, num_heads=2, mlp_dim=32, dtype=jnp.bfloat16)
  model = stack.vlorafy(block, L, spec)
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(2, 5, 16)), jnp.bfloat16)
  params = nn.unbox(model.init(jax.random.key(0), x))["params"]
  params = jax.tree.map(lambda p: p + 0.05 * jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
  assert {p.dtype for p in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
  layout = stack.layout_from_params(params, spec)
  _assert_trees_close(_flat(stack.materialize(params, layout)),
                      ref.materialize_prefix_sum(params, layout), "float32 chain", tol=1e-6)

  y = model.apply({"params": params}, x)
  assert y.dtype == jnp.bfloat16
  dense = model.clone(vlora=None)
  prefix = lambda p: {"per_layer": traverse_util.unflatten_dict(
      ref.materialize_prefix_sum(p, stack.layout_from_params(p, spec)), sep="/")}
  loss = lambda p: jnp.sum(model.apply({"params": p}, x).astype(jnp.float32))
  loss_prefix = lambda p: jnp.sum(dense.apply({"params": prefix(p)}, x).astype(jnp.float32))
  np.testing.assert_allclose(np.asarray(y, np.float32),
                             np.asarray(dense.apply({"params": prefix(params)}, x), np.float32),
                             rtol=2e-2, atol=2e-2)
  g, g_prefix = jax.grad(loss)(params), jax.grad(loss_prefix)(params)
  for path, a in _flat(g).items():
    b = _flat(g_prefix)[path]
    assert a.dtype == jnp.float32, path
    np.testing.assert_allclose(a, b, rtol=5e-2, atol=5e-2 * float(jnp.abs(b).max()), err_msg=path)
