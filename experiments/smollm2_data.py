"""The two text domains of the SmolLM2 compress-and-heal experiment (`smollm2_heal.py`), from
files every machine has, with train / validation / test splits that no run crosses.

  shakespeare  Tiny Shakespeare (``../shared/data/tiny_shakespeare.txt``), cut into three
               contiguous character ranges, each starting at a line: the first 80% trains, the
               next 10% validates, the last 10% tests.
  python       the Python source of this interpreter's standard library
               (``sysconfig.get_paths()['stdlib']``). The unit is a top-level module (a ``.py``
               file, or a package with all its ``.py`` files): whole modules are held out, chosen
               by a seeded permutation (``held_out``), so no validation or test file is a
               neighbour of a trained one. Test suites, third-party packages and generated
               tables are left out (`EXCLUDED`).

`prepare` writes each split of each domain as a text file, plus ``heal_train.txt``, what healing
trains on: both train splits, the Python part cut (by whole modules, in the permutation's order) to
the token count of Shakespeare's, so that the two domains weigh about the same in the shuffled
windows. ``split.json`` records the choice: the seed, every module of every split, the character
and token counts and each file's sha256 (the standard library differs between Python versions:
the hashes say which text a result was measured on).

Evaluation windows (`eval_windows`): a fixed number of non-overlapping windows spread evenly over
a split's tokens, so that a held-out perplexity covers the whole split, not its first modules.
"""

from __future__ import annotations

import hashlib
import json
import sys
import sysconfig
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tiny_shakespeare.txt"
DOMAINS = ("shakespeare", "python")
SPLITS = ("train", "validation", "test")
SHAKESPEARE_CUTS = (0.8, 0.9)  # train | validation | test, as fractions of the characters
# Left out of the Python domain: test suites (most of the standard library's source by volume,
# and repetitive), third-party packages, and machine-generated text (codec tables, pydoc's topic
# strings, this build's sysconfig data) that is not code anyone wrote.
EXCLUDED = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test",
                      "__pycache__", "encodings", "pydoc_data"})
EXCLUDED_PREFIXES = ("_sysconfigdata", "config-")


def stdlib_dir() -> Path:
  return Path(sysconfig.get_paths()["stdlib"])


def contiguous_splits(text: str, cuts: tuple[float, float] = SHAKESPEARE_CUTS) -> dict[str, str]:
  """``{split: text}``: three contiguous ranges of ``text`` at ``cuts`` of its characters, each
  cut moved forward to the next line start."""
  def line_start(i: int) -> int:
    j = text.find("\n", i)
    return len(text) if j < 0 else j + 1
  a, b = (line_start(int(c * len(text))) for c in cuts)
  return {"train": text[:a], "validation": text[a:b], "test": text[b:]}


def _excluded(name: str) -> bool:
  return name in EXCLUDED or name.startswith(EXCLUDED_PREFIXES)


def stdlib_units(stdlib: Path) -> dict[str, list[Path]]:
  """``{top-level module name: its .py files, sorted}`` of a standard library directory."""
  units: dict[str, list[Path]] = {}
  for path in sorted(stdlib.iterdir()):
    if _excluded(path.name):
      continue
    if path.is_file() and path.suffix == ".py":
      units[path.stem] = [path]
    elif path.is_dir():
      files = sorted(f for f in path.rglob("*.py")
                     if not any(_excluded(p) for p in f.relative_to(stdlib).parts))
      if files:
        units[path.name] = files
  return units


def held_out(names: list[str], seed: int, fraction: float) -> dict[str, list[str]]:
  """``{split: module names}``: a permutation of the sorted ``names`` by ``seed``; its first
  ``round(fraction * n)`` (at least one) validate, the next as many test, the rest train, in the
  permutation's order."""
  names = sorted(names)
  k = max(1, round(fraction * len(names)))
  if 2 * k >= len(names):
    raise ValueError(f"held_out: {len(names)} modules cannot hold out 2 x {k} and still train")
  order = [names[i] for i in np.random.default_rng(seed).permutation(len(names))]
  return {"validation": order[:k], "test": order[k:2 * k], "train": order[2 * k:]}


