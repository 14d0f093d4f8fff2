"""Horizontal LoRA on VLoRA (and on dense): start == base, freezing without optimizer state,
merged == adapter inference, adapter-only save/load, validation."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import traverse_util

from vlora_jax import models
from vlora_jax.core import lora, params, stack
from vlora_jax.models.lm import LM
from vlora_jax.models.seq2seq import Seq2Seq
from vlora_jax.models.vit import ViT
from vlora_jax.core.spec import VLoRASpec

V, T = 17, 8
VSPEC = VLoRASpec.official(compound_size=2, rank=2)
LSPEC = lora.LoRASpec(targets=("attn/qkv/kernel", "mlp/fc.*/kernel"), rank=2, alpha=4.0)
TOK = jax.random.randint(jax.random.key(0), (3, T), 0, V, dtype=jnp.int32)


def _lm(**kw):
  base = dict(vocab_size=V, max_len=T, dim=16, depth=4, num_heads=2, mlp_ratio=2.0, vlora=VSPEC,
              lora=LSPEC)
  return LM(**{**base, **kw})


@functools.lru_cache
def _init_fn():
  return jax.jit(_lm().init)  # compiled once, called with several keys


def _boxed(seed=1):
  return _init_fn()(jax.random.key(seed, impl="rbg"), TOK)


def _flat(tree):
  return traverse_util.flatten_dict(tree, sep="/")


def _loss(model, p):
  logits = model.apply({"params": p}, TOK[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(logits, TOK[:, 1:]).mean()


@functools.lru_cache
def _trained():
  """The LoRA-on-VLoRA LM after 3 adapter-only Adam steps: ``(params, opt_state, tx)``."""
  p = nn.unbox(_boxed())["params"]
  tx = lora.optimizer(optax.adam(3e-2), p)
  model = _lm()

  @jax.jit
  def step(p, opt):
    loss, g = jax.value_and_grad(functools.partial(_loss, model))(p)
    updates, opt = tx.update(g, opt, p)
    return optax.apply_updates(p, updates), opt, loss

  opt, losses, new = tx.init(p), [], p
  for _ in range(3):
    new, opt, loss = step(new, opt)
    losses.append(float(loss))
  return p, new, opt, losses


def test_adapters_start_equal_to_base_with_named_axes():
  boxed = _boxed()["params"]["blocks"]
  qkv_a, fc2_b = boxed["lora_a"]["attn"]["qkv"]["kernel"], boxed["lora_b"]["mlp"]["fc2"]["kernel"]
  assert qkv_a.value.shape == (4, 16, 2) and qkv_a.names == ("layers", "embed", "rank")
  assert fc2_b.value.shape == (4, 2, 16) and fc2_b.names == ("layers", "rank", "embed")
  assert set(boxed["lora_a"]) == {"attn", "mlp"} and set(boxed["lora_a"]["attn"]) == {"qkv"}
  p = nn.unbox(_boxed())["params"]
  assert all(float(jnp.abs(b).max()) == 0 for b in jax.tree.leaves(p["blocks"]["lora_b"]))
  assert float(jnp.abs(qkv_a.value).max()) > 0
  base = dict(p, blocks={g: v for g, v in p["blocks"].items() if g not in lora.ADAPTER_GROUPS})
  np.testing.assert_allclose(jax.jit(_lm().apply)({"params": p}, TOK),
                             jax.jit(_lm(lora=None).apply)({"params": base}, TOK), atol=1e-6)


def test_frozen_params_unchanged_and_without_optimizer_state():
  before, after, opt, losses = _trained()
  n_adapters = sum(a.size for a in lora.adapters(before).values())
  # Adam keeps mu and nu for the adapters only; frozen leaves have no state at all.
  state_sizes = [a.size for a in jax.tree.leaves(opt) if a.ndim > 0]
  assert sum(state_sizes) == 2 * n_adapters
  n_total = sum(a.size for a in jax.tree.leaves(before))
  assert n_total > 4 * n_adapters
  fb, fa = _flat(before), _flat(after)
  for path in fb:
    if "/lora_" in path:
      continue
    np.testing.assert_array_equal(fa[path], fb[path], err_msg=path)  # frozen: bit for bit
  assert float(jnp.abs(fa["blocks/lora_b/attn/qkv/kernel"]).max()) > 0  # adapters trained
  assert losses[-1] < losses[0]
  # Another trainable set: the adapters and the head.
  tx = lora.optimizer(optax.adam(1e-3), before, (lora.ADAPTERS_REGEX, r"head/.*"))
  sizes = sum(a.size for a in jax.tree.leaves(tx.init(before)) if a.ndim > 0)
  assert sizes == 2 * (n_adapters + sum(a.size for a in jax.tree.leaves(before["head"])))
  with pytest.raises(ValueError, match="matches no parameter"):
    lora.optimizer(optax.adam(1e-3), before, r"blocks/lora_c/.*")


def test_merged_inference_equals_adapter_inference_on_vlora():
  _, p, _, _ = _trained()
  model = _lm()
  dense, merged = models.to_dense(model, {"params": p})
  assert dense.vlora is None and dense.lora is None
  assert set(merged["params"]["blocks"]) == {"per_layer"}
  out = jax.jit(model.apply)({"params": p}, TOK)
  np.testing.assert_allclose(jax.jit(dense.apply)(merged, TOK), out, atol=1e-5, rtol=1e-5)
  # The adapters matter: VLoRA alone (merged without adapters) computes something else.
  no_adapters = {"params": dict(p, blocks={g: v for g, v in p["blocks"].items()
                                           if g not in lora.ADAPTER_GROUPS})}
  assert float(jnp.abs(jax.jit(_lm(lora=None).apply)(no_adapters, TOK) - out).max()) > 1e-3
  with pytest.raises(ValueError, match="lora=None"):
    stack.merge(p, VSPEC)


def test_merged_inference_equals_adapter_inference_on_dense_vit():
  model = ViT(num_classes=5, patch_size=4, dim=16, depth=3, num_heads=2, mlp_ratio=2.0,
              lora=lora.LoRASpec(rank=3))
  images = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  v = nn.unbox(jax.jit(model.init)(jax.random.key(1, impl="rbg"), images))
  # Give B non-zero values, as training would.
  b = v["params"]["blocks"]["lora_b"]
  v["params"]["blocks"]["lora_b"] = jax.tree.map(
      lambda a: 0.1 * jax.random.normal(jax.random.key(a.size), a.shape), b)
  assert set(v["params"]["blocks"]) == {"per_layer", "lora_a", "lora_b"}
  dense, merged = models.to_dense(model, v)
  out = jax.jit(model.apply)(v, images)
  np.testing.assert_allclose(jax.jit(dense.apply)(merged, images), out, atol=1e-5, rtol=1e-5)
  plain = {"params": dict(v["params"], blocks={"per_layer": v["params"]["blocks"]["per_layer"]})}
  assert float(jnp.abs(jax.jit(dense.apply)(plain, images) - out).max()) > 1e-3


def test_adapter_only_save_load_round_trip(tmp_path):
  _, trained, _, _ = _trained()
  path = tmp_path / "adapters.npz"
  written = lora.save_adapters(path, trained, LSPEC)
  with np.load(path) as f:
    keys = set(f.files)
  assert keys - {"__lora_spec__"} == set(written) == set(lora.adapters(trained))
  assert all("/lora_a/" in k or "/lora_b/" in k for k in written)
  n_saved = sum(a.size for a in written.values())
  assert n_saved < sum(a.size for a in jax.tree.leaves(trained)) / 4
  # Load into a fresh model (other seed): adapters come from the file, the rest stays fresh.
  fresh = nn.unbox(_boxed(seed=5))["params"]
  loaded = lora.load_adapters(path, fresh, LSPEC)
  fl, ff, ft = _flat(loaded), _flat(fresh), _flat(trained)
  for k in fl:
    np.testing.assert_array_equal(fl[k], ft[k] if k in written else ff[k], err_msg=k)
  # Loading back into the params they came from reproduces the model exactly.
  apply = jax.jit(_lm().apply)
  wiped = dict(trained, blocks=dict(trained["blocks"], lora_b=jax.tree.map(
      jnp.zeros_like, trained["blocks"]["lora_b"])))
  np.testing.assert_array_equal(apply({"params": lora.load_adapters(path, wiped)}, TOK),
                                apply({"params": trained}, TOK))
  # Mismatches fail with one error that lists them.
  other = params.param_shapes(_lm(lora=lora.LoRASpec(targets=("attn/qkv/kernel",), rank=3)), TOK)
  other = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), other)
  with pytest.raises(ValueError) as e:
    lora.load_adapters(path, other)
  msg = str(e.value)
  assert "not in params: blocks/lora_a/mlp/fc1/kernel" in msg
  assert "shape of blocks/lora_a/attn/qkv/kernel: file (4, 16, 2), params (4, 16, 3)" in msg
  with pytest.raises(ValueError, match="saved with lora spec"):
    lora.load_adapters(path, fresh, lora.LoRASpec(targets=LSPEC.targets, rank=2, alpha=8.0))
  with pytest.raises(ValueError, match="no LoRA adapters"):
    lora.save_adapters(tmp_path / "x.npz", {"w": jnp.ones(3)})


def test_seq2seq_adapters_reach_cross_attention():
  model = Seq2Seq(vocab_size=V, max_len=T, dim=16, depth=2, num_heads=2, mlp_ratio=2.0, vlora=VSPEC,
                  lora=lora.LoRASpec(targets=("attn/qkv/kernel", "cross/(q|kv)/kernel"), rank=2))
  shapes = params.param_shapes(model, TOK, TOK)
  assert set(_flat(shapes["encoder"]["lora_a"])) == {"attn/qkv/kernel"}
  assert set(_flat(shapes["decoder"]["lora_b"])) == {"attn/qkv/kernel", "cross/q/kernel",
                                                      "cross/kv/kernel"}
  assert shapes["decoder"]["lora_b"]["cross"]["kv"]["kernel"].shape == (2, 2, 32)
  c = params.count(shapes)
  assert c["groups"]["lora"] == 2 * (16 * 2 + 2 * 48) + 2 * (16 * 2 + 2 * 16) + 2 * (16 * 2 + 2 * 32) \
      + 2 * (16 * 2 + 2 * 48)
  bad = model.clone(lora=lora.LoRASpec(targets=("attn/qkv/kernel", "cross/k/kernel")))
  with pytest.raises(ValueError, match=r"lora.targets\[1\]='cross/k/kernel' matches no parameter"):
    params.param_shapes(bad, TOK, TOK)


def test_spec_validation_and_config():
  shapes = {"attn/qkv/kernel": (16, 48), "attn/qkv/bias": (48,)}
  with pytest.raises(ValueError, match="adapters need a weight with at least two axes"):
    lora.LoRASpec(targets=("attn/qkv/.*",)).layout(shapes)
  with pytest.raises(ValueError, match=r"lora.targets\[0\]='mlp/fc1/kernel' matches no parameter"):
    lora.LoRASpec(targets=("mlp/fc1/kernel",)).layout(shapes)
  with pytest.raises(ValueError, match="lora.rank=17 .* min\\(d_in, d_out\\)=16"):
    lora.LoRASpec(targets=("attn/qkv/kernel",), rank=17).layout(shapes)
  with pytest.raises(ValueError, match="lora.rank=0"):
    lora.LoRASpec(rank=0)
  with pytest.raises(ValueError, match="lora.alpha=-1"):
    lora.LoRASpec(alpha=-1)
  with pytest.raises(ValueError, match="not a valid regex"):
    lora.LoRASpec(targets=("attn/(qkv",))
  (e,) = lora.LoRASpec(targets=("attn/qkv/kernel",), rank=4, alpha=2.0).layout(shapes)
  assert (e.d_in, e.d_out, e.scale) == (16, 48, 0.5)
  assert lora.LoRASpec(rank=4).scale == 1.0  # alpha=None: alpha = rank
  cfg = ml_collections.ConfigDict(dict(enabled=True, targets=["attn/qkv/kernel"], rank=4))
  assert lora.spec_from_config(cfg) == lora.LoRASpec(targets=("attn/qkv/kernel",), rank=4)
  assert lora.spec_from_config(ml_collections.ConfigDict(dict(enabled=False))) is None
  assert lora.spec_from_config(None) is None
