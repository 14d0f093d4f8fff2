"""`convert.compress` inits: whitened (activation-aware) and zero increments, ranks from a budget.

Pure numpy stacks of tiny shapes, built as a dense `LayerStack`'s
``{'per_layer': {path: [L, ...]}}`` (no model init, no training), so the whole file runs in seconds.
"""

import dataclasses

import numpy as np
import pytest
from flax import traverse_util

from vlora_jax.core import params as params_lib
from vlora_jax.core import stack
from vlora_jax.convert.compress import (_compress_compound, budget_ranks, budget_ranks_tree,
                                        compress, compress_tree, whitener)
from vlora_jax.core.spec import VLoRASpec

D, L = 12, 4
QKV, FC2, BIAS = "attn/qkv/kernel", "mlp/fc2/kernel", "mlp/fc2/bias"
MATRICES = {QKV: D, FC2: 2 * D}  # path -> d_in


def _flat(tree):
  return traverse_util.flatten_dict(tree, sep="/")


def dense_stack(seed=0, dtype=np.float32):
  """Layers that share a component (as trained layers do) plus independent full-rank parts."""
  rng = np.random.default_rng(seed)
  def layers(shape):
    shared = rng.standard_normal(shape)
    return np.stack([shared + 0.5 * rng.standard_normal(shape) for _ in range(L)]).astype(dtype)
  return {"per_layer": {
      "attn": {"qkv": {"kernel": layers((D, 3 * D))}},
      "mlp": {"fc2": {"kernel": layers((2 * D, D)), "bias": layers((D,))}},
      "norm": {"scale": (1 + 0.1 * rng.standard_normal((L, D))).astype(dtype)}}}


def calibration(seed=1, n=400):
  """``{path: X [L, n, d_in]}``: inputs with a strongly non-uniform spectrum (1 .. 1e-3) in a
  random basis per layer, so that the output error weighs directions very differently."""
  rng = np.random.default_rng(seed)
  def inputs(d):
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return (rng.standard_normal((n, d)) * 10.0 ** -np.linspace(0, 3, d)) @ q.T
  return {p: np.stack([inputs(d) for _ in range(L)]) for p, d in MATRICES.items()}


def covariances(x):
  return {p: np.einsum("lni,lnj->lij", v, v) / v.shape[1] for p, v in x.items()}


def spec_of(mode="anchored", rank=3, **kw):
  return VLoRASpec(compound_size=4, rank=rank, mode=mode, targets=(QKV, FC2, BIAS), **kw)


def output_errors(dense, out, spec, x):
  """``{path: [L]}`` ``||X (W - Ŵ)||_F / ||X W||_F`` on the calibration inputs themselves."""
  got = _flat(stack.materialize(out.params, stack.layout_from_params(out.params, spec)))
  want = _flat(dense["per_layer"])
  res = {}
  for p, xs in x.items():
    w, w_hat = np.asarray(want[p], np.float64), np.asarray(got[p], np.float64)
    res[p] = np.array([np.linalg.norm(xs[l] @ (w[l] - w_hat[l])) / np.linalg.norm(xs[l] @ w[l])
                       for l in range(L)])
  return res


# ---------------------------------------------------------------------------- whitened increments


