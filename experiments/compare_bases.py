"""Measures `convert.compress`'s base choices.

  python -m experiments.compare_bases --out experiments/results/compare_bases.json [--steps 800]

Trains a small dense ViT on sklearn's digits (D 64, 8 layers, patch 2; ``steps`` Adam steps, 800 by
default, a few minutes on 2 CPU cores), compresses its stack to VLoRA (compound size 4, every rank
in RANKS, anchored and cumulative) with each base rule, and prints per rule: the mean per-layer
relative weight error, the relative logits error against the dense model and the test accuracy
(the last 297 digits). Then the same weight errors for a stack that IS VLoRA (materialised from a
random anchored / cumulative VLoRA init at rank 8). Writes the rows as JSON and a markdown table
beside it; `compress`'s docstring states the conclusion (``base='first'`` is the default).
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
import optax

from vlora_jax.core import stack
from vlora_jax.convert.compress import compress, compress_tree
from vlora_jax.models.vit import ViT
from vlora_jax.core.spec import VLoRASpec

RANKS = (4, 8, 16, 32)
BASES = ("first", "mean", "auto")
MODEL = dict(num_classes=10, patch_size=2, dim=64, depth=8, num_heads=4, mlp_ratio=2.0)


def digits():
  from sklearn.datasets import load_digits  # scikit-learn ships these 1,797 images in its wheel
  x, y = load_digits(return_X_y=True)
  return (x / 16.0).astype(np.float32).reshape(-1, 8, 8, 1), y.astype(np.int32)


def train(steps: int, seed: int = 0):
  x, y = digits()
  model = ViT(**MODEL)
  params = nn.unbox(model.init(jax.random.key(seed), x[:2]))["params"]
  tx = optax.adamw(1e-3, weight_decay=0.05)
  opt = tx.init(params)

  @jax.jit
  def step(p, o, xb, yb):
    loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(
        model.apply({"params": p}, xb), yb).mean()
    g = jax.grad(loss)(p)
    u, o = tx.update(g, o, p)
    return optax.apply_updates(p, u), o

  rng = np.random.default_rng(seed)
  for _ in range(steps):
    idx = rng.integers(0, 1500, 128)
    params, opt = step(params, opt, x[idx], y[idx])
  return model, params, x[1500:], y[1500:]


def measure(steps: int) -> dict:
  model, params, x, y = train(steps)
  ref = np.asarray(model.apply({"params": params}, x))
  result = {"steps": steps, "model": MODEL, "compound_size": 4,
            "dense_test_accuracy": float((ref.argmax(-1) == y).mean()), "rows": [], "is_vlora": []}
  for mode in ("anchored", "cumulative"):
    for r in RANKS:
      spec = VLoRASpec(compound_size=4, rank=r, mode=mode)
      for base in BASES:
        p, reports = compress_tree(params, spec, base)
        out = np.asarray(model.clone(vlora=spec).apply({"params": p}, x))
        result["rows"].append({
            "mode": mode, "rank": r, "base": base,
            "weight_error": float(reports["blocks"].total.mean()),
            "logits_error": float(np.linalg.norm(out - ref) / np.linalg.norm(ref)),
            "test_accuracy": float((out.argmax(-1) == y).mean())})
      print(result["rows"][-3:], flush=True)
  for made in ("anchored", "cumulative"):
    gen = VLoRASpec(compound_size=4, rank=8, mode=made)
    v = nn.unbox(ViT(**MODEL, vlora=gen).init(jax.random.key(1), x[:2]))["params"]["blocks"]
    dense = {"per_layer": stack.materialize(v, stack.layout_from_params(v, gen))}
    for mode, r in ((made, 8), ("anchored" if made == "cumulative" else "cumulative", 32)):
      for base in BASES:
        err = compress(dense, VLoRASpec(compound_size=4, rank=r, mode=mode), base).total.mean()
        result["is_vlora"].append({"made": made, "mode": mode, "rank": r, "base": base,
                                   "weight_error": float(err)})
  return result


def markdown(result: dict, command: str) -> str:
  lines = [
      "# Compressing a trained dense stack: which base", "",
      f"A dense ViT on digits (D 64, 8 layers, patch 2, {result['steps']} Adam steps; test "
      f"accuracy {result['dense_test_accuracy']:.3f}) compressed to VLoRA with compound size 4. "
      "Cells: mean per-layer relative weight error / relative logits error / test accuracy.", "",
      "```", command, "```", "",
      "| mode | rank | " + " | ".join(BASES) + " |", "|---|---:|" + "---|" * len(BASES)]
  cell = {(r["mode"], r["rank"], r["base"]): r for r in result["rows"]}
  for mode in ("anchored", "cumulative"):
    for rank in RANKS:
      cs = [cell[(mode, rank, b)] for b in BASES]
      lines.append(f"| {mode} | {rank} | " + " | ".join(
          f"{c['weight_error']:.3f} / {c['logits_error']:.3f} / {c['test_accuracy']:.3f}"
          for c in cs) + " |")
  lines += ["", "Stacks that ARE VLoRA (materialised rank-8 inits), mean per-layer relative weight "
            "error after compression:", "", "| made | compressed as | rank | " +
            " | ".join(BASES) + " |", "|---|---|---:|" + "---:|" * len(BASES)]
  got = {(r["made"], r["mode"], r["rank"], r["base"]): r["weight_error"]
         for r in result["is_vlora"]}
  for made, mode, rank in dict.fromkeys((r["made"], r["mode"], r["rank"])
                                        for r in result["is_vlora"]):
    lines.append(f"| {made} | {mode} | {rank} | " +
                 " | ".join(f"{got[(made, mode, rank, b)]:.1e}" for b in BASES) + " |")
  return "\n".join(lines) + "\n"


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--steps", type=int, default=800, help="Adam steps of the dense ViT")
  ap.add_argument("--out", default="experiments/results/compare_bases.json")
  args = ap.parse_args(argv)
  result = measure(args.steps)
  result["environment"] = {"jax": jax.__version__, "python": platform.python_version(),
                           "machine": platform.machine()}
  command = f"python -m experiments.compare_bases --steps {args.steps} --out {args.out}"
  out = Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(result, indent=1) + "\n")
  out.with_suffix(".md").write_text(markdown(result, command))
  print(markdown(result, command))


if __name__ == "__main__":
  main()
