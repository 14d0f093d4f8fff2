"""Input pipelines from ``config.data``: offline sources and TFDS, read with grain.

``config.data.source`` picks the records (see `sources.py`; each model family names the sources
it reads, ``Family.sources``):

  digits   scikit-learn's bundled 8x8 digits (no download, no data dir)       -> vit
  npz      a local .npz of images (mnist.npz, cifar10.npz, cifar10_subset.npz,
           cifar10_jpeg_q75.npz, as `vlora-data` prepares them) -> vit; pixels on the scale
           ``data.pixel_scale`` declares (uint8 | unit)
  tfds     ``tfds.data_source(data.tfds_name)``: images (cifar10, mnist) -> vit,
           text (tiny_shakespeare) -> lm
  text     a local UTF-8 text file, character level                           -> lm, llama
  tokenized  a local UTF-8 text file, tokenized by a subword tokenizer (`tokenized.py`) -> llama
  reverse  synthetic sequence reversal, generated from (seed, index)          -> seq2seq

A relative ``data.path`` is read from the data directory, ``$VLORA_DATA`` (`paths.py`).

Every source has three splits: train, validation and test. The validation split comes out of the
train split, ``data.validation_fraction`` of it, chosen by ``data.split_seed`` (an int: a seeded
permutation; None: the last examples or blocks in the file's order), so that no choice made
while training reads the test split:

  images   of the train split's examples; the test split is the file's (``x_test``) or TFDS's
           (``data.test_split``). Digits: scikit-learn's 1,797 images, of which the last 20% of
           a fixed permutation (seed 0) test
  text     the text is cut into ``data.split_blocks`` blocks, of which ``validation_fraction``
           validate and ``test_fraction`` test (TFDS text: blocks of its train split validate,
           its ``data.test_split`` tests); no window crosses from one split into another
  reverse  fixed sets from other seeds: seed + 10^6 validates, seed + 2 * 10^6 tests

``data.eval_split`` ('validation' by default, or 'test') is what the run evaluates while it
trains, and so what ranks ``best/`` and ``--step best``. The trainer evaluates the test split
once, at the end, into the summary (``test/*``). The choice is stored in the data info
(``eval_split``, ``split``), with every checkpoint.

`build` returns a `pipeline.Pipeline` for this process; see there for the order guarantees. Its
``info`` describes the data: what the trainer checks the model against, and what a checkpoint
stores for using the trained model without the data (`vlora_jax.load`):

  images   image_shape (H, W, C), num_classes, class_names (or None), and the normalisation:
           model input = (pixels * scale - mean) / std, per channel
  text     vocab (the characters; token id = position in it), vocab_size, tokens_per_example,
           chars_per_token (by eval split: bits per character from bits per token);
           tokenized: tokenizer (its JSON), bos_id, eos_id in place of vocab
  seq2seq  vocab_size, tokens_per_example, special_tokens (pad, bos, eos ids)
  all      eval_split, split (what each split holds: its size, or its blocks)
"""

from __future__ import annotations

import dataclasses

import grain
import numpy as np

from vlora_jax.data import sources, tokenized
from vlora_jax.data import tokenizer as tokenizer_lib
from vlora_jax.data.pipeline import Pipeline, image_fns
from vlora_jax.data.sources import DataError
from vlora_jax.tokens import BOS_ID, EOS_ID, PAD_ID

SOURCES = ("digits", "npz", "tfds", "text", "tokenized", "reverse")
TEXT_TFDS = ("tiny_shakespeare",)  # TFDS names read as text; any other TFDS name is images
AUGMENTS = ("none", "crop", "crop_flip")
EVAL_SPLITS = ("validation", "test")

__all__ = ["build", "carve", "DataError", "EVAL_SPLITS", "Pipeline", "SOURCES"]


class Subset:
  """``records[indices[i]]`` as a random-access sequence."""

  def __init__(self, records, indices):
    self.records, self.indices = records, np.asarray(indices, np.int64)

  def __len__(self):
    return len(self.indices)

  def __getitem__(self, i):
    return self.records[int(self.indices[int(i)])]


def carve(n: int, fraction: float, seed: int | None) -> tuple[np.ndarray, np.ndarray]:
  """``(train indices, validation indices)`` of a train split of ``n`` examples, both sorted:
  ``round(fraction * n)`` validate (at least one where ``fraction`` > 0); ``seed`` None the last
  ones, an int a permutation by that seed (the same for every run with that seed)."""
  count = max(1, round(fraction * n)) if fraction > 0 else 0
  if count >= n:
    raise DataError(f"data.validation_fraction={fraction} holds out {count} of the {n} train "
                    "examples, leaving none to train; allowed: a smaller fraction")
  order = np.arange(n) if seed is None else np.random.default_rng(seed).permutation(n)
  return np.sort(order[:n - count]), np.sort(order[n - count:])


def eval_split(d) -> str:
  """``data.eval_split``, checked: what the run evaluates while it trains."""
  split = d.eval_split
  if split not in EVAL_SPLITS:
    raise DataError(f"data.eval_split={split!r}: allowed are {list(EVAL_SPLITS)} (validation "
                    "comes out of the train split; test is evaluated once, at the end)")
  return split


def _tfds_kw(d) -> dict:
  return dict(data_dir=d.data_dir or None, download=d.download)


def _image_splits(d) -> tuple[sources.ImageSplit, sources.ImageSplit]:
  """The source's own ``(train, test)`` splits."""
  if d.source == "digits":
    return sources.digits("train"), sources.digits("test")
  if d.source == "npz":
    return sources.npz_splits(d.path, pixel_scale=d.pixel_scale)
  return (sources.tfds_images(d.tfds_name, d.train_split, **_tfds_kw(d)),
          sources.tfds_images(d.tfds_name, d.test_split, **_tfds_kw(d)))


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


