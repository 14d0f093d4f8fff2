"""Random-access data sources: the records a pipeline reads, one ``source[i]`` at a time.

Every source is a plain sequence (``len`` and ``[i]``), which is what ``grain.MapDataset.source``
takes. Image sources return ``{'image': [H, W, C] uint8 or float, 'label': int}`` and know the scale
that maps their pixels to [0, 1]; text sources are whole strings (the pipeline cuts windows);
the synthetic sequence task is generated from (seed, index).

Nothing here downloads: a missing file or an unprepared TFDS dataset is a `DataError` at start
that names the path or the dataset and says how to provide it.
"""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from vlora_jax.errors import UserError


class DataError(UserError, ValueError):
  """A data set that is missing or malformed (raised before anything compiles)."""


@dataclasses.dataclass
class ImageSplit:
  """One split of an image data set as a random-access sequence of records."""
  records: Sequence[Any]   # [i] -> {'image', 'label'}
  scale: float             # pixels * scale lie in [0, 1]
  shape: tuple[int, int, int]
  num_classes: int

  def __len__(self):
    return len(self.records)

  def __getitem__(self, i):
    return self.records[i]


class _Arrays:
  """``(images [N, H, W(, C)], labels [N])`` -> records, adding a channel axis to grey images."""

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    self.images = images if images.ndim == 4 else images[..., None]
    self.labels = labels.astype(np.int32)

  def __len__(self):
    return len(self.labels)

  def __getitem__(self, i):
    return {"image": self.images[i], "label": int(self.labels[i])}


class _Jpegs:
  """JPEG bytes joined in one buffer with offsets (``cifar10_jpeg_q75.npz``), decoded per item."""

  def __init__(self, buf: np.ndarray, offsets: np.ndarray, labels: np.ndarray):
    self.buf, self.offsets, self.labels = buf, offsets, labels.astype(np.int32)

  def __len__(self):
    return len(self.labels)

  def __getitem__(self, i):
    from PIL import Image  # only this source needs Pillow
    raw = self.buf[self.offsets[i]:self.offsets[i + 1]].tobytes()
    return {"image": np.asarray(Image.open(io.BytesIO(raw)).convert("RGB")),
            "label": int(self.labels[i])}


def _need_file(path: str, key: str, hint: str) -> Path:
  p = Path(path).expanduser()
  if not path or not p.is_file():
    raise DataError(f"{key}={path!r}: file not found (resolved to {p.resolve()}). {hint}")
  return p


def digits(split: str, test_fraction: float = 0.2) -> ImageSplit:
  """scikit-learn's bundled 8x8 digits (1,797 images, values 0..16): no download, no data dir.

  The split is a fixed permutation (seed 0): the last ``test_fraction`` of it is the test set.
  """
  from sklearn.datasets import load_digits
  d = load_digits()
  perm = np.random.default_rng(0).permutation(len(d.target))
  n_test = int(round(len(perm) * test_fraction))
  idx = perm[:-n_test] if split == "train" else perm[-n_test:]
  images = d.images[idx].astype(np.float32)
  return ImageSplit(_Arrays(images, d.target[idx]), 1.0 / 16.0, (8, 8, 1), 10)


NPZ_HINT = ("Point data.path at a local copy of mnist.npz, cifar10_subset.npz or cifar10_jpeg_q75.npz "
            "(keys x_train/y_train/x_test/y_test, or train_jpeg/train_offsets/... for JPEG bytes), "
            "e.g. --config.data.path=../shared/data/cifar10_subset.npz")


def npz_images(path: str, split: str) -> ImageSplit:
  """Images from a local ``.npz``: raw uint8 arrays (``x_<split>``) or JPEG bytes (``<split>_jpeg``)."""
  p = _need_file(path, "data.path", NPZ_HINT)
  z = np.load(p, allow_pickle=False)
  part = "train" if split == "train" else "test"
  if f"{part}_jpeg" in z.files:
    records = _Jpegs(z[f"{part}_jpeg"], z[f"{part}_offsets"], z[f"y_{part}"])
    shape = records[0]["image"].shape
    num_classes = len(z["label_names"]) if "label_names" in z.files else int(records.labels.max()) + 1
  elif f"x_{part}" in z.files:
    records = _Arrays(z[f"x_{part}"], z[f"y_{part}"])
    shape = records.images.shape[1:]
    num_classes = len(z["label_names"]) if "label_names" in z.files else int(records.labels.max()) + 1
  else:
    raise DataError(f"data.path={path!r} has keys {z.files}: expected x_{part}/y_{part} or "
                    f"{part}_jpeg/{part}_offsets/y_{part}. {NPZ_HINT}")
  return ImageSplit(records, 1.0 / 255.0, tuple(int(s) for s in shape), num_classes)


