"""Config files: ``FILE.py[:ARG]`` -> a locked ConfigDict, for the commands, notebooks and tests.

A config file defines ``get_config()`` or ``get_config(arg)``; ``:ARG`` after the path is passed
as ``arg``. A file inside a package (a folder with ``__init__.py``, as this repository's
``configs/``) imports its neighbours through that package (``from configs import default``):
before it runs, the folder that holds the package goes first on ``sys.path``, so the file finds
its own package from any working directory and whatever else is installed. Nothing of this
repository but ``vlora_jax`` is installed: a ``configs`` package of your own is never shadowed by
this one. A file outside any package imports the defaults as
``from vlora_jax.config import defaults``.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import ml_collections

from vlora_jax.config import overrides as overrides_lib


def package_root(path: str | Path) -> tuple[Path, str] | None:
  """``(the folder that holds the file's top package, that package's name)``, or None for a
  file whose folder is no package. ``configs/vit_digits.py`` -> ``(<repository>, 'configs')``."""
  folder = Path(path).resolve().parent
  if not (folder / "__init__.py").is_file():
    return None
  while (folder.parent / "__init__.py").is_file():
    folder = folder.parent
  return folder.parent, folder.name


def make_importable(path: str | Path) -> None:
  """Puts the folder above ``path``'s package first on ``sys.path``, and forgets a package of
  the same name imported from elsewhere (another project's ``configs``), so that the file's own
  ``from <package> import ...`` reads its neighbours."""
  found = package_root(path)
  if found is None:
    return
  root, name = found
  if str(root) in sys.path:
    sys.path.remove(str(root))
  sys.path.insert(0, str(root))
  loaded = sys.modules.get(name)
  here = root / name
  if loaded is not None and not any(Path(p).resolve() == here
                                    for p in getattr(loaded, "__path__", [])):
    for mod in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
      del sys.modules[mod]


def config_path(spec: str) -> str:
  """The file part of ``FILE.py[:ARG]``."""
  return spec.partition(":")[0]


def load(spec: str, lock: bool = True, **overrides):
  """Calls ``get_config(arg)`` of a config file; applies dotted ``overrides`` (values, e.g.
  ``{'optim.lr': 1e-3}``; a key the config lacks is an `overrides.OverrideError`); locks it.

  Raises what the file raises (a ``SyntaxError``, the ``ValueError`` of a bad ``:ARG``), and
  ``FileNotFoundError`` for a path that is not a file.
  """
  path, _, arg = spec.partition(":")
  p = Path(path).expanduser().resolve()
  if not p.is_file():
    raise FileNotFoundError(f"config file {path!r} not found (resolved to {p})")
  make_importable(p)
  mod_spec = importlib.util.spec_from_file_location(f"_vlora_config_{p.stem}", p)
  mod = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(mod)
  if not hasattr(mod, "get_config"):
    raise AttributeError(f"config file {path!r} defines no get_config()")
  config = mod.get_config(arg) if arg else mod.get_config()
  if not isinstance(config, ml_collections.ConfigDict):
    from vlora_jax.errors import ConfigError
    raise ConfigError(f"config {spec!r}: get_config() returned "
                      f"{'None' if config is None else 'a ' + type(config).__name__}, not an "
                      "ml_collections.ConfigDict")
  if lock:
    config.lock()
  overrides_lib.apply_values(config, overrides)
  return config
