"""The relaxed mode (Relaxed Recursive Transformers): W_k = W_0 + scale A_k B_k for every layer
k = 0 .. s-1 of a compound, W_0 a shared weight that is no layer. Values and gradients against a
float64 reference, the stack scanned and unrolled, merging, and parameter counts."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import chain_reference as ref
from chain_reference import ToyBlock
from vlora_jax.core import chain, params as params_lib, stack
from vlora_jax.core.spec import VLoRASpec

C, S, D_IN, D_OUT, R = 2, 3, 6, 5, 2
SCALE = 0.75
SPEC = VLoRASpec(compound_size=3, targets=("up/kernel", "down/kernel", "ln/scale"), rank=2,
                 alpha=(2.0, 1.0, 1.0), mode="relaxed")


def _factors(seed=0):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(C, D_IN, D_OUT)), rng.normal(size=(C, S, D_IN, R)),
          rng.normal(size=(C, S, R, D_OUT)), rng.normal(size=(C, S, D_IN, D_OUT)))


def _layers(base, a, b):
  """Every layer's weight ``[C, S, ...]`` as the stack builds it, one `layer_weight` a layer."""
  term = ("increments", (("mode", "relaxed"), ("scale", SCALE)))
  return jnp.stack([jnp.stack([chain.layer_weight(base, jnp.int32(c), (term,),
                                                  ((a, b, jnp.int32(c), jnp.int32(k)),))
                               for k in range(S)]) for c in range(C)])


def test_layer_weights_and_gradients_equal_the_float64_definition():
  base, a, b, g = _factors()
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  want = base[:, None] + SCALE * np.einsum("ckir,ckro->ckio", a, b)  # every k, 0 included
  np.testing.assert_allclose(_layers(f32(base), f32(a), f32(b)), want, rtol=1e-5, atol=1e-5)
  grads = jax.grad(lambda *p: jnp.sum(_layers(*p) * f32(g)), argnums=(0, 1, 2))(
      f32(base), f32(a), f32(b))
  want_grads = (g.sum(1),                                    # the base: from every layer
                SCALE * np.einsum("ckio,ckro->ckir", g, b),   # A_k: from layer k alone
                SCALE * np.einsum("ckir,ckio->ckro", a, g))
  for got, w in zip(grads, want_grads):
    np.testing.assert_allclose(got, w, rtol=1e-4, atol=1e-4)


def test_vector_increments_every_layer_its_own():
  rng = np.random.default_rng(1)
  base, deltas = rng.normal(size=(C, D_OUT)), rng.normal(size=(C, S, D_OUT))
  term = ("vector", (("mode", "relaxed"),))
  for c in range(C):
    for k in range(S):
      inputs = (jnp.asarray(deltas, jnp.float32), jnp.int32(c), jnp.int32(k))
      got = chain.layer_weight(jnp.asarray(base, jnp.float32), jnp.int32(c), (term,), (inputs,))
      np.testing.assert_allclose(got, base[c] + deltas[c, k], rtol=1e-6, atol=1e-6)


def _setup(scan=True):
  model = stack.vlorafy(ToyBlock(), 6, SPEC, scan=scan)
  x = jax.random.normal(jax.random.key(0), (3, 5, 8))
  gate = jnp.full((1, 1, 16), 0.5)
  variables = nn.unbox(model.init(jax.random.key(1), x, gate))
  # Non-zero vector increments (they start at zero): every term counts.
  p = traverse_util.flatten_dict(variables["params"], sep="/")
  p["inc_vec/ln/scale"] = 0.1 * jax.random.normal(jax.random.key(2), p["inc_vec/ln/scale"].shape)
  return model, {"params": traverse_util.unflatten_dict(p, sep="/")}, x, gate


def test_stack_shapes_scan_unrolled_and_float64_layers_agree():
  model, v, x, gate = _setup()
  p = traverse_util.flatten_dict(v["params"], sep="/")
  assert p["base/up/kernel"].shape == (2, 8, 16)      # [C, ...]: one shared weight a compound
  assert p["inc_a/up/kernel"].shape == (2, 3, 8, 2)   # [C, s, ...]: the first layer has one too
  assert p["inc_vec/ln/scale"].shape == (2, 3, 8)
  y = model.apply(v, x, gate)
  np.testing.assert_allclose(model.clone(scan=False).apply(v, x, gate), y, rtol=1e-5, atol=1e-5)
  out = x
  for weights in ref.layer_weights_float64(v["params"], SPEC, 6):
    tree = traverse_util.unflatten_dict({k: jnp.asarray(w, jnp.float32) for k, w in
                                         weights.items()}, sep="/")
    out = ToyBlock().apply({"params": tree}, out, gate)
  np.testing.assert_allclose(y, out, rtol=1e-5, atol=1e-5)
  # the first layer of a compound is no longer its base
  w = stack.materialize(v["params"], model.layout_for(x, gate)[0])
  assert not np.allclose(w["up"]["kernel"][0], v["params"]["base"]["up"]["kernel"][0])