def _tfds_source(name: str, split: str, data_dir: str | None, download: bool):
  import tensorflow_datasets as tfds
  how = (f"Prepare it once with `tfds build {name} --file_format=array_record` (needs network), "
         "set --config.data.download=True, or set --config.data.data_dir to a directory holding it; "
         "offline, use a local-files config (configs/vit_local.py, configs/lm_shakespeare.py:text).")
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # unknown name: tfds lists every dataset; keep the first line
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise DataError(f"data.tfds_name={name!r} is not a TFDS dataset ({first})") from None
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir, download=download,
                            builder_kwargs={"file_format": "array_record"})
  except Exception as e:
    state = "is not prepared" if not builder.is_prepared() else "could not be read"
    raise DataError(f"TFDS dataset {name!r} (split {split!r}) {state} in data.data_dir="
                    f"{str(builder.data_dir)!r}: {type(e).__name__}: {str(e)[:200]}. " + how) from e


class _TfdsImages:
  """A TFDS data source -> records; items are read one at a time (batch reads differ by version)."""

  def __init__(self, src):
    self.src = src

  def __len__(self):
    return len(self.src)

  def __getitem__(self, i):
    ex = self.src[int(i)]
    return {"image": np.asarray(ex["image"]), "label": int(ex["label"])}


def tfds_images(name: str, split: str, data_dir: str | None = None,
                download: bool = False) -> ImageSplit:
  """An image-classification TFDS dataset (``cifar10``, ``mnist``...) through ``tfds.data_source``."""
  import tensorflow_datasets as tfds
  src = _tfds_source(name, split, data_dir, download)
  info = tfds.builder(name, data_dir=data_dir).info
  shape = tuple(int(s) for s in info.features["image"].shape)
  return ImageSplit(_TfdsImages(src), 1.0 / 255.0, shape, int(info.features["label"].num_classes))


TEXT_HINT = ("Point data.path at a UTF-8 text file, e.g. "
             "--config.data.path=../shared/data/tiny_shakespeare.txt")


def text_file(path: str) -> str:
  return _need_file(path, "data.path", TEXT_HINT).read_text(encoding="utf-8")


def tfds_text(name: str, split: str, data_dir: str | None = None, download: bool = False) -> str:
  """A text TFDS dataset whose split is one or more ``{'text': ...}`` examples (``tiny_shakespeare``)."""
  src = _tfds_source(name, split, data_dir, download)
  parts = []
  for i in range(len(src)):
    t = src[i]["text"]
    parts.append(t.decode("utf-8") if isinstance(t, bytes) else str(t))
  return "".join(parts)


PAD, BOS, EOS = 0, 1, 2  # the sequence task's special tokens; 0 is padding everywhere


class Reversal:
  """Synthetic seq2seq: reverse a random token string. ``[i]`` is a pure function of (seed, i).

  ``src`` = tokens (ids 3..vocab-1) padded with 0; ``tgt_in`` = BOS + reversed; ``tgt_out`` =
  reversed + EOS; all three have length ``seq_len`` (the longest string is ``seq_len - 1``).
  """

  def __init__(self, seed: int, size: int, seq_len: int, vocab_size: int, min_len: int):
    self.seed, self.size, self.seq_len, self.vocab, self.min_len = (
        seed, size, seq_len, vocab_size, min_len)

  def __len__(self):
    return self.size

  def __getitem__(self, i):
    rng = np.random.default_rng([self.seed, int(i)])
    n = int(rng.integers(self.min_len, self.seq_len))  # at most seq_len - 1: room for BOS/EOS
    toks = rng.integers(3, self.vocab, size=n)
    out = {k: np.zeros(self.seq_len, np.int32) for k in ("src", "tgt_in", "tgt_out")}
    out["src"][:n] = toks
    out["tgt_in"][0] = BOS
    out["tgt_in"][1:n + 1] = toks[::-1]
    out["tgt_out"][:n] = toks[::-1]
    out["tgt_out"][n] = EOS
    return out