@pytest.mark.parametrize("mode", ["anchored", "cumulative"])
def test_whitened_with_identity_covariance_is_plain_svd(mode):
  w = dense_stack(dtype=np.float64)["per_layer"]["attn"]["qkv"]["kernel"]
  e = VLoRASpec(compound_size=L, rank=3, mode=mode, targets=(QKV,)).layout(
      {QKV: (D, 3 * D)}, L).entries[0]
  eye = whitener(np.eye(D), 1e-6)
  plain_rec, (plain_a, plain_b) = _compress_compound(w, w[0], e, mode, "svd")
  white_rec, (white_a, white_b) = _compress_compound(w, w[0], e, mode, "whitened", [eye] * L)
  # float64 throughout: the same factors, not just the same product.
  np.testing.assert_allclose(white_a, plain_a, rtol=0, atol=1e-10)
  np.testing.assert_allclose(white_b, plain_b, rtol=0, atol=1e-10)
  np.testing.assert_allclose(white_rec, plain_rec, rtol=0, atol=1e-10)
  assert np.abs(plain_rec[1:] - w[1:]).max() > 0.1  # rank 3 of 12: a real truncation

  # End to end (float32 params, as the model takes them): the same tree, the same numbers.
  dense, spec = dense_stack(), spec_of(mode)
  eye_cov = {p: np.broadcast_to(np.eye(d), (L, d, d)) for p, d in MATRICES.items()}
  plain = compress(dense, spec)
  white = compress(dense, spec, increments="whitened", covariances=eye_cov)
  for path, a in _flat(plain.params).items():
    np.testing.assert_allclose(np.asarray(_flat(white.params)[path]), np.asarray(a), atol=1e-6)
  # With C = I the output error is the weight error.
  for p in MATRICES:
    np.testing.assert_allclose(white.out_errors[p], white.errors[p], atol=1e-6)


