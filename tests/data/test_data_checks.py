"""Data checked where it is read: every malformed file is one DataError naming file, split, field."""

import io
import re
import zipfile

import numpy as np
import pytest
from helpers_train import tiny

from vlora_jax import data
from vlora_jax.data import DataError

N_TRAIN, N_TEST, HW, C, CLASSES = 12, 8, 6, 3, 4


def _arrays(dtype=np.uint8):
  """A clean file's arrays: every class in train, pixels 1..255 (whole numbers)."""
  rng = np.random.default_rng(0)
  return {"x_train": rng.integers(1, 256, (N_TRAIN, HW, HW, C)).astype(dtype),
          "y_train": np.arange(N_TRAIN) % CLASSES,
          "x_test": rng.integers(1, 256, (N_TEST, HW, HW, C)).astype(dtype),
          "y_test": np.arange(N_TEST) % CLASSES}


def _jpeg_arrays():
  """The JPEG-bytes layout of a clean file: images joined in one buffer, with offsets."""
  from PIL import Image
  out = {}
  for part, n in (("train", N_TRAIN), ("test", N_TEST)):
    blobs = []
    for i in range(n):
      f = io.BytesIO()
      Image.fromarray(np.full((HW, HW, 3), 20 * i, np.uint8)).save(f, format="JPEG")
      blobs.append(f.getvalue())
    out[f"{part}_jpeg"] = np.frombuffer(b"".join(blobs), np.uint8)
    out[f"{part}_offsets"] = np.cumsum([0] + [len(b) for b in blobs])
    out[f"y_{part}"] = np.arange(n) % CLASSES
  return out


def _clean(pixel_scale):
  a = _arrays()
  if pixel_scale == "unit":
    a["x_train"], a["x_test"] = a["x_train"] / 255.0, a["x_test"].astype(np.float32) / 255
  return a


def _build(path, pixel_scale="uint8"):
  return data.build(tiny("vit", **{"data.source": "npz", "data.path": str(path),
                                   "data.pixel_scale": pixel_scale, "data.mean": (0.0,) * C,
                                   "data.std": (1.0,) * C, "data.eval_examples": 0}))


def _reads_back(pipe, arrays, pixel_scale="uint8") -> bool:
  """The clean file's pipeline holds what the file holds: its shapes, classes and eval pixels
  (mean 0, std 1: the pixels scaled to [0, 1] and nothing else)."""
  assert pipe.info["image_shape"] == list(arrays["x_train"].shape[1:]) or \
      tuple(pipe.info["image_shape"]) == arrays["x_train"].shape[1:], pipe.info
  assert pipe.info["num_classes"] == CLASSES and pipe.num_eval_of("test") == len(arrays["x_test"])
  first = next(iter(pipe.eval_batches("test")))
  real = int(first["mask"].sum())  # the batch's examples before its padding
  want = arrays["x_test"][:real].astype(np.float64)
  want = want / 255.0 if pixel_scale == "uint8" else want
  np.testing.assert_allclose(first["image"][:real], want, atol=1e-6)
  return True


def _save(tmp_path, arrays, name="bad.npz"):
  path = tmp_path / name
  np.savez(path, **arrays)
  return path


def _set(key, fn):
  """A change to one array of the clean file."""
  def change(a):
    a[key] = fn(a[key].copy())
    return a
  return change


def _at(index, value, dtype=None):
  def put(x):
    x = x.astype(dtype) if dtype else x
    x[index] = value
    return x
  return put


