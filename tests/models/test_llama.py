"""The llama family: grouped-query attention, VLoRA == its merged dense twin, the KV cache, rotary
base, named parameter and activation axes, and its config checks."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from vlora_jax.models import decoding
from vlora_jax.core import partitioning, stack
from vlora_jax.models.llama import TARGETS, Llama
from vlora_jax.core.spec import VLoRASpec

V, T = 40, 10
SPEC = VLoRASpec.official(compound_size=2, rank=2, targets=TARGETS)
BASE = dict(vocab_size=V, max_len=24, dim=16, depth=4, num_heads=4, num_kv_heads=2, head_dim=6,
            mlp_dim=20, rope_base=1e5, tie_embeddings=False)


def _tokens(seed=0, batch=2):
  return jax.random.randint(jax.random.key(seed), (batch, T), 0, V, dtype=jnp.int32)


@functools.lru_cache
def _params(vlora: bool = False, **kw):
  model = Llama(**{**BASE, **kw}, vlora=SPEC if vlora else None)
  return model, nn.unbox(jax.jit(model.init)(jax.random.key(1, impl="rbg"), _tokens())["params"])


def _logits(model, params, tokens):
  return jax.jit(lambda p, t: model.apply({"params": p}, t))(params, tokens)


def test_grouped_query_attention_is_attention_with_shared_key_value_heads():
  """2 key/value heads serving 4 query heads == 4 key/value heads, each group's copied."""
  model, params = _params()
  wide = model.clone(num_kv_heads=4)
  flat = dict(traverse_util.flatten_dict(params, sep="/"))
  for name in ("k_proj", "v_proj"):
    key = f"blocks/per_layer/self_attn/{name}/kernel"
    k = flat[key].reshape(4, 16, 2, 6)  # [L, D, kv heads, hd]
    flat[key] = jnp.repeat(k, 2, axis=2).reshape(4, 16, 24)  # head h reads kv head h // 2
  wide_params = traverse_util.unflatten_dict(flat, sep="/")
  np.testing.assert_allclose(_logits(wide, wide_params, _tokens()),
                             _logits(model, params, _tokens()), atol=2e-5, rtol=1e-5)


def test_vlora_llama_equals_its_merged_dense_twin():
  model, params = _params(vlora=True)
  assert float(jnp.abs(params["blocks"]["inc_b"]["mlp"]["down_proj"]["kernel"]).max()) > 0
  assert set(traverse_util.flatten_dict(params["blocks"]["base"], sep="/")) == {
      t.replace("\\", "") for t in TARGETS}
  merged = stack.merge(params, SPEC)
  dense = model.clone(vlora=None)
  np.testing.assert_allclose(_logits(dense, merged, _tokens(3)),
                             _logits(model, params, _tokens(3)), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("vlora", [False, True])
def test_kv_cache_decoding_equals_running_the_whole_sequence(vlora):
  """Prompts of different lengths (left-padded), a rotary base that is not the default, VLoRA
  merged or not: the cached tokens are the recomputed ones."""
  model, params = _params(vlora=vlora)
  params = jax.tree.map(lambda p: 5 * p, params)  # logits far from uniform: a wrong cache shows
  prompts = [[3, 7, 1, 9, 2], [5, 4], [8]]
  cached = decoding.generate(model, params, prompts, max_new_tokens=8)
  whole = decoding.generate(model, params, prompts, max_new_tokens=8, use_cache=False,
                            merge=False)
  assert cached == whole
  # past the context (max_len 24) the window slides and goes on
  long = decoding.generate(model, params, [[3, 7]], max_new_tokens=30)
  assert len(long[0]) == 30


def test_the_rotary_base_changes_the_model():
  model, params = _params()
  params = jax.tree.map(lambda p: 20 * p, params)  # init's 0.02 leaves attention nearly uniform
  other = model.clone(rope_base=10.0)
  assert float(jnp.abs(_logits(model, params, _tokens()) - _logits(other, params, _tokens()))
               .max()) > 1e-2


def test_tied_embeddings_and_biases():
  """A tied head is an untied one whose kernel is the transposed embedding."""
  tied, params = _params(tie_embeddings=True, attention_bias=True, mlp_bias=True)
  assert "lm_head" not in params
  layer = params["blocks"]["per_layer"]
  assert layer["self_attn"]["k_proj"]["bias"].shape == (4, 12)
  assert layer["mlp"]["down_proj"]["bias"].shape == (4, 16)
  untied = dict(params, lm_head={"kernel": params["embed_tokens"]["embedding"].T})
  np.testing.assert_allclose(_logits(tied.clone(tie_embeddings=False), untied, _tokens()),
                             _logits(tied, params, _tokens()), atol=1e-5, rtol=1e-5)


def test_every_parameter_axis_is_named():
  model = Llama(**BASE, vlora=SPEC)
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), _tokens()))["params"]
  names = jax.tree.map(lambda b: b.names, boxed,
                       is_leaf=lambda b: isinstance(b, nn.LogicallyPartitioned))
  flat = traverse_util.flatten_dict(names, sep="/", is_leaf=lambda _, v: isinstance(v, tuple))
  assert flat["embed_tokens/embedding"] == ("vocab", "embed")
  assert flat["lm_head/kernel"] == ("embed", "vocab")
  assert flat["blocks/base/self_attn/q_proj/kernel"] == ("compound", "embed", "heads")
  assert flat["blocks/base/self_attn/k_proj/kernel"] == ("compound", "embed", "kv_heads")
  assert flat["blocks/base/mlp/down_proj/kernel"] == ("compound", "mlp", "embed")
  assert flat["blocks/per_layer/input_layernorm/scale"] == ("layers", "embed")
  assert all(None not in n[1:] for p, n in flat.items() if "/inc_" not in p)


def test_every_large_activation_is_constrained():
  """Under activation rules, the residual stream, q / k / v, the MLP hidden and the logits each
  get a sharding constraint of their shape."""
  model, params = _params()
  mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  rules = (("batch", "data"), ("length", None), ("embed", None), ("heads", None), ("kv", None),
           ("mlp", None), ("vocab", None))
  with partitioning.activation_sharding(mesh, rules):
    jaxpr = jax.make_jaxpr(lambda p, t: model.apply({"params": p}, t))(params, _tokens())
  shapes = set()

  def walk(jp):
    for eqn in jp.eqns:
      if eqn.primitive.name == "sharding_constraint":
        shapes.add(tuple(eqn.invars[0].aval.shape))
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        walk(sub)

  walk(jaxpr.jaxpr)
  for want in [(2, T, 16), (2, T, 4, 6), (2, T, 2, 6), (2, T, 20), (2, T, V)]:
    assert want in shapes, (want, shapes)


@pytest.mark.parametrize("change, says", [
    ({"num_kv_heads": 3}, "model.num_kv_heads=3 does not divide model.num_heads=4"),
    ({"head_dim": 5}, "model.head_dim=5: must be even"),
    ({"rope_base": 0.0}, "model.rope_base=0.0"),
    ({"mlp_dim": 0}, "model.mlp_dim=0"),
])
def test_bad_shapes_are_refused_naming_the_key(change, says):
  model = Llama(**{**BASE, **change})
  with pytest.raises(ValueError, match=says):
    jax.eval_shape(lambda: model.init(jax.random.key(0), _tokens()))
