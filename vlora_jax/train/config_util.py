"""Loading ``configs/FILE.py[:ARG]`` without absl flags (notebooks, tests, benchmarks)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import ml_collections


def load(spec: str, lock: bool = True, **overrides):
  """Calls ``get_config(arg)`` of a config file; applies dotted ``overrides``; locks the result.

  Config files import their shared defaults as ``from configs import default``: the project
  installs ``configs`` as a package (``pip install -e .``).
  """
  path, _, arg = spec.partition(":")
  p = Path(path).resolve()
  if not p.is_file():
    raise FileNotFoundError(f"config file {path!r} not found (resolved to {p})")
  mod_spec = importlib.util.spec_from_file_location(f"_vlora_config_{p.stem}", p)
  mod = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(mod)
  config = mod.get_config(arg) if arg else mod.get_config()
  if not isinstance(config, ml_collections.ConfigDict):
    from vlora_jax.errors import ConfigError
    raise ConfigError(f"config {spec!r}: get_config() returned "
                      f"{'None' if config is None else 'a ' + type(config).__name__}, not an "
                      "ml_collections.ConfigDict")
  if lock:
    config.lock()
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for k in parents:
      node = node[k]
    node[leaf] = value
  return config
