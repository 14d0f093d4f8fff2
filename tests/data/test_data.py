"""Input pipelines: order from (seed, step), process shards, augmentation, sources, TFDS, errors."""

import numpy as np
import pytest
import tensorflow_datasets as tfds
from helpers_train import need_shared, tiny

from vlora_jax import data
from vlora_jax.data import DataError


def _eq(a: dict, b: dict) -> bool:
  return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_batch_is_a_pure_function_of_seed_and_step():
  c = tiny("vit", batch_size=32)
  p1, p2 = data.build(c), data.build(c)
  assert _eq(p1.train_batch(7), p2.train_batch(7))
  # the iterator a resumed run starts at step 5 yields exactly batches 5, 6, 7 of a fresh run
  it = p2.train_batches(5)
  for t in (5, 6, 7):
    assert _eq(next(it), p1.train_batch(t))
  other = data.build(tiny("vit", batch_size=32, seed=1))
  assert not _eq(other.train_batch(7), p1.train_batch(7))
  assert not _eq(p1.train_batch(7), p1.train_batch(8))


def test_batches_of_one_example():
  """batch_size 1 (one long window a step, as configs/lm_shakespeare.py:xl trains): the same
  records in the same order as batches of two, one at a time."""
  ones, twos = data.build(tiny("vit", batch_size=1)), data.build(tiny("vit", batch_size=2))
  first = [ones.train_batch(t) for t in range(4)]
  assert all(b["image"].shape[0] == 1 and b["label"].shape == (1,) for b in first)
  pairs = [twos.train_batch(t) for t in range(2)]
  assert np.array_equal(np.concatenate([b["image"] for b in first]),
                        np.concatenate([b["image"] for b in pairs]))


