"""How far each layer's weights move from its compound's base layer, in trained runs.

  python -m experiments.layer_drift RUN [RUN ...] [--compound-size S] [--out FILE.md]

RUN is a workdir (or a checkpoint path) of a trained model. For every targeted weight (the
config's ``model.vlora.targets``) and every layer k of a compound of s layers, the drift is
``||W_k - W_0|| / ||W_0||`` (Frobenius), W_0 being the compound's first layer, averaged over the
compounds. A VLoRA run's per-layer weights are those its forward computes (``stack.merge``); a
dense run is grouped into compounds of its config's ``model.vlora.compound_size`` (or
``--compound-size``), so its drift is what untied layers do.
A large drift that buys no accuracy says the model does not lean on its increments
(experiments/results/ablate_cifar10.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from vlora_jax import models
from vlora_jax.core import stack
from vlora_jax.runs import checkpoint_format


def _stacks(tree, prefix=""):
  """``(path, per_layer dict)`` of every layer stack in a merged params tree."""
  if stack.is_stack(tree):
    yield prefix, tree["per_layer"]
  elif isinstance(tree, dict):
    for k, v in tree.items():
      yield from _stacks(v, f"{prefix}/{k}" if prefix else k)


def _get(tree: dict, path: str) -> np.ndarray:
  """The leaf at a ``/``-joined path, as float64."""
  for k in path.split("/"):
    tree = tree[k]
  return np.asarray(tree, np.float64)


def drift(run: str, compound_size: int | None = None) -> dict:
  """``{'run', 'variant', 'rank', 's', 'drift': {stack/target: [per-step drift, ...]}}``.

  ``compound_size`` groups a dense run's layers (a VLoRA run's own compounds are fixed).
  """
  meta = checkpoint_format.meta_at(run)
  vcfg = meta["config"]["model"]["vlora"]
  spec = models.vlora_spec(vcfg)
  params = checkpoint_format.read_path(run)["params"]
  merged = stack.merge(params, spec) if spec else params
  s = int(vcfg["compound_size"] if spec or compound_size is None else compound_size)
  out = {}
  for name, per_layer in _stacks(merged):
    for target in vcfg["targets"]:
      w = _get(per_layer, target)                 # [L, ...]
      if s < 2 or w.shape[0] % s:
        raise ValueError(f"{run}: {w.shape[0]} layer(s) in {name!r} do not form compounds of "
                         f"{s} >= 2 layers; pass --compound-size to group a dense run")
      w = w.reshape(w.shape[0] // s, s, -1)       # [C, s, n]
      base = np.linalg.norm(w[:, 0], axis=-1)     # [C]
      rel = np.linalg.norm(w[:, 1:] - w[:, :1], axis=-1) / base[:, None]  # [C, s-1]
      out[f"{name}/{target}"] = rel.mean(axis=0).tolist()
  variant = vcfg["mode"] if spec else "dense"
  rank = vcfg["rank"] if variant in ("cumulative", "anchored") else None
  return {"run": run, "variant": variant, "rank": rank, "s": s, "drift": out}


def markdown(results: list[dict]) -> str:
  """One row per run and weight, one column per layer after the base."""
  s = max(r["s"] for r in results)
  head = ["run", "variant", "weight", *(f"layer {k}" for k in range(1, s))]
  lines = ["| " + " | ".join(head) + " |", "|---|---|---|" + "---:|" * (s - 1)]
  for r in results:
    model = r["variant"] + (f" r{r['rank']}" if r["rank"] else "")
    for weight, d in r["drift"].items():
      lines.append(f"| {r['run']} | {model} | {weight} | " + " | ".join(f"{x:.3f}" for x in d)
                   + " |")
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("runs", nargs="+", help="workdirs or checkpoint paths")
  ap.add_argument("--compound-size", type=int, help="group dense runs' layers by this many "
                  "(default: their config's model.vlora.compound_size)")
  ap.add_argument("--out", help="also write the table to this Markdown file")
  args = ap.parse_args(argv)
  md = markdown([drift(r, args.compound_size) for r in args.runs])
  print(md)
  if args.out:
    Path(args.out).write_text(md)
  return 0


if __name__ == "__main__":
  sys.exit(main())
