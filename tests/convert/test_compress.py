"""`convert.compress`: dense stack -> VLoRA stack by truncated SVD."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from vlora_jax.core import stack
from vlora_jax.convert import compress, compress_tree
from vlora_jax.core.layers import EncoderBlock
from vlora_jax.models.vit import ViT
from vlora_jax.core.spec import VLoRASpec

D, L = 16, 6
X = jnp.zeros((1, 3, D))


def _flat(tree):
  return traverse_util.flatten_dict(tree, sep="/")


def random_like(shapes, seed):
  """Random values for a tree of ShapeDtypeStructs: nothing zero or one (LayerNorm scales near 1).

  Built from `jax.eval_shape` rather than `init`, whose compile takes tens of seconds on 2 CPUs.
  """
  rng = np.random.default_rng(seed)
  def fill(path, a):
    v = 0.3 * rng.standard_normal(a.shape)
    return jnp.asarray(v + (1.0 if path[-1].key == "scale" else 0.0), a.dtype)
  return jax.tree_util.tree_map_with_path(fill, shapes)


def shapes_of(model, *args):
  return nn.unbox(jax.eval_shape(model.init, jax.random.key(0), *args))["params"]


def vlora_params(spec, seed=0):
  """A random VLoRA stack of a small transformer block, every group non-trivial."""
  return random_like(shapes_of(stack.vlorafy(EncoderBlock(D, 2, 2 * D), L, spec), X), seed)


def dense_params(seed=0):
  return random_like(shapes_of(stack.vlorafy(EncoderBlock(D, 2, 2 * D), L), X), seed)


def materialized(p, spec):
  return {"per_layer": stack.materialize(p, stack.layout_from_params(p, spec))}


@pytest.mark.parametrize("mode", ["anchored", "cumulative"])
def test_recovers_a_vlora_stack(mode):
  spec = VLoRASpec(compound_size=3, rank=2, mode=mode,
                   targets=("attn/qkv/kernel", "mlp/fc1/kernel", "mlp/fc2/kernel", "norm2/scale"))
  dense = materialized(vlora_params(spec), spec)
  for rank in (2, 4):  # the generating rank, and more than it
    out = compress(dense, VLoRASpec(**{**spec.__dict__, "rank": rank}))
    print(mode, rank, {k: float(v.max()) for k, v in out.errors.items()})
    assert set(out.errors) == {"attn/qkv/kernel", "mlp/fc1/kernel", "mlp/fc2/kernel", "norm2/scale"}
    assert max(float(v.max()) for v in out.errors.values()) < 1e-5
    assert all(b == ["layer0", "layer0"] for b in out.bases.values())
  # Untargeted params are copied exactly.
  np.testing.assert_array_equal(out.params["per_layer"]["attn"]["proj"]["kernel"],
                                dense["per_layer"]["attn"]["proj"]["kernel"])


def test_anchored_stack_is_cumulative_at_twice_the_rank():
  """W_k - W_{k-1} = D_k - D_{k-1} has rank <= 2r: the cumulative reading recovers it at 2r."""
  gen = VLoRASpec(compound_size=3, rank=2, mode="anchored")
  dense = materialized(vlora_params(gen, seed=3), gen)
  at = lambda r: float(compress(dense, VLoRASpec(compound_size=3, rank=r)).total.max())
  assert at(2) > 1e-3 and at(4) < 1e-5


@pytest.mark.parametrize("mode", ["anchored", "cumulative"])
def test_errors_fall_as_rank_rises(mode):
  dense = dense_params(seed=1)  # independent layers: nothing here is low-rank
  errs = [compress(dense, VLoRASpec(compound_size=3, rank=r, mode=mode)).total.mean()
          for r in (1, 2, 4, 8, 16)]
  print(mode, np.round(errs, 4))
  assert all(a > b for a, b in zip(errs, errs[1:])), errs
  assert errs[0] > 0.5 and errs[-1] < 1e-5  # rank 16 = min(d_in, d_out): exact


def test_cumulative_errors_do_not_accumulate():
  """Increments of the reconstructed predecessor: later layers are no worse than the naive chain."""
  dense = dense_params(seed=2)
  w = np.asarray(dense["per_layer"]["mlp"]["fc1"]["kernel"], np.float64)[:3]  # one compound
  r = 4
  naive, prev = [], w[0]
  for k in range(1, 3):  # naive: truncate the true difference W_k - W_{k-1} and chain those
    u, s, vt = np.linalg.svd(w[k] - w[k - 1], full_matrices=False)
    prev = prev + (u[:, :r] * s[:r]) @ vt[:r]
    naive.append(np.linalg.norm(w[k] - prev) / np.linalg.norm(w[k]))
  ours = compress(dense, VLoRASpec(compound_size=3, rank=r,
                                   targets=("mlp/fc1/kernel",))).errors["mlp/fc1/kernel"][1:3]
  assert ours[1] < naive[1] - 0.05, (ours, naive)  # the naive chain drifts at the last layer
  assert ours[0] == pytest.approx(naive[0], rel=1e-4)  # same first step


def test_base_choices():
  dense = dense_params(seed=4)
  spec = VLoRASpec(compound_size=3, rank=2, targets=("attn/proj/kernel",), mode="anchored")
  w = np.asarray(dense["per_layer"]["attn"]["proj"]["kernel"])
  sq = {}
  for base in ("first", "mean", 1, "auto"):
    out = compress(dense, spec, base=base)
    b = np.asarray(out.params["base"]["attn"]["proj"]["kernel"])
    m = stack.materialize(out.params, stack.layout_from_params(out.params, spec))
    sq[base] = float(((np.asarray(m["attn"]["proj"]["kernel"]) - w) ** 2).sum())
    if base == "mean":
      np.testing.assert_allclose(b, w.reshape(2, 3, D, D).mean(1), atol=1e-6)
      assert out.bases["attn/proj/kernel"] == ["mean", "mean"]
    if base == 1:
      np.testing.assert_array_equal(b, w[1::3])
      assert out.bases["attn/proj/kernel"] == ["layer1", "layer1"]
  # 'auto' minimises the total squared residual over the candidates.
  assert sq["auto"] <= min(sq["first"], sq["mean"], sq[1]) + 1e-6


@pytest.mark.parametrize("mode", ["anchored", "cumulative"])
def test_compressed_vit_loads_and_matches_dense_at_full_rank(mode):
  kw = dict(num_classes=5, patch_size=4, dim=D, depth=4, num_heads=2, mlp_ratio=2.0)
  images = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  dense_model = ViT(**kw)
  params = random_like(shapes_of(dense_model, images), seed=1)
  spec = VLoRASpec(compound_size=2, rank=D, mode=mode)
  vl_model = ViT(**kw, vlora=spec)
  vl_params, reports = compress_tree(params, spec)
  init = shapes_of(vl_model, images)  # the tree the model's init makes (shapes only)
  assert jax.tree.structure(vl_params) == jax.tree.structure(init)
  assert jax.tree.map(lambda a: (a.shape, a.dtype), vl_params) == \
      jax.tree.map(lambda a: (a.shape, a.dtype), init)
  assert float(reports["blocks"].total.max()) < 1e-5
  want = jax.jit(dense_model.apply)({"params": params}, images)
  got = jax.jit(vl_model.apply)({"params": vl_params}, images)
  assert float(jnp.abs(want).max()) > 0.1
  assert float(jnp.abs(got - want).max()) < 1e-4
  # Below full rank the compressed model is a different function: the check above can fail.
  low, _ = compress_tree(params, VLoRASpec(compound_size=2, rank=2, mode=mode))
  got_low = ViT(**kw, vlora=VLoRASpec(compound_size=2, rank=2, mode=mode)).apply(
      {"params": low}, images)
  assert float(jnp.abs(got_low - want).max()) > 1e-3


def test_tied_and_rslora_scale():
  dense = dense_params(seed=5)
  tied = compress(dense, VLoRASpec(compound_size=2, mode="tied"), base="auto")
  assert set(tied.params) == {"per_layer", "base"}
  assert all(b == ["mean"] * 3 for b in tied.bases.values())  # the mean minimises a tied residual
  spec = VLoRASpec(compound_size=3, rank=16, scaling="rslora", alpha=3.0)
  out = compress(dense, spec)
  assert float(out.total.max()) < 1e-5  # scale = alpha / sqrt(r) divided out correctly


def test_bad_input():
  dense = dense_params()
  spec = VLoRASpec(compound_size=3, rank=2)
  with pytest.raises(ValueError, match="dense stack"):
    compress({"base": dense["per_layer"]}, spec)
  with pytest.raises(ValueError, match="base='median'"):
    compress(dense, spec, base="median")
  with pytest.raises(ValueError, match="compound_size=4 does not divide num_layers=6"):
    compress(dense, VLoRASpec(compound_size=4))
  with pytest.raises(ValueError, match="base=5 is not a layer"):
    compress(dense, spec, base=5)
