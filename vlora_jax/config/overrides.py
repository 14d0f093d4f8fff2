"""``--config.KEY=VALUE``: the one reader of config overrides, for every command that takes them.

``vlora-train``, ``vlora-params``, ``vlora-evaluate`` (and `train.load_config`'s keyword
overrides, which are values already) set a config key the same way:

  --config.optim.lr=3e-4                   a number
  --config.model.vlora.rank=4,4,2,2        a sequence: ``4,4,2,2``, ``(4,4,2,2)`` or ``[4,4,2,2]``
  --config.data.mean=0.5                   one number where the key holds a sequence: ``(0.5,)``
  --config.progress=false                  a bool: true / false / 1 / 0, any case
  --config.data.path=runs/a b.txt          a key that holds text takes the text as it is
  --config.data.split_seed=None            None, where the key allows it
  --config.optim.lr 3e-4                   the value may also be the next argument

A value is read by what the key holds now: text for a text key, a bool for a bool key, otherwise a
Python literal (a number, a tuple, None), or the text itself where it is none (the schema then
names the key and what it allows). A key the config does not have is one line naming it and the
nearest key there is. This module imports no JAX: a bad override is refused at once.
"""

from __future__ import annotations

import ast
import difflib
from typing import Any, Iterable

from vlora_jax.errors import ConfigError

PREFIX = "--config."


class OverrideError(ConfigError):
  """An override that names no key of the config, has no value, or cannot be set."""


def split(argv: Iterable[str]) -> tuple[list[tuple[str, str]], list[str]]:
  """``argv`` -> ``([(key, text), ...], the other arguments)``, in order.

  ``--config.a.b=1`` and ``--config.a.b 1`` both give ``('a.b', '1')``; an override with no value
  is an `OverrideError`.
  """
  pairs, rest = [], []
  args = list(argv)
  i = 0
  while i < len(args):
    token = args[i]
    if not token.startswith(PREFIX):
      rest.append(token)
      i += 1
      continue
    key, eq, text = token[len(PREFIX):].partition("=")
    if not key:
      raise OverrideError(f"{token!r}: no key after --config.; write --config.KEY=VALUE")
    if not eq:
      if i + 1 >= len(args) or args[i + 1].startswith("--"):
        raise OverrideError(f"{token}: no value; write {token}=VALUE")
      text, i = args[i + 1], i + 1
    pairs.append((key, text))
    i += 1
  return pairs, rest


def parse_value(text: str, current: Any) -> Any:
  """The text of an override as a value for a key that holds ``current`` (see the module doc)."""
  if isinstance(current, str):
    return text
  if isinstance(current, bool):
    return {"true": True, "1": True, "false": False, "0": False}.get(text.strip().lower(), text)
  try:
    value = ast.literal_eval(text.strip())
  except (ValueError, SyntaxError, MemoryError, RecursionError):
    return text
  if isinstance(value, list):
    value = tuple(value)
  if isinstance(current, (list, tuple)) and _is_number(value):
    value = (value,)  # '--config.data.mean=0.5' for a one-channel mean
  return value


def _is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def _fit(value: Any, current: Any) -> Any:
  """``value`` in the container type the key holds (a stored JSON config holds lists), and a
  whole number as a float where the key holds a float."""
  if isinstance(current, list) and isinstance(value, tuple):
    return list(value)
  if isinstance(current, tuple) and isinstance(value, list):
    return tuple(value)
  if isinstance(current, float) and _is_number(value):
    return float(value)
  return value


def _keys_of(node) -> list[str]:
  return [str(k) for k in node.keys()]


def _is_group(node) -> bool:
  return hasattr(node, "keys") and hasattr(node, "__getitem__") and not isinstance(node, str)


def _no_key(key: str, node, depth: int) -> OverrideError:
  """The error for ``--config.<key>`` whose part ``depth`` is not a key of ``node``."""
  parts = key.split(".")
  where = ".".join(parts[:depth]) or "the config"
  near = difflib.get_close_matches(parts[depth], _keys_of(node), n=1)
  hint = f"; did you mean {near[0]!r}?" if near else f"; its keys are {sorted(_keys_of(node))}"
  return OverrideError(f"{PREFIX}{key}: no config key {parts[depth]!r} in {where}{hint}")


def set_key(config, key: str, value: Any, *, text: str | None = None) -> Any:
  """Sets the dotted ``key`` of ``config`` (a ConfigDict or a nested dict) to ``value``, parsed
  from ``text`` when that is given; returns the value set. A key the config lacks, or a value the
  config's own types refuse, is an `OverrideError` naming the override."""
  *parents, leaf = key.split(".")
  node = config
  for depth, part in enumerate(parents):
    if not _is_group(node) or part not in node.keys():
      raise _no_key(key, node, depth)
    node = node[part]
    if not _is_group(node):
      raise OverrideError(f"{PREFIX}{key}: {'.'.join(parents[:depth + 1])} is a value, not a "
                          "group of keys")
  if not _is_group(node) or leaf not in node.keys():
    raise _no_key(key, node, len(parents))
  current = node[leaf]
  if _is_group(current):
    raise OverrideError(f"{PREFIX}{key} is a group of keys ({sorted(_keys_of(current))}); set "
                        "one of them")
  if text is not None:
    value = parse_value(text, current)
  value = _fit(value, current)
  try:
    node[leaf] = value
  except (TypeError, ValueError) as e:
    shown = text if text is not None else repr(value)
    raise OverrideError(f"{PREFIX}{key}={shown}: the key holds {type(current).__name__} values "
                        f"such as {current!r} ({e})") from None
  return value


def apply(config, pairs: Iterable[tuple[str, str]]) -> dict[str, Any]:
  """Applies ``[(key, text), ...]`` (`split`'s) to ``config``; returns ``{key: value set}``."""
  return {key: set_key(config, key, None, text=text) for key, text in pairs}


def apply_values(config, values: dict[str, Any]) -> None:
  """Applies ``{dotted key: value}`` (values, not text: `train.load_config`'s keywords)."""
  for key, value in values.items():
    set_key(config, key, value)
