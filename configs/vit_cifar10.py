"""ViT on CIFAR-10, the paper-style setup, from TFDS ``cifar10`` (``tfds.data_source`` + grain).

Architecture as the official VLoRA CIFAR config: 32x32 images, 4x4 patches (64 + class token),
D 192, 3 heads, 12 layers, MLP 768; VLoRA in 3 compounds of 4 layers with rank-8 increments on the
four big matrices, official anchored mode: 1,602,634 parameters against 5,362,762 dense (29.9%).
Recipe: AdamW (lr 1e-3, wd 0.05), 5 warmup epochs then cosine, batch 128, 200 epochs, random crop
(padding 4) + horizontal flip, label smoothing 0.1. 5,000 of the 50,000 train images (a seeded
choice) validate, so an epoch is the other 45,000; TFDS's 10,000 test images are evaluated once,
at the end (``test/accuracy``).

Launch (TFDS must have cifar10 prepared, or add --config.data.download=True with network):

  vlora-train --config configs/vit_cifar10.py --workdir runs/vit_cifar10
  vlora-train --config configs/vit_cifar10.py:dense --workdir runs/vit_cifar10_dense

Expected: not measured in this repository (a full run is ~70k steps: days on a CPU, well under an
hour on one accelerator). The paper reports VLoRA matching the dense ViT's accuracy with ~30% of
its parameters. Offline, the same model reads local files through ``configs/vit_local.py``
(``cifar10_full``: the lossless cifar10.npz that `vlora-data cifar10` writes).

``arg``: ``vlora`` | ``dense``; ``small`` (D 96, 6 layers, s=3: a CPU-sized variant); and
``r=<rank>``, ``s=<compound size>``, ``epochs=<n>``, e.g. ``configs/vit_cifar10.py:small,epochs=5``.
"""

from configs import default

TRAIN_EXAMPLES = 50_000


def train_examples(total: int, c) -> int:
  """The examples that train: the train split less the validation split carved from it."""
  return total - round(total * c.data.validation_fraction)


def get_config(arg: str = "vlora"):
  a = default.parse_arg(arg, {"variant": ("vlora", ("vlora", "dense")),
                              "size": ("paper", ("paper", "small")), "r": 8, "s": 0,
                              "epochs": 200})
  c = default.get_config()
  m = c.model
  m.name = "vit"
  m.img_size = 32
  m.in_chans = 3
  m.patch_size = 4
  m.num_classes = 10
  m.class_token = True
  m.global_pool = "token"
  m.dim, m.depth, m.num_heads = (192, 12, 3) if a["size"] == "paper" else (96, 6, 3)
  m.mlp_ratio = 4.0
  m.dropout = 0.0
  s = a["s"] or (4 if a["size"] == "paper" else 3)
  m.vlora = default.vlora(enabled=a["variant"] == "vlora", compound_size=s, rank=a["r"])

  c.data.source = "tfds"
  c.data.tfds_name = "cifar10"
  c.data.train_split = "train"
  c.data.validation_fraction = 0.1  # 5,000 of the 50,000 train images validate (TFDS test tests)
  c.data.augment = "crop_flip"  # RandomCrop(32, padding=4) + RandomHorizontalFlip
  c.data.crop_padding = 4
  c.data.mean = (0.4914, 0.4822, 0.4465)  # CIFAR-10 train statistics
  c.data.std = (0.2470, 0.2435, 0.2616)

  c.batch_size = 128
  c.eval_batch_size = 500
  steps_per_epoch = train_examples(TRAIN_EXAMPLES, c) // c.batch_size
  c.num_train_steps = a["epochs"] * steps_per_epoch
  c.label_smoothing = 0.1
  c.optim.lr = 1e-3
  c.optim.weight_decay = 0.05
  c.optim.warmup_steps = min(5 * steps_per_epoch, c.num_train_steps // 10)
  c.log_every_steps = 100
  c.eval_every_steps = 5 * steps_per_epoch
  c.checkpoint.every_steps = steps_per_epoch
  return c
