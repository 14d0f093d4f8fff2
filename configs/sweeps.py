"""Sweeps: named lists of runs, declared next to the configs they sweep.

A point is one run: a config file with its arg, dotted ``overrides`` (as ``--config.<key>=``), and
``tags`` that name it in tables and plots (dataset, variant, rank, compound size, depth, seed).
``experiments/sweep.py --sweep NAME`` runs a sweep locally (resumable: finished points are skipped)
and collects the results; ``experiments/paper_table.py`` and ``experiments/plots.py`` read them.

  paper_<dataset>  dense vs VLoRA (anchored = the official code, cumulative = the paper's reading)
                   at ranks 2/4/8/16, compound size 4, 3 seeds: the paper table (README)
  ablate_digits    rank x compound size x depth, and the variants (stop-gradient off, zero-B
                   init, tied) on digits, 1 seed: the ablation plots
  ablate_cifar10   what limits VLoRA on CIFAR-10: the factors' learning rate, tied weights, and
                   dense models of VLoRA's size, 3 seeds

CPU budget (2 cores, one run at a time, shared with other work): the paper sweeps use small ViTs
(D 64, or D 128 for the under-30%-of-parameters lines; 4 layers, one compound of 4, except two
CIFAR-10 probes of 8 and 12 layers) and short schedules, 210 runs in about 12.5 hours; each data
set line below says what it trains. Users with an accelerator scale them with ``--override``.
"""

from __future__ import annotations

import itertools
import os

# The data directory (../shared/data beside the repository, or $VLORA_DATA), made absolute so that a
# sweep runs from any working directory.
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.abspath(os.environ.get("VLORA_DATA", os.path.join(_REPO, "..", "shared", "data")))
SEEDS = (0, 1, 2)
RANKS = (2, 4, 8, 16)

# Fast settings for every sweep run: no TensorBoard, no progress bar, no best-checkpoint copy,
# one checkpoint at the end (it marks the point finished and lets a killed sweep resume).
QUIET = {"tensorboard": False, "progress": False, "checkpoint.keep_best": 0,
         "checkpoint.every_steps": 100_000, "checkpoint.keep": 1}

def _local(dataset: str) -> str:
  """The `vit_local.py` config of a data set under ``DATA``."""
  return f"configs/vit_local.py:{dataset},dir={DATA}"


