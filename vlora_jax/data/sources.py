"""Random-access data sources: the records a pipeline reads, one ``source[i]`` at a time.

Every source is a plain sequence (``len`` and ``[i]``), which is what ``grain.MapDataset.source``
takes. Image sources return ``{'image': [H, W, C] uint8 or float, 'label': int}`` and know the scale
that maps their pixels to [0, 1]; text sources are whole strings (the pipeline cuts windows);
the synthetic sequence task is generated from (seed, index).

Nothing here downloads: a missing file or an unprepared TFDS dataset is a `DataError` at start
that names the path or the dataset and says how to provide it. Local files are checked where they
are read, once: a malformed ``.npz`` (bad keys, dtypes, shapes, NaN pixels, pixels off the declared
scale, labels out of range) or text file is a `DataError` naming file, split, field and values,
never a NaN loss or a too-good eval later.
"""

from __future__ import annotations

import dataclasses
import functools
import io
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from vlora_jax.data import paths
from vlora_jax.errors import UserError
from vlora_jax.tokens import BOS_ID, EOS_ID


class DataError(UserError, ValueError):
  """A data set that is missing or malformed (raised before anything compiles)."""


@dataclasses.dataclass
class ImageSplit:
  """One split of an image data set as a random-access sequence of records."""
  records: Sequence[Any]   # [i] -> {'image', 'label'}
  scale: float             # pixels * scale lie in [0, 1]
  shape: tuple[int, int, int]
  num_classes: int
  class_names: tuple[str, ...] | None = None  # where the data set names its classes

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

  def __init__(self, buf: np.ndarray, offsets: np.ndarray, labels: np.ndarray, where: str = ""):
    self.buf, self.offsets, self.labels = buf, offsets, labels.astype(np.int32)
    self.where = where  # names the file and field in a decode error
    self.shape = None   # every image must have the first one's shape (set by the npz source)

  def __len__(self):
    return len(self.labels)

  def __getitem__(self, i):
    from PIL import Image  # only this source needs Pillow
    raw = self.buf[self.offsets[i]:self.offsets[i + 1]].tobytes()
    try:
      image = np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))
    except Exception as e:  # a bad image surfaces mid-training: name it
      raise DataError(f"{self.where}: image {i} (bytes {self.offsets[i]}:{self.offsets[i + 1]}) "
                      f"does not decode ({type(e).__name__}: {e})") from e
    if self.shape is not None and image.shape != self.shape:
      raise DataError(f"{self.where}: image {i} is {image.shape}; allowed: the first image's "
                      f"shape {self.shape}")
    return {"image": image, "label": int(self.labels[i])}


def _need_file(path: str, key: str, hint: str) -> Path:
  """The file ``key`` names, resolved as every data path is (`paths.resolve`)."""
  if not path:
    raise DataError(f"{key}={path!r}: empty; give a file. {hint}")
  p = paths.resolve(path)
  if not p.is_file():
    raise paths.not_found(path, key, DataError)
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
  return ImageSplit(_Arrays(images, d.target[idx]), 1.0 / 16.0, (8, 8, 1), 10,
                    tuple(str(n) for n in d.target_names))


NPZ_HINT = ("data.path names an .npz with keys x_train/y_train/x_test/y_test (or "
            "train_jpeg/train_offsets/... for JPEG bytes), as `vlora-data mnist|cifar10|"
            "cifar10_subset` writes it")


PIXEL_SCALES = {"uint8": 1.0 / 255.0, "unit": 1.0}  # data.pixel_scale -> factor onto [0, 1]
SPLITS = ("train", "test")


class _Npz:
  """An open ``.npz`` whose every problem is one `DataError` naming the file, split and field."""

  def __init__(self, path: str):
    self.path = path
    p = _need_file(path, "data.path", NPZ_HINT)
    with open(p, "rb") as f:
      head = f.read(4)
    if head not in (b"PK\x03\x04", b"PK\x05\x06"):  # a zip's first bytes (\x05\x06: empty zip)
      raise DataError(f"data.path={path!r} is not an .npz (a zip of .npy arrays): it starts with "
                      f"{head!r}. {NPZ_HINT}")
    try:
      self.z = np.load(p, allow_pickle=False)
    except Exception as e:
      raise DataError(f"data.path={path!r} is a truncated or damaged .npz "
                      f"({type(e).__name__}: {e}). {NPZ_HINT}") from None
    self.keys = list(self.z.files)

  def error(self, split: str | None, field: str, msg: str) -> DataError:
    where = [f"data.path={self.path!r}"] + ([f"{split} split"] if split else []) + [field]
    return DataError(f"{', '.join(where)}: {msg}")

  def get(self, split: str | None, key: str) -> np.ndarray:
    if key not in self.keys:
      raise self.error(split, key, f"missing; the file has keys {self.keys}. {NPZ_HINT}")
    try:
      return self.z[key]
    except Exception as e:  # numpy's own message names neither the file nor the member
      why = ("an object array (stored with pickle), which is not loaded; allowed: numeric arrays"
             if "allow_pickle" in str(e) else
             f"could not be read, the file is truncated or damaged ({type(e).__name__}: {e})")
      raise self.error(split, key, why) from None


