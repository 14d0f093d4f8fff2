"""Decoder-only LM: VLoRA == its merged dense twin, causality, rotary positions, tied head, training."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from vlora_jax import models
from vlora_jax.core import layers, params, stack
from vlora_jax.models.lm import LM
from vlora_jax.core.spec import VLoRASpec

V, T = 17, 8
SPEC = VLoRASpec.official(compound_size=2, rank=2)


def _lm(**kw):
  base = dict(vocab_size=V, max_len=T, dim=16, depth=4, num_heads=2, mlp_ratio=2.0, vlora=SPEC)
  return LM(**{**base, **kw})


def _tokens(seed=0, batch=3):
  return jax.random.randint(jax.random.key(seed), (batch, T), 0, V, dtype=jnp.int32)


@functools.lru_cache
def _init_cached(positions="learned", tie_embeddings=False):
  # Init compiles one RNG kernel per parameter (seconds on CPU): share it between tests, and use
  # rbg keys (XLA's RngBitGenerator compiles about twice as fast as threefry on CPU).
  model = _lm(positions=positions, tie_embeddings=tie_embeddings)
  return nn.unbox(jax.jit(model.init)(jax.random.key(1, impl="rbg"), _tokens()))


def _init(model):
  return _init_cached(model.positions, model.tie_embeddings)


def _apply(model):
  """Jitted forward (one compile per model; eager scans would recompile at every call)."""
  return jax.jit(lambda v, tok: model.apply(v, tok))


@pytest.mark.parametrize("positions,tied", [("learned", False), ("rope", True)])
def test_vlora_lm_equals_materialised_dense(positions, tied):
  model = _lm(positions=positions, tie_embeddings=tied)
  v = _init(model)
  # Official init: the increments are non-zero, so layers inside a compound really differ.
  assert float(jnp.abs(v["params"]["blocks"]["inc_b"]["attn"]["qkv"]["kernel"]).max()) > 0
  dense = params.dense_twin(model)
  merged = {"params": stack.merge(v["params"], SPEC)}
  assert jax.tree.map(jnp.shape, merged["params"]) == jax.tree.map(
      lambda s: s.shape, params.param_shapes(dense, _tokens()))
  tok = _tokens(2)
  np.testing.assert_allclose(_apply(dense)(merged, tok), _apply(model)(v, tok), atol=1e-5,
                             rtol=1e-5)


@pytest.mark.parametrize("positions,tied", [("learned", False), ("rope", True)])
def test_causal(positions, tied):
  model = _lm(positions=positions, tie_embeddings=tied)
  v = _init(model)
  tok = _tokens(3)
  changed = tok.at[:, 5].set((tok[:, 5] + 1) % V)
  a, b = _apply(model)(v, jnp.concatenate([tok, changed])).reshape(2, *tok.shape, V)
  np.testing.assert_array_equal(a[:, :5], b[:, :5])  # the past does not see the future
  assert float(jnp.abs(a[:, 5:] - b[:, 5:]).max(axis=-1).min()) > 0  # present and future do


def test_rotary_depends_on_relative_position_only():
  q = jax.random.normal(jax.random.key(0), (1, 6, 2, 8))
  k = jax.random.normal(jax.random.key(1), (1, 6, 2, 8))
  pos = jnp.arange(6)
  scores = lambda off: jnp.einsum("bqhd,bkhd->bhqk", layers.rotary(q, pos + off),
                                  layers.rotary(k, pos + off))
  np.testing.assert_allclose(scores(0), scores(37), atol=1e-4)
  assert float(jnp.abs(scores(0) - jnp.einsum("bqhd,bkhd->bhqk", q, k)).max()) > 1e-2
  np.testing.assert_allclose(jnp.linalg.norm(layers.rotary(q, pos), axis=-1),
                             jnp.linalg.norm(q, axis=-1), rtol=1e-5)  # a rotation
  with pytest.raises(ValueError, match="even head dimension"):
    layers.rotary(q[..., :7], pos)


def test_rope_and_tied_parameters():
  learned = params.param_shapes(_lm(), _tokens())
  rope = params.param_shapes(_lm(positions="rope", tie_embeddings=True), _tokens())
  assert learned["pos_embed"].shape == (1, T, 16) and "head" in learned
  assert set(rope) == {"embed", "blocks", "norm"}  # no position table, no head
  # rope adds no block parameters: the stacks are identical
  assert jax.tree.map(lambda s: s.shape, rope["blocks"]) == jax.tree.map(lambda s: s.shape,
                                                                         learned["blocks"])


def test_tied_logits_are_hidden_times_embedding_transposed():
  model = _lm(positions="rope", tie_embeddings=True)
  v = _init(model)
  tok = _tokens(4)
  logits, state = jax.jit(lambda v, t: model.apply(v, t, capture_intermediates=True))(v, tok)
  h = state["intermediates"]["norm"]["__call__"][0]  # the final LayerNorm's output
  np.testing.assert_allclose(logits, h @ v["params"]["embed"]["embedding"].T, atol=1e-5)


def _loss(model, p, tok, rng=None):
  logits = model.apply({"params": p}, tok[:, :-1], train=rng is not None,
                       rngs={"dropout": rng} if rng is not None else None)
  return optax.softmax_cross_entropy_with_integer_labels(logits, tok[:, 1:]).mean()


@pytest.mark.parametrize("positions,tied", [("learned", False), ("rope", True)])
def test_one_train_step_reduces_loss(positions, tied):
  model = _lm(positions=positions, tie_embeddings=tied, dropout=0.1)
  p = _init(model)["params"]
  tok = _tokens(5, batch=8)
  tx = optax.adam(1e-2)

  @jax.jit
  def step(p):
    grads = jax.grad(lambda p: _loss(model, p, tok, jax.random.key(9)))(p)  # dropout on
    updates, _ = tx.update(grads, tx.init(p), p)
    new = optax.apply_updates(p, updates)
    return grads, _loss(model, p, tok), _loss(model, new, tok)

  grads, before, after = step(p)
  assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))
  assert float(after) < float(before)


def test_from_config_and_errors():
  cfg = ml_collections.ConfigDict(dict(
      name="lm", vocab_size=V, max_len=T, positions="rope", tie_embeddings=True, dim=16, depth=4,
      num_heads=2, mlp_ratio=2.0, dropout=0.0, dtype="float32", scan=True, remat="none",
      vlora=dict(enabled=True, compound_size=2, rank=2, mode="anchored")))
  model = models.build(cfg)
  assert isinstance(model, LM) and model.positions == "rope" and model.tie_embeddings
  assert model.vlora.compound_size == 2 and model.vlora.mode == "anchored"
  shapes = params.param_shapes(model, *models.sample_inputs(cfg))
  assert shapes["embed"]["embedding"].shape == (V, 16)
  tok = _tokens()
  with pytest.raises(ValueError, match="model.positions='alibi'"):
    _lm(positions="alibi").init(jax.random.key(0), tok)
  with pytest.raises(ValueError, match="exceeds model.max_len=4"):
    _lm(max_len=4).init(jax.random.key(0), tok)
  with pytest.raises(ValueError, match="even head dim"):
    _lm(dim=18, num_heads=6, positions="rope").init(jax.random.key(0), tok)
  with pytest.raises(ValueError, match="model.num_heads=3 does not divide model.dim=16"):
    _lm(num_heads=3).init(jax.random.key(0), tok)
