"""Prepare the data sets the configs read: ``vlora-data NAME [--from PATH] [--out DIR]``.

  vlora-data tiny_shakespeare                          # from TFDS (needs network)
  vlora-data mnist --from ~/Downloads/mnist.npz        # from a copy you have
  vlora-data all --from ../shared/data                 # every one a folder of copies holds

(``python -m vlora_jax.data.prepare`` is the same command.) Each data set is written under the
name its configs read, into ``--out`` (default: the data directory, ``$VLORA_DATA`` or
``~/.cache/vlora_jax/data``, where a config's relative ``data.path`` is looked up), and read back
through the pipeline's own checks before the command says it is done:

  NAME              writes                  --from (a file, or a folder that holds one)
  digits            nothing: scikit-learn bundles it (configs/vit_digits.py)
  mnist             mnist.npz               Keras' mnist.npz; the four IDX files, .gz or not
                                            (torchvision's MNIST/raw, or the originals)
  cifar10           cifar10.npz             cifar-10-python.tar.gz or its cifar-10-batches-py
                                            folder (the original, as Keras and torchvision
                                            download it); a cifar10.npz
  cifar10_subset    cifar10_subset.npz      as cifar10: its first 4,000 train and 1,000 test
                                            images (the same images as ../shared/data's)
  cifar10_jpeg      cifar10_jpeg_q75.npz    a copy of that file (SOURCES.md says how it was
                                            built); checked and copied
  tiny_shakespeare  tiny_shakespeare.txt    a UTF-8 text file (Karpathy's char-rnn input.txt)
  all               each of the above that --from holds (online: each TFDS has)

Without ``--from``, mnist, cifar10, cifar10_subset and tiny_shakespeare come from TFDS
(``tfds.data_source(..., download=True)``; ``--tfds_dir`` is TFDS's data directory), which
needs the network once. The ``.npz`` files hold uint8 pixels ``x_train [N, H, W(, C)]``,
``y_train``, ``x_test``, ``y_test`` (and ``label_names``), which is what ``data.source='npz'``
reads. CIFAR's pickles are read by an unpickler that builds numpy arrays and nothing else.

Exit status: 0 written (or already there: ``--force`` writes again); 2 a mistake in the input
(an unknown name, a --from that holds no such data set, a file that does not check), one line.
"""

from __future__ import annotations

import gzip
import io
import pickle
import shutil
import sys
import tarfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from vlora_jax import cli
from vlora_jax.runs import outputs
from vlora_jax.data import paths, sources
from vlora_jax.data.sources import DataError

FILES = {"mnist": "mnist.npz", "cifar10": "cifar10.npz", "cifar10_subset": "cifar10_subset.npz",
         "cifar10_jpeg": "cifar10_jpeg_q75.npz", "tiny_shakespeare": "tiny_shakespeare.txt"}
NAMES = ("digits",) + tuple(FILES) + ("all",)
SUBSET = (4000, 1000)  # cifar10_subset: the first train and test images
IDX = {"x_train": "train-images-idx3-ubyte", "y_train": "train-labels-idx1-ubyte",
       "x_test": "t10k-images-idx3-ubyte", "y_test": "t10k-labels-idx1-ubyte"}
CIFAR_BATCHES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


class PrepareError(DataError):
  """A data set that cannot be prepared from what was given."""


# ------------------------------------------------------------------------------------- readers


def _find(where: Path, *names: str) -> Path | None:
  """``where`` itself if it is one of ``names``' files, else the first of them under it (a
  folder, searched to any depth: torchvision nests MNIST/raw)."""
  if where.is_file():
    return where if where.name in names else None
  for name in names:
    hits = sorted(where.rglob(name))
    if hits:
      return hits[0]
  return None