def test_one_epoch_is_a_permutation_then_reshuffled():
  from vlora_jax.data import sources
  c = tiny("vit", batch_size=2)
  p = data.build(c)
  train = sources.digits("train")
  kept, held = data.carve(len(train), c.data.validation_fraction, c.data.split_seed)
  n = len(kept)
  assert n % 2 == 0 and p.info["num_train"] == n and n + len(held) == len(train)
  epoch = np.concatenate([p.train_batch(t)["image"] for t in range(n // 2)])
  mean, std = np.float32(0.305), np.float32(0.376)
  expect = (train.records.images[kept].astype(np.float32) * np.float32(1 / 16) - mean) / std
  key = lambda a: sorted(x.tobytes() for x in a)
  assert key(epoch) == key(expect)  # every training image exactly once, no validation image
  again = np.concatenate([p.train_batch(t)["image"] for t in range(n // 2, n // 2 + 8)])
  assert not np.array_equal(again, epoch[:16])  # the next epoch comes in a new order


@pytest.mark.parametrize("count", [2, 4])
def test_processes_read_disjoint_slices_of_the_same_global_batch(count):
  c = tiny("vit", batch_size=16)
  whole = data.build(c).train_batch(3)
  parts = [data.build(c, process_index=i, process_count=count).train_batch(3) for i in range(count)]
  assert all(len(p["label"]) == 16 // count for p in parts)
  joined = {k: np.concatenate([p[k] for p in parts]) for k in whole}
  assert _eq(joined, whole)
  # eval: every process gets its slice of each padded batch; masks add up to the eval set size
  evs = [list(data.build(c, process_index=i, process_count=count).eval_batches())
         for i in range(count)]
  assert sum(float(b["mask"].sum()) for e in evs for b in e) == 64  # tiny: eval_examples=64
  assert len({len(e) for e in evs}) == 1


def _npz(tmp_path, n=40, hw=8, c=3):
  rng = np.random.default_rng(0)
  path = tmp_path / "imgs.npz"
  np.savez(path, x_train=rng.integers(1, 256, (n, hw, hw, c), dtype=np.uint8),
           y_train=rng.integers(0, 4, n).astype(np.uint8),
           x_test=rng.integers(1, 256, (8, hw, hw, c), dtype=np.uint8),
           y_test=rng.integers(0, 4, 8).astype(np.uint8))
  return path


def test_npz_source_and_crop_flip_augmentation(tmp_path):
  path = _npz(tmp_path)
  base = {"data.source": "npz", "data.path": str(path), "data.mean": (0.0,) * 3,
          "data.std": (1.0,) * 3, "model.img_size": 8, "model.in_chans": 3, "batch_size": 40,
          "data.eval_examples": 0, "data.validation_fraction": 0.0, "data.eval_split": "test"}
  plain = data.build(tiny("vit", **base, **{"data.augment": "none"}))
  aug = data.build(tiny("vit", **base, **{"data.augment": "crop_flip", "data.crop_padding": 2}))
  assert plain.info == {"kind": "images", "image_shape": (8, 8, 3), "num_classes": 4,
                        "num_train": 40, "scale": 1 / 255, "mean": (0.0,) * 3, "std": (1.0,) * 3,
                        "class_names": None, "eval_split": "test",
                        "split": {"train": 40, "validation": 0, "test": 8,
                                  "validation_fraction": 0.0, "seed": 0}}
  x, xa = plain.train_batch(0)["image"], aug.train_batch(0)["image"]
  assert np.array_equal(plain.train_batch(0)["label"], aug.train_batch(0)["label"])
  assert x.shape == xa.shape == (40, 8, 8, 3) and x.dtype == np.float32
  assert (x > 0).all()  # raw pixels are >= 1: zeros can only come from the crop's padding
  padded = [(xa[i] == 0).all(-1).any() for i in range(40)]
  assert sum(padded) > 20  # only the centre crop (1 in 25) adds no zero padding
  # each augmented image is a shifted (and maybe mirrored) window of the original
  for i in range(40):
    src = np.pad(x[i], ((2, 2), (2, 2), (0, 0)))
    hits = [(dy, dx, f) for dy in range(5) for dx in range(5) for f in (False, True)
            if np.array_equal(xa[i], (src[dy:dy + 8, dx:dx + 8][:, ::-1] if f else
                                      src[dy:dy + 8, dx:dx + 8]))]
    assert hits, i
  assert _eq(aug.train_batch(0), aug.train_batch(0))  # augmentation is deterministic too
  ev = next(aug.eval_batches())
  assert ev["image"].shape[0] == 32 and ev["mask"].sum() == 8  # eval: no augmentation, padded


def test_text_windows_and_reversal_records(tmp_path):
  text = "".join(chr(97 + (i * 7) % 26) for i in range(3000))
  (tmp_path / "t.txt").write_text(text)
  p = data.build(tiny("lm", **{"data.path": str(tmp_path / "t.txt")}))
  assert p.info["vocab_size"] == 26 and p.info["tokens_per_example"] == 16
  b = p.train_batch(0)["tokens"]
  assert b.shape == (16, 17) and b.dtype == np.int32
  vocab = p.info["vocab"]
  decoded = ["".join(vocab[t] for t in row) for row in b]
  assert all(s in text for s in decoded)
  held = {split: [r for batch in p.eval_batches(split)
                  for r, m in zip(batch["tokens"], batch["mask"]) if m] for split in p.eval_splits}
  # 20 blocks of 150 characters: the last validates, the one before it tests (split_seed None:
  # the tail), each 150 // 17 = 8 non-overlapping windows, none read in training
  assert p.info["split"]["validation"] == [18] and p.info["split"]["test"] == [19]
  assert len(held["validation"]) == len(held["test"]) == 8
  assert "".join(vocab[t] for t in held["validation"][0]) == text[2700:2717]
  assert "".join(vocab[t] for t in held["test"][0]) == text[2850:2867]
  r = data.build(tiny("seq2seq")).train_batch(0)
  for src, tin, tout in zip(r["src"], r["tgt_in"], r["tgt_out"]):
    n = int((src != 0).sum())
    assert 2 <= n <= 7 and (src[:n] >= 3).all() and (src[n:] == 0).all()
    assert tin[0] == 1 and np.array_equal(tin[1:n + 1], src[:n][::-1])
    assert np.array_equal(tout[:n], src[:n][::-1]) and tout[n] == 2 and (tout[n + 1:] == 0).all()


def test_tfds_cifar10_through_the_real_pipeline():
  from vlora_jax.train import load_config
  c = load_config("configs/vit_cifar10.py:small", **{"batch_size": 8, "eval_batch_size": 8})
  with tfds.testing.mock_data(num_examples=24):
    p = data.build(c)
    assert p.info["image_shape"] == (32, 32, 3) and p.info["num_classes"] == 10
    b = p.train_batch(2)
    assert b["image"].shape == (8, 32, 32, 3) and b["label"].shape == (8,)
    assert _eq(b, data.build(c).train_batch(2))
    # validation: 10% of the 24 train images (seeded); the test split: TFDS's own, all 24
    assert sum(float(e["mask"].sum()) for e in p.eval_batches()) == 2
    assert sum(float(e["mask"].sum()) for e in p.eval_batches("test")) == 24
    src = tfds.data_source("cifar10", split="train")
    raw = np.stack([np.asarray(src[i]["image"]) for i in range(len(src))]).astype(np.float32)
  # normalised pixels come from the mock's raw images (up to the random crop's zero padding)
  mean, std = np.array(c.data.mean), np.array(c.data.std)
  back = np.round((b["image"] * std + mean) * 255)
  assert back.min() >= 0 and back.max() <= 255
  assert set(np.unique(back)).issubset(set(np.unique(raw)) | {0.0})


def test_tfds_text_through_the_real_pipeline():
  c = tiny("lm", **{"data.source": "tfds", "data.tfds_name": "tiny_shakespeare",
                    "data.split_blocks": 4, "model.max_len": 4, "data.eval_examples": 4})
  with tfds.testing.mock_data(num_examples=3):
    p = data.build(c)
  assert p.train_batch(0)["tokens"].shape == (16, 5)


@pytest.mark.parametrize("overrides,match", [
    ({"data.source": "npz", "data.path": "/no/such/file.npz"},
     r"data.path='/no/such/file.npz': file not found.*--config.data.path"),
    ({"data.source": "tfds", "data.tfds_name": "cifar_10_typo"},
     r"data.tfds_name='cifar_10_typo' is not a TFDS dataset"),
    ({"data.source": "tfds", "data.tfds_name": "cifar10", "data.data_dir": "/tmp/vlora_no_tfds"},
     r"TFDS dataset 'cifar10' .*is not prepared in data.data_dir=.*tfds build cifar10"),
    ({"data.source": "images"}, r"data.source='images': allowed are"),
])
def test_missing_data_is_a_clear_error(overrides, match):
  with pytest.raises(DataError, match=match):
    data.build(tiny("vit", **overrides))


def test_missing_text_file_is_a_clear_error():
  with pytest.raises(DataError, match=r"data.path='/nope.txt': file not found"):
    data.build(tiny("lm", **{"data.path": "/nope.txt"}))


def test_shared_local_files():
  from vlora_jax.data import sources
  mnist = sources.npz_images(str(need_shared("mnist.npz")), "train")
  assert len(mnist) == 60000 and mnist.shape == (28, 28, 1) and mnist.num_classes == 10
  jpeg = sources.npz_images(str(need_shared("cifar10_jpeg_q75.npz")), "train")
  exact = sources.npz_images(str(need_shared("cifar10_subset.npz")), "train")
  assert len(jpeg) == 50000 and jpeg.shape == (32, 32, 3)
  for i in (0, 1, 3999):  # JPEG quality 75 vs the lossless pixels: a few grey levels apart
    a, b = jpeg[i], exact[i]
    assert a["label"] == b["label"]
    assert np.abs(a["image"].astype(float) - b["image"]).mean() < 15