def _refuse(error, values: np.ndarray, bad: np.ndarray, what: str, allowed: str,
            at: str = "index") -> None:
  """Raises ``error`` with the count of ``bad`` entries and the first one, if there is any."""
  if not bad.any():
    return
  i = int(np.argmax(bad.reshape(len(bad), -1).any(1)))
  first = values[i][bad[i]].flat[0] if values.ndim > 1 else values[i]
  raise error(f"found {int(bad.sum())} {what}, the first at {at} {i} ({first}); allowed: {allowed}")


def _check_images(error, x: np.ndarray, pixel_scale: str) -> None:
  """Pixels: numeric, [N, H, W(, C)], finite and on the declared scale (never a guessed one)."""
  if x.dtype.kind not in "iuf":
    raise error(f"dtype {x.dtype}; allowed: integer or float pixels")
  if x.ndim not in (3, 4) or len(x) == 0:
    raise error(f"shape {x.shape}; allowed: [N, H, W] or [N, H, W, C] with N >= 1")
  is_float = x.dtype.kind == "f"
  if is_float:
    _refuse(error, x, ~np.isfinite(x), "NaN/inf pixels", "finite pixels", at="image")
  if pixel_scale == "unit":
    other = "integer pixels 0-255 are --config.data.pixel_scale=uint8"
    if not is_float:
      raise error(f"dtype {x.dtype} under data.pixel_scale='unit'; allowed: floats in [0, 1] "
                  f"({other})")
    _refuse(error, x, (x < 0) | (x > 1), "pixels outside [0, 1]",
            f"floats in [0, 1] under data.pixel_scale='unit' ({other})", at="image")
    return
  if x.dtype == np.uint8:
    return
  if is_float:
    fractional = x != np.floor(x)
    if fractional.any():
      hint = (" (these look like [0, 1] floats: pass --config.data.pixel_scale=unit)"
              if x.min() >= 0 and x.max() <= 1 else "")
      _refuse(error, x, fractional, "fractional pixels",
              f"whole numbers 0-255 under data.pixel_scale='uint8'{hint}", at="image")
  _refuse(error, x, (x < 0) | (x > 255), "pixels outside [0, 255]",
          "integers 0-255 under data.pixel_scale='uint8'", at="image")


def _check_labels(error, y: np.ndarray, n: int, per: str) -> np.ndarray:
  """One whole-number label per example -> int64 (the class range is checked across splits)."""
  if y.ndim != 1 or len(y) != n:
    raise error(f"shape {y.shape}; allowed: ({n},), one label per {per}")
  if y.dtype.kind not in "iuf":
    raise error(f"dtype {y.dtype}; allowed: integer class ids")
  if y.dtype.kind == "f":
    _refuse(error, y, ~(np.isfinite(y) & (y == np.floor(y))), "labels that are not whole numbers",
            "integer class ids")
  return y.astype(np.int64)


def _array_split(npz: _Npz, part: str, pixel_scale: str):
  """``x_<part>`` / ``y_<part>`` -> (records, int64 labels, field of the images)."""
  x = npz.get(part, f"x_{part}")
  _check_images(functools.partial(npz.error, part, f"x_{part}"), x, pixel_scale)
  y = _check_labels(functools.partial(npz.error, part, f"y_{part}"), npz.get(part, f"y_{part}"),
                    len(x), f"image of x_{part}")
  return _Arrays(x, y), y, f"x_{part}"


def _jpeg_split(npz: _Npz, part: str, pixel_scale: str):
  """``<part>_jpeg`` / ``<part>_offsets`` / ``y_<part>`` -> (records, int64 labels, field)."""
  buf_key, off_key = f"{part}_jpeg", f"{part}_offsets"
  buf, off = npz.get(part, buf_key), npz.get(part, off_key)
  if pixel_scale != "uint8":
    raise npz.error(part, buf_key, f"JPEG bytes decode to 0-255 pixels, but data.pixel_scale="
                    f"{pixel_scale!r}; allowed: data.pixel_scale='uint8'")
  if buf.dtype != np.uint8 or buf.ndim != 1:
    raise npz.error(part, buf_key, f"{buf.dtype} array of shape {buf.shape}; allowed: 1-D uint8")
  error = functools.partial(npz.error, part, off_key)
  if off.dtype.kind not in "iu" or off.ndim != 1 or len(off) < 2:
    raise error(f"{off.dtype} array of shape {off.shape}; allowed: 1-D integer byte offsets, "
                "one more than the images")
  _refuse(error, off, np.concatenate([off[:1] < 0, np.diff(off) <= 0]),
          "offsets below 0 or not above the one before", "increasing offsets from 0")
  _refuse(error, off, off > len(buf), f"offsets beyond the {len(buf)} bytes of {buf_key}",
          f"offsets <= {len(buf)}")
  y = _check_labels(functools.partial(npz.error, part, f"y_{part}"), npz.get(part, f"y_{part}"),
                    len(off) - 1, f"image of {off_key} (its length - 1)")
  records = _Jpegs(buf, off, y, where=f"data.path={npz.path!r}, {part} split, {buf_key}")
  records.shape = records[0]["image"].shape  # image 0 decodes, or the error names it
  return records, y, buf_key


