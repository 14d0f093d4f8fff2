"""ViT on scikit-learn's bundled 8x8 digits: the embedded default (no download, no data directory).

1,797 images: 359 test (the last 20% of a fixed permutation) and 1,438 train, of which 144 (a
seeded choice, data.split_seed 0) validate and 1,294 train. 4x4 patches (4 patches + class token),
D 64, 4 layers, 4 heads, 1,000 steps of batch 64. ``vlora`` (default): one compound of 4 layers
(a base layer and 3 rank-8 increments, official anchored mode): 79,306 parameters, 39% of the
dense model's 202,186. ``dense``: the same architecture with full weights in every layer.

  vlora-train --config configs/vit_digits.py --workdir runs/vit_digits
  vlora-train --config configs/vit_digits.py:dense --workdir runs/vit_digits_dense

The evaluations every 250 steps, and best/, read the validation split (``eval/accuracy``); the
test split is evaluated once, at the end (``test/accuracy``); ``summary.json`` in the workdir
holds both. Expected: about 97% test accuracy in under a minute on 2 CPU cores, compile
included. Measured by the commands above on 2 CPU cores shared with other work (load average
~8): vlora validation 97.22%, test 97.49% in 40.8 s; dense validation 98.61%, test 98.61% in
32.1 s (experiments/results/main_job/{vlora,dense}_summary.json).

``arg``: ``vlora`` | ``dense``, then optional ``r=<rank>``, ``s=<compound size>``, ``steps=<n>``,
e.g. ``configs/vit_digits.py:vlora,r=4,s=2``.
"""

from configs import default


def get_config(arg: str = "vlora"):
  a = default.parse_arg(arg, {"variant": ("vlora", ("vlora", "dense")), "r": 8, "s": 4,
                              "steps": 1000})
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
  c.model.vlora = default.vlora(enabled=a["variant"] == "vlora", compound_size=a["s"], rank=a["r"])

  c.data.source = "digits"
  c.data.mean = (0.305,)       # of the 0..16 pixels scaled to [0, 1]
  c.data.std = (0.376,)
  c.data.augment = "none"      # 8x8 digits: even 1-pixel crops cost 5 points of accuracy
  c.data.validation_fraction = 0.1  # 144 of the 1,438 train images (seeded: data.split_seed 0)

  c.batch_size = 64
  c.eval_batch_size = 360      # the whole test set (359) in one batch, and validation (144)
  c.num_train_steps = a["steps"]
  c.label_smoothing = 0.1
  c.optim.lr = 2e-3
  c.optim.warmup_steps = 50
  c.optim.weight_decay = 0.05
  c.log_every_steps = 50
  c.eval_every_steps = 250
  c.checkpoint.every_steps = 500
  return c