@pytest.mark.parametrize("mode", ["anchored", "cumulative"])
def test_whitened_trades_weight_error_for_output_error(mode):
  dense, spec, x = dense_stack(), spec_of(mode), calibration()
  cov = covariances(x)
  plain = compress(dense, spec, covariances=cov)  # plain SVD; the covariances only report
  white = compress(dense, spec, increments="whitened", covariances=cov)
  out_plain, out_white = output_errors(dense, plain, spec, x), output_errors(dense, white, spec, x)
  later = [l for l in range(L) if l % spec.compound_size]  # layer 0 of a compound is exact
  for p in MATRICES:
    print(mode, p, "output", out_plain[p][later].round(3), out_white[p][later].round(3),
          "weight", plain.errors[p][later].round(3), white.errors[p][later].round(3))
    # Lower output error on the calibration inputs, in every layer that has an increment ...
    assert (out_white[p][later] < 0.8 * out_plain[p][later]).all()
    # ... at the price of a higher weight error: the trade-off is real.
    assert (white.errors[p][later] > plain.errors[p][later]).all()
    # What `Compressed` reports is that output error.
    np.testing.assert_allclose(white.out_errors[p], out_white[p], rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(plain.out_errors[p], out_plain[p], rtol=1e-3, atol=1e-6)
  assert (white.out_total[later] < plain.out_total[later]).all()
  assert plain.errors[BIAS].max() < 1e-6 and white.errors[BIAS].max() < 1e-6  # vectors: exact


@pytest.mark.parametrize("mode", ["anchored", "cumulative"])
def test_rank_deficient_covariance(mode):
  """5 calibration tokens for 12 or 24 inputs: C has rank 5. Another layer's C is all zero."""
  dense, x = dense_stack(), {p: v[:, :5] for p, v in calibration().items()}
  x[QKV][2] = 0.0  # inputs that are always zero: any increment is output-exact (S = I there)
  cov = covariances(x)
  assert {int(np.linalg.matrix_rank(c)) for c in cov[FC2]} == {5}
  for rank in (3, 5):
    spec = spec_of(mode, rank=rank)
    plain = compress(dense, spec, covariances=cov)
    white = compress(dense, spec, increments="whitened", covariances=cov)
    for path, a in _flat(white.params).items():
      assert np.isfinite(np.asarray(a)).all(), path
    assert np.isfinite(white.out_total).all() and np.isfinite(white.total).all()
    with np.errstate(invalid="ignore"):  # 0 / 0 in the layer without inputs
      out_plain = output_errors(dense, plain, spec, x)
      out_white = output_errors(dense, white, spec, x)
    for p in MATRICES:
      ok = np.isfinite(out_plain[p])  # the all-zero layer has no output to measure
      assert (out_white[p][ok] <= out_plain[p][ok] + 1e-6).all(), (p, out_white[p], out_plain[p])
      if rank == 5:  # the inputs span 5 directions: rank 5 reproduces every output
        assert out_white[p][ok].max() < 1e-2 < out_plain[p][1:][ok[1:]].min()


def test_whitener_is_a_damped_square_root():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((3, D))  # rank 3 of 12
  c = x.T @ x / 3
  s, s_inv = whitener(c, 1e-4)
  floor = 1e-4 * np.trace(c) / D
  np.testing.assert_allclose(s, s.T, atol=1e-12)
  np.testing.assert_allclose(s @ s, c + floor * np.eye(D), atol=1e-10)
  np.testing.assert_allclose(s @ s_inv, np.eye(D), atol=1e-8)
  s0, s0_inv = whitener(np.zeros((D, D)), 1e-6)
  np.testing.assert_array_equal(s0, np.eye(D))
  np.testing.assert_array_equal(s0_inv, np.eye(D))


def test_auto_base_minimises_the_output_residual_when_whitened():
  dense, cov = dense_stack(), covariances(calibration())
  spec = VLoRASpec(compound_size=4, rank=2, mode="anchored", targets=(FC2,))
  w = dense["per_layer"]["mlp"]["fc2"]["kernel"].astype(np.float64)
  sq_w = np.einsum("lio,lij,ljo->l", w, cov[FC2], w)  # ||S^T W||^2 per layer
  res = {}
  for base in ("first", "mean", 2, "auto"):
    out = compress(dense, spec, base, increments="whitened", covariances=cov)
    res[base] = float((out.out_errors[FC2] ** 2 * sq_w).sum())  # the absolute output residual
  assert res["auto"] <= min(res["first"], res["mean"], res[2]) * (1 + 1e-4), res


def test_compress_tree_passes_covariances_per_stack():
  dense, cov = dense_stack(), covariances(calibration())
  tree = {"embed": {"kernel": np.ones((3, D), np.float32)}, "blocks": dense}
  spec = spec_of("cumulative")
  out, reports = compress_tree(tree, spec, increments="whitened", covariances={"blocks": cov})
  direct = compress(dense, spec, increments="whitened", covariances=cov)
  np.testing.assert_array_equal(reports["blocks"].out_total, direct.out_total)
  np.testing.assert_array_equal(out["embed"]["kernel"], tree["embed"]["kernel"])
  with pytest.raises(ValueError, match=r"stack paths \['decoder'\]"):
    compress_tree(tree, spec, increments="whitened", covariances={"blocks": cov, "decoder": cov})
  with pytest.raises(ValueError, match="needs covariances"):
    compress_tree(tree, spec, increments="whitened")


# -------------------------------------------------------------------------------- zero increments


@pytest.mark.parametrize("mode,base", [("anchored", "first"), ("cumulative", "mean")])
def test_zero_increments_make_every_layer_its_base(mode, base):
  dense = dense_stack()
  spec = VLoRASpec(compound_size=2, rank=3, mode=mode, targets=(QKV, FC2, BIAS))
  out = compress(dense, spec, base, increments="zero", seed=3)
  got = _flat(stack.materialize(out.params, stack.layout_from_params(out.params, spec)))
  want = _flat(dense["per_layer"])
  for p in (QKV, FC2, BIAS):
    g, w = np.asarray(got[p]), np.asarray(want[p])
    np.testing.assert_array_equal(g[1::2], g[0::2])  # layer 1 of each compound = its base
    b = w[0::2] if base == "first" else (w[0::2] + w[1::2]) / 2
    np.testing.assert_allclose(g[0::2], b, atol=1e-6)
    assert out.errors[p][1::2].min() > 0.1  # the later layers really differ from the dense ones
  # The product is zero because B is; A is the model's kaiming init, so training moves B at once.
  a, b = _flat(out.params["inc_a"]), _flat(out.params["inc_b"])
  assert all(np.asarray(v).std() > 0.01 for v in a.values())
  assert all(not np.asarray(v).any() for v in b.values())
  assert not np.asarray(_flat(out.params["inc_vec"])[BIAS]).any()
  # The tree is the same as the SVD init's (it loads into the same model).
  svd = compress(dense, spec, base)
  shapes = lambda t: {k: (v.shape, v.dtype) for k, v in _flat(t).items()}
  assert shapes(out.params) == shapes(svd.params)


# ------------------------------------------------------------------------------- ranks from budget


def _raise(spec, target, step, max_rank):
  ranks = dict(zip(spec.targets, spec.ranks))
  ranks[target] = min(ranks[target] + step, max_rank)
  return dataclasses.replace(spec, rank=tuple(ranks[t] for t in spec.targets))


def vlora_count(dense, spec):
  """The VLoRA stack's parameter count, written out for this block (checked against the tree
  `compress` makes in the test below): norm per layer, one base per compound, A and B for every
  later layer of the matrices, full-vector increments for the bias."""
  c, s, r = L // spec.compound_size, spec.compound_size, dict(zip(spec.targets, spec.ranks))
  return (L * D + c * (D * 3 * D + 2 * D * D + D)
          + c * (s - 1) * ((D + 3 * D) * r[QKV] + (2 * D + D) * r[FC2] + D))


@pytest.mark.parametrize("mode,step,whiten", [("anchored", 1, False), ("cumulative", 1, True),
                                              ("cumulative", 3, False)])
def test_budget_ranks_meet_the_budget_within_one_step(mode, step, whiten):
  dense = dense_stack()
  cov = covariances(calibration()) if whiten else None
  dense_count = params_lib.count(dense)["total"]
  max_rank = {QKV: D, FC2: D}
  # The smallest model: 0.36 of dense at rank 1 everywhere, 0.53 at rank 3. The largest ranks
  # would exceed dense here: tiny d_in, d_out make (s-1)(d_in + d_out) r big next to d_in d_out.
  for fraction in (0.4, 0.5, 0.62, 0.8, 1.0) if step == 1 else (0.56, 0.62, 0.8, 1.0):
    b = budget_ranks(dense, spec_of(mode, rank=7), fraction, cov, step=step)
    assert b.count == vlora_count(dense, b.spec)
    if fraction == 0.62:  # counted exactly as the model's tree: what `compress` makes
      assert b.count == params_lib.count(compress(dense, b.spec).params)["total"]
    assert b.dense == dense_count and b.fraction == pytest.approx(b.count / dense_count)
    assert b.count <= fraction * dense_count, (fraction, b)
    assert b.ranks[BIAS] == 7  # a vector target: its rank changes no count
    for t in (QKV, FC2):
      assert b.ranks[t] == max_rank[t] or b.ranks[t] % step == 0
      if b.ranks[t] < max_rank[t]:  # one more step of any target breaks the budget
        more = vlora_count(dense, _raise(b.spec, t, step, max_rank[t]))
        assert more > fraction * dense_count, (fraction, t, b.ranks)
    print(mode, step, whiten, fraction, b.ranks, round(b.fraction, 3))


def test_budget_ranks_follow_residual_energy():
  """A target whose increments have rank 1 gets no rank beyond 1 while another one needs it."""
  dense = dense_stack()
  w = dense["per_layer"]["attn"]["qkv"]["kernel"].astype(np.float64)
  rng = np.random.default_rng(5)
  u, v = rng.standard_normal((D, 1)), rng.standard_normal((1, 3 * D))
  dense["per_layer"]["attn"]["qkv"]["kernel"] = np.stack(
      [w[0] + k * u @ v for k in range(L)]).astype(np.float32)
  b = budget_ranks(dense, spec_of("anchored"), 0.6)
  assert b.ranks[QKV] == 1 and b.ranks[FC2] > 4, b.ranks
  assert b.energy[QKV][1:].max() < 1e-10 < b.energy[FC2].min()
  # Whitening changes the allocation: an fc2 whose inputs live in 2 directions needs ~2 ranks.
  x = calibration()
  x[FC2] = x[FC2][:, :, :2] @ np.random.default_rng(6).standard_normal((2, 2 * D))
  cov = covariances(x)
  dense = dense_stack()
  plain = budget_ranks(dense, spec_of("anchored"), 0.6)
  white = budget_ranks(dense, spec_of("anchored"), 0.6, cov)
  assert white.ranks[QKV] > plain.ranks[QKV] and white.ranks[FC2] < plain.ranks[FC2], \
      (plain.ranks, white.ranks)


def test_budget_ranks_tree_counts_the_whole_model():
  dense = dense_stack()
  outside = {"embed": {"kernel": np.zeros((40, D), np.float32)},
             "head": {"kernel": np.zeros((D, 5), np.float32), "bias": np.zeros(5, np.float32)}}
  tree = {**outside, "blocks": dense}
  n_out = 40 * D + D * 5 + 5
  b = budget_ranks_tree(tree, spec_of("cumulative"), 0.6)
  vl, _ = compress_tree(tree, b.spec)
  assert b.count == params_lib.count(vl)["total"] <= 0.6 * params_lib.count(tree)["total"]
  assert b.dense == params_lib.count(tree)["total"]
  alone = budget_ranks(dense, spec_of("cumulative"), 0.6)
  # Outside params are as many in both models, so the stack's share of the budget is smaller.
  assert b.count - n_out <= 0.6 * (alone.dense + n_out) - n_out < alone.count


# ------------------------------------------------------------------------------------ bad input


def test_bad_arguments():
  dense, cov = dense_stack(), covariances(calibration())
  spec = spec_of()
  with pytest.raises(ValueError,
                     match=r"increments='pca': allowed are \['svd', 'whitened', 'zero'\]"):
    compress(dense, spec, increments="pca")
  with pytest.raises(ValueError, match="increments='whitened' needs covariances"):
    compress(dense, spec, increments="whitened")
  bad = {**cov, FC2: cov[FC2][:, :D, :D]}
  with pytest.raises(ValueError, match=r"covariances\['mlp/fc2/kernel'\] has shape \(4, 12, 12\).*"
                                       r"\(4, 24, 24\)"):
    compress(dense, spec, increments="whitened", covariances=bad)
  with pytest.raises(ValueError, match=r"missing the targeted matrices \['attn/qkv/kernel'\]"):
    compress(dense, spec, increments="whitened", covariances={FC2: cov[FC2]})
  with pytest.raises(ValueError, match=r"paths \['attn/qkv/weight'\] that are not parameters"):
    compress(dense, spec, increments="whitened", covariances={**cov, "attn/qkv/weight": cov[QKV]})
  nan = {**cov, QKV: np.where(np.eye(D) > 0, np.nan, cov[QKV])}
  with pytest.raises(ValueError, match=r"covariances\['attn/qkv/kernel'\] has NaN"):
    compress(dense, spec, increments="whitened", covariances=nan)
  for damping in (0.0, -1e-3, float("inf")):
    with pytest.raises(ValueError, match=f"damping={damping!r}"):
      compress(dense, spec, increments="whitened", covariances=cov, damping=damping)
  for fraction in (0, 0.0, -0.2, 1.5, True, "0.3"):
    with pytest.raises(ValueError, match=f"fraction={fraction!r}: must be a number in \\(0, 1\\]"):
      budget_ranks(dense, spec, fraction)
  with pytest.raises(ValueError, match=r"fraction=0.2 is below the smallest VLoRA model"):
    budget_ranks(dense, spec, 0.2)  # at rank 1 everywhere it has 0.36 of the dense count
  with pytest.raises(ValueError, match="step=0"):
    budget_ranks(dense, spec, 0.5, step=0)
  with pytest.raises(ValueError, match="base='auto'"):
    budget_ranks(dense, spec, 0.5, base="auto")
  with pytest.raises(ValueError, match="spec.mode='tied'"):
    budget_ranks(dense, dataclasses.replace(spec, mode="tied"), 0.5)
  with pytest.raises(ValueError, match=r"covariances\['mlp/fc2/kernel'\] has shape"):
    budget_ranks(dense, spec, 0.5, bad)
  other = spec_of()
  object.__setattr__(other, "mode", "spiral")  # a mode whose tree this module does not make
  for call in (lambda: compress(dense, other), lambda: budget_ranks(dense, other, 0.5)):
    with pytest.raises(ValueError, match="spec.mode='spiral' is not a mode it compresses into"):
      call()
