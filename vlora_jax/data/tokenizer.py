"""The run's tokenizer, from what its checkpoint stores (`vlora_jax.load`'s ``info``).

Two kinds, and `from_info` picks the run's:

* `CharTokenizer`: the character-level text sources (a local file, or TFDS ``tiny_shakespeare``).
  The vocabulary is the sorted characters of the text, and a token id is a character's place in it
  (`vlora_jax.data`); the string is stored with every checkpoint as ``info["vocab"]``.
* `SubwordTokenizer`: a Hugging Face ``tokenizers`` tokenizer (byte-level BPE, as GPT-2, Llama 3
  and SmolLM2 use), read from a ``tokenizer.json``, built from a GGUF file's vocabulary and merges,
  or taken from another run (`load`). The ``tokenized`` data source and an imported model
  (`vlora_jax.convert`) store it with every checkpoint as ``info["tokenizer"]`` (its JSON), with
  its BOS and EOS ids, so text round-trips without the file it came from.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

# llama.cpp's names of the pre-tokenizer regexes (``tokenizer.ggml.pre``) that are not GPT-2's: the
# Llama 3 split, as transformers' GGUF loader maps them. Any other name gets GPT-2's split, as
# there (SmolLM2's 'smollm' among them).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
GGUF_SPLITS = {name: _LLAMA3_SPLIT for name in ("llama3", "llama-v3", "llama-bpe", "falcon3",
                                                 "smaug-bpe", "dbrx")}
GGUF_CONTROL, GGUF_USER_DEFINED = 3, 4  # llama.cpp's token types


class TokenizerError(ValueError):
  """Text the vocabulary cannot encode, ids it cannot decode, or a tokenizer that does not read."""


class CharTokenizer:
  """``encode(text) -> ids`` and ``decode(ids) -> text`` over a string of distinct characters."""

  def __init__(self, vocab: str):
    if not vocab or len(set(vocab)) != len(vocab):
      raise TokenizerError(f"vocab={vocab[:40]!r}: must be a non-empty string of distinct "
                           "characters")
    self.vocab = vocab
    self._ids = {c: i for i, c in enumerate(vocab)}
    self.bos_id = self.eos_id = None

  @classmethod
  def of_text(cls, *texts: str) -> "CharTokenizer":
    """The vocabulary of ``texts``: their distinct characters, sorted (a text run's ids)."""
    return cls("".join(sorted(set().union(*texts))))

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

  def token_id(self, text: str) -> int | None:
    """The id of ``text`` if it is one character of the vocabulary, else None."""
    return self._ids.get(text)


class SubwordTokenizer:
  """A ``tokenizers.Tokenizer`` with the ids of its BOS and EOS tokens (None where unknown).

  ``encode(text)`` adds what the tokenizer's post-processor adds (a BOS for Llama 3, nothing for
  SmolLM2), as Hugging Face's ``tokenizer(text)`` does; ``encode(text, special=False)`` adds
  nothing (a data stream). Special tokens written in the text (``<|im_end|>``) are one token each.
  """

  def __init__(self, tokenizer, bos_id: int | None = None, eos_id: int | None = None):
    self.tokenizer, self.bos_id, self.eos_id = tokenizer, bos_id, eos_id

  @classmethod
  def from_json(cls, text: str, bos_id=None, eos_id=None,
                where: str = "tokenizer") -> "SubwordTokenizer":
    from tokenizers import Tokenizer
    try:
      return cls(Tokenizer.from_str(text), bos_id, eos_id)
    except Exception as e:  # tokenizers raises its own Exception type for malformed JSON
      raise TokenizerError(f"{where}: not a Hugging Face tokenizer.json ({e})") from None

  @classmethod
  def from_info(cls, info: dict) -> "SubwordTokenizer":
    """The tokenizer a run's data info stores (``info["tokenizer"]``)."""
    if not info.get("tokenizer"):
      raise TokenizerError(f"the run's data info stores no subword tokenizer (data kind "
                           f"{info.get('kind')!r})")
    return cls.from_json(info["tokenizer"], info.get("bos_id"), info.get("eos_id"),
                         where="the run's stored tokenizer")

  def to_info(self) -> dict:
    """What a checkpoint's data info stores for this tokenizer (JSON)."""
    return {"tokenizer": self.tokenizer.to_str(), "bos_id": self.bos_id, "eos_id": self.eos_id}

  def __len__(self) -> int:
    return self.tokenizer.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str, special: bool = True) -> list[int]:
    return self.tokenizer.encode(text, add_special_tokens=special).ids

  def decode(self, ids: Sequence[int]) -> str:
    bad = [i for i in ids if not 0 <= int(i) < len(self)]
    if bad:
      raise TokenizerError(f"token ids {bad[:5]} are outside [0, {len(self)})")
    return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

  def token_id(self, text: str) -> int | None:
    """The id of ``text`` if it is one token of the vocabulary, else None."""
    ids = self.encode(text, special=False)
    return ids[0] if len(ids) == 1 else None


