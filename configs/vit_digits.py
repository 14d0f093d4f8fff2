"""ViT on scikit-learn's bundled 8x8 digits: the embedded default (no download, no data directory).

1,797 images (1,438 train / 359 test, a fixed split), 4x4 patches (4 patches + class token), D 64,
4 layers, 4 heads. ``vlora`` (default): one compound of 4 layers, rank 8; ``dense``: the same
architecture with full weights in every layer.

Launch (from the repository root):

  python -m vlora_jax.main --config configs/vit_digits.py --workdir /tmp/vit_digits
  python -m vlora_jax.main --config configs/vit_digits.py:dense --workdir /tmp/vit_digits_dense

Expected: >= 95% test accuracy in under 2 minutes on 2 CPU cores (see the README for measured
numbers); ``summary.json`` in the workdir holds the final metrics.

``arg``: ``vlora`` | ``dense`` | ``vlora,r=4,s=2`` (rank and compound size) | add ``,steps=N``.
"""

from configs import default


def parse_arg(arg: str) -> dict:
  """``'vlora,r=4,s=2,steps=300'`` -> {'variant': 'vlora', 'r': '4', ...}."""
  parts = [p for p in (arg or "vlora").split(",") if p]
  out = {"variant": parts[0] if parts and "=" not in parts[0] else "vlora"}
  for p in parts:
    if "=" in p:
      k, v = p.split("=", 1)
      out[k.strip()] = v.strip()
  if out["variant"] not in ("vlora", "dense"):
    raise ValueError(f"config arg {arg!r}: the variant must be 'vlora' or 'dense'")
  return out


def get_config(arg: str = "vlora"):
  a = parse_arg(arg)
  c = default.get_config()
  c.model.name = "vit"
  c.model.img_size = 8         # digits are 8x8, grey
  c.model.in_chans = 1
  c.model.patch_size = 4       # 4 patches of 4x4 (2x2 patches learned much more slowly)
  c.model.num_classes = 10
  c.model.class_token = True
  c.model.global_pool = "token"
  c.model.dim = 64
  c.model.depth = 4
  c.model.num_heads = 4
  c.model.dropout = 0.1        # with label smoothing: ~98% instead of ~95.5% (1,438 images overfit)
  c.model.vlora = default.vlora(enabled=a["variant"] == "vlora",
                                compound_size=int(a.get("s", 4)), rank=int(a.get("r", 8)))

  c.data.source = "digits"
  c.data.mean = (0.305,)       # of the 0..16 pixels scaled to [0, 1]
  c.data.std = (0.376,)
  c.data.augment = "none"      # 8x8 digits: crops would cut strokes off

  c.batch_size = 64
  c.eval_batch_size = 360      # the whole test set in one batch
  c.num_train_steps = int(a.get("steps", 1000))
  c.label_smoothing = 0.1
  c.optim.lr = 2e-3
  c.optim.warmup_steps = 50
  c.optim.weight_decay = 0.05
  c.log_every_steps = 50
  c.eval_every_steps = 250
  c.checkpoint.every_steps = 500
  return c
