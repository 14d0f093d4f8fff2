"""``data.source='tokenized'``: a local text file, tokenized by a subword tokenizer, in windows.

  data.path                 the UTF-8 text file
  data.tokenizer            a tokenizer.json, a .gguf, a Hugging Face model directory, or a run
                            that stores a tokenizer (`vlora_jax.data.tokenizer.load`)
  data.split_blocks         the token stream is cut into this many contiguous blocks of equal size
  data.validation_fraction  the share of the blocks that validates, and of those that test
  data.test_fraction
  data.split_seed           which blocks: None the last ones in the file's order (validation, then
                            test); an int, a choice by this seed (`split`)
  data.eval_split           'validation' | 'test': what the run evaluates on

The whole file is tokenized at once (no special tokens: a stream), then split. Train examples are
every window of ``model.max_len + 1`` tokens inside the train blocks (adjacent blocks join; no
window crosses into held-out text), validation and test examples the non-overlapping windows of
their blocks in order (`windows`; the character-level ``text`` source cuts its text the same
way). The choice of blocks, the eval split's characters per token (bits per character) and the
tokenizer (its JSON, BOS and EOS ids) are stored in the data info, with every checkpoint:
`vlora_jax.load`, `sample` and `evaluate` need nothing else.
"""

from __future__ import annotations

import numpy as np

from vlora_jax.data import tokenizer as tokenizer_lib
from vlora_jax.data import sources
from vlora_jax.data.sources import DataError

SPLITS = ("train", "validation", "test")
EVAL_SPLITS = ("validation", "test")


def split(num_blocks: int, validation: float, test: float, seed: int | None) -> dict[str, list]:
  """``{split name: sorted block indices}`` of ``num_blocks`` blocks.

  ``round(fraction * num_blocks)`` blocks validate and as many test (at least one each where the
  fraction is > 0). ``seed`` None: the last blocks, validation before test (a held-out tail of the
  file); an int: a permutation by that seed picks them (the same for every run with that seed).
  """
  counts = {name: max(1, round(f * num_blocks)) if f > 0 else 0
            for name, f in (("validation", validation), ("test", test))}
  held = counts["validation"] + counts["test"]
  if held >= num_blocks:
    raise DataError(f"data.validation_fraction={validation} and data.test_fraction={test} hold "
                    f"out {held} of data.split_blocks={num_blocks} blocks, leaving none to train; "
                    "allowed: fewer held-out blocks than blocks")
  order = (np.arange(num_blocks) if seed is None
           else np.random.default_rng(seed).permutation(num_blocks))
  tail = order[num_blocks - held:]
  return {"train": sorted(int(b) for b in order[:num_blocks - held]),
          "validation": sorted(int(b) for b in tail[:counts["validation"]]),
          "test": sorted(int(b) for b in tail[counts["validation"]:])}


def spans(blocks: list[int], num_blocks: int, num_tokens: int) -> list[tuple[int, int]]:
  """Token ``[start, end)`` ranges of ``blocks``, adjacent blocks joined into one range."""
  out: list[tuple[int, int]] = []
  for b in blocks:
    start, end = b * num_tokens // num_blocks, (b + 1) * num_tokens // num_blocks
    if out and out[-1][1] == start:
      out[-1] = (out[-1][0], end)
    else:
      out.append((start, end))
  return out


