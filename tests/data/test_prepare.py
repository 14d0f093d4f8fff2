"""`vlora-data`: each data set from the formats users have (IDX, CIFAR's python archive, Keras'
npz, a text file) or TFDS, into the layout the configs read; relative data paths and the
suggestion a missing file gets."""

from __future__ import annotations

import gzip
import io
import pickle
import tarfile

import numpy as np
import pytest
import tensorflow_datasets as tfds
from helpers_train import tiny

from vlora_jax import data
from vlora_jax.data import paths, prepare, sources
from vlora_jax.data.sources import DataError

RNG = np.random.default_rng(0)


def _idx(path, array, zipped):
  head = b"\0\0\x08" + bytes([array.ndim]) + b"".join(int(d).to_bytes(4, "big")
                                                      for d in array.shape)
  raw = head + array.astype(np.uint8).tobytes()
  path.write_bytes(gzip.compress(raw) if zipped else raw)


def _mnist_arrays(n_train=12, n_test=5):
  return {"x_train": RNG.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
          "y_train": np.arange(n_train, dtype=np.uint8) % 10,
          "x_test": RNG.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
          "y_test": np.arange(n_test, dtype=np.uint8) % 10}


@pytest.mark.parametrize("zipped", [True, False])
def test_mnist_from_the_idx_files(tmp_path, zipped):
  want = _mnist_arrays()
  raw = tmp_path / "MNIST" / "raw"  # torchvision's layout
  raw.mkdir(parents=True)
  for key, name in prepare.IDX.items():
    _idx(raw / (name + (".gz" if zipped else "")), want[key], zipped)
  out = prepare.prepare("mnist", tmp_path / "data", tmp_path, log=lambda _: None)
  with np.load(out) as z:
    assert all(np.array_equal(z[k], v) for k, v in want.items())
  # ... and a config reads it by its bare name from the data directory
  train, test = sources.npz_splits(str(out))
  assert len(train) == 12 and train.shape == (28, 28, 1) and len(test) == 5


def _cifar_archive(path, n=10):
  x = RNG.integers(0, 256, (6 * n, 32, 32, 3), dtype=np.uint8)
  y = np.arange(6 * n) % 10

  def batch(i):
    part = slice(i * n, (i + 1) * n)
    return pickle.dumps({b"labels": [int(v) for v in y[part]],
                         b"data": x[part].transpose(0, 3, 1, 2).reshape(n, -1)}, protocol=2)

  with tarfile.open(path, "w:gz") as t:
    def add(name, raw):
      info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
      info.size = len(raw)
      t.addfile(info, io.BytesIO(raw))
    for i, name in enumerate(prepare.CIFAR_BATCHES):
      add(name, batch(i))
    add("batches.meta", pickle.dumps({b"label_names": [f"c{i}".encode() for i in range(10)]},
                                     protocol=2))
  return x, y


def test_cifar10_and_its_subset_from_the_original_archive(tmp_path):
  x, y = _cifar_archive(tmp_path / "cifar-10-python.tar.gz")
  log = []
  full = prepare.prepare("cifar10", tmp_path / "d", tmp_path, log=log.append)
  with np.load(full) as z:
    assert np.array_equal(z["x_train"], x[:50]) and np.array_equal(z["x_test"], x[50:])
    assert np.array_equal(z["y_train"], y[:50]) and list(z["label_names"])[:2] == ["c0", "c1"]
  sub = prepare.prepare("cifar10_subset", tmp_path / "d", tmp_path, log=log.append)
  with np.load(sub) as z:  # fewer than 4,000 here: all of them, with their indices
    assert np.array_equal(z["x_train"], x[:50]) and list(z["train_index"]) == list(range(50))
  assert prepare.prepare("cifar10", tmp_path / "d", tmp_path, log=log.append) == full
  assert "already there (--force writes it again)" in log[-1]


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
  folder = tmp_path / "cifar-10-batches-py"
  folder.mkdir()
  evil = pickle.dumps({b"data": __import__("os").system}, protocol=2)  # a function, not an array
  for name in prepare.CIFAR_BATCHES + ["batches.meta"]:
    (folder / name).write_bytes(evil)
  with pytest.raises(DataError, match="posix.system is not allowed in a CIFAR batch"):
    prepare.prepare("cifar10", tmp_path / "d", tmp_path, log=lambda _: None)
  assert not (tmp_path / "d" / "cifar10.npz").exists()