def _read_idx(path: Path) -> np.ndarray:
  """An IDX file (MNIST's format; gzipped or not) as a uint8 array."""
  raw = path.read_bytes()
  if raw[:2] == b"\x1f\x8b":
    raw = gzip.decompress(raw)
  if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != 8:
    raise PrepareError(f"--from: {path} is not an IDX file of unsigned bytes (it starts with "
                       f"{raw[:4]!r})")
  dims = raw[3]
  shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(dims))
  data = np.frombuffer(raw, np.uint8, offset=4 + 4 * dims)
  if data.size != int(np.prod(shape)):
    raise PrepareError(f"--from: {path} holds {data.size} bytes of data, its header says "
                       f"{shape}: truncated")
  return data.reshape(shape)


def _npz_arrays(path: Path) -> dict[str, np.ndarray]:
  try:
    with np.load(path, allow_pickle=False) as z:
      return {k: z[k] for k in z.files}
  except Exception as e:  # noqa: BLE001 -- any failure to read is about the file given
    raise PrepareError(f"--from: {path} does not read as an .npz ({type(e).__name__}: {e})") \
        from None


def mnist_from(where: Path) -> dict[str, np.ndarray]:
  """MNIST from Keras' ``mnist.npz`` or the four IDX files."""
  npz = _find(where, "mnist.npz")
  if npz is not None:
    return _npz_arrays(npz)
  found = {k: _find(where, v, v + ".gz") for k, v in IDX.items()}
  if all(found.values()):
    return {k: _read_idx(p) for k, p in found.items()}
  missing = [IDX[k] for k, p in found.items() if p is None]
  raise PrepareError(f"--from={str(where)!r}: no MNIST there (looked for mnist.npz, and for the "
                     f"IDX files {missing}, .gz or not)")


class _ArraysOnly(pickle.Unpickler):
  """Unpickles CIFAR's batches: dicts, lists, bytes and numpy arrays; any other class is refused
  (a pickle can run code)."""
  ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
             ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

  def find_class(self, module, name):
    if (module, name) not in self.ALLOWED:
      raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR batch")
    return super().find_class(module, name)


def _unpickle(raw: bytes, where: str) -> dict:
  try:
    out = _ArraysOnly(io.BytesIO(raw), encoding="bytes").load()
  except Exception as e:  # noqa: BLE001 -- a broken or foreign pickle: about the file given
    raise PrepareError(f"--from: {where} is not a CIFAR-10 python batch ({type(e).__name__}: "
                       f"{e})") from None
  return {(k.decode() if isinstance(k, bytes) else k): v for k, v in out.items()}


def _cifar_members(where: Path) -> dict[str, bytes] | None:
  """The batches and ``batches.meta`` of the original CIFAR-10 python archive or its folder."""
  names = CIFAR_BATCHES + ["batches.meta"]
  tar = _find(where, "cifar-10-python.tar.gz")
  if tar is not None:
    with tarfile.open(tar, "r:gz") as t:
      by_name = {Path(m.name).name: m for m in t.getmembers() if m.isfile()}
      if not set(names) <= set(by_name):
        raise PrepareError(f"--from: {tar} lacks {sorted(set(names) - set(by_name))}")
      return {n: t.extractfile(by_name[n]).read() for n in names}
  first = _find(where, "data_batch_1")
  if first is None:
    return None
  folder = first.parent
  if not all((folder / n).is_file() for n in names):
    raise PrepareError(f"--from: {folder} lacks {[n for n in names if not (folder / n).is_file()]}")
  return {n: (folder / n).read_bytes() for n in names}


def cifar10_from(where: Path) -> dict[str, np.ndarray]:
  """Full CIFAR-10 from the original python archive (or folder), or a ``cifar10.npz``."""
  members = _cifar_members(where)
  if members is None:
    npz = _find(where, "cifar10.npz")
    if npz is None:
      raise PrepareError(f"--from={str(where)!r}: no CIFAR-10 there (looked for "
                         "cifar-10-python.tar.gz, a cifar-10-batches-py folder, cifar10.npz)")
    return _npz_arrays(npz)
  batches = {n: _unpickle(members[n], n) for n in CIFAR_BATCHES}
  meta = _unpickle(members["batches.meta"], "batches.meta")
  images = lambda b: np.asarray(b["data"], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  labels = lambda b: np.asarray(b["labels"], np.uint8)
  train = [batches[n] for n in CIFAR_BATCHES[:-1]]
  names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta["label_names"]]
  return {"x_train": np.concatenate([images(b) for b in train]),
          "y_train": np.concatenate([labels(b) for b in train]),
          "x_test": images(batches["test_batch"]), "y_test": labels(batches["test_batch"]),
          "label_names": np.asarray(names)}