def module_text(name: str, files: list[Path], stdlib: Path) -> str:
  """A module's files, each after a comment line naming it (the model sees where files join)."""
  return "".join(f"# {f.relative_to(stdlib).as_posix()}\n"
                 f"{f.read_text(encoding='utf-8', errors='replace')}\n" for f in files)


def _sha(text: str) -> str:
  return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _write(directory: Path, name: str, text: str) -> dict:
  (directory / name).write_text(text, encoding="utf-8")
  return {"file": name, "chars": len(text), "sha256": _sha(text)}


def prepare(directory: Path, tokenizer, *, seed: int, held_fraction: float = 0.1,
            shakespeare: Path = SHAKESPEARE, stdlib: Path | None = None) -> dict:
  """Writes every split of both domains and ``heal_train.txt`` into ``directory`` and returns
  the record (also ``split.json``); an existing ``split.json`` is returned as it is."""
  record_file = directory / "split.json"
  if record_file.exists():
    return json.loads(record_file.read_text())
  stdlib = stdlib or stdlib_dir()
  directory.mkdir(parents=True, exist_ok=True)
  count = lambda text: len(tokenizer.encode(text))  # noqa: E731
  files: dict = {"shakespeare": {}, "python": {}}
  shakes = contiguous_splits(shakespeare.read_text(encoding="utf-8"))
  for split, text in shakes.items():
    files["shakespeare"][split] = {**_write(directory, f"shakespeare_{split}.txt", text),
                                   "tokens": count(text)}
  units = stdlib_units(stdlib)
  modules = held_out(list(units), seed, held_fraction)
  for split in ("validation", "test"):
    text = "".join(module_text(m, units[m], stdlib) for m in modules[split])
    files["python"][split] = {**_write(directory, f"python_{split}.txt", text),
                              "tokens": count(text), "modules": modules[split]}
  # Train modules in the permutation's order until they hold as many tokens as Shakespeare's
  # train split: a random subset of the train modules, not the alphabet's first.
  budget, used, parts, tokens = files["shakespeare"]["train"]["tokens"], [], [], 0
  for m in modules["train"]:
    if tokens >= budget:
      break
    text = module_text(m, units[m], stdlib)
    parts.append(text)
    used.append(m)
    tokens += count(text)
  python_train = "".join(parts)
  files["python"]["train"] = {**_write(directory, "python_train.txt", python_train),
                              "tokens": tokens, "modules": used,
                              "modules_not_used": modules["train"][len(used):]}
  heal = shakes["train"] + "\n\n" + python_train
  record = {"seed": seed, "held_fraction": held_fraction, "shakespeare_cuts": SHAKESPEARE_CUTS,
            "shakespeare_source": str(shakespeare), "stdlib": str(stdlib),
            "python_version": sys.version.split()[0], "excluded": sorted(EXCLUDED),
            "files": files, "heal_train": {**_write(directory, "heal_train.txt", heal),
                                           "tokens": count(heal)}}
  record_file.write_text(json.dumps(record, indent=1))
  return record


def eval_windows(ids: np.ndarray, count: int, length: int) -> np.ndarray:
  """``[count, length + 1]`` int32: non-overlapping windows whose starts are spread evenly over
  ``ids`` (the first at 0, the last ending at the end); an error if the split is too short."""
  window = length + 1
  if count < 1 or len(ids) < count * window:
    raise ValueError(f"eval_windows: {len(ids)} tokens hold fewer than {count} windows of "
                     f"{window}; hold out more text or ask for fewer windows")
  starts = np.linspace(0, len(ids) - window, count).astype(np.int64) if count > 1 else [0]
  return np.stack([np.asarray(ids[s:s + window], np.int32) for s in starts])
