"""Measures `compress`'s base choices: ``python -m vlora_jax.convert.compare_bases [steps]``.

Trains a small dense ViT on sklearn's digits (D 64, 8 layers, patch 2; ``steps`` Adam steps, 800 by
default, a few minutes on 2 CPU cores), compresses its stack to VLoRA (compound size 4, every rank
in RANKS, anchored and cumulative) with each base rule, and prints per rule: the mean per-layer
relative weight error, the relative logits error against the dense model and the test accuracy
(the last 297 digits). Then the same weight errors for a stack that IS VLoRA (materialised from a
random anchored / cumulative VLoRA init at rank 8). The results are quoted in `compress`'s docstring.
"""

from __future__ import annotations

import sys

import flax.linen as nn
import jax
import numpy as np
import optax

from vlora_jax import stack
from vlora_jax.convert.compress import compress, compress_tree
from vlora_jax.models.vit import ViT
from vlora_jax.spec import VLoRASpec

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


def main(steps: int = 800):
  model, params, x, y = train(steps)
  ref = np.asarray(model.apply({"params": params}, x))
  print(f"dense ViT on digits after {steps} steps: test accuracy {(ref.argmax(-1) == y).mean():.3f}")
  print("mode        rank  " + "  ".join(f"{b:>26}" for b in BASES))
  print("                  " + "  ".join(f"{'weight err  logit err  acc':>26}" for _ in BASES))
  for mode in ("anchored", "cumulative"):
    for r in RANKS:
      spec = VLoRASpec(compound_size=4, rank=r, mode=mode)
      cells = []
      for base in BASES:
        p, reports = compress_tree(params, spec, base)
        out = np.asarray(model.clone(vlora=spec).apply({"params": p}, x))
        dlog = np.linalg.norm(out - ref) / np.linalg.norm(ref)
        cells.append(f"{reports['blocks'].total.mean():10.3f} {dlog:10.3f} "
                     f"{(out.argmax(-1) == y).mean():5.3f}")
      print(f"{mode:<10}  {r:4d}  " + "  ".join(cells), flush=True)
  print("\nstacks that are VLoRA at rank 8 (mean per-layer relative weight error):")
  for made in ("anchored", "cumulative"):
    gen = VLoRASpec(compound_size=4, rank=8, mode=made)
    v = nn.unbox(ViT(**MODEL, vlora=gen).init(jax.random.key(1), x[:2]))["params"]["blocks"]
    dense = {"per_layer": stack.materialize(v, stack.layout_from_params(v, gen))}
    for mode, r in ((made, 8), ("anchored" if made == "cumulative" else "cumulative", 32)):
      errs = [compress(dense, VLoRASpec(compound_size=4, rank=r, mode=mode), b).total.mean()
              for b in BASES]
      print(f"  made {made:<10} compressed {mode:<10} r {r:2d}: " +
            "  ".join(f"{b} {e:.2e}" for b, e in zip(BASES, errs)))


if __name__ == "__main__":
  main(*(int(a) for a in sys.argv[1:]))