# name -> (change to the clean arrays, declared pixel_scale, split, field, what the message says)
CASES = {
    "unit_floats_declared_uint8": (
        lambda a: {**a, "x_train": a["x_train"] / 255.0}, "uint8", "train", "x_train",
        r"fractional pixels.*look like \[0, 1\] floats.*pixel_scale=unit"),
    "uint8_declared_unit": (lambda a: a, "unit", "train", "x_train",
                            r"dtype uint8 under data.pixel_scale='unit'.*pixel_scale=uint8"),
    "float_0_255_declared_unit": (
        lambda a: {**a, "x_train": a["x_train"].astype(np.float32)}, "unit", "train", "x_train",
        r"pixels outside \[0, 1\].*pixel_scale=uint8"),
    "nan_pixels_in_test": (_set("x_test", _at((5, 1, 2, 0), np.nan, np.float32)), "uint8", "test",
                           "x_test", r"found 1 NaN/inf pixels, the first at image 5 \(nan\)"),
    "inf_pixels_in_train": (_set("x_train", _at((3, 0, 0), np.inf, np.float64)), "uint8", "train",
                            "x_train", r"found 3 NaN/inf pixels, the first at image 3 \(inf\)"),
    "negative_label": (_set("y_train", _at(7, -1)), "uint8", "train", "y_train",
                       r"found 1 labels outside \[0, 4\), the first at index 7 \(-1\)"),
    "fractional_label": (_set("y_test", _at(2, 1.5, np.float32)), "uint8", "test", "y_test",
                         r"not whole numbers, the first at index 2 \(1.5\)"),
    "label_beyond_train_classes": (_set("y_test", _at(6, 4)), "uint8", "test", "y_test",
                                   r"outside \[0, 4\), the first at index 6 \(4\).*max\(y_train\)"),
    "labels_of_wrong_length": (_set("y_test", lambda y: y[:-1]), "uint8", "test", "y_test",
                               r"shape \(7,\); allowed: \(8,\), one label per image"),
    "image_shapes_differ": (_set("x_test", lambda x: x[:, :4, :4]), "uint8", "test", "x_test",
                            r"shape \(4, 4, 3\).*train split's are \(6, 6, 3\)"),
    "missing_y_test": (lambda a: {k: v for k, v in a.items() if k != "y_test"}, "uint8", "test",
                       "y_test", r"missing; the file has keys \['x_train', 'y_train', 'x_test'\]"),
    "object_array": (_set("x_train", lambda x: np.array(list(x) + [None], object)[:-1]), "uint8",
                     "train", "x_train", r"object array \(stored with pickle\)"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_malformed_npz_is_one_error_naming_file_split_field(tmp_path, case):
  change, scale, split, field, match = CASES[case]
  assert _reads_back(_build(_save(tmp_path, _clean(scale), "clean.npz"), scale), _clean(scale),
                     scale)
  path = _save(tmp_path, change(_arrays()))
  with pytest.raises(DataError, match=match) as e:
    _build(path, scale)
  msg = str(e.value)
  assert str(path) in msg and f"{split} split" in msg and f"{field}:" in msg, msg


def test_label_names_set_the_class_count_and_names(tmp_path):
  a = _arrays()
  a["label_names"] = np.array(["a", "b", "c"])  # 3 names, but y_train has class 3
  path = _save(tmp_path, a)
  with pytest.raises(DataError, match=r"train split, y_train: found 3 labels outside \[0, 3\).*"
                                      r"len\(label_names\)"):
    _build(path)
  a["label_names"] = np.array(["a", "b", "c", "d", "e"])
  info = _build(_save(tmp_path, a, "ok.npz")).info
  assert info["num_classes"] == 5 and info["class_names"] == ("a", "b", "c", "d", "e")


def test_jpeg_offsets_out_of_range(tmp_path):
  assert _build(_save(tmp_path, _jpeg_arrays(), "clean.npz")).info["image_shape"] == (HW, HW, 3)
  a = _jpeg_arrays()
  a["test_offsets"][-1] = len(a["test_jpeg"]) + 10
  path = _save(tmp_path, a)
  with pytest.raises(DataError, match=r"offsets beyond the \d+ bytes of test_jpeg.*index 8") as e:
    _build(path)
  assert re.search(re.escape(repr(str(path))) + r", test split, test_offsets:", str(e.value))
  a = _jpeg_arrays()
  a["train_jpeg"] = a["train_jpeg"].copy()
  a["train_jpeg"][:50] = 0  # the first image's header
  with pytest.raises(DataError, match=r"train split, train_jpeg: image 0 .*does not decode"):
    _build(_save(tmp_path, a, "bad_bytes.npz"))


def _cut_member(path, member):
  """The same .npz with one member's bytes cut short (a well-formed zip)."""
  with zipfile.ZipFile(path) as z:
    members = {n: z.read(n) for n in z.namelist()}
  members[member] = members[member][:-40]
  with zipfile.ZipFile(path, "w") as z:
    for n, b in members.items():
      z.writestr(n, b)


@pytest.mark.parametrize("how", ["file_cut_short", "member_cut_short", "not_an_npz"])
def test_unreadable_npz_names_the_file(tmp_path, how):
  path = _save(tmp_path, _arrays())
  assert _reads_back(_build(path), _arrays())
  if how == "file_cut_short":
    path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])
    match = "a truncated or damaged .npz"
  elif how == "member_cut_short":
    _cut_member(path, "x_test.npy")
    match = "test split, x_test: could not be read, the file is truncated"
  else:
    path.write_text("x_train,y_train\n1,2\n")
    match = r"is not an .npz \(a zip of .npy arrays\): it starts with b'x_tr'"
  with pytest.raises(DataError, match=match) as e:
    _build(path)
  assert str(path) in str(e.value)


def test_declared_unit_floats_are_normalised_like_uint8(tmp_path):
  """pixel_scale=unit: [0, 1] floats reach the model as the same images given as 0-255 do."""
  uint8 = _build(_save(tmp_path, _clean("uint8"), "u8.npz"))
  unit = _build(_save(tmp_path, _clean("unit"), "unit.npz"), "unit")
  for t in (0, 1):
    u, f = uint8.train_batch(t), unit.train_batch(t)
    np.testing.assert_array_equal(u["label"], f["label"])
    np.testing.assert_allclose(f["image"], u["image"], rtol=0, atol=1e-6)
  assert float(u["image"].max()) > 0.9  # in [0, 1] once, not divided by 255 twice
  for u, f in zip(uint8.eval_batches(), unit.eval_batches()):
    np.testing.assert_array_equal(u["mask"], f["mask"])
    np.testing.assert_allclose(f["image"], u["image"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("content,match", [
    (b"First line\nsecond \xff line\n", r"not UTF-8: byte 18 \(0xff\)"),
    (b"", r"the file is empty"),
])
def test_bad_text_file(tmp_path, content, match):
  path = tmp_path / "corpus.txt"
  path.write_bytes(content)
  with pytest.raises(DataError, match=match) as e:
    data.build(tiny("lm", **{"data.path": str(path)}))
  assert str(path) in str(e.value)
  path.write_bytes(b"a clean line\n" * 300)
  assert data.build(tiny("lm", **{"data.path": str(path)})).info["vocab_size"] > 5