def npz_splits(path: str, *, pixel_scale: str = "uint8") -> tuple[ImageSplit, ImageSplit]:
  """(train, test) images from a local ``.npz``, every split checked once, here.

  Raw arrays (``x_<split>``, ``y_<split>``) or JPEG bytes (``<split>_jpeg``, ``<split>_offsets``,
  ``y_<split>``). ``pixel_scale`` declares the pixels: 'uint8' (whole numbers 0-255) or 'unit'
  (floats in [0, 1]); it sets the normalisation and the file must match it. Labels lie in
  [0, num_classes) in every split, num_classes being ``len(label_names)`` when the file has it, else
  the train labels' max + 1 (``label_names`` also become the splits' ``class_names``). Any problem
  is one `DataError` naming file, split, field and values.
  """
  if pixel_scale not in PIXEL_SCALES:
    raise DataError(f"data.pixel_scale={pixel_scale!r}: allowed are {list(PIXEL_SCALES)}")
  npz = _Npz(path)
  with npz.z:
    read = {part: (_jpeg_split if f"{part}_jpeg" in npz.keys else _array_split)(
        npz, part, pixel_scale) for part in SPLITS}
    names = npz.get(None, "label_names") if "label_names" in npz.keys else None
  if names is not None:
    if names.ndim != 1 or len(names) == 0:
      raise npz.error(None, "label_names", f"shape {names.shape}; allowed: one name per class")
    num_classes, why = len(names), "num_classes = len(label_names)"
  else:
    num_classes = int(read["train"][1].max()) + 1
    why = "num_classes = max(y_train) + 1, as the file has no label_names"
  shapes = {part: tuple(int(s) for s in read[part][0][0]["image"].shape) for part in SPLITS}
  for part in SPLITS:
    records, y, field = read[part]
    _refuse(functools.partial(npz.error, part, f"y_{part}"), y, (y < 0) | (y >= num_classes),
            f"labels outside [0, {num_classes})", f"class ids 0..{num_classes - 1} ({why})")
    if shapes[part] != shapes["train"]:
      raise npz.error(part, field, f"images of shape {shapes[part]} (H, W, C), the train split's "
                      f"are {shapes['train']}; allowed: the train split's shape")
  scale = PIXEL_SCALES[pixel_scale]
  class_names = None if names is None else tuple(
      n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names.tolist())
  return tuple(ImageSplit(read[p][0], scale, shapes[p], num_classes, class_names)
               for p in SPLITS)


def npz_images(path: str, split: str, *, pixel_scale: str = "uint8") -> ImageSplit:
  """One split (``'train'``, else test) of `npz_splits`; both are read, to check them together."""
  train, test = npz_splits(path, pixel_scale=pixel_scale)
  return train if split == "train" else test


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
  label = info.features["label"]
  return ImageSplit(_TfdsImages(src), 1.0 / 255.0, shape, int(label.num_classes),
                    tuple(label.names))


TEXT_HINT = "data.path names a UTF-8 text file (`vlora-data tiny_shakespeare` writes one)"


def text_file(path: str) -> str:
  """A non-empty UTF-8 file's text (a bad byte is a `DataError` naming its offset)."""
  raw = _need_file(path, "data.path", TEXT_HINT).read_bytes()
  if not raw:
    raise DataError(f"data.path={path!r}: the file is empty; allowed: UTF-8 text. {TEXT_HINT}")
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise DataError(f"data.path={path!r}: not UTF-8: byte {e.start} (0x{raw[e.start]:02x}) "
                    f"{e.reason}; allowed: UTF-8 text. {TEXT_HINT}") from None


def tfds_text(name: str, split: str, data_dir: str | None = None, download: bool = False) -> str:
  """A text TFDS dataset whose split is one or more ``{'text': ...}`` examples (``tiny_shakespeare``)."""
  src = _tfds_source(name, split, data_dir, download)
  parts = []
  for i in range(len(src)):
    t = src[i]["text"]
    parts.append(t.decode("utf-8") if isinstance(t, bytes) else str(t))
  return "".join(parts)


class Reversal:
  """Synthetic seq2seq: reverse a random token string. ``[i]`` is a pure function of (seed, i).

  ``src`` = tokens (ids 3..vocab-1) padded with `PAD_ID`; ``tgt_in`` = BOS + reversed; ``tgt_out`` =
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
    out["tgt_in"][0] = BOS_ID
    out["tgt_in"][1:n + 1] = toks[::-1]
    out["tgt_out"][:n] = toks[::-1]
    out["tgt_out"][n] = EOS_ID
    return out