def _check_eval_split(d, split: str, sizes: dict) -> None:
  if not sizes[split]:
    key = "validation_fraction" if split == "validation" else "test_fraction"
    raise DataError(f"data.eval_split={split!r} but the {split} split is empty "
                    f"(data.{key}={d[key]}): the run would evaluate on nothing; allowed: a "
                    f"data.{key} > 0, or the other split")


def _images(config, d, common) -> Pipeline:
  train_full, test = _image_splits(d)
  if d.augment not in AUGMENTS:
    raise DataError(f"data.augment={d.augment!r}: allowed are {list(AUGMENTS)}")
  fraction, split_seed = float(d.validation_fraction), d.split_seed
  train_idx, val_idx = carve(len(train_full), fraction, split_seed)
  train, validation = (dataclasses.replace(train_full, records=Subset(train_full.records, idx))
                       for idx in (train_idx, val_idx))
  which = eval_split(d)
  sizes = dict(train=len(train), validation=len(validation), test=len(test))
  _check_eval_split(d, which, sizes)
  seed = int(config.seed)
  train_fn, eval_fn = image_fns(train.scale, d.mean, d.std, d.augment, d.crop_padding)
  ds = (grain.MapDataset.source(train).shuffle(seed=seed).repeat()
        .random_map(train_fn, seed=seed + 1))
  info = dict(kind="images", image_shape=train.shape, num_classes=train.num_classes,
              num_train=len(train), scale=train.scale, mean=tuple(d.mean), std=tuple(d.std),
              class_names=train.class_names, eval_split=which,
              split=dict(sizes, validation_fraction=fraction, seed=split_seed))
  return Pipeline(ds, _eval_sets(d, validation=validation, test=test), eval_fn,
                  eval_split=which, info=info, **common)


def _eval_sets(d, **sets) -> dict:
  """Every non-empty eval set, capped at ``data.eval_examples``."""
  return {name: _cap(records, d.eval_examples)
          for name, records in sets.items() if len(records)}


def _chars(d) -> tuple[str, str | None]:
  """``(text to split into train / validation [/ test], separate test text or None)``."""
  if d.source == "text":
    return sources.text_file(d.path), None
  return (sources.tfds_text(d.tfds_name, d.train_split, **_tfds_kw(d)),
          sources.tfds_text(d.tfds_name, d.test_split, **_tfds_kw(d)))


def _text(config, d, common) -> Pipeline:
  """Character-level text: blocks of the text validate and test, as `tokenized` cuts them."""
  text, test_text = _chars(d)
  tok = tokenizer_lib.CharTokenizer.of_text(text, test_text or "")
  encode = lambda s: np.asarray(tok.encode(s), np.int32)
  which = eval_split(d)
  windows, split = tokenized.windows(encode(text), d, config.model.max_len, which,
                                     test=encode(test_text) if test_text is not None else None)
  seed = int(config.seed)
  ds = grain.MapDataset.source(windows["train"]).shuffle(seed=seed).repeat()
  info = dict(kind="text", vocab_size=len(tok), vocab=tok.vocab,
              num_train=len(windows["train"]), tokens_per_example=config.model.max_len,
              chars_per_token={name: 1.0 for name in windows if name != "train"},
              eval_split=which, split=split)
  return Pipeline(ds, _eval_sets(d, validation=windows["validation"], test=windows["test"]),
                  lambda r: r, eval_split=which, info=info, **common)


def _tokenized(config, d, common) -> Pipeline:
  eval_split(d)
  windows, info = tokenized.build(d, config.model.max_len)
  seed = int(config.seed)
  ds = grain.MapDataset.source(windows["train"]).shuffle(seed=seed).repeat()
  return Pipeline(ds, _eval_sets(d, validation=windows["validation"], test=windows["test"]),
                  lambda r: r, eval_split=info["eval_split"], info=info, **common)


def _reversal(config, d, common) -> Pipeline:
  """An endless synthetic train stream; validation and test are fixed sets from other seeds."""
  seq_len, vocab, seed = config.model.max_len, d.vocab_size, int(config.seed)
  mk = lambda s, n: sources.Reversal(s, n, seq_len, vocab, d.min_len)
  n = d.eval_examples or 512
  which = eval_split(d)
  info = dict(kind="seq2seq", vocab_size=vocab, num_train=None, tokens_per_example=seq_len,
              special_tokens=dict(pad=PAD_ID, bos=BOS_ID, eos=EOS_ID),
              eval_split=which, split=dict(validation=n, test=n, validation_seed=seed + 10**6,
                                           test_seed=seed + 2 * 10**6))
  sets = dict(validation=mk(seed + 10**6, n), test=mk(seed + 2 * 10**6, n))
  return Pipeline(grain.MapDataset.source(mk(seed, 2**62)), sets, lambda r: r,
                  eval_split=which, info=info, **common)


def build(config, *, process_index: int = 0, process_count: int = 1) -> Pipeline:
  """``config`` (the whole experiment config) -> this process's `Pipeline`.

  Reads ``config.data``, ``config.seed``, ``config.batch_size``, ``config.eval_batch_size`` and,
  for sequence data, ``config.model.max_len``.
  """
  d = config.data
  if d.source not in SOURCES:
    raise DataError(f"data.source={d.source!r}: allowed are {list(SOURCES)}")
  common = dict(global_batch=config.batch_size, eval_batch=config.eval_batch_size,
                process_index=process_index, process_count=process_count,
                threads=d.threads)
  k = kind(d)
  if k == "images":
    return _images(config, d, common)
  if d.source == "tokenized":
    return _tokenized(config, d, common)
  if k == "text":
    return _text(config, d, common)
  return _reversal(config, d, common)
