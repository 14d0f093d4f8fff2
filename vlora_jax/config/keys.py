"""Declared config keys: each key's type, the values it allows and the condition under which it
applies. `vlora_jax.train.schema` lists the run's keys with these; a model family declares its own
``config.model`` keys beside its code (``Family.config_keys``).

A key judges one value (`Key.check`) and can name values it must refuse (`Key.bad_values`), so the
tests that every key rejects a wrong type and an out-of-range value are generated from the same
declaration that the check uses.
"""

from __future__ import annotations

import abc
import dataclasses
import math
import re
from typing import Any, Callable

from vlora_jax import errors


def bad(key: str, value, allowed: str) -> errors.ConfigError:
  """The config error every check raises: the key, its value and what is allowed."""
  return errors.ConfigError(f"{key}={value!r}: {allowed}")


@dataclasses.dataclass(frozen=True)
class When:
  """The condition under which a key applies: ``test(config[key])`` holds (``text`` says it)."""
  key: str
  test: Callable[[Any], bool]
  text: str

  def holds(self, config) -> bool:
    return self.test(lookup(config, self.key, None))


def when_in(key: str, *values) -> When:
  return When(key, lambda v: v in values, f"{key} in {list(values)}")


def lookup(config, dotted: str, default=KeyError):
  """``config['a']['b']`` for ``'a.b'``; ``default`` where a part is missing."""
  node = config
  for k in dotted.split("."):
    if not hasattr(node, "get") or k not in node:
      if default is KeyError:
        raise KeyError(dotted)
      return default
    node = node[k]
  return node


def fill(config, dotted: str, value) -> None:
  """Sets ``'a.b'`` of an unlocked ``config`` to ``value`` if it is absent (a default), making the
  groups on the way. A group that is absent whose name is VLoRA's or LoRA's (``vlora``, ``lora``)
  is not made: without one a model is dense (has no LoRA). A part that is not a group leaves
  the key alone (the schema names that value)."""
  *groups, last = dotted.split(".")
  node = config
  for g in groups:
    if g not in node:
      if g in ("vlora", "lora"):
        return
      node[g] = {}
    node = node[g]
    if not hasattr(node, "items"):
      return
  if last not in node:
    node[last] = value


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def _interval(lo, hi, lo_open, hi_open) -> str:
  if lo is not None and hi is not None:
    return f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
  if lo is not None:
    return f"{'>' if lo_open else '>='} {lo:g}"
  if hi is not None:
    return f"{'<' if hi_open else '<='} {hi:g}"
  return ""


@dataclasses.dataclass(frozen=True)
class Key(abc.ABC):
  """One config key. Subclasses say what a value must be (`problem`) and name bad values.

  Attributes:
    doc: what the key does (one line; the commented ``configs/default.py`` has the long form).
    when: the key applies only when this holds (None: always); it is not checked otherwise.
    required: a config must have the key; others may be absent, and then take their default.
    nullable: None is allowed too (it means the documented default).
    default: what a config that leaves the key out gets, for a family's own ``config.model``
      keys (`Family.model_config`); the run's common keys take theirs from the default config,
      ``vlora_jax/config/defaults.py`` (`train.schema.complete`), each written once.
  """
  doc: str = ""
  when: When | None = None
  required: bool = False
  nullable: bool = False
  default: Any = None

  @abc.abstractmethod
  def allowed(self) -> str:
    """What the key allows, for messages and docs/config.md."""

  @abc.abstractmethod
  def problem(self, value) -> bool:
    """True if ``value`` is not allowed."""

  def check(self, key: str, value) -> None:
    if self.problem(value):
      raise bad(key, value, f"must be {self.allowed()}")

  @abc.abstractmethod
  def bad_values(self) -> dict[str, Any]:
    """``{'wrong type': v, 'out of range': v}``: values this key must refuse (tests)."""

  def _refuses(self, value) -> bool:
    """`problem` for keys whose `check` walks the value (its error names the failing item)."""
    try:
      self.check("", value)
    except errors.ConfigError:
      return True
    return False


@dataclasses.dataclass(frozen=True)
class Int(Key):
  lo: int | None = None
  hi: int | None = None

  def allowed(self) -> str:
    return f"an integer {_interval(self.lo, self.hi, False, False)}".rstrip()

  def problem(self, v) -> bool:
    return (not _is_int(v) or (self.lo is not None and v < self.lo)
            or (self.hi is not None and v > self.hi))

  def bad_values(self):
    out = {"wrong type": 2.5}
    if self.lo is not None:
      out["out of range"] = self.lo - 1
    elif self.hi is not None:
      out["out of range"] = self.hi + 1
    return out


