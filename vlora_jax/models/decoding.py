"""Generating with a trained model: LM sampling and encoder-decoder decoding, with a KV cache.

  tokens = decoding.generate(lm, params, [[5, 9, 2], [7]], max_new_tokens=100, temperature=0.8,
                             top_k=40, seed=0)           # one list of new ids per prompt
  out = decoding.greedy(seq2seq, params, src, bos=1, eos=2)           # [B, T]
  out = decoding.beam_search(seq2seq, params, src, bos=1, eos=2, beam_size=4)

The cache is the training attention layer's own (`layers.SelfAttention` with ``decode``), kept per
layer by the layer stack under its scan; there is no second model. VLoRA and LoRA weights are merged
into plain per-layer weights once per call (`stack.to_dense`), so every token runs the dense
model: a VLoRA model samples as fast as its dense twin. ``merge=False`` decodes on the VLoRA
parameters themselves, each layer's weights built inside the scan at every step.

Prompts of different lengths are left-padded: every sequence writes the same cache slot at each
step, its positions count from its own first token, and its padding slots are masked out of
attention. An LM whose context (``model.max_len``) is shorter than prompt plus output slides its
window: when the cache is full, the last half window is prefilled again and generation goes on
(prompts are then batched with those of their own length, so that a greedy continuation does
not depend on the prompts beside it; a sampled one draws its noise for the batch it is in).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vlora_jax.core import stack
from vlora_jax.tokens import PAD_ID


# ---------------------------------------------------------------------------------- choosing


@dataclasses.dataclass(frozen=True)
class Sampler:
  """How the next token is chosen from logits.

  Attributes:
    temperature: 0 is greedy (argmax); otherwise the logits are divided by it.
    top_k: keep the k most likely tokens (0: all).
    top_p: keep the smallest set of most likely tokens whose probability reaches p (1: all).
    num_tokens: only ids below it are ever chosen (None: every id of the model's output). A
      model may have more output ids than its vocabulary has tokens (``model.vocab_size`` rounded
      up); those ids mean nothing.
  """
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  num_tokens: int | None = None

  def check(self, vocab_size: int) -> None:
    if self.num_tokens is not None and not 1 <= self.num_tokens <= vocab_size:
      raise ValueError(f"num_tokens={self.num_tokens!r}: must be in [1, {vocab_size}] (the "
                       "model's output ids)")
    if not (math.isfinite(self.temperature) and self.temperature >= 0):
      raise ValueError(f"temperature={self.temperature!r}: must be >= 0 (0 is greedy)")
    if 0 < self.temperature < FLOAT32_TINY:  # 0 or subnormal in float32: the logits / T overflow
      raise ValueError(f"temperature={self.temperature!r}: underflows in float32 (positive "
                       f"temperatures must be >= {FLOAT32_TINY:.3g}); use 0 for greedy sampling")
    if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or not (
        0 <= self.top_k <= vocab_size):
      raise ValueError(f"top_k={self.top_k!r}: must be an integer in [0, {vocab_size}] (the "
                       "vocabulary; 0 keeps every token)")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p={self.top_p!r}: must be in (0, 1] (1 keeps every token)")

  def __call__(self, logits, key):
    """``logits [B, V]`` -> token ids ``[B]`` (int32)."""
    logits = logits.astype(jnp.float32)
    if self.num_tokens is not None:
      logits = jnp.where(jnp.arange(logits.shape[-1]) < self.num_tokens, logits, -jnp.inf)
    if self.temperature == 0:
      return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / self.temperature
    if self.top_k:
      kth = jax.lax.top_k(logits, self.top_k)[0][:, -1:]
      logits = jnp.where(logits < kth, -jnp.inf, logits)
    if self.top_p < 1:
      ranked = jnp.sort(logits, axis=-1)[:, ::-1]
      probs = jax.nn.softmax(ranked, axis=-1)
      # a token stays if the tokens ranked above it hold less than top_p (the first always does)
      keep = jnp.cumsum(probs, axis=-1) - probs < self.top_p
      floor = jnp.min(jnp.where(keep, ranked, jnp.inf), axis=-1, keepdims=True)
      logits = jnp.where(logits < floor, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


GREEDY = Sampler(temperature=0.0)
FLOAT32_TINY = float(np.finfo(np.float32).tiny)  # the smallest normal float32
MAX_SEED = 2**32 - 1
# A bound on one call's new tokens (a typo's 10**12 would run for days): 2**20 per sequence.
MAX_NEW_TOKENS = 2**20


# ---------------------------------------------------------------------------------- the cache


def init_cache(model, *inputs, method=None, **kwargs):
  """Zeros shaped as the model's ``cache`` collection for ``inputs`` (shapes only, no compute).

  ``inputs`` are what the decoding call takes, with the time axis at the cache's full length.
  """
  init = functools.partial(model.init, method=method, decode="prefill", **kwargs)
  shapes = jax.eval_shape(init, jax.random.key(0), *inputs)["cache"]
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def reorder_cache(cache, rows):
  """Every cached sequence replaced by sequence ``rows[i]`` (beam search's parents).

  The stacks keep their caches as ``[layers, batch, ...]``; the per-layer ``index`` is ``[layers]``
  and is the same for every sequence.
  """
  return jax.tree.map(lambda a: a if a.ndim < 2 else jnp.take(a, rows, axis=1), cache)


@functools.partial(jax.jit, static_argnames="model")
def _merge(model, params):
  return stack.to_dense(model, {"params": params})[1]["params"]


def _merged(model, params, merge: bool):
  """``(dense twin, its params)``: VLoRA and LoRA folded in by one compiled call."""
  if not merge or (getattr(model, "vlora", None) is None and getattr(model, "lora", None) is None):
    return model, params
  return model.clone(vlora=None, lora=None), _merge(model, params)


# ---------------------------------------------------------------------------------- LM sampling


def _left_pad(seqs: Sequence[Sequence[int]], width: int):
  """``(tokens [B, width] int32, pad [B] int32)``: each sequence right-aligned after ``pad`` zeros."""
  tokens = np.zeros((len(seqs), width), np.int32)
  pad = np.zeros((len(seqs),), np.int32)
  for i, s in enumerate(seqs):
    pad[i] = width - len(s)
    tokens[i, pad[i]:] = s
  return tokens, pad


@functools.partial(jax.jit, static_argnames=("model", "new", "sampler", "stop", "use_cache"))
def _lm_chunk(model, params, context, pad, done, key, *, new: int, sampler: Sampler,
              stop: int | None, use_cache: bool):
  """Up to ``new`` tokens after the left-padded ``context [B, P]``, in one cache of ``P + new``.

  Returns ``(tokens [B, new], count, done [B], key)``: the first ``count`` columns were generated
  (fewer than ``new`` when every sequence stopped); a finished sequence emits `PAD_ID`.
  """
  b, p = context.shape
  length = p + new
  slots = jnp.arange(length)
  mask = (slots[None, :] >= pad[:, None])[:, None, None, :]  # [B, 1, 1, T]: real tokens only
  position = lambda slot: jnp.maximum(slot - pad[:, None], 0)  # [B, t]: from the first real one

  def run(tokens, ids, cache=None, decode=None):
    if cache is None:
      return model.apply({"params": params}, tokens, ids, mask)
    logits, upd = model.apply({"params": params, "cache": cache}, tokens, ids, mask,
                              decode=decode, mutable=["cache"])
    return logits, upd["cache"]

  # The state between tokens: (cache, logits of the next token) with the cache; without it (the
  # reference), the sequence so far, whole, to be run again.
  if use_cache:
    ids = jnp.zeros((b, length), jnp.int32)
    logits, cache = run(context, position(slots[None, :p]), init_cache(model, ids, ids, mask),
                        "prefill")
    state = (cache, logits[:, -1])
  else:
    state = (jnp.zeros((b, length), jnp.int32).at[:, :p].set(context), None)

  def next_logits(state, i):
    """The logits of token ``i`` (slot ``p + i``)."""
    if use_cache:
      return state[1]
    logits = run(state[0], position(slots[None, :]))  # later slots are masked by causality
    return jax.lax.dynamic_index_in_dim(logits, p + i - 1, axis=1, keepdims=False)

  def feed(state, token, i):
    """The state once token ``i`` (slot ``p + i``) is known."""
    if use_cache:
      logits, cache = run(token[:, None], position(p + i + jnp.zeros((1, 1), jnp.int32)),
                          state[0], "step")
      return cache, logits[:, 0]
    return jax.lax.dynamic_update_slice(state[0], token[:, None], (0, p + i)), None

  def body(carry):
    i, out, state, done, key = carry
    key, sub = jax.random.split(key)
    logits = next_logits(state, i)
    token = jnp.where(done, PAD_ID, sampler(logits, sub))
    out = out.at[:, i].set(token)
    if stop is not None:
      done = done | (token == stop)
    state = jax.lax.cond(i + 1 < new, lambda s: feed(s, token, i), lambda s: s, state)
    return i + 1, out, state, done, key

  carry = (jnp.zeros((), jnp.int32), jnp.zeros((b, new), jnp.int32), state, done, key)
  count, out, _, done, key = jax.lax.while_loop(
      lambda c: (c[0] < new) & ~jnp.all(c[3]), body, carry)
  return out, count, done, key


def check_count(name: str, value, most: int | None = None) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"{name}={value!r}: must be an integer >= 1")
  if most is not None and value > most:
    raise ValueError(f"{name}={value!r}: must be at most {most:,}")


def check_seed(seed) -> None:
  """A seed that names one key: JAX keeps a seed's low 32 bits (2**32 is the key of 0)."""
  if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
    raise ValueError(f"seed={seed!r}: must be an integer in [0, {MAX_SEED}] (a 32-bit key: "
                     "larger seeds would repeat smaller ones' samples)")


def check_prompts(prompts, vocab_size: int) -> list[list[int]]:
  """Each prompt a non-empty list of ids in ``[0, vocab_size)``; a ValueError naming the first
  that is not."""
  if not prompts:
    raise ValueError("prompts: give at least one prompt")
  out = []
  for i, p in enumerate(prompts):
    p = [int(t) for t in np.asarray(p).reshape(-1)]
    if not p:
      raise ValueError(f"prompts[{i}] is empty: a prompt needs at least one token")
    bad = [t for t in p if not 0 <= t < vocab_size]
    if bad:
      raise ValueError(f"prompts[{i}] holds token ids {bad[:5]} outside [0, {vocab_size})")
    out.append(p)
  return out


def generate(model, params, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             sampler: Sampler = GREEDY, seed: int = 0, stop_token: int | None = None,
             use_cache: bool = True, merge: bool = True, on_chunk=None) -> list[list[int]]:
  """Continues every prompt by up to ``max_new_tokens`` tokens; returns the new ids of each.

  A sequence ends at ``stop_token`` (not included in what is returned). The same ``seed`` gives
  the same samples. ``use_cache=False`` runs the whole sequence again for every token (the
  reference the cache is measured against). ``on_chunk(n)`` is called with the tokens each chunk
  produced (a progress bar).
  """
  vocab = model.vocab_size
  sampler.check(vocab)
  check_count("max_new_tokens", max_new_tokens, MAX_NEW_TOKENS)
  check_seed(seed)
  if stop_token is not None and not 0 <= stop_token < vocab:
    raise ValueError(f"stop_token={stop_token!r}: must be a token id in [0, {vocab})")
  seqs = check_prompts(prompts, vocab)
  model, params = _merged(model, params, merge)
  params = jax.device_put(params)
  run = functools.partial(_generate_batch, model, params, max_new_tokens=max_new_tokens,
                          sampler=sampler, stop_token=stop_token, use_cache=use_cache,
                          on_chunk=on_chunk)
  if max(map(len, seqs)) + max_new_tokens <= model.max_len:  # one window: one batch
    return run(seqs, jax.random.key(seed))
  if model.max_len < 2:
    raise ValueError(f"model.max_len={model.max_len}: prompt plus max_new_tokens="
                     f"{max_new_tokens} exceed it, and a sliding window needs room for a context "
                     "token and a new one (max_len >= 2)")
  # A sliding window refills at a sequence's own lengths; sequences batch only with their kind,
  # so that what a greedy prompt gives does not depend on the prompts beside it.
  out: list[list[int]] = [[] for _ in seqs]
  for n, length in enumerate(sorted(set(map(len, seqs)))):
    group = [i for i, s in enumerate(seqs) if len(s) == length]
    key = jax.random.fold_in(jax.random.key(seed), n)
    for i, new in zip(group, run([seqs[i] for i in group], key)):
      out[i] = new
  return out


def _generate_batch(model, params, seqs, key, *, max_new_tokens, sampler, stop_token, use_cache,
                    on_chunk):
  """`generate` of prompts that share one chunk schedule (all of them in one window, or of one
  length)."""
  window = model.max_len
  seqs = [list(s) for s in seqs]
  new_ids: list[list[int]] = [[] for _ in seqs]
  done = np.zeros((len(seqs),), bool)
  remaining = max_new_tokens
  while remaining > 0 and not done.all():
    # Room for at least half a window of new tokens; the context is what fits before it.
    room = min(remaining, max(1, window // 2))
    context = [s[-(window - room):] for s in seqs]
    width = max(len(c) for c in context)
    new = min(remaining, window - width)
    tokens, pad = _left_pad(context, width)
    out, count, done_dev, key = _lm_chunk(model, params, tokens, pad, jnp.asarray(done), key,
                                          new=new, sampler=sampler, stop=stop_token,
                                          use_cache=use_cache)
    out, count = np.asarray(out), int(count)
    for i in range(len(seqs)):
      if done[i]:
        continue
      row = out[i, :count].tolist()
      if stop_token is not None and stop_token in row:
        row = row[:row.index(stop_token)]
      new_ids[i] += row
      seqs[i] += row
    done = np.asarray(done_dev)
    remaining -= count
    if on_chunk is not None:
      on_chunk(count)
  return new_ids


# ---------------------------------------------------------------------------------- seq2seq


def _encoded(model, params, src):
  return model.apply({"params": params}, src, method="encode")


def _no_specials(logits, bos: int):
  """A decoder never writes padding or BOS: those logits out (so a sequence is padding only after
  its EOS, which the teacher-forced masks rely on)."""
  return logits.at[:, jnp.asarray([PAD_ID, bos])].set(-jnp.inf)


def _decoder(model, params, memory, src):
  """``(cache, step)``: an empty decoder cache for ``model.max_len`` target tokens, and
  ``step(cache, tokens [B, 1], position, decode) -> (logits [B, V], cache)``."""
  b = src.shape[0]
  length = model.max_len
  ids = jnp.zeros((b, length), jnp.int32)
  cache = init_cache(model, ids, memory, src, ids, method="decode_logits")

  def step(cache, tokens, position, decode):
    logits, upd = model.apply({"params": params, "cache": cache}, tokens, memory, src,
                              jnp.full((b, 1), position, jnp.int32), decode=decode,
                              method="decode_logits", mutable=["cache"])
    return logits[:, 0], upd["cache"]

  return cache, step


@functools.partial(jax.jit, static_argnames=("model", "bos", "eos", "merge"))
def greedy(model, params, src, *, bos: int, eos: int, merge: bool = True):
  """Greedy decoding of ``src [B, S]``: the encoder runs once, the decoder token by token.

  Returns ``[B, model.max_len]`` int32: the tokens up to and including ``eos``, then `PAD_ID`.
  """
  model, params = _merged(model, params, merge)
  memory = _encoded(model, params, src)
  cache, step = _decoder(model, params, memory, src)
  b, length = src.shape[0], model.max_len
  logits, cache = step(cache, jnp.full((b, 1), bos, jnp.int32), 0, "prefill")

  def body(i, carry):
    out, cache, logits, done = carry
    token = jnp.argmax(_no_specials(logits, bos), -1).astype(jnp.int32)
    token = jnp.where(done, PAD_ID, token)
    out, done = out.at[:, i].set(token), done | (token == eos)
    logits, cache = jax.lax.cond(i + 1 < length, lambda c: step(c, token[:, None], i + 1, "step"),
                                 lambda c: (logits, c), cache)
    return out, cache, logits, done

  carry = (jnp.zeros((b, length), jnp.int32), cache, logits, jnp.zeros((b,), bool))
  return jax.lax.fori_loop(0, length, body, carry)[0]


@functools.partial(jax.jit, static_argnames=("model", "bos", "eos", "beam_size", "length_penalty",
                                             "merge"))
def beam_search(model, params, src, *, bos: int, eos: int, beam_size: int,
                length_penalty: float = 0.0, merge: bool = True):
  """Beam search over ``src [B, S]``; the best beam of each, ``[B, model.max_len]`` int32.

  The search keeps the beams of highest summed log-probability; the final choice among them
  divides that sum by ``length ** length_penalty`` (0: no normalisation). A beam that emitted
  ``eos`` is kept as it is, and continues with `PAD_ID` at no cost. ``beam_size=1`` is `greedy`.
  """
  if isinstance(beam_size, bool) or not isinstance(beam_size, int) or beam_size < 1:
    raise ValueError(f"beam_size={beam_size!r}: must be an integer >= 1")
  model, params = _merged(model, params, merge)
  b, k, length, vocab = src.shape[0], beam_size, model.max_len, model.vocab_size
  memory = _encoded(model, params, src)
  memory, src = jnp.repeat(memory, k, axis=0), jnp.repeat(src, k, axis=0)  # [B*K, ...]
  cache, step = _decoder(model, params, memory, src)
  logits, cache = step(cache, jnp.full((b * k, 1), bos, jnp.int32), 0, "prefill")
  # All beams start as one: only the first may extend, or the first step picks K copies.
  scores = jnp.where(jnp.arange(k) == 0, 0.0, -jnp.inf)[None].repeat(b, 0)
  frozen = jnp.full((vocab,), -jnp.inf).at[PAD_ID].set(0.0)  # a finished beam's only way on

  def body(i, carry):
    seqs, scores, finished, cache, logits = carry
    logp = jax.nn.log_softmax(_no_specials(logits.astype(jnp.float32), bos)).reshape(b, k, vocab)
    logp = jnp.where(finished[..., None], frozen, logp)
    top, flat = jax.lax.top_k((scores[..., None] + logp).reshape(b, k * vocab), k)
    parent, token = flat // vocab, (flat % vocab).astype(jnp.int32)
    seqs = jnp.take_along_axis(seqs, parent[..., None], axis=1).at[:, :, i].set(token)
    finished = jnp.take_along_axis(finished, parent, axis=1) | (token == eos)
    cache = reorder_cache(cache, (parent + k * jnp.arange(b)[:, None]).reshape(-1))
    logits, cache = jax.lax.cond(
        i + 1 < length, lambda c: step(c, token.reshape(-1, 1), i + 1, "step"),
        lambda c: (logits, c), cache)
    return seqs, top, finished, cache, logits

  carry = (jnp.zeros((b, k, length), jnp.int32), scores, jnp.zeros((b, k), bool), cache, logits)
  seqs, scores, _, _, _ = jax.lax.fori_loop(0, length, body, carry)
  if length_penalty:
    ended = jnp.argmax(seqs == eos, axis=-1)
    lengths = jnp.where(jnp.any(seqs == eos, axis=-1), ended + 1, length).astype(jnp.float32)
    scores = scores / lengths ** length_penalty
  best = jnp.argmax(scores, axis=-1)
  return jnp.take_along_axis(seqs, best[:, None, None], axis=1)[:, 0]
