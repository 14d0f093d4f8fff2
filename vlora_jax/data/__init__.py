"""Input pipelines from ``config.data``: offline sources and TFDS, read with grain.

``config.data.source`` picks the records (see `sources.py`; each model family names the sources
it reads, ``Family.sources``):

  digits   scikit-learn's bundled 8x8 digits (no download, no data dir)       -> vit
  npz      a local .npz of images (mnist.npz, cifar10_subset.npz, cifar10_jpeg_q75.npz) -> vit;
           pixels on the scale ``data.pixel_scale`` declares (uint8 | unit)
  tfds     ``tfds.data_source(data.tfds_name)``: images (cifar10, mnist) -> vit,
           text (tiny_shakespeare) -> lm
  text     a local UTF-8 text file, character level                           -> lm, llama
  tokenized  a local UTF-8 text file, tokenized by a subword tokenizer, with train / validation /
           test splits (`tokenized.py`)                                      -> llama
  reverse  synthetic sequence reversal, generated from (seed, index)          -> seq2seq

`build` returns a `pipeline.Pipeline` for this process; see there for the order guarantees. Its
``info`` describes the data: what the trainer checks the model against, and what a checkpoint
stores for using the trained model without the data (`vlora_jax.load`):

  images   image_shape (H, W, C), num_classes, class_names (or None), and the normalisation:
           model input = (pixels * scale - mean) / std, per channel
  text     vocab (the characters; token id = position in it), vocab_size, tokens_per_example;
           tokenized: tokenizer (its JSON), bos_id, eos_id, eval_split and split (the blocks of
           each held-out split) in place of vocab
  seq2seq  vocab_size, tokens_per_example, special_tokens (pad, bos, eos ids)
"""

from __future__ import annotations

import grain
import numpy as np

from vlora_jax.data import sources, tokenized
from vlora_jax.data.pipeline import Pipeline, Windows, image_fns
from vlora_jax.data.sources import DataError

SOURCES = ("digits", "npz", "tfds", "text", "tokenized", "reverse")
TEXT_TFDS = ("tiny_shakespeare",)  # TFDS names read as text; any other TFDS name is images
AUGMENTS = ("none", "crop", "crop_flip")

__all__ = ["build", "DataError", "Pipeline", "SOURCES"]


def _image_splits(d):
  if d.source == "digits":
    return sources.digits("train"), sources.digits("test")
  if d.source == "npz":
    return sources.npz_splits(d.path, pixel_scale=d.get("pixel_scale", "uint8"))
  kw = dict(data_dir=d.get("data_dir") or None, download=d.get("download", False))
  return (sources.tfds_images(d.tfds_name, d.train_split, **kw),
          sources.tfds_images(d.tfds_name, d.eval_split, **kw))


def _texts(d):
  if d.source == "text":
    text = sources.text_file(d.path)
    cut = int(len(text) * (1 - d.get("eval_fraction", 0.1)))
    return text[:cut], text[cut:]
  kw = dict(data_dir=d.get("data_dir") or None, download=d.get("download", False))
  return (sources.tfds_text(d.tfds_name, d.train_split, **kw),
          sources.tfds_text(d.tfds_name, d.eval_split, **kw))


def _cap(records, n: int):
  """The first ``n`` records (all if ``n`` is 0)."""
  if not n or n >= len(records):
    return records
  return grain.MapDataset.source(records)[:n]


def kind(d) -> str:
  """'images' | 'text' | 'seq2seq': what the source yields."""
  if d.source in ("digits", "npz") or (d.source == "tfds" and d.tfds_name not in TEXT_TFDS):
    return "images"
  return "text" if d.source in ("text", "tfds", "tokenized") else "seq2seq"


def build(config, *, process_index: int = 0, process_count: int = 1) -> Pipeline:
  """``config`` (the whole experiment config) -> this process's `Pipeline`.

  Reads ``config.data``, ``config.seed``, ``config.batch_size``, ``config.eval_batch_size`` and,
  for sequence data, ``config.model.max_len``.
  """
  d = config.data
  if d.source not in SOURCES:
    raise DataError(f"data.source={d.source!r}: allowed are {list(SOURCES)}")
  seed = int(config.seed)
  common = dict(global_batch=config.batch_size, eval_batch=config.eval_batch_size,
                process_index=process_index, process_count=process_count,
                threads=d.get("threads", 2))
  k = kind(d)
  if k == "images":
    train, test = _image_splits(d)
    if d.get("augment", "none") not in AUGMENTS:
      raise DataError(f"data.augment={d.augment!r}: allowed are {list(AUGMENTS)}")
    train_fn, eval_fn = image_fns(train.scale, d.mean, d.std, d.get("augment", "none"),
                                  d.get("crop_padding", 4))
    ds = (grain.MapDataset.source(train).shuffle(seed=seed).repeat()
          .random_map(train_fn, seed=seed + 1))
    info = dict(kind=k, image_shape=train.shape, num_classes=train.num_classes,
                num_train=len(train), scale=train.scale, mean=tuple(d.mean), std=tuple(d.std),
                class_names=train.class_names)
    return Pipeline(ds, _cap(test, d.get("eval_examples", 0)), eval_fn, info=info, **common)

  if d.source == "tokenized":
    train_w, eval_w, info = tokenized.build(d, config.model.max_len)
    ds = grain.MapDataset.source(train_w).shuffle(seed=seed).repeat()
    return Pipeline(ds, _cap(eval_w, d.get("eval_examples", 0)), lambda r: r, info=info, **common)

  if k == "text":
    train_text, eval_text = _texts(d)
    chars = sorted(set(train_text) | set(eval_text))
    table = {c: i for i, c in enumerate(chars)}
    encode = lambda s: np.fromiter((table[c] for c in s), np.int32, len(s))
    window = config.model.max_len + 1  # inputs tokens[:-1], targets tokens[1:]
    train_w = Windows(encode(train_text), window)
    eval_w = Windows(encode(eval_text), window, stride=window)
    if len(train_w) == 0 or len(eval_w) == 0:
      raise DataError(f"data: the text is too short for windows of model.max_len + 1 = {window} "
                      f"tokens (train {len(train_text)}, eval {len(eval_text)} characters)")
    ds = grain.MapDataset.source(train_w).shuffle(seed=seed).repeat()
    info = dict(kind=k, vocab_size=len(chars), vocab="".join(chars), num_train=len(train_w),
                tokens_per_example=window - 1)
    return Pipeline(ds, _cap(eval_w, d.get("eval_examples", 0)), lambda r: r, info=info, **common)

  # seq2seq: an endless synthetic train stream and a fixed eval set from another seed
  seq_len = config.model.max_len
  vocab = d.vocab_size
  mk = lambda s, n: sources.Reversal(s, n, seq_len, vocab, d.get("min_len", 1))
  ds = grain.MapDataset.source(mk(seed, 2**62))
  info = dict(kind=k, vocab_size=vocab, num_train=None, tokens_per_example=seq_len,
              special_tokens=dict(pad=sources.PAD, bos=sources.BOS, eos=sources.EOS))
  return Pipeline(ds, mk(seed + 10**6, d.get("eval_examples") or 512), lambda r: r, info=info,
                  **common)
