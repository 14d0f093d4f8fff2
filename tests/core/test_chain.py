"""The increment chain against a float64 numpy reference and an unrolled loop: values and gradients.

Both the per-layer form the stack trains with (`chain.layer_factors` + `chain.layer_weight`) and
the prefix-sum chain it replaced (`chain_reference`), which the stack tests use as a reference.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import chain_reference as ref
from vlora_jax.core import chain

C, S, D_IN, D_OUT, R = 3, 4, 6, 5, 2
SCALE = 0.75


def _factors(seed=0):
  rng = np.random.default_rng(seed)
  base = rng.normal(size=(C, D_IN, D_OUT))
  a = rng.normal(size=(C, S - 1, D_IN, R))
  b = rng.normal(size=(C, S - 1, R, D_OUT))
  g = rng.normal(size=(C, S, D_IN, D_OUT))  # cotangent: loss = sum(W * g)
  return base, a, b, g


def numpy_chain(base, a, b, mode):
  """float64 reference, written from the definitions."""
  out = np.zeros((C, S, D_IN, D_OUT))
  for c in range(C):
    out[c, 0] = base[c]
    for k in range(1, S):
      prev = out[c, k - 1] if mode == "cumulative" else base[c]
      out[c, k] = prev + SCALE * a[c, k - 1] @ b[c, k - 1]
  return out


def numpy_grads(base, a, b, g, mode, stop_gradient_base):
  """Analytic gradients of sum(W * g) wrt base, A, B in float64."""
  # How much each layer's cotangent reaches increment j: cumulative -> all layers k >= j.
  reach = np.zeros((C, S - 1, D_IN, D_OUT))
  for j in range(1, S):
    reach[:, j - 1] = g[:, j:].sum(1) if mode == "cumulative" else g[:, j]
  d_base = g[:, 0] if stop_gradient_base else g.sum(1)
  d_a = SCALE * np.einsum("ckio,ckro->ckir", reach, b)
  d_b = SCALE * np.einsum("ckir,ckio->ckro", a, reach)
  return d_base, d_a, d_b


def jax_chain(base, a, b, mode, stop_gradient_base, unrolled=False):
  deltas = ref.increments(a, b, SCALE)
  fn = ref.chain_reference_unrolled if unrolled else ref.chain
  return fn(base, deltas, mode=mode, stop_gradient_base=stop_gradient_base)


@pytest.mark.parametrize("mode", ["cumulative", "anchored"])
@pytest.mark.parametrize("stop_gradient_base", [False, True])
def test_chain_matches_float64_reference_and_unrolled_loop(mode, stop_gradient_base):
  base, a, b, g = _factors()
  want = numpy_chain(base, a, b, mode)
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  got = jax_chain(f32(base), f32(a), f32(b), mode, stop_gradient_base)
  unrolled = jax_chain(f32(base), f32(a), f32(b), mode, stop_gradient_base, unrolled=True)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got, unrolled, rtol=1e-6, atol=1e-6)

  def loss(fn_unrolled):
    return lambda *p: jnp.sum(jax_chain(*p, mode, stop_gradient_base, fn_unrolled) * f32(g))

  grads = jax.grad(loss(False), argnums=(0, 1, 2))(f32(base), f32(a), f32(b))
  grads_unrolled = jax.grad(loss(True), argnums=(0, 1, 2))(f32(base), f32(a), f32(b))
  for got_g, ref_g, unr_g in zip(grads, numpy_grads(base, a, b, g, mode, stop_gradient_base),
                                 grads_unrolled):
    np.testing.assert_allclose(got_g, ref_g, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got_g, unr_g, rtol=1e-5, atol=1e-5)


def test_stop_gradient_base_means_base_grad_from_layer_zero_only():
  base, a, b, _ = _factors(1)
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  for mode in ("cumulative", "anchored"):
    # A loss on layers k >= 1 only: with stop-gradient the base gets exactly nothing.
    later = lambda w0, sg: jnp.sum(jax_chain(w0, f32(a), f32(b), mode, sg)[:, 1:] ** 2)
    assert float(jnp.abs(jax.grad(later)(f32(base), True)).max()) == 0.0
    assert float(jnp.abs(jax.grad(later)(f32(base), False)).max()) > 0.0


def test_tied_every_layer_is_the_base_and_base_gets_grad_from_all():
  base, _, _, g = _factors(2)
  w = ref.expand(ref.chain(jnp.asarray(base, jnp.float32), None, mode="tied"), S)
  assert w.shape == (C * S, D_IN, D_OUT)
  for c in range(C):
    for k in range(S):
      np.testing.assert_array_equal(w[c * S + k], base[c].astype(np.float32))
  grad = jax.grad(lambda w0: jnp.sum(ref.expand(ref.chain(w0, None, mode="tied"), S)
                                     .reshape(C, S, D_IN, D_OUT) * g))(jnp.asarray(base, jnp.float32))
  np.testing.assert_allclose(grad, g.sum(1), rtol=1e-5)


def test_zero_b_init_keeps_every_layer_equal_to_its_base():
  a, b = chain.init_factors(jax.random.key(0), compounds=C, steps=S - 1, d_in=D_IN, d_out=D_OUT,
                            rank=R, init="zero_b")
  assert float(jnp.abs(a).max()) > 0 and float(jnp.abs(b).max()) == 0.0
  base = jax.random.normal(jax.random.key(1), (C, D_IN, D_OUT))
  for mode in ("cumulative", "anchored"):
    w = ref.chain(base, ref.increments(a, b, SCALE), mode=mode)
    for k in range(S):
      np.testing.assert_array_equal(w[:, k], base)


def test_official_init_bounds_and_nonzero_increments():
  d_in, d_out = 64, 256
  a, b = chain.init_factors(jax.random.key(0), compounds=2, steps=3, d_in=d_in, d_out=d_out, rank=8)
  # kaiming_uniform(a=sqrt 5) on torch A [r, in], B [r, out]: bounds 1/sqrt(in), 1/sqrt(out).
  assert float(jnp.abs(a).max()) <= 1 / np.sqrt(d_in)
  assert float(jnp.abs(a).max()) > 0.9 / np.sqrt(d_in)
  assert float(jnp.abs(b).max()) <= 1 / np.sqrt(d_out)
  assert float(jnp.abs(b).max()) > 0.9 / np.sqrt(d_out)
  assert float(jnp.abs(ref.increments(a, b, 1.0)).max()) > 0


def test_chain_accumulates_in_float32_for_bf16_params():
  base, a, b, _ = _factors(3)
  bf = lambda x: jnp.asarray(x, jnp.bfloat16)
  w = ref.chain(bf(base), ref.increments(bf(a), bf(b), SCALE), mode="cumulative")
  assert w.dtype == jnp.float32
  want = numpy_chain(np.asarray(bf(base), np.float64), np.asarray(bf(a), np.float64),
                     np.asarray(bf(b), np.float64), "cumulative")
  np.testing.assert_allclose(w, want, rtol=1e-5, atol=1e-5)


def test_scaling_rules():
  assert chain.lora_scale(16.0, 4) == 4.0
  assert chain.lora_scale(16.0, 4, "rslora") == 8.0
  chex.assert_trees_all_close(chain.lora_scale(1.0, 8), 0.125)


# ------------------------------------------------------------------ one layer at a time (the stack)


def per_layer_chain(base, a, b, mode, stop_gradient_base):
  """All layers' weights ``[C, S, ...]`` as the stack builds them: one `layer_weight` per layer."""
  rows = []
  for c in range(C):
    row = []
    for k in range(S):
      ci, ki = jnp.int32(c), jnp.int32(k)  # traced in the stack: no Python branching on them
      gate = (ki == 0).astype(jnp.float32) if stop_gradient_base else None
      term = ("increments", (("mode", mode), ("scale", SCALE)))
      row.append(chain.layer_weight(base, ci, (term,), ((a, b, ci, ki),), gate))
    rows.append(jnp.stack(row))
  return jnp.stack(rows)