def _schedule(steps: int, **model) -> dict:
  """Overrides: ``model.<key>`` values, ``steps`` with a 10% warm-up, one evaluation at the end."""
  return {**{f"model.{k}": v for k, v in model.items()}, "num_train_steps": steps,
          "optim.warmup_steps": steps // 10, "eval_every_steps": 0}


ACC = "eval/accuracy"
CIFAR = {"patch_size": 8, "depth": 4, "num_heads": 4}  # 16 patches + cls, 4 layers = 1 compound
SHAKESPEARE = f"configs/lm_shakespeare.py:text,file={os.path.join(DATA, 'tiny_shakespeare.txt')}"

# dataset -> (config spec, overrides, metric, what it trains)
DATASETS = {
    "digits": ("configs/vit_digits.py", {}, ACC,
               "the embedded default: 8x8 digits, D 64, 1,000 steps of 64"),
    "mnist": (_local("mnist"), _schedule(600, patch_size=7), ACC,
              "MNIST 60k/10k, 7x7 patches (16 + cls), D 64, 600 steps of 128"),
    "cifar10_subset": (_local("cifar10"), _schedule(800, dim=64, **CIFAR), ACC,
                       "exact CIFAR-10 4k/1k, 8x8 patches (16 + cls), D 64, crop+flip, "
                       "800 steps of 128 (25 epochs)"),
    "cifar10_jpeg": (_local("cifar10_jpeg"), _schedule(600, dim=64, **CIFAR), ACC,
                     "full CIFAR-10 50k/10k (JPEG q75), 8x8 patches, D 64, crop+flip, "
                     "600 steps of 128 (1.5 epochs)"),
    "shakespeare": (SHAKESPEARE, _schedule(600, dim=64), "eval/loss",
                    "char LM, D 64, 4 layers, context 64, 600 steps of 32"),
    # D 128: the width where ranks 2-4 fall under 30% of the dense parameters (at D 64 rank 2 is
    # 30.1%: the per-layer biases and norms, which VLoRA does not share, weigh more in a narrow
    # model). Longer schedules than the D 64 lines, whose MNIST run stopped far from convergence.
    "digits_d128": ("configs/vit_digits.py", {"model.dim": 128}, ACC,
                    "digits at D 128 (4 layers, 4 heads), 1,000 steps of 64"),
    "mnist_d128": (_local("mnist"), _schedule(1000, patch_size=7, dim=128), ACC,
                   "MNIST, 7x7 patches, D 128, 4 layers, 1,000 steps of 128 (2.1 epochs)"),
    # Twice the schedule: at 1,000 steps neither model had converged (dense gained 4 points from
    # the 600 steps of D 64); is the gap to dense what an unconverged VLoRA pays?
    "mnist_d128_2k": (_local("mnist"), _schedule(2000, patch_size=7, dim=128), ACC,
                      "MNIST, 7x7 patches, D 128, 4 layers, 2,000 steps of 128 (4.3 epochs)"),
    "cifar10_subset_d128": (_local("cifar10"), _schedule(1250, dim=128, **CIFAR), ACC,
                            "exact CIFAR-10 4k/1k, 8x8 patches, D 128, 4 layers, crop+flip, "
                            "1,250 steps of 128 (40 epochs)"),
    # Two compounds instead of one (8 layers; VLoRA at 28.5% of the parameters): is a single
    # compound, one full layer for the whole model, what limits VLoRA on CIFAR-10?
    "cifar10_subset_d128_L8": (_local("cifar10"), _schedule(1250, dim=128, **{**CIFAR, "depth": 8}),
                               ACC, "exact CIFAR-10 4k/1k, 8x8 patches, D 128, 8 layers = 2 "
                               "compounds of 4, crop+flip, 1,250 steps of 128 (40 epochs)"),
    # The paper's depth: 12 layers = 3 compounds of 4 (VLoRA r2 at 28.0%, r4 at 29.6%). The gap
    # narrowed from one compound to two; does a third close it?
    "cifar10_subset_d128_L12": (_local("cifar10"),
                                _schedule(1250, dim=128, **{**CIFAR, "depth": 12}), ACC,
                                "exact CIFAR-10 4k/1k, 8x8 patches, D 128, 12 layers = 3 "
                                "compounds of 4, crop+flip, 1,250 steps of 128 (40 epochs)"),
    # The full CIFAR-10 at D 128 and 3.4x the epochs of the D 64 line: does the gap to dense close
    # with a longer schedule on the full data, or is it capacity?
    "cifar10_jpeg_d128": (_local("cifar10_jpeg"), _schedule(2000, dim=128, **CIFAR), ACC,
                          "full CIFAR-10 50k/10k (JPEG q75), 8x8 patches, D 128, 4 layers, "
                          "crop+flip, 2,000 steps of 128 (5.1 epochs)"),
}


def _vlora(mode: str, rank: int, s: int = 4, **extra) -> dict:
  return {"model.vlora.enabled": True, "model.vlora.mode": mode, "model.vlora.rank": rank,
          "model.vlora.compound_size": s, **{f"model.vlora.{k}": v for k, v in extra.items()}}


# The low-rank factors A_k, B_k of every compound (the stack's inc_a / inc_b groups).
FACTORS = r".*/inc_[ab]/.*"


def point(dataset: str, variant: str, seed: int, rank: int | None = None, s: int = 4,
          depth: int | None = None, dim: int | None = None, factor_lr: float | None = None,
          **vlora_extra) -> dict:
  """One run: ``variant`` is dense | anchored | cumulative | tied (VLoRA modes).

  ``depth`` and ``dim`` replace the data set line's; ``factor_lr`` multiplies the learning rate
  of the low-rank factors only (``optim.lr_mults``).
  """
  spec, base, metric, _ = DATASETS[dataset]
  ov = dict(QUIET, **base, seed=seed)
  if depth is not None:
    ov["model.depth"] = depth
  if dim is not None:
    ov["model.dim"] = dim
  if factor_lr is not None:
    ov["optim.lr_mults"] = ((FACTORS, factor_lr),)
  if variant == "dense":
    ov["model.vlora.enabled"] = False
  else:
    ov.update(_vlora(variant, rank, s, **vlora_extra))
  # A tied run has no factors: its rank (kept in its id, which names finished runs) is no tag.
  tags = {"dataset": dataset, "variant": variant,
          "rank": rank if variant in ("anchored", "cumulative") else None,
          "s": s if variant != "dense" else None, "depth": depth or base.get("model.depth", 4),
          "seed": seed, "metric": metric, **{k: v for k, v in vlora_extra.items()}}
  name = "dense" if variant == "dense" else f"{variant}_r{rank}_s{s}"
  if depth is not None:
    name += f"_L{depth}"
  if dim is not None:
    tags["dim"] = dim
    name += f"_D{dim}"
  if factor_lr is not None:
    tags["factor_lr"] = factor_lr
    name += f"_flr{factor_lr:g}"
  name += "".join(f"_{k}={v}" for k, v in sorted(vlora_extra.items()))
  return {"id": f"{dataset}/{name}/seed{seed}", "config": spec, "overrides": ov, "tags": tags}


def paper(dataset: str, ranks=RANKS, modes=("anchored", "cumulative"), seeds=SEEDS) -> list[dict]:
  pts = [point(dataset, "dense", seed) for seed in seeds]
  pts += [point(dataset, m, seed, rank=r) for m in modes for r in ranks for seed in seeds]
  return pts


def ablate_digits(seeds=(0,)) -> list[dict]:
  pts = [point("digits", "dense", seed, depth=d) for d in (4, 8) for seed in seeds]
  for r, s, d, seed in itertools.product(RANKS, (2, 4), (4, 8), seeds):
    pts.append(point("digits", "cumulative", seed, rank=r, s=s, depth=d))
  for seed in seeds:  # the variants, at r 8, s 4, depth 4
    pts.append(point("digits", "anchored", seed, rank=8, stop_gradient_base=False))
    pts.append(point("digits", "cumulative", seed, rank=8, stop_gradient_base=False))
    pts.append(point("digits", "cumulative", seed, rank=8, init="zero_b"))
    pts.append(point("digits", "anchored", seed, rank=8, init="zero_b"))
    pts.append(point("digits", "tied", seed, rank=8))
  return pts


def ablate_cifar10(seeds=SEEDS) -> list[dict]:
  """What holds VLoRA back on CIFAR-10, where it trails dense in training fit as much as on test
  at every rank (the paper table's train column)?

  - The factors' learning rate (``factor_lr`` 4x, 16x; subset at D 64, cumulative r2): with
    kaiming-uniform A, B of entries ~1/sqrt(d) and scale alpha / r, one Adam step moves an
    increment ~sqrt(d) times less than it moves a full weight (the LoRA+ argument).
  - The increments at all (``tied``: every layer of a compound uses W_0; subset at D 64).
  - Dense at VLoRA's parameter count (the D 128 subset line, whose VLoRA r2 has 244k): narrower
    (D 64, 4 layers: 214k) and shallower (D 128, 1 layer: 227k). Is VLoRA better than a dense
    model of its own size? And at the paper's depth (the L12 line, VLoRA r2 675k): dense with one
    layer a compound (D 128, 3 layers: 623k), i.e. VLoRA's base layers without its 9 low-rank ones.
  """
  pts = [point("cifar10_subset", "cumulative", seed, rank=2, factor_lr=m)
         for m in (4.0, 16.0) for seed in seeds]
  pts += [point("cifar10_subset", "tied", seed, rank=2) for seed in seeds]
  pts += [point("cifar10_subset_d128", "dense", seed, dim=64) for seed in seeds]
  pts += [point("cifar10_subset_d128", "dense", seed, depth=1) for seed in seeds]
  pts += [point("cifar10_subset_d128_L12", "dense", seed, depth=3) for seed in seeds]
  return pts


# Every rank and both modes at D 64 (27 runs a data set); at D 128, ranks 2 and 4 (15 runs), the
# ranks that fall near or under 30% of the parameters: the CPU budget.
D128_RANKS = (2, 4)
SWEEPS = {
    "paper_digits": lambda: paper("digits"),
    "paper_cifar10_subset": lambda: paper("cifar10_subset"),
    "paper_mnist": lambda: paper("mnist"),
    "paper_shakespeare": lambda: paper("shakespeare"),
    "paper_cifar10_jpeg": lambda: paper("cifar10_jpeg"),
    "paper_digits_d128": lambda: paper("digits_d128", ranks=D128_RANKS),
    "paper_cifar10_subset_d128": lambda: paper("cifar10_subset_d128", ranks=D128_RANKS),
    "paper_mnist_d128": lambda: paper("mnist_d128", ranks=D128_RANKS),
    "paper_mnist_d128_2k": lambda: paper("mnist_d128_2k", ranks=(2,)),
    "paper_cifar10_subset_d128_L8": lambda: paper("cifar10_subset_d128_L8", ranks=(2,),
                                                  modes=("cumulative",)),
    "paper_cifar10_subset_d128_L12": lambda: paper("cifar10_subset_d128_L12", ranks=D128_RANKS,
                                                   modes=("cumulative",)),
    "paper_cifar10_jpeg_d128": lambda: paper("cifar10_jpeg_d128", ranks=(2,),
                                             modes=("cumulative",)),
    "ablate_digits": ablate_digits,
    "ablate_cifar10": ablate_cifar10,
}
PAPER = [k for k in SWEEPS if k.startswith("paper_")]


def get(name: str) -> list[dict]:
  if name not in SWEEPS:
    raise ValueError(f"--sweep={name!r}: unknown sweep; declared are {sorted(SWEEPS)}")
  return SWEEPS[name]()