def from_info(info: dict) -> CharTokenizer | SubwordTokenizer:
  """The tokenizer a run's data info stores: subword if it has one, else the characters."""
  if info.get("tokenizer"):
    return SubwordTokenizer.from_info(info)
  return CharTokenizer.from_info(info)


# ------------------------------------------------------------------------------------ reading


def _byte_spelling() -> dict[int, str]:
  """GPT-2's byte -> character map: the alphabet a byte-level vocabulary is written in."""
  keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
          *range(ord("®"), ord("ÿ") + 1)]
  extra = iter(range(256, 512))
  return {b: chr(b if b in keep else next(extra)) for b in range(256)}


def _gguf_value(reader, key: str):
  field = reader.fields.get(key)
  return None if field is None else field.contents()


def from_gguf(reader, where: str) -> SubwordTokenizer:
  """The byte-level BPE a GGUF file describes (``tokenizer.ggml.*``), built as transformers'
  GGUF loader builds it: the vocabulary and merges, GPT-2's byte-level pre-tokenizer (or the split
  that ``tokenizer.ggml.pre`` names, `GGUF_SPLITS`), control tokens kept whole as special tokens,
  and a BOS before every text where ``tokenizer.ggml.add_bos_token`` says so.

  ``reader`` is a ``gguf.GGUFReader``; ``where`` names the file in errors.
  """
  from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
  from tokenizers.models import BPE

  kind = _gguf_value(reader, "tokenizer.ggml.model")
  if kind is None or _gguf_value(reader, "tokenizer.ggml.tokens") is None:
    raise TokenizerError(f"{where}: holds no tokenizer (no tokenizer.ggml.model / "
                         "tokenizer.ggml.tokens metadata)")
  if kind != "gpt2":
    raise TokenizerError(f"{where}: tokenizer.ggml.model={kind!r}; allowed: 'gpt2' (byte-level "
                         "BPE; sentencepiece vocabularies are not supported)")
  merges = _gguf_value(reader, "tokenizer.ggml.merges")
  if not merges:
    raise TokenizerError(f"{where}: a byte-level BPE without tokenizer.ggml.merges")
  spelling = _byte_spelling()
  alphabet = set(spelling.values())
  respell = lambda t: t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode())
  tokens = _gguf_value(reader, "tokenizer.ggml.tokens")
  vocab = {respell(t): i for i, t in enumerate(tokens)}
  tok = Tokenizer(BPE(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges], dropout=None,
                      continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
  split = GGUF_SPLITS.get(_gguf_value(reader, "tokenizer.ggml.pre"))
  tok.pre_tokenizer = (pre_tokenizers.ByteLevel(add_prefix_space=False) if split is None else
                       pre_tokenizers.Sequence([
                           pre_tokenizers.Split(Regex(split), behavior="isolated"),
                           pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]))
  tok.decoder = decoders.ByteLevel()
  types = _gguf_value(reader, "tokenizer.ggml.token_type") or ()
  control = [t for t, k in zip(tokens, types) if k == GGUF_CONTROL and set(t) <= alphabet]
  tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
  user = [t for t, k in zip(tokens, types) if k == GGUF_USER_DEFINED and t in vocab]
  tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])
  bos, eos = (_gguf_value(reader, f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos"))
  if _gguf_value(reader, "tokenizer.ggml.add_bos_token") and bos is not None:
    tok.post_processor = processors.TemplateProcessing(
        single=f"{tokens[bos]}:0 $A:0", pair=f"{tokens[bos]}:0 $A:0 $B:1",
        special_tokens=[(tokens[bos], int(bos))])
  return SubwordTokenizer(tok, None if bos is None else int(bos),
                          None if eos is None else int(eos))


def _first_id(value) -> int | None:
  """A config's token id (Llama 3 lists several EOS ids: the first is the one it writes)."""
  if isinstance(value, list):
    value = value[0] if value else None
  return value if isinstance(value, int) and not isinstance(value, bool) else None


def from_hf_dir(directory: Path, where: str) -> SubwordTokenizer:
  """``tokenizer.json`` of a Hugging Face model directory, BOS/EOS from its ``config.json``."""
  path = directory / "tokenizer.json"
  if not path.is_file():
    raise TokenizerError(f"{where}: {directory} has no tokenizer.json (a Hugging Face model "
                         "directory holds one beside config.json)")
  ids = {}
  config = directory / "config.json"
  if config.is_file():
    try:
      ids = json.loads(config.read_text())
    except ValueError:
      ids = {}
  return SubwordTokenizer.from_json(path.read_text(encoding="utf-8"),
                                    _first_id(ids.get("bos_token_id")),
                                    _first_id(ids.get("eos_token_id")), where=f"{where} ({path})")


def load(path: str, where: str = "tokenizer") -> SubwordTokenizer:
  """A subword tokenizer from ``path``: a ``tokenizer.json``, a ``.gguf`` file, a Hugging Face
  model directory, or a run (its workdir or a checkpoint step directory) that stores one.

  ``where`` names the setting in errors (``data.tokenizer``); every failure is a `TokenizerError`.
  """
  p = Path(path).expanduser()
  where = f"{where}={path!r}"
  if not path or not p.exists():
    raise TokenizerError(f"{where}: no such file or directory; allowed: a tokenizer.json, a .gguf "
                         "file, a Hugging Face model directory or a run's workdir")
  if p.is_file() and p.suffix == ".gguf":
    from gguf import GGUFReader
    try:
      reader = GGUFReader(p)
    except Exception as e:  # gguf raises ValueError, struct.error, ... on a file it cannot parse
      raise TokenizerError(f"{where}: not a GGUF file ({type(e).__name__}: {e})") from None
    return from_gguf(reader, where)
  if p.is_file():
    return SubwordTokenizer.from_json(p.read_text(encoding="utf-8", errors="replace"),
                                      where=where)
  if (p / "tokenizer.json").is_file():
    return from_hf_dir(p, where)
  from vlora_jax.runs import checkpoint_format as fmt
  from vlora_jax import errors
  from vlora_jax.runs import trained as trained_lib
  try:
    if (p / "meta").is_dir():
      step_dir, info = p, fmt.read_meta(p).get("data") or {}
    else:
      step_dir, _, meta = trained_lib.open_checkpoint(p)
      info = meta.get("data") or {}
  except errors.CheckpointError as e:
    raise TokenizerError(f"{where}: neither a tokenizer nor a run ({e})") from None
  if not info.get("tokenizer"):
    raise TokenizerError(f"{where}: the run in {step_dir} stores no subword tokenizer (its data "
                         f"kind is {info.get('kind')!r})")
  return SubwordTokenizer.from_info(info)
