"""What a VLoRA parameterisation is (`VLoRASpec`) and how it lays out one block's parameters.

`VLoRASpec` is the user-facing description (config keys ``vlora.*``); it validates itself on
construction. `VLoRASpec.layout` matches it against the parameter shapes of one block and returns a
`Layout`: for every parameter path, whether it stays full per layer or is targeted (low-rank or
full-vector increments, or tied), with its rank and scale. Everything downstream (the stack, counting,
import, compression, checkpoint metadata) reads the layout; nothing re-derives it.

All checks run on shapes only (``jax.eval_shape``), so bad input fails before anything compiles.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping, Sequence

from vlora_jax.core import chain

# The four big matrices of a transformer block, as the official code targets them
# (attn.qkv, attn.proj, mlp.fc1, mlp.fc2 in timm's names, which our blocks keep).
VIT_TARGETS = (r"attn/qkv/kernel", r"attn/proj/kernel", r"mlp/fc1/kernel", r"mlp/fc2/kernel")


def _per_target(field: str, value, targets: tuple[str, ...]) -> tuple:
  """A scalar, a list in the order of ``targets`` or a {pattern: value} dict -> a tuple."""
  if isinstance(value, Mapping):
    unknown = sorted(set(value) - set(targets))
    missing = [t for t in targets if t not in value]
    if unknown or missing:
      raise ValueError(
          f"vlora.{field}: dict keys must be exactly the target patterns {list(targets)}; "
          f"unknown {unknown}, missing {missing}")
    return tuple(value[t] for t in targets)
  if isinstance(value, (list, tuple)):
    if len(value) != len(targets):
      raise ValueError(
          f"vlora.{field}={list(value)} has {len(value)} entries but vlora.targets has "
          f"{len(targets)} ({list(targets)}); give one value per target or a single value")
    return tuple(value)
  return (value,) * len(targets)


def match_targets(field: str, targets: Sequence[str], shapes: Mapping[str, Sequence[int]]
                  ) -> list[tuple[str, tuple[int, ...], int | None]]:
  """``[(path, shape, index of the first target that full-matches the path, or None)]`` over one
  block's ``{path: shape}``, sorted by path (so that layouts compare equal).

  Raises if a target matches no parameter: a typo would otherwise change nothing, silently.
  ``field`` names the config key in the message (``vlora.targets``, ``lora.targets``).
  """
  out, used = [], set()
  for path, shape in sorted(shapes.items()):
    hit = next((i for i, t in enumerate(targets) if re.fullmatch(t, path)), None)
    if hit is not None:
      used.add(hit)
    out.append((path, tuple(shape), hit))
  for i, t in enumerate(targets):
    if i not in used:
      raise ValueError(f"{field}[{i}]={t!r} matches no parameter of the block; "
                       f"its parameters are {sorted(shapes)}")
  return out


@dataclasses.dataclass(frozen=True)
class VLoRASpec:
  """A VLoRA parameterisation of a layer stack.

  Attributes:
    compound_size: layers per compound ``s``; layer 0 of each compound is a full base layer.
    targets: regexes, full-matched against ``/``-joined parameter paths inside one block
      (e.g. ``attn/qkv/kernel``). Each must match at least one parameter.
    rank: LoRA rank ``r`` of the increments: one int, a list (one per target) or a
      ``{pattern: rank}`` dict.
    alpha: the increment scale numerator, same forms as ``rank`` (official default 1).
    mode: ``cumulative`` (the paper: W_k = W_{k-1} + dW_k), ``anchored`` (the official code:
      W_k = W_0 + dW_k), ``tied`` (no increments: weight sharing inside a compound) or
      ``relaxed`` (Relaxed Recursive Transformers: W_k = W_0 + dW_k for every layer, the first
      included, with W_0 a shared weight that is no layer of its own).
    stop_gradient_base: detach W_0 in layers k >= 1 (the official code does; not ``relaxed``,
      whose W_0 is no layer that could keep its gradient).
    scaling: ``standard`` (alpha / r) or ``rslora`` (alpha / sqrt(r)).
    init: ``official`` (kaiming-uniform(a=sqrt 5) on A and B) or ``zero_b`` (B = 0).
  """

  compound_size: int = 4
  targets: tuple[str, ...] = VIT_TARGETS
  rank: Any = 8
  alpha: Any = 1.0
  mode: str = "cumulative"
  stop_gradient_base: bool = False
  scaling: str = "standard"
  init: str = "official"

  def __post_init__(self):
    targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
    object.__setattr__(self, "targets", targets)
    if not isinstance(self.compound_size, int) or self.compound_size < 1:
      raise ValueError(f"vlora.compound_size={self.compound_size!r}: must be an integer >= 1")
    if not targets:
      raise ValueError("vlora.targets is empty: give at least one parameter-path pattern")
    for i, t in enumerate(targets):
      try:
        re.compile(t)
      except re.error as e:
        raise ValueError(f"vlora.targets[{i}]={t!r} is not a valid regex ({e}): each target must be "
                         "a Python regex full-matched against block parameter paths") from None
    if self.mode not in chain.MODES:
      raise ValueError(f"vlora.mode={self.mode!r}: allowed are {list(chain.MODES)}")
    if self.mode == "relaxed" and self.stop_gradient_base:
      raise ValueError("vlora.stop_gradient_base=True with vlora.mode='relaxed': the relaxed base "
                       "is no layer of its own, so detaching it would leave it untrained; set "
                       "stop_gradient_base=False")
    if self.scaling not in chain.SCALINGS:
      raise ValueError(f"vlora.scaling={self.scaling!r}: allowed are {list(chain.SCALINGS)}")
    if self.init not in chain.INITS:
      raise ValueError(f"vlora.init={self.init!r}: allowed are {list(chain.INITS)}")
    ranks = _per_target("rank", self.rank, targets)
    alphas = _per_target("alpha", self.alpha, targets)
    for t, r in zip(targets, ranks):
      if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"vlora.rank={r!r} for target {t!r}: must be an integer >= 1")
    for t, a in zip(targets, alphas):
      if isinstance(a, bool) or not isinstance(a, (int, float)) or not a > 0:
        raise ValueError(f"vlora.alpha={a!r} for target {t!r}: must be a number > 0")
    object.__setattr__(self, "rank", ranks if len(set(ranks)) > 1 else ranks[0])
    object.__setattr__(self, "alpha", alphas if len(set(alphas)) > 1 else float(alphas[0]))

  @classmethod
  def official(cls, **overrides) -> "VLoRASpec":
    """What the official PyTorch code computes: anchored, W_0 detached, both factors random."""
    kw = dict(mode="anchored", stop_gradient_base=True, init="official", alpha=1.0,
              scaling="standard")
    kw.update(overrides)
    return cls(**kw)

  @property
  def ranks(self) -> tuple[int, ...]:
    return _per_target("rank", self.rank, self.targets)

  @property
  def alphas(self) -> tuple[float, ...]:
    return _per_target("alpha", self.alpha, self.targets)

  def check_depth(self, num_layers: int) -> None:
    if num_layers % self.compound_size:
      raise ValueError(
          f"vlora.compound_size={self.compound_size} does not divide num_layers={num_layers}: "
          f"allowed compound sizes are {[s for s in range(1, num_layers + 1) if num_layers % s == 0]}")

  def layout(self, shapes: Mapping[str, Sequence[int]], num_layers: int) -> "Layout":
    """Matches the targets against one block's ``{path: shape}`` and checks every rank."""
    self.check_depth(num_layers)
    entries = []
    for path, shape, hit in match_targets("vlora.targets", self.targets, shapes):
      if hit is None:
        entries.append(Entry(path, shape, "full"))
      elif self.mode == "tied":
        entries.append(Entry(path, shape, "tied"))
      elif len(shape) == 0:
        raise ValueError(f"vlora.targets[{hit}]={self.targets[hit]!r} matches the scalar {path!r}: "
                         "only parameters with at least one axis can carry increments")
      elif len(shape) == 1:
        entries.append(Entry(path, shape, "vector"))
      else:
        d_in, d_out = math.prod(shape[:-1]), shape[-1]
        r, a = self.ranks[hit], self.alphas[hit]
        if r > min(d_in, d_out):
          raise ValueError(
              f"vlora.rank={r} for {path!r} (shape {shape}, d_in={d_in}, d_out={d_out}): "
              f"must be between 1 and min(d_in, d_out)={min(d_in, d_out)}")
        entries.append(Entry(path, shape, "lowrank", rank=r, alpha=a,
                             scale=chain.lora_scale(a, r, self.scaling), d_in=d_in, d_out=d_out))
    return Layout(self, num_layers, tuple(entries))