def test_stack_gradients_equal_the_float64_definition_and_unrolled():
  model, v, x, gate = _setup()
  loss = lambda m: lambda p: jnp.sum(m.apply({"params": p}, x, gate) ** 2)
  g_scan = jax.grad(loss(model))(v["params"])
  g_unrolled = jax.grad(loss(model.clone(scan=False)))(v["params"])

  with jax.enable_x64():
    def loss64(p):
      out = x.astype(jnp.float64)
      for weights in ref.layer_weights_x64(p, SPEC, 6):
        out = _toy64(weights, out, gate.astype(jnp.float64))
      return jnp.sum(out ** 2)
    p64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), v["params"])
    g64 = jax.grad(loss64)(p64)
  flat = lambda t: traverse_util.flatten_dict(t, sep="/")
  for path, got in flat(g_scan).items():
    np.testing.assert_allclose(got, flat(g_unrolled)[path], rtol=1e-4, atol=1e-5, err_msg=path)
    np.testing.assert_allclose(got, np.asarray(flat(g64)[path]), rtol=2e-3, atol=2e-4,
                               err_msg=path)
  assert float(jnp.abs(flat(g_scan)["inc_a/up/kernel"][:, 0]).max()) > 0  # layer 0 learns too


def _toy64(w, x, gate):
  """`ToyBlock` written out in float64 (the reference of its gradients)."""
  mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  h = (x - mu) / jnp.sqrt(var + 1e-6) * w["ln/scale"] + w["ln/bias"]
  h = jnp.tanh(h @ w["up/kernel"] + w["up/bias"]) * gate
  return x + h @ w["down/kernel"] + w["down/bias"]


def test_merge_into_the_dense_twin_gives_the_same_function():
  model, v, x, gate = _setup()
  merged = stack.merge(v["params"], SPEC)
  np.testing.assert_allclose(model.clone(vlora=None).apply({"params": merged}, x, gate),
                             model.apply(v, x, gate), rtol=1e-6, atol=1e-6)


def test_parameter_count():
  """Per compound: one base, and s increments (not s - 1) per targeted weight."""
  _, v, _, _ = _setup()
  counts = params_lib.count(v["params"])
  d, h = 8, 16
  per_compound = (d * h + S * R * (d + h)) + (h * d + S * R * (h + d)) + (d + S * d)
  per_layer_full = h + d + d  # up/bias, down/bias, ln/bias
  assert counts["total"] == C * per_compound + 6 * per_layer_full


def test_relaxed_refuses_the_official_stop_gradient():
  with pytest.raises(ValueError, match="stop_gradient_base=True with vlora.mode='relaxed'"):
    VLoRASpec(mode="relaxed", stop_gradient_base=True)
  assert chain.num_steps("relaxed", 4) == 4 and chain.num_steps("anchored", 4) == 3


# ------------------------------------------------------------------------ compression (dense -> relaxed)


def _dense_stack(seed=0):
  """A trained-looking dense ToyBlock stack: layers share a component, plus their own parts."""
  model = stack.vlorafy(ToyBlock(), 6)
  x, gate = jax.random.normal(jax.random.key(0), (3, 5, 8)), jnp.full((1, 1, 16), 0.5)
  p = nn.unbox(model.init(jax.random.key(seed), x, gate))["params"]
  rng = np.random.default_rng(seed)
  shared = lambda a: np.asarray(a[:1]) + 0.3 * rng.standard_normal(a.shape).astype(np.float32)
  return model, jax.tree.map(shared, p), x, gate


def test_compress_into_relaxed_loads_and_is_exact_at_full_rank():
  from vlora_jax.convert.compress import compress
  dense_model, dense, x, gate = _dense_stack()
  spec = VLoRASpec(compound_size=3, targets=("up/kernel", "down/kernel", "ln/scale"), rank=8,
                   mode="relaxed")
  out = compress(dense, spec, base="mean")
  relaxed = stack.vlorafy(ToyBlock(), 6, spec)
  want = jax.tree.map(jnp.shape, nn.unbox(relaxed.init(jax.random.key(0), x, gate))["params"])
  assert jax.tree.map(jnp.shape, out.params) == want  # the model's own tree: s steps a compound
  assert float(out.total.max()) < 1e-5  # rank 8 = min(d_in, d_out): every layer exact
  np.testing.assert_allclose(relaxed.apply({"params": out.params}, x, gate),
                             dense_model.apply({"params": dense}, x, gate), rtol=1e-4, atol=1e-4)
  bases = out.params["base"]["up"]["kernel"]
  np.testing.assert_allclose(bases[0], dense["per_layer"]["up"]["kernel"][:3].mean(0), atol=1e-6)


def test_relaxed_zero_increments_and_budget_count():
  from vlora_jax.convert.compress import budget_ranks, compress
  _, dense, _, _ = _dense_stack(1)
  spec = VLoRASpec(compound_size=3, targets=("up/kernel", "down/kernel"), rank=2, mode="relaxed")
  zero = compress(dense, spec, base="mean", increments="zero")
  w = stack.materialize(zero.params, stack.layout_from_params(zero.params, spec))["up"]["kernel"]
  for layer in range(6):  # every layer, the first included, is its compound's mean
    np.testing.assert_allclose(w[layer], zero.params["base"]["up"]["kernel"][layer // 3],
                               atol=1e-6)
  budget = budget_ranks(dense, spec, 0.7, base="mean")
  assert budget.count == params_lib.count(compress(dense, budget.spec, base="mean").params)["total"]
  assert budget.count <= 0.7 * budget.dense
  for t in range(len(spec.targets)):  # the budget is spent: one more rank of any target breaks it
    ranks = list(budget.spec.ranks)
    ranks[t] += 1
    more = compress(dense, dataclasses.replace(spec, rank=tuple(ranks)), base="mean").params
    assert params_lib.count(more)["total"] > 0.7 * budget.dense, (t, ranks)