@pytest.mark.parametrize("mode", ["cumulative", "anchored"])
@pytest.mark.parametrize("stop_gradient_base", [False, True])
def test_layer_by_layer_matches_float64_reference_and_prefix_sum(mode, stop_gradient_base):
  base, a, b, g = _factors(4)
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  got = per_layer_chain(f32(base), f32(a), f32(b), mode, stop_gradient_base)
  np.testing.assert_allclose(got, numpy_chain(base, a, b, mode), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got, jax_chain(f32(base), f32(a), f32(b), mode, stop_gradient_base),
                             rtol=1e-6, atol=1e-6)

  loss = lambda *p: jnp.sum(per_layer_chain(*p, mode, stop_gradient_base) * f32(g))
  grads = jax.grad(loss, argnums=(0, 1, 2))(f32(base), f32(a), f32(b))
  for got_g, ref_g in zip(grads, numpy_grads(base, a, b, g, mode, stop_gradient_base)):
    np.testing.assert_allclose(got_g, ref_g, rtol=1e-5, atol=1e-5)


def test_layer_weight_without_index_or_increment():
  base, a, b, g = _factors(5)
  w = jnp.asarray(base[0], jnp.float32)
  lhs, rhs = jnp.asarray(a[0, 0], jnp.float32), jnp.asarray(b[0, 0], jnp.float32)
  adapter = (("adapter", (("scale", SCALE),)),)
  weight = lambda w, lhs, rhs: chain.layer_weight(w, None, adapter, ((lhs, rhs),))
  np.testing.assert_allclose(weight(w, lhs, rhs), base[0] + SCALE * a[0, 0] @ b[0, 0],
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(chain.layer_weight(jnp.asarray(base, jnp.float32), jnp.int32(2)),
                                base[2].astype(np.float32))
  d_w, d_lhs, d_rhs = jax.grad(lambda *p: jnp.sum(weight(*p) * g[0, 0]), argnums=(0, 1, 2))(
      w, lhs, rhs)
  np.testing.assert_allclose(d_w, g[0, 0], rtol=1e-6)
  np.testing.assert_allclose(d_lhs, SCALE * g[0, 0] @ b[0, 0].T, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(d_rhs, SCALE * a[0, 0].T @ g[0, 0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["cumulative", "anchored"])
def test_vector_increments_per_layer(mode):
  rng = np.random.default_rng(6)
  base, deltas = rng.normal(size=(C, D_OUT)), rng.normal(size=(C, S - 1, D_OUT))
  for c in range(C):
    w = base[c]
    for k in range(S):
      if k:
        w = (w if mode == "cumulative" else base[c]) + deltas[c, k - 1]
      term = ("vector", (("mode", mode),))
      inputs = (jnp.asarray(deltas, jnp.float32), jnp.int32(c), jnp.int32(k))
      got = chain.layer_weight(jnp.asarray(base, jnp.float32), jnp.int32(c), (term,), (inputs,))
      np.testing.assert_allclose(got, w, rtol=1e-5, atol=1e-5)


def test_layer_weight_accumulates_in_float32_for_bf16_params():
  base, a, b, _ = _factors(7)
  bf = lambda x: jnp.asarray(x, jnp.bfloat16)
  w = per_layer_chain(bf(base), bf(a), bf(b), "cumulative", False)
  assert w.dtype == jnp.bfloat16  # the base's dtype, after an f32 sum
  want = numpy_chain(*(np.asarray(bf(x), np.float64) for x in (base, a, b)), "cumulative")
  np.testing.assert_array_equal(w, want.astype(jnp.bfloat16))


@pytest.mark.parametrize("gate", [0.0, 1.0, 0.5])
def test_lowrank_matmul_against_float64(gate):
  """Value and every gradient of ``x @ (w0 + lhs @ rhs)``, ``w0``'s scaled by the gate, under jit
  (a traced gate: the branch is chosen at run time)."""
  rng = np.random.default_rng(8)
  x, w0 = rng.normal(size=(7, D_IN)), rng.normal(size=(D_IN, D_OUT))
  lhs, rhs, dy = rng.normal(size=(D_IN, R)), rng.normal(size=(R, D_OUT)), rng.normal(size=(7, D_OUT))
  f32 = lambda v: jnp.asarray(v, jnp.float32)
  y, vjp = jax.jit(lambda *p: jax.vjp(chain.lowrank_matmul, *p))(
      f32(x), f32(w0), f32(lhs), f32(rhs), f32(gate))
  dx, d_w0, d_lhs, d_rhs, _ = vjp(f32(dy))
  w, g = w0 + lhs @ rhs, x.T @ dy
  for got, want in ((y, x @ w), (dx, dy @ w.T), (d_w0, gate * g), (d_lhs, g @ rhs.T),
                    (d_rhs, lhs.T @ g)):
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def test_detached_base_backward_forms_no_weight_sized_gradient():
  """Where the gate is 0, the backward branch has no ``d_in x d_out`` product over the rows: the
  FLOPs the factored weight saves (`chain.LowRankWeight`)."""
  args = [jnp.zeros(s, jnp.float32) for s in ((7, D_IN), (D_IN, D_OUT), (D_IN, R), (R, D_OUT), ())]
  jaxpr = jax.make_jaxpr(lambda *p: jax.vjp(chain.lowrank_matmul, *p)[1](
      jnp.ones((7, D_OUT))))(*args)
  (cond,) = [e for e in jaxpr.eqns if e.primitive.name == "cond"]
  factors_only, full = cond.params["branches"]  # index 0: the predicate (gate != 0) is False

  def weight_sized_dots(branch):
    return [e for e in branch.jaxpr.eqns if e.primitive.name == "dot_general"
            and e.outvars[0].aval.shape == (D_IN, D_OUT)]
  assert not weight_sized_dots(factors_only) and len(weight_sized_dots(full)) == 1


def test_factored_weight_reads_as_layer_weight():
  """Where a consumer does not know `LowRankWeight` (``jnp.asarray``: what ``nn.Dense`` does), it
  reads as `layer_weight`'s array, with the same gradients."""
  base, a, b, g = _factors(9)
  f32 = lambda v: jnp.asarray(v, jnp.float32)
  term = (("increments", (("mode", "anchored"), ("scale", SCALE))),)
  for k in range(S):
    ci, ki = jnp.int32(1), jnp.int32(k)
    gate = (ki == 0).astype(jnp.float32)
    plain = lambda *p: chain.layer_weight(p[0], ci, term, ((p[1], p[2], ci, ki),), gate)
    factored = lambda *p: jnp.asarray(chain.factored_weight(p[0], ci, term, ((p[1], p[2], ci, ki),),
                                                            gate))
    params = (f32(base), f32(a), f32(b))
    np.testing.assert_allclose(factored(*params), plain(*params), rtol=1e-6)
    for fn in (plain, factored):
      grads = jax.grad(lambda *p: jnp.sum(fn(*p) * f32(g[1, k])), argnums=(0, 1, 2))(*params)
      if fn is plain:
        want = grads
      else:
        for got, ref_g in zip(grads, want):
          np.testing.assert_allclose(got, ref_g, rtol=1e-6, atol=1e-6)
