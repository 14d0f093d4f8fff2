"""Encoder-decoder: VLoRA in both stacks == merged dense, decoder targets, masks, training, reversal."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from vlora_jax import models
from vlora_jax.models import decoding
from vlora_jax.core import params, stack
from vlora_jax.models.seq2seq import CROSS_TARGETS, DEC_TARGETS, Seq2Seq, decoder_spec
from vlora_jax.core.spec import VIT_TARGETS, VLoRASpec

V = 13
SPEC = VLoRASpec.official(compound_size=2, rank=2)
# Real lengths 5, 3 and 6 (source) and 4, 6, 2 (target); id 0 pads the rest.
SRC = jnp.array([[5, 6, 7, 8, 9, 0, 0], [3, 4, 5, 0, 0, 0, 0], [9, 8, 7, 6, 5, 4, 0]], jnp.int32)
TGT = jnp.array([[1, 4, 5, 6, 0, 0], [1, 7, 8, 9, 10, 11], [1, 12, 0, 0, 0, 0]], jnp.int32)


def _model(**kw):
  base = dict(vocab_size=V, max_len=8, dim=16, depth=2, dec_depth=4, num_heads=2, mlp_ratio=2.0,
              vlora=SPEC)
  return Seq2Seq(**{**base, **kw})


@functools.lru_cache
def _variables():
  # Init compiles one RNG kernel per parameter (seconds on CPU): share it between tests, and use
  # rbg keys (XLA's RngBitGenerator compiles about twice as fast as threefry on CPU).
  return nn.unbox(jax.jit(_model().init)(jax.random.key(1, impl="rbg"), SRC, TGT))


def _apply(model):
  return jax.jit(lambda v, src, tgt: model.apply(v, src, tgt))


def test_vlora_in_both_stacks_equals_materialised_dense():
  model, v = _model(), _variables()
  p = v["params"]
  assert stack.is_stack(p["encoder"]) and stack.is_stack(p["decoder"])
  assert p["encoder"]["base"]["attn"]["qkv"]["kernel"].shape == (1, 16, 48)   # 2 layers = 1 x 2
  assert p["decoder"]["base"]["attn"]["qkv"]["kernel"].shape == (2, 16, 48)   # 4 layers = 2 x 2
  specs = {k: s for k, (s, _) in model.stack_specs().items()}
  merged = {"params": stack.merge(p, specs)}
  dense = params.dense_twin(model)
  assert jax.tree.map(jnp.shape, merged["params"]) == jax.tree.map(
      lambda s: s.shape, params.param_shapes(dense, SRC, TGT))
  np.testing.assert_allclose(_apply(dense)(merged, SRC, TGT), _apply(model)(v, SRC, TGT),
                             atol=1e-5, rtol=1e-5)
  with pytest.raises(ValueError, match="no entry for the stack 'decoder'"):
    stack.merge(p, {"encoder": SPEC})


def test_decoder_targets_include_cross_attention():
  p = _variables()["params"]
  assert set(p["decoder"]["inc_a"]["cross"]) == {"q", "kv", "proj"}
  assert "cross" not in p["encoder"]["base"]
  assert p["decoder"]["inc_b"]["cross"]["kv"]["kernel"].shape == (2, 1, 2, 32)
  assert p["decoder"]["per_layer"]["cross"]["kv"]["bias"].shape == (4, 32)
  # Per-target ranks: cross/q and cross/kv take qkv's rank, cross/proj takes proj's.
  spec = VLoRASpec(rank=(2, 3, 4, 5), alpha=(1.0, 2.0, 1.0, 1.0))
  dec = decoder_spec(spec)
  assert dec.targets == DEC_TARGETS and dec.ranks == (2, 3, 4, 5, 2, 2, 3)
  assert dec.alphas == (1.0, 2.0, 1.0, 1.0, 1.0, 1.0, 2.0)
  # Overridden targets: the spec's own for both stacks, or dec_targets for the decoder.
  only_mlp = VLoRASpec(compound_size=2, targets=("mlp/fc1/kernel", "mlp/fc2/kernel"))
  assert decoder_spec(only_mlp) == only_mlp
  assert decoder_spec(SPEC, CROSS_TARGETS).targets == CROSS_TARGETS
  shapes = params.param_shapes(_model(vlora=only_mlp, dec_targets=CROSS_TARGETS), SRC, TGT)
  assert set(shapes["decoder"]["inc_a"]) == {"cross"} and set(shapes["encoder"]["inc_a"]) == {"mlp"}
  with pytest.raises(ValueError, match="decoder target 'cross/q/kernel' has no value"):
    decoder_spec(VLoRASpec(targets=("mlp/fc1/kernel", "mlp/fc2/kernel"), rank=(2, 4)),
                 CROSS_TARGETS)
  assert decoder_spec(VLoRASpec(targets=VIT_TARGETS)).targets == DEC_TARGETS


def test_causal_and_padding_masks():
  model, v = _model(), _variables()
  f = _apply(model)
  base = f(v, SRC, TGT)
  real = np.asarray(TGT != 0)
  # Decoder causality: a later target token does not change earlier outputs.
  out = f(v, SRC, TGT.at[1, 3].set(2))
  np.testing.assert_array_equal(out[1, :3], base[1, :3])
  assert float(jnp.abs(out[1, 3:] - base[1, 3:]).max()) > 0
  # Pad content (the pad embedding row, position embeddings at pad slots) is invisible at real
  # positions, through encoder self-attention, cross-attention and decoder self-attention alike.
  p = jax.tree.map(jnp.array, v["params"])
  noise = jax.random.normal(jax.random.key(7), (16,))  # not a constant: LayerNorm would remove it
  p["embed"]["embedding"] = p["embed"]["embedding"].at[0].add(noise)
  p["enc_pos_embed"] = p["enc_pos_embed"].at[:, 6:].add(noise)  # source slots 6, 7 are pad in every row
  out = f({"params": p}, SRC, TGT)
  np.testing.assert_allclose(np.asarray(out)[real], np.asarray(base)[real], atol=1e-5)
  assert float(jnp.abs(out - base).max()) > 1e-2  # pad positions themselves did change
  # More padding on either side changes nothing at real positions either.
  out = f(v, jnp.pad(SRC, ((0, 0), (0, 1))), jnp.pad(TGT, ((0, 0), (0, 2))))
  np.testing.assert_allclose(np.asarray(out[:, :6])[real], np.asarray(base)[real], atol=1e-5)
  # ... while a real source token does reach every target position (masks do not cut too much).
  out = f(v, SRC.at[1, 2].set(11), TGT)
  assert float(jnp.abs(out[1] - base[1]).max(axis=-1).min()) > 0  # every position


def _loss_and_acc(model, p, src, tgt_in, tgt):
  logits = model.apply({"params": p}, src, tgt_in)
  w = (tgt != 0).astype(jnp.float32)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, tgt)
  acc = ((logits.argmax(-1) == tgt) * w).sum() / w.sum()
  return (loss * w).sum() / w.sum(), acc


def _train_step(model, tx):
  @jax.jit
  def step(p, opt, *batch):
    (loss, acc), g = jax.value_and_grad(
        lambda p: _loss_and_acc(model, p, *batch), has_aux=True)(p)
    updates, opt = tx.update(g, opt, p)
    return optax.apply_updates(p, updates), opt, loss, acc
  return step


# ----------------------------------------------------------------------------- a task to learn
BOS, EOS, FIRST, RV, RS = 1, 2, 3, 16, 8  # ids 3..15 are symbols; sources of 2..7 symbols
STEPS = 250


def _reversal_batch(rng, n):
  """Sources of random length padded to RS; targets = reversed source + EOS; tgt_in = BOS + tgt."""
  src = np.zeros((n, RS), np.int32)
  tgt = np.zeros((n, RS + 1), np.int32)
  for i, length in enumerate(rng.integers(2, RS, size=n)):
    seq = rng.integers(FIRST, RV, size=length)
    src[i, :length], tgt[i, :length], tgt[i, length] = seq, seq[::-1], EOS
  tgt_in = np.concatenate([np.full((n, 1), BOS, np.int32), tgt[:, :-1]], axis=1)
  return src, tgt_in, tgt


@functools.lru_cache
def _reversal_setup():
  """VLoRA in both stacks; initial params, optimizer, and the train step and forward, compiled
  once for both tests below."""
  model = Seq2Seq(vocab_size=RV, max_len=RS + 1, dim=64, depth=2, dec_depth=2, num_heads=4,
                  mlp_ratio=2.0, vlora=VLoRASpec(compound_size=2, rank=4))
  src, tgt_in, _ = _reversal_batch(np.random.default_rng(0), 2)
  p = nn.unbox(jax.jit(model.init)(jax.random.key(0, impl="rbg"), src, tgt_in))["params"]
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   optax.adam(optax.warmup_cosine_decay_schedule(3e-4, 3e-3, 20, STEPS)))
  forward = jax.jit(lambda p, s, t: model.apply({"params": p}, s, t))
  return model, p, tx, _train_step(model, tx), forward


def test_one_train_step_reduces_loss():
  _, p, tx, step, _ = _reversal_setup()
  batch = _reversal_batch(np.random.default_rng(5), 64)
  new, _, before, _ = step(p, tx.init(p), *batch)
  _, _, after, _ = step(new, tx.init(new), *batch)  # the step reports the loss before updating
  assert float(after) < float(before)


def test_reversal_is_learned():
  """VLoRA in both stacks learns to reverse variable-length sequences (masks and cross-attention
  have to work for that), judged on fresh sequences, teacher-forced and by real decoding (greedy
  and beam search)."""
  model, p, tx, step, forward = _reversal_setup()
  rng, opt = np.random.default_rng(0), tx.init(p)
  for _ in range(STEPS):
    p, opt, loss, _ = step(p, opt, *_reversal_batch(rng, 64))

  src, tgt_in, tgt = _reversal_batch(np.random.default_rng(123), 256)  # unseen sequences
  real = tgt != 0
  acc = (np.asarray(forward(p, src, tgt_in)).argmax(-1) == tgt)[real].mean()
  assert acc > 0.9, (float(loss), acc)

  # Real decoding (`vlora_jax.models.decoding`): the encoder once, the cached decoder on its own
  # outputs.
  greedy = np.asarray(decoding.greedy(model, p, src, bos=BOS, eos=EOS))
  exact = (greedy == tgt).all(-1).mean()
  assert exact > 0.8, exact
  np.testing.assert_array_equal(decoding.beam_search(model, p, src, bos=BOS, eos=EOS,
                                                     beam_size=1), greedy)
  beam = np.asarray(decoding.beam_search(model, p, src, bos=BOS, eos=EOS, beam_size=4))
  assert (beam == tgt).all(-1).mean() > 0.8


def test_from_config_and_errors():
  cfg = ml_collections.ConfigDict(dict(
      name="seq2seq", vocab_size=V, max_len=8, dim=16, depth=2, dec_depth=4, num_heads=2,
      mlp_ratio=2.0, dropout=0.0, dtype="float32", scan=True, remat="none",
      vlora=dict(enabled=True, compound_size=2, rank=2, dec_targets=list(CROSS_TARGETS))))
  model = models.build(cfg)
  assert isinstance(model, Seq2Seq) and model.decoder_depth == 4
  assert model.stack_specs()["decoder"][0].targets == CROSS_TARGETS
  shapes = params.param_shapes(model, *models.sample_inputs(cfg))
  assert shapes["decoder"]["base"]["cross"]["q"]["kernel"].shape == (2, 16, 16)
  with pytest.raises(ValueError, match="tgt_in length 6 exceeds model.max_len=5"):
    _model(max_len=5).init(jax.random.key(0), SRC[:, :5], TGT)
  with pytest.raises(ValueError, match="vlora.compound_size=3 does not divide num_layers=2"):
    _model(vlora=VLoRASpec(compound_size=3)).init(jax.random.key(0), SRC, TGT)
