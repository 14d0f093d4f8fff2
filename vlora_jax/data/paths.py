"""Where a config's data files are: a relative ``data.path`` is read from the data directory.

  the data directory   ``$VLORA_DATA`` when it is set, else ``~/.cache/vlora_jax/data``
  data.path            an absolute path (or ``~/...``) is read as it is; a relative one, from
                       the data directory, whatever the current directory is

So ``configs/lm_shakespeare.py``, whose ``data.path`` is ``tiny_shakespeare.txt``, reads
``$VLORA_DATA/tiny_shakespeare.txt`` from any directory, and ``vlora-data NAME`` (`prepare`)
writes each data set there under the name its configs read. A file that is not there is a
`DataError` whose suggestion is a path that exists (the same name in the current directory or
the data directory), or the command that prepares it.
"""

from __future__ import annotations

import os
from pathlib import Path

from vlora_jax.errors import UserError

ENV = "VLORA_DATA"
DEFAULT = Path("~/.cache/vlora_jax/data")

# The files the configs read, by the name `vlora-data` prepares them under.
PREPARED = {"mnist.npz": "mnist", "cifar10.npz": "cifar10",
            "cifar10_subset.npz": "cifar10_subset", "cifar10_jpeg_q75.npz": "cifar10_jpeg",
            "tiny_shakespeare.txt": "tiny_shakespeare"}


def data_dir() -> Path:
  """The data directory: ``$VLORA_DATA`` (relative to the current directory), else the default."""
  return Path(os.environ.get(ENV) or DEFAULT).expanduser().absolute()


def resolve(path: str | os.PathLike) -> Path:
  """``data.path`` as a file: absolute as it is, relative under `data_dir`."""
  p = Path(path).expanduser()
  return p if p.is_absolute() else data_dir() / p


def where_text() -> str:
  """How a relative path was resolved, for messages."""
  source = f"${ENV}" if os.environ.get(ENV) else f"the default; set ${ENV} to change it"
  return f"a relative data.path is read from the data directory {data_dir()} ({source})"


def suggestion(path: str, key: str = "data.path") -> str:
  """What to do about a data file that is not at ``resolve(path)``: a path that exists, or the
  command that prepares it."""
  name = Path(path).name
  for candidate in (Path.cwd() / path, Path.cwd() / name, data_dir() / name):
    if candidate.is_file():
      return f"It is at {candidate}: --config.{key}={candidate.absolute()}"
  if name in PREPARED:
    out = "" if Path(path).name == path else f" --out {resolve(path).parent}"
    return (f"Prepare it with `vlora-data {PREPARED[name]}{out}` (python -m "
            f"vlora_jax.data.prepare; from TFDS, or --from a copy you have), or give its path: "
            f"--config.{key}=/path/to/{name}")
  return f"Give the file's path: --config.{key}=/path/to/{name or 'file'}"


def not_found(path: str, key: str, error: type[UserError]) -> UserError:
  """The error for a data file that is not there (see `suggestion`)."""
  return error(f"{key}={path!r}: file not found (resolved to {resolve(path)}; "
               f"{where_text()}). {suggestion(path, key)}")