@dataclasses.dataclass(frozen=True)
class Float(Key):
  """A finite number (an int is accepted: ml_collections promotes it) in an interval."""
  lo: float | None = None
  hi: float | None = None
  lo_open: bool = False
  hi_open: bool = False

  def allowed(self) -> str:
    return f"a finite number {_interval(self.lo, self.hi, self.lo_open, self.hi_open)}".rstrip()

  def problem(self, v) -> bool:
    if not _is_number(v) or not math.isfinite(v):
      return True
    if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
      return True
    return self.hi is not None and (v >= self.hi if self.hi_open else v > self.hi)

  def bad_values(self):
    out = {"wrong type": "0.1", "not finite": float("nan")}
    if self.lo is not None:
      out["out of range"] = float(self.lo) - (0.0 if self.lo_open else 1.0)
    elif self.hi is not None:
      out["out of range"] = float(self.hi) + (0.0 if self.hi_open else 1.0)
    else:
      out["out of range"] = float("inf")
    return out


@dataclasses.dataclass(frozen=True)
class Bool(Key):
  def allowed(self) -> str:
    return "True or False"

  def problem(self, v) -> bool:
    return not isinstance(v, bool)

  def bad_values(self):
    return {"wrong type": "yes"}


@dataclasses.dataclass(frozen=True)
class Str(Key):
  """A string; ``nonempty`` refuses ''."""
  nonempty: bool = False

  def allowed(self) -> str:
    return "a non-empty string" if self.nonempty else "a string"

  def problem(self, v) -> bool:
    return not isinstance(v, str) or (self.nonempty and not v)

  def bad_values(self):
    return {"wrong type": 7, **({"out of range": ""} if self.nonempty else {})}


@dataclasses.dataclass(frozen=True)
class Choice(Key):
  choices: tuple = ()

  def allowed(self) -> str:
    return f"one of {list(self.choices)}"

  def problem(self, v) -> bool:
    return not any(type(v) is type(c) and v == c for c in self.choices)

  def check(self, key: str, value) -> None:
    if self.problem(value):
      raise bad(key, value, f"allowed are {list(self.choices)}")

  def bad_values(self):
    return {"wrong type": 3.5, "out of range": "no_such_choice"}


def _regex_error(p) -> str | None:
  if not isinstance(p, str):
    return "must be a regex string"
  try:
    re.compile(p)
  except re.error as e:
    return f"is not a valid regex ({e})"
  return None


@dataclasses.dataclass(frozen=True)
class Regex(Key):
  """A Python regex, full-matched against ``/``-joined parameter paths ('' = none)."""

  def allowed(self) -> str:
    return "a regex string"

  def problem(self, v) -> bool:
    return _regex_error(v) is not None

  def check(self, key: str, value) -> None:
    why = _regex_error(value)
    if why:
      raise bad(key, value, why)

  def bad_values(self):
    return {"wrong type": 7, "out of range": "(unclosed"}


@dataclasses.dataclass(frozen=True)
class Regexes(Key):
  """One regex or a non-empty sequence of them."""

  def allowed(self) -> str:
    return "a regex string or a non-empty sequence of them"

  def check(self, key: str, value) -> None:
    items = (value,) if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not items:
      raise bad(key, value, f"must be {self.allowed()}")
    for i, p in enumerate(items):
      why = _regex_error(p)
      if why:
        raise bad(f"{key}[{i}]", p, why)

  def problem(self, v) -> bool:
    return self._refuses(v)

  def bad_values(self):
    return {"wrong type": 7, "out of range": ("(unclosed",)}


@dataclasses.dataclass(frozen=True)
class Rules(Key):
  """``((regex, multiplier), ...)``: a multiplier is a finite number >= 0."""

  def allowed(self) -> str:
    return "a sequence of (regex, multiplier >= 0) pairs"

  def check(self, key: str, value) -> None:
    if not isinstance(value, (list, tuple)):
      raise bad(key, value, f"must be {self.allowed()}")
    for i, pair in enumerate(value):
      if not isinstance(pair, (list, tuple)) or len(pair) != 2:
        raise bad(f"{key}[{i}]", pair, "must be a (regex, multiplier) pair")
      why = _regex_error(pair[0])
      if why:
        raise bad(f"{key}[{i}]", pair[0], why)
      if not _is_number(pair[1]) or not math.isfinite(pair[1]) or pair[1] < 0:
        raise bad(f"{key}[{i}]", pair[1], "the multiplier must be a finite number >= 0")

  def problem(self, v) -> bool:
    return self._refuses(v)

  def bad_values(self):
    return {"wrong type": "x", "out of range": ((".*", -1.0),), "bad regex": (("(x", 1.0),)}


@dataclasses.dataclass(frozen=True)
class Numbers(Key):
  """A number or a non-empty sequence of numbers, each judged by ``each``."""
  each: Key = Float()

  def allowed(self) -> str:
    return f"{self.each.allowed()}, or a non-empty sequence of them"

  def problem(self, v) -> bool:
    items = v if isinstance(v, (list, tuple)) else (v,)
    return not items or any(self.each.problem(x) for x in items)

  def bad_values(self):
    each = self.each.bad_values()
    return {"wrong type": "x", **{k: (v,) for k, v in each.items() if k != "wrong type"}}


@dataclasses.dataclass(frozen=True)
class Anything(Key):
  """A key whose values a cross-field rule judges (``sharding_rules``): only its presence counts."""

  def allowed(self) -> str:
    return "see its rule"

  def problem(self, v) -> bool:
    return False

  def bad_values(self):
    return {}
