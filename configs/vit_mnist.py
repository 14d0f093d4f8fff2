"""ViT on MNIST from TFDS ``mnist``: 28x28 grey digits, 4x4 patches (49 + class token).

D 64, 4 layers, 4 heads; VLoRA: one compound of 4 layers, rank 8 (``vlora``, default) or the dense
model (``dense``). 2,000 steps of batch 128 (about 4 epochs), AdamW lr 2e-3, cosine.

5,000 of the 60,000 train images (a seeded choice) validate: the periodic evals and best/ read
them; the 10,000 test images are evaluated once, at the end (``test/accuracy``).

Launch (TFDS must have mnist prepared, or add --config.data.download=True with network):

  vlora-train --config configs/vit_mnist.py --workdir runs/vit_mnist

Offline, from a local mnist.npz (`vlora-data mnist`): ``configs/vit_local.py:mnist``.
Expected: ~94% test accuracy in ~5 minutes on 2 CPU cores (measured offline through
``configs/vit_local.py:mnist`` when all 60,000 images trained and the test split was the eval
split: 93.7% in 315 s; experiments/results/main_job/vit_local_mnist_summary.json). The paper
table's D 128 line reaches 96.8%.

``arg``: ``vlora`` | ``dense``, then optional ``r=<rank>``, ``s=<compound size>``, ``steps=<n>``.
"""

from configs import default


def get_config(arg: str = "vlora"):
  a = default.parse_arg(arg, {"variant": ("vlora", ("vlora", "dense")), "r": 8, "s": 4,
                              "steps": 2000})
  c = default.get_config()
  m = c.model
  m.name = "vit"
  m.img_size = 28
  m.in_chans = 1
  m.patch_size = 4
  m.num_classes = 10
  m.class_token = True
  m.global_pool = "token"
  m.dim, m.depth, m.num_heads = 64, 4, 4
  m.dropout = 0.1
  m.vlora = default.vlora(enabled=a["variant"] == "vlora", compound_size=a["s"], rank=a["r"])

  c.data.source = "tfds"
  c.data.tfds_name = "mnist"
  c.data.mean = (0.1307,)      # MNIST train statistics
  c.data.std = (0.3081,)
  c.data.augment = "none"
  c.data.validation_fraction = 1 / 12  # 5,000 of the 60,000 train images validate

  c.batch_size = 128
  c.eval_batch_size = 1000
  c.num_train_steps = a["steps"]
  c.label_smoothing = 0.1
  c.optim.lr = 2e-3
  c.optim.warmup_steps = 100
  c.log_every_steps = 50
  c.eval_every_steps = 500
  c.checkpoint.every_steps = 500
  return c