@dataclasses.dataclass(frozen=True)
class Entry:
  """One parameter of the block and its role in the stack."""
  path: str
  shape: tuple[int, ...]
  role: str  # full | lowrank | vector | tied
  rank: int = 0
  alpha: float = 0.0
  scale: float = 0.0
  d_in: int = 0
  d_out: int = 0


@dataclasses.dataclass(frozen=True)
class Layout:
  """A spec resolved against one block: the single source of truth for the stack's parameters."""
  spec: VLoRASpec | None
  num_layers: int
  entries: tuple[Entry, ...]

  @property
  def compounds(self) -> int:
    return self.num_layers // self.compound_size

  @property
  def compound_size(self) -> int:
    return self.spec.compound_size if self.spec else 1

  @property
  def steps(self) -> int:
    """Increments per compound and targeted parameter (`chain.num_steps`; 0 when dense)."""
    return chain.num_steps(self.spec.mode, self.compound_size) if self.spec else 0

  def by_role(self, *roles: str) -> list[Entry]:
    return [e for e in self.entries if e.role in roles]

  def to_json(self) -> dict:
    """What a checkpoint stores to refuse restoring into a different layout."""
    spec = dataclasses.asdict(self.spec) if self.spec else None
    if spec:
      spec["targets"] = list(spec["targets"])
      for k in ("rank", "alpha"):
        spec[k] = list(spec[k]) if isinstance(spec[k], tuple) else spec[k]
    return {"num_layers": self.num_layers, "vlora": spec,
            "params": {e.path: {"shape": list(e.shape), "role": e.role, "rank": e.rank}
                       for e in self.entries}}


def dense_layout(shapes: Mapping[str, Sequence[int]], num_layers: int) -> Layout:
  return Layout(None, num_layers, tuple(Entry(p, tuple(s), "full") for p, s in sorted(shapes.items())))