def test_from_tfds_when_online(tmp_path):
  with tfds.testing.mock_data(num_examples=6):
    m = prepare.prepare("mnist", tmp_path, None, log=lambda _: None)
    text = prepare.prepare("tiny_shakespeare", tmp_path, None, log=lambda _: None)
  with np.load(m) as z:
    assert z["x_train"].shape == (6, 28, 28) and z["x_test"].shape == (6, 28, 28)
  assert text.read_text()  # the three splits, joined


def test_all_from_a_folder_of_copies_and_the_command(tmp_path, capsys):
  src = tmp_path / "copies"
  src.mkdir()
  np.savez(src / "mnist.npz", **_mnist_arrays())  # Keras' layout
  (src / "input.txt").write_text("First Citizen:\nBefore we proceed any further, hear me.\n" * 9)
  found = prepare._available(src)  # pylint: disable=protected-access
  assert found == ["digits", "mnist", "tiny_shakespeare"]
  prepare.main(["all", "--from", str(src), "--out", str(tmp_path / "d")])
  assert (tmp_path / "d" / "mnist.npz").is_file()
  assert (tmp_path / "d" / "tiny_shakespeare.txt").read_text().startswith("First Citizen:")
  with pytest.raises(SystemExit) as e:
    prepare.main(["cifar10", "--from", str(src), "--out", str(tmp_path / "d")])
  assert e.value.code == 2
  assert "no CIFAR-10 there" in capsys.readouterr().err


def test_a_relative_data_path_is_read_from_the_data_directory(tmp_path, monkeypatch):
  (tmp_path / "verse.txt").write_text("Thou art the king of all that we behold.\n" * 300)
  monkeypatch.setenv(paths.ENV, str(tmp_path))
  monkeypatch.chdir("/")
  assert paths.resolve("verse.txt") == tmp_path / "verse.txt"
  assert data.build(tiny("lm", **{"data.path": "verse.txt"})).info["vocab_size"] > 10


def test_a_missing_file_suggests_a_path_that_works(tmp_path, monkeypatch):
  monkeypatch.setenv(paths.ENV, str(tmp_path / "empty"))
  monkeypatch.chdir(tmp_path)
  (tmp_path / "tiny_shakespeare.txt").write_text("To be, or not to be, that is the question.\n"
                                                 * 300)
  with pytest.raises(DataError) as e:  # the file is here, not in the data directory
    data.build(tiny("lm", **{"data.path": "tiny_shakespeare.txt"}))
  message = str(e.value)
  assert f"resolved to {tmp_path / 'empty' / 'tiny_shakespeare.txt'}" in message
  suggested = message.split("--config.data.path=")[-1]
  assert suggested == str(tmp_path / "tiny_shakespeare.txt")
  assert data.build(tiny("lm", **{"data.path": suggested})).info["vocab_size"] > 10
  with pytest.raises(DataError, match=r"Prepare it with `vlora-data mnist`"):
    data.build(tiny("vit", **{"data.source": "npz", "data.path": "mnist.npz"}))


def test_a_forced_rewrite_that_does_not_check_keeps_the_earlier_file(tmp_path):
  """--force from a bad copy: the new file is checked before it replaces anything, so the
  earlier good one stays, and no temporary is left behind."""
  src = tmp_path / "copies"
  src.mkdir()
  np.savez(src / "mnist.npz", **_mnist_arrays())
  out = tmp_path / "d"
  good = prepare.prepare("mnist", out, src, log=lambda _: None)
  before = good.read_bytes()
  bad = _mnist_arrays()
  bad["y_train"] = bad["y_train"][:-1]  # one label short: the pipeline's checks refuse it
  np.savez(src / "mnist.npz", **bad)
  with pytest.raises(DataError):
    prepare.prepare("mnist", out, src, force=True, log=lambda _: None)
  assert good.read_bytes() == before
  assert sorted(p.name for p in out.iterdir()) == ["mnist.npz"]