def subset_of(full: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The first 4,000 train and 1,000 test images of CIFAR-10, with their original indices."""
  n_train, n_test = min(SUBSET[0], len(full["x_train"])), min(SUBSET[1], len(full["x_test"]))
  out = {"x_train": full["x_train"][:n_train], "y_train": full["y_train"][:n_train],
         "x_test": full["x_test"][:n_test], "y_test": full["y_test"][:n_test],
         "train_index": np.arange(n_train, dtype=np.int32),
         "test_index": np.arange(n_test, dtype=np.int32)}
  if "label_names" in full:
    out["label_names"] = full["label_names"]
  return out


def cifar10_subset_from(where: Path) -> dict[str, np.ndarray]:
  npz = _find(where, "cifar10_subset.npz")
  if npz is not None and _cifar_members(where) is None and _find(where, "cifar10.npz") is None:
    return _npz_arrays(npz)
  return subset_of(cifar10_from(where))


def _text_from(where: Path) -> str:
  path = _find(where, "tiny_shakespeare.txt", "input.txt") if where.is_dir() else where
  if path is None:
    raise PrepareError(f"--from={str(where)!r}: no tiny_shakespeare.txt or input.txt there")
  return sources.text_file(str(path.absolute()))


# ------------------------------------------------------------------------------------- TFDS


def _tfds_images(name: str, tfds_dir: str | None) -> dict[str, np.ndarray]:
  def arrays(split):
    src = sources.tfds_images(name, split, data_dir=tfds_dir, download=True)
    x = np.stack([np.asarray(src[i]["image"], np.uint8) for i in range(len(src))])
    y = np.asarray([src[i]["label"] for i in range(len(src))], np.uint8)
    return (x[..., 0] if x.shape[-1] == 1 else x), y, src.class_names
  x_train, y_train, names = arrays("train")
  x_test, y_test, _ = arrays("test")
  out = dict(x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
  if name == "cifar10" and names:
    out["label_names"] = np.asarray(names)
  return out


def _tfds_text(tfds_dir: str | None) -> str:
  """TFDS ``tiny_shakespeare``'s splits, which are the file's first 90%, next 5% and last 5%."""
  return "".join(sources.tfds_text("tiny_shakespeare", split, data_dir=tfds_dir, download=True)
                 for split in ("train", "validation", "test"))


# ------------------------------------------------------------------------------------- writing


def _write_npz(out: Path, arrays: dict[str, np.ndarray]) -> None:
  with open(out, "wb") as f:  # a file object: np.savez adds no '.npz' to the name
    np.savez_compressed(f, **arrays)


def _check_written(name: str, out: Path) -> str:
  """The file read back through the pipeline's checks; a line that says what it holds."""
  if name == "tiny_shakespeare":
    text = sources.text_file(str(out))
    return f"{len(text):,} characters, {len(set(text))} distinct"
  train, test = sources.npz_splits(str(out))
  return (f"{len(train):,} train + {len(test):,} test images of {train.shape}, "
          f"{train.num_classes} classes")


def prepare(name: str, out_dir: Path, source: Path | None = None, *, force: bool = False,
            tfds_dir: str | None = None, log: Callable[[str], None] = print) -> Path | None:
  """Writes data set ``name`` into ``out_dir`` (see the module doc); returns the file, or None
  for digits (nothing to write)."""
  if name == "digits":
    from sklearn.datasets import load_digits
    log(f"digits: bundled with scikit-learn ({len(load_digits().target):,} images); nothing to "
        "write")
    return None
  out = out_dir / FILES[name]
  if out.exists() and not force:
    log(f"{name}: {out} is already there (--force writes it again)")
    return out
  if source is not None and not source.exists():
    raise PrepareError(f"--from={str(source)!r}: no such file or directory")
  t0 = time.time()
  cli.writable_dir(out_dir, f"--out={str(out_dir)!r}", PrepareError)
  if name == "tiny_shakespeare":
    text = _text_from(source) if source else _tfds_text(tfds_dir)
    write = lambda tmp: tmp.write_bytes(text.encode("utf-8"))
  elif name == "cifar10_jpeg":
    if source is None:
      raise PrepareError("cifar10_jpeg: no public source writes this file; give --from a copy of "
                         "cifar10_jpeg_q75.npz (or prepare cifar10: the same images, lossless)")
    found = _find(source, FILES[name])
    if found is None:
      raise PrepareError(f"--from={str(source)!r}: no {FILES[name]} there")
    write = lambda tmp: shutil.copyfile(found, tmp)
  else:
    readers = {"mnist": mnist_from, "cifar10": cifar10_from, "cifar10_subset": cifar10_subset_from}
    if source is not None:
      arrays = readers[name](source)
    else:
      arrays = _tfds_images("mnist" if name == "mnist" else "cifar10", tfds_dir)
      arrays = subset_of(arrays) if name == "cifar10_subset" else arrays
    write = lambda tmp: _write_npz(tmp, arrays)
  # Checked before it replaces anything: a file that does not check is not left for a config to
  # read, and an earlier good one stays.
  with outputs.atomic_file(out, "--out") as tmp:
    write(tmp)
    what = _check_written(name, tmp)
  log(f"{name}: wrote {out} ({what}; {out.stat().st_size / 2**20:.1f} MiB) in "
      f"{time.time() - t0:.1f} s")
  return out


def _available(source: Path | None) -> list[str]:
  """The data sets ``all`` prepares: those ``--from`` holds, or (online) every TFDS one."""
  if source is None:
    return ["digits", "mnist", "cifar10", "cifar10_subset", "tiny_shakespeare"]
  probes = {"mnist": lambda: (_find(source, "mnist.npz")
                             or all(_find(source, v, v + ".gz") for v in IDX.values())),
            "cifar10": lambda: _cifar_members(source) or _find(source, "cifar10.npz"),
            "cifar10_subset": lambda: (_cifar_members(source) or _find(source, "cifar10.npz")
                                       or _find(source, "cifar10_subset.npz")),
            "cifar10_jpeg": lambda: _find(source, FILES["cifar10_jpeg"]),
            "tiny_shakespeare": lambda: _find(source, "tiny_shakespeare.txt", "input.txt")}
  names = ["digits"]
  for name, probe in probes.items():
    try:
      if probe():
        names.append(name)
    except PrepareError:
      continue
  return names


def main(argv: list[str] | None = None) -> None:
  parser = cli.Parser("vlora-data", __doc__, allow_abbrev=False)
  parser.add_argument("name", choices=NAMES, metavar="NAME", help=f"one of {', '.join(NAMES)}")
  parser.add_argument("--from", dest="source", default=None, metavar="PATH",
                      help="a file or folder holding a copy (default: TFDS, online)")
  parser.add_argument("--out", default=None, metavar="DIR",
                      help=f"where to write (default: the data directory, ${paths.ENV} or "
                      f"{paths.DEFAULT})")
  parser.add_argument("--tfds_dir", default=None, metavar="DIR",
                      help="TFDS's data directory (default: TFDS's own)")
  parser.add_argument("--force", action="store_true", help="write a file that is already there")
  parser.add_argument("--verbose", action="store_true", help="show the traceback of input errors")
  args = parser.parse_args(argv)
  out_dir = Path(args.out).expanduser().absolute() if args.out else paths.data_dir()
  source = Path(args.source).expanduser().absolute() if args.source else None
  names = _available(source) if args.name == "all" else [args.name]
  for name in names:
    cli.guarded("vlora-data", args.verbose, prepare, name, out_dir, source, force=args.force,
                tfds_dir=args.tfds_dir)
  if args.name == "all":
    print(f"prepared {', '.join(names)} in {out_dir}", file=sys.stderr)


if __name__ == "__main__":
  main()
