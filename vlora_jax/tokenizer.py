"""The run's tokenizer, from what its checkpoint stores (`vlora_jax.load`'s ``info``).

The LM's text sources (a local file, or TFDS ``tiny_shakespeare``) are character level: the
vocabulary is the sorted characters of the text, and a token id is a character's place in it
(`vlora_jax.data`). The string is stored with every checkpoint as ``info["vocab"]``, so text
round-trips without the data file.
"""

from __future__ import annotations

from typing import Sequence


class TokenizerError(ValueError):
  """Text the vocabulary cannot encode, or ids it cannot decode."""


class CharTokenizer:
  """``encode(text) -> ids`` and ``decode(ids) -> text`` over a string of distinct characters."""

  def __init__(self, vocab: str):
    if not vocab or len(set(vocab)) != len(vocab):
      raise TokenizerError(f"vocab={vocab[:40]!r}: must be a non-empty string of distinct "
                           "characters")
    self.vocab = vocab
    self._ids = {c: i for i, c in enumerate(vocab)}

  @classmethod
  def from_info(cls, info: dict) -> "CharTokenizer":
    """The tokenizer of a run's data info; a `TokenizerError` if the run stored none."""
    if not info.get("vocab"):
      raise TokenizerError(f"the run's data info stores no character vocabulary (data kind "
                           f"{info.get('kind')!r}); only runs on text sources (data.source "
                           "'text', or 'tfds' tiny_shakespeare) have one")
    return cls(info["vocab"])

  def __len__(self) -> int:
    return len(self.vocab)

  def encode(self, text: str) -> list[int]:
    unknown = sorted({c for c in text if c not in self._ids})
    if unknown:
      raise TokenizerError(f"text holds characters the vocabulary lacks: {''.join(unknown)!r} "
                           f"(the vocabulary is {self.vocab!r})")
    return [self._ids[c] for c in text]

  def decode(self, ids: Sequence[int]) -> str:
    bad = [i for i in ids if not 0 <= int(i) < len(self.vocab)]
    if bad:
      raise TokenizerError(f"token ids {bad[:5]} are outside [0, {len(self.vocab)})")
    return "".join(self.vocab[int(i)] for i in ids)
