"""Decoding with the KV cache: parity with the full forward pass, sampling, beams, the tokenizer."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlora_jax.models import decoding
from vlora_jax.core import stack
from vlora_jax.core.lora import LoRASpec
from vlora_jax.models.lm import LM
from vlora_jax.models.seq2seq import Seq2Seq
from vlora_jax.core.spec import VLoRASpec
from vlora_jax.data.tokenizer import CharTokenizer, TokenizerError

V, T = 11, 12
PROMPTS = [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10]]  # different lengths: left-padded in one batch


def _lm(vlora="cumulative", positions="learned", scan=True, lora=False):
  spec = None if vlora is None else VLoRASpec(compound_size=2, rank=2, mode=vlora)
  return LM(vocab_size=V, max_len=T, dim=16, depth=4, num_heads=2, mlp_ratio=2.0,
            positions=positions, vlora=spec, scan=scan,
            lora=LoRASpec(targets=(r"attn/qkv/kernel", r"mlp/fc1/kernel"), rank=2)
            if lora else None)


@functools.lru_cache
def _params(model):
  p = nn.unbox(jax.jit(model.init)(jax.random.key(0, impl="rbg"), jnp.zeros((1, T), jnp.int32)))
  # Random LoRA factors and increments (their init is zero): every term of the chain counts.
  leaves, tree = jax.tree.flatten(p["params"])
  keys = jax.random.split(jax.random.key(1), len(leaves))
  leaves = [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
  return jax.tree.unflatten(tree, leaves)


PARITY = [  # every mode, both position kinds, scan and unrolled, LoRA on top
    dict(vlora=None), dict(vlora="cumulative"), dict(vlora="anchored", positions="rope"),
    dict(vlora="cumulative", positions="rope", scan=False), dict(vlora="anchored", scan=False),
    dict(vlora="cumulative", lora=True)]


@pytest.mark.parametrize("kw", PARITY, ids=lambda kw: "-".join(f"{v}" for v in kw.values()))
def test_cached_logits_equal_the_full_forward_pass(kw):
  """Prompts of three lengths, left-padded, prefilled together, then fed one token a step: the
  logits of every real token equal those of the full forward pass without a cache."""
  model = _lm(**kw)
  params = _params(model)
  rng = np.random.default_rng(0)
  seqs = [p + rng.integers(0, V, T - 5).tolist() for p in PROMPTS]  # prompt + 7 more each
  width = max(map(len, PROMPTS))
  tokens, pad = decoding._left_pad([s[:len(p)] for s, p in zip(seqs, PROMPTS)], width)
  total = width + T - 5
  slots = jnp.arange(total)
  mask = (slots[None, :] >= pad[:, None])[:, None, None, :]
  ids = lambda s: jnp.maximum(s - pad[:, None], 0)

  steps = jnp.asarray([s[len(p):] for s, p in zip(seqs, PROMPTS)], jnp.int32).T  # [7, B]

  @jax.jit
  def cached_and_full(params):
    cache = decoding.init_cache(model, *(jnp.zeros((3, total), jnp.int32),) * 2, mask)
    logits, upd = model.apply({"params": params, "cache": cache}, tokens, ids(slots[None, :width]),
                              mask, decode="prefill", mutable=["cache"])

    def step(cache, xs):
      i, token = xs
      logits, upd = model.apply({"params": params, "cache": cache}, token[:, None],
                                ids(jnp.full((1, 1), width + i)), mask, decode="step",
                                mutable=["cache"])
      return upd["cache"], logits[:, 0]

    _, more = jax.lax.scan(step, upd["cache"], (jnp.arange(len(steps)), steps))
    by_slot = jnp.concatenate([logits, more.transpose(1, 0, 2)], axis=1)  # [B, total, V]
    # The reference: one pass over the sequences right-padded (causal: a real token never sees
    # the padding after it), no cache.
    return by_slot, model.apply({"params": params}, jnp.asarray(_right_pad(seqs)))

  by_slot, full = map(np.asarray, cached_and_full(params))
  worst = max(float(np.abs(by_slot[b, pad[b]:] - full[b, :len(s)]).max())
              for b, s in enumerate(seqs))
  assert worst <= 1e-5, worst


def _right_pad(seqs):
  out = np.zeros((len(seqs), max(map(len, seqs))), np.int32)
  for i, s in enumerate(seqs):
    out[i, :len(s)] = s
  return out


def test_seq2seq_cached_decoder_equals_teacher_forcing():
  """The decoder fed its target one token a step, with the encoder run once and the cross keys
  kept from the first call, gives the teacher-forced logits."""
  model = Seq2Seq(vocab_size=V, max_len=8, dim=16, depth=2, num_heads=2, mlp_ratio=2.0,
                  vlora=VLoRASpec(compound_size=2, rank=2))
  src = jnp.asarray([[5, 6, 7, 0, 0], [3, 4, 5, 6, 7]], jnp.int32)
  tgt = jnp.asarray([[1, 9, 8, 7, 4, 5, 3, 3], [1, 7, 6, 5, 4, 3, 2, 9]], jnp.int32)
  params = nn.unbox(model.init(jax.random.key(0), src, tgt))["params"]
  full = model.apply({"params": params}, src, tgt)

  @jax.jit
  def cached(params):
    memory = model.apply({"params": params}, src, method="encode")
    cache = decoding.init_cache(model, tgt, memory, src, tgt, method="decode_logits")
    out, upd = [], {"cache": cache}
    for i in range(tgt.shape[1]):
      logits, upd = model.apply({"params": params, **upd}, tgt[:, i:i + 1], memory, src,
                                jnp.full((2, 1), i), decode="prefill" if i == 0 else "step",
                                method="decode_logits", mutable=["cache"])
      out.append(logits)
    return jnp.concatenate(out, axis=1)

  np.testing.assert_allclose(cached(params), full, atol=1e-5, rtol=0)


def test_decode_modes_are_checked():
  model = _lm(vlora=None, positions="rope")
  with pytest.raises(ValueError, match="decode='steps'"):
    model.apply({"params": _params(model)}, jnp.zeros((1, 2), jnp.int32), decode="steps")
  with pytest.raises(ValueError, match="position_ids"):
    learned = _lm(vlora=None)
    learned.apply({"params": _params(learned)}, jnp.zeros((1, 2), jnp.int32), decode="step")


# ------------------------------------------------------------------------------------- sampling


def test_generate_batched_cached_merged_and_windowed_agree():
  """Greedy continuation of prompts of three lengths, 16 tokens with a context of 12 (the window
  slides): cached == the whole sequence run again per token; merged
  once (the default) == decoding on the VLoRA parameters; the first tokens (inside the first
  window) == argmax of full forward passes; and batched == each prompt alone."""
  model = _lm(vlora="cumulative")
  params = _params(model)
  gen = functools.partial(decoding.generate, model, params, max_new_tokens=16)
  batched = gen(PROMPTS)
  assert [len(x) for x in batched] == [16, 16, 16]
  assert batched == gen(PROMPTS, use_cache=False) == gen(PROMPTS, merge=False)
  # Inside one window the prompts share a left-padded batch: each gives what it gives alone.
  one_window = gen(PROMPTS, max_new_tokens=T - len(PROMPTS[0]))
  assert [gen([p], max_new_tokens=T - len(PROMPTS[0]))[0] for p in PROMPTS] == one_window
  seq = list(PROMPTS[0])
  for _ in range(T - len(seq)):
    seq.append(int(np.argmax(model.apply({"params": params}, jnp.asarray([seq]))[0, -1])))
  assert seq[len(PROMPTS[0]):] == batched[0][:T - len(PROMPTS[0])]


def test_sampling_is_reproducible_by_seed_and_greedy_is_deterministic():
  model = _lm(vlora="anchored", positions="rope")
  params = _params(model)
  hot = decoding.Sampler(temperature=1.5, top_k=8, top_p=0.95)
  gen = functools.partial(decoding.generate, model, params, PROMPTS, max_new_tokens=16)
  assert gen(sampler=hot, seed=3) == gen(sampler=hot, seed=3)
  assert gen(sampler=hot, seed=3) != gen(sampler=hot, seed=4)
  assert gen(seed=3) == gen(seed=4)  # greedy: no randomness
  assert gen(sampler=decoding.Sampler(1.0, top_k=1), seed=5) == gen()  # top-1 is greedy


def test_stop_token_ends_each_sequence_alone():
  model = _lm(vlora=None)
  params = _params(model)
  free = decoding.generate(model, params, PROMPTS, max_new_tokens=10)
  stop = free[1][3]
  stopped = decoding.generate(model, params, PROMPTS, max_new_tokens=10, stop_token=stop)
  for f, s in zip(free, stopped):
    assert s == (f[:f.index(stop)] if stop in f else f)


def test_top_k_and_top_p_keep_the_right_tokens():
  """Over many draws, the tokens sampled are exactly those top-k / top-p allow (numpy reference)."""
  logits = jnp.asarray(np.random.default_rng(0).normal(size=(1, 20)) * 2, jnp.float32)
  probs = np.asarray(jax.nn.softmax(logits[0]))
  order = np.argsort(-probs)
  keys = jax.random.split(jax.random.key(0), 4000)
  draw = lambda s: set(np.asarray(jax.vmap(lambda k: s(logits, k))(keys)).ravel().tolist())
  assert draw(decoding.Sampler(1.0, top_k=3)) == set(order[:3].tolist())
  nucleus = order[:np.searchsorted(np.cumsum(probs[order]), 0.6) + 1]
  assert draw(decoding.Sampler(1.0, top_p=0.6)) == set(nucleus.tolist())
  assert draw(decoding.Sampler(1.0, top_k=2, top_p=0.99)) == set(order[:2].tolist())


@pytest.mark.parametrize("kw, match", [
    (dict(max_new_tokens=0), "max_new_tokens=0"),
    (dict(sampler=decoding.Sampler(temperature=-1.0)), "temperature=-1.0"),
    (dict(sampler=decoding.Sampler(top_k=V + 1)), f"top_k={V + 1}"),
    (dict(sampler=decoding.Sampler(top_p=0.0)), "top_p=0.0"),
    (dict(stop_token=V), f"stop_token={V}"),
    (dict(prompts=[[1], []]), r"prompts\[1\] is empty"),
    (dict(prompts=[[1, V]]), r"prompts\[0\] holds token ids \[11\]")])
def test_bad_generation_arguments(kw, match):
  model = _lm(vlora=None)
  kw = {"prompts": PROMPTS, "max_new_tokens": 4, **kw}
  with pytest.raises(ValueError, match=match):
    decoding.generate(model, _params(model), kw.pop("prompts"), **kw)


# ------------------------------------------------------------------------------------- beams


def test_beam_search_width_one_is_greedy_and_wider_scores_no_worse():
  model = Seq2Seq(vocab_size=V, max_len=6, dim=16, depth=2, num_heads=2, mlp_ratio=2.0,
                  vlora=VLoRASpec(compound_size=2, rank=2))
  src = jnp.asarray(np.random.default_rng(0).integers(3, V, (8, 6)), jnp.int32)
  params = nn.unbox(model.init(jax.random.key(0), src, src))["params"]
  greedy = decoding.greedy(model, params, src, bos=1, eos=2)
  np.testing.assert_array_equal(decoding.beam_search(model, params, src, bos=1, eos=2,
                                                     beam_size=1), greedy)
  beam = decoding.beam_search(model, params, src, bos=1, eos=2, beam_size=4)

  def log_prob(out):  # the summed log-probability of each output, by teacher forcing
    tgt_in = jnp.concatenate([jnp.ones((8, 1), jnp.int32), out[:, :-1]], axis=1)
    logits = model.apply({"params": params}, src, tgt_in).at[..., jnp.asarray([0, 1])].set(-1e9)
    lp = jnp.take_along_axis(jax.nn.log_softmax(logits), out[..., None], -1)[..., 0]
    return np.asarray(jnp.sum(jnp.where(out != 0, lp, 0.0), -1))

  assert (log_prob(beam) >= log_prob(greedy) - 1e-5).all()
  assert (log_prob(beam) > log_prob(greedy) + 1e-3).any()  # the search found better sequences


def test_merge_keeps_the_model_output():
  model = _lm(vlora="cumulative", lora=True)
  params = _params(model)
  dense, variables = stack.to_dense(model, {"params": params})
  x = jnp.asarray([PROMPTS[0]])
  np.testing.assert_allclose(dense.apply(variables, x), model.apply({"params": params}, x),
                             atol=1e-5)


# ------------------------------------------------------------------------------------- tokenizer


def test_char_tokenizer_round_trips_and_refuses_unknown_text():
  tok = CharTokenizer.from_info({"vocab": "\n !',.?ABCabc"})
  text = "Abc, cab!\nA b?"
  assert tok.decode(tok.encode(text)) == text
  assert tok.encode("A") == [7]
  with pytest.raises(TokenizerError, match="'Z'"):
    tok.encode("AZ")
  with pytest.raises(TokenizerError, match="outside"):
    tok.decode([99])
  with pytest.raises(TokenizerError, match="no character vocabulary"):
    CharTokenizer.from_info({"kind": "seq2seq"})


def test_num_tokens_keeps_ids_without_a_token_out():
  """A model with more output ids than its vocabulary has tokens never emits the extra ones."""
  logits = jnp.asarray([[0.0, 0.0, 0.0, 9.0, 9.0]] * 64)
  for sampler in (decoding.Sampler(temperature=1.0, num_tokens=3),
                  decoding.Sampler(temperature=0.0, num_tokens=3)):
    ids = np.asarray(sampler(logits, jax.random.key(0)))
    assert ids.max() < 3
  with pytest.raises(ValueError, match=r"num_tokens=6: must be in \[1, 5\]"):
    decoding.Sampler(num_tokens=6).check(5)