class SpanWindows:
  """The ``length``-token windows, every ``stride`` tokens, inside each of ``spans`` of ``tokens``,
  in order: ``[i]`` = ``{'tokens': int32 [length]}``."""

  def __init__(self, tokens: np.ndarray, spans_: list[tuple[int, int]], length: int,
               stride: int = 1):
    self.tokens, self.length, self.stride = tokens, length, stride
    self.starts = [s for s, _ in spans_]
    counts = [max(0, (e - s - length) // stride + 1) for s, e in spans_]
    self.offsets = np.cumsum([0] + counts)

  def __len__(self):
    return int(self.offsets[-1])

  def __getitem__(self, i):
    i = int(i)
    if not 0 <= i < len(self):
      raise IndexError(f"window {i} of {len(self)}")
    span = int(np.searchsorted(self.offsets, i, side="right")) - 1
    start = self.starts[span] + (i - int(self.offsets[span])) * self.stride
    return {"tokens": self.tokens[start:start + self.length].astype(np.int32)}


def load_tokenizer(d) -> tokenizer_lib.SubwordTokenizer:
  try:
    return tokenizer_lib.load(d.tokenizer, "data.tokenizer")
  except tokenizer_lib.TokenizerError as e:
    raise DataError(str(e)) from None


def windows(ids: np.ndarray, d, max_len: int, eval_split: str, test: np.ndarray | None = None):
  """``({'train', 'validation', 'test'}: windows, split info)`` of a token stream ``ids``.

  ``ids`` is cut into ``data.split_blocks`` blocks; ``data.validation_fraction`` of them
  validate and, unless ``test`` (a separate test stream) is given, ``data.test_fraction`` test.
  Train examples are every window of ``max_len + 1`` tokens inside the train blocks, held-out
  examples the non-overlapping windows of their blocks in order.
  """
  fractions = {k: float(d[f"{k}_fraction"]) for k in EVAL_SPLITS}
  if test is not None:
    fractions["test"] = 0.0
  if fractions[eval_split] <= 0 and not (eval_split == "test" and test is not None):
    raise DataError(f"data.eval_split={eval_split!r} but data.{eval_split}_fraction="
                    f"{fractions[eval_split]}: the run would evaluate on nothing; allowed: > 0")
  num_blocks, seed = int(d.split_blocks), d.split_seed
  chosen = split(num_blocks, fractions["validation"], fractions["test"], seed)
  ranges = {name: spans(chosen[name], num_blocks, len(ids)) for name in SPLITS}
  window = max_len + 1  # inputs tokens[:-1], targets tokens[1:]
  out = {"train": SpanWindows(ids, ranges["train"], window)}
  for name in EVAL_SPLITS:
    out[name] = SpanWindows(ids, ranges[name], window, stride=window)
  if test is not None:
    out["test"] = SpanWindows(test, [(0, len(test))], window, stride=window)
  if len(out["train"]) == 0 or len(out[eval_split]) == 0:
    sizes = {name: sum(e - s for s, e in r) for name, r in ranges.items()}
    raise DataError(f"data.path={d.path!r}: {len(ids)} tokens give no window of "
                    f"model.max_len + 1 = {window} tokens in the train or the {eval_split} split "
                    f"(tokens per split: {sizes}); use a longer text, fewer data.split_blocks or "
                    "a shorter max_len")
  info = dict(blocks=num_blocks, seed=seed, tokens=int(len(ids)),
              **{name: chosen[name] for name in EVAL_SPLITS})
  if test is not None:
    info["test"] = f"data.test_split ({len(test)} tokens)"
  return out, info


def chars_per_token(tok, ids: np.ndarray, spans_: list[tuple[int, int]]) -> float:
  """The characters per token of ``spans_`` of ``ids``, decoded span by span (what turns bits
  per token into bits per character)."""
  tokens = sum(e - s for s, e in spans_)
  if not tokens:
    return 0.0
  return sum(len(tok.decode(ids[s:e].tolist())) for s, e in spans_) / tokens


def build(d, max_len: int):
  """``({'train', 'validation', 'test'}: windows, info)`` of ``config.data`` for windows of
  ``max_len + 1`` tokens (``data.eval_split`` checked by the caller, `data.eval_split`)."""
  which = d.eval_split
  tok = load_tokenizer(d)
  ids = np.asarray(tok.encode(sources.text_file(d.path), special=False), np.int32)
  out, split_info = windows(ids, d, max_len, which)
  # Each split's own: its blocks hold other text (other modules of a code base, say).
  per_split = {name: chars_per_token(tok, ids, spans(split_info[name], split_info["blocks"],
                                                     len(ids)))
               for name in EVAL_SPLITS if isinstance(split_info.get(name), list)}
  info = dict(kind="text", vocab_size=len(tok), num_train=len(out["train"]),
              tokens_per_example=max_len, eval_split=which, split=split_info,
              chars_per_token={k: v for k, v in per_split.items() if v}, **tok.to_info())
  return out, info
