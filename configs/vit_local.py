"""The MNIST and CIFAR-10 configs on local ``.npz`` files (offline), as `vlora-data` writes them.

Files, read from the data directory (``$VLORA_DATA``, else ``~/.cache/vlora_jax/data``; or
``dir=``): ``mnist.npz`` (full MNIST, exact), ``cifar10.npz`` (full CIFAR-10, exact, from the
original tarball), ``cifar10_subset.npz`` (exact CIFAR-10, its first 4,000 train + 1,000 test
images), ``cifar10_jpeg_q75.npz`` (full CIFAR-10 as JPEG quality 75, decoded with Pillow as
read). `vlora-data NAME` prepares each (docs/guide.md, "Data").

  mnist          configs/vit_mnist.py's model and recipe on mnist.npz
  cifar10        configs/vit_cifar10.py's model and recipe on cifar10_subset.npz
  cifar10_full   configs/vit_cifar10.py's model and recipe on cifar10.npz (50k train)
  cifar10_jpeg   configs/vit_cifar10.py's model and recipe on cifar10_jpeg_q75.npz (50k train)

Each carves its validation split out of the train split as the config it extends does (MNIST:
5,000 images; CIFAR: 10%): evaluations while training and ``best/`` read it, and the test split
(the file's x_test) is evaluated once, at the end (``test/accuracy`` in summary.json).

  vlora-train --config configs/vit_local.py:mnist --workdir runs/vit_mnist_local
  vlora-train --config configs/vit_local.py:cifar10,small,epochs=30 --workdir runs/vit_cifar
  vlora-train --config configs/vit_local.py:cifar10_jpeg,dir=/data --workdir runs/c10

Expected: mnist 93.7% test accuracy in 315 s on 2 CPU cores (2,000 steps; measured before the
validation split was carved out, on all 60,000 train images:
experiments/results/main_job/vit_local_mnist_summary.json). The CIFAR variants are the
paper-style model; on the 4,000-image subset a ViT trained from scratch overfits (expect roughly
50-60%).

Expected time on 2 CPU cores: ``cifar10`` (200 epochs of the subset's 3,600 training images:
5,600 steps of the CIFAR config's train step, ~1.6 s each in ``docs/benchmarks.md``) ~2.5 hours;
``cifar10_jpeg`` and ``cifar10_full`` (70,200 steps) ~1.3 days; ``cifar10,small,epochs=30`` a few
minutes. Pass ``epochs=`` for a shorter run.

``arg``: the data set word, then the words and keys of the config it extends (``vlora`` |
``dense``, ``small``, ``r=``, ``s=``, ``steps=`` / ``epochs=``) and ``dir=<data directory>``.
"""

import os

from configs import default, vit_cifar10, vit_mnist

FILES = {"mnist": "mnist.npz", "cifar10": "cifar10_subset.npz",
         "cifar10_jpeg": "cifar10_jpeg_q75.npz", "cifar10_full": "cifar10.npz"}
TRAIN_EXAMPLES = {"cifar10": 4_000, "cifar10_jpeg": 50_000, "cifar10_full": 50_000}


def get_config(arg: str = "mnist"):
  words = [w for w in (arg or "mnist").split(",") if w]
  name = words[0] if words and words[0] in FILES else "mnist"
  rest = [w for w in words if w != name]
  data_dir = ""  # the data directory ($VLORA_DATA) reads a relative data.path
  for w in list(rest):
    if w.startswith("dir="):
      data_dir = w[4:]
      rest.remove(w)
  for w in rest:
    if w in FILES:
      raise ValueError(f"config arg {arg!r}: give one data set ({list(FILES)}) first")
  base_arg = ",".join(rest)
  if name == "mnist":
    c = vit_mnist.get_config(base_arg or "vlora")
  else:
    c = vit_cifar10.get_config(base_arg or "vlora")
    epochs = default.parse_arg(base_arg, {"variant": ("vlora", ("vlora", "dense")),
                                          "size": ("paper", ("paper", "small")), "r": 8, "s": 0,
                                          "epochs": 200})["epochs"]
    steps_per_epoch = vit_cifar10.train_examples(TRAIN_EXAMPLES[name], c) // c.batch_size
    c.num_train_steps = epochs * steps_per_epoch
    c.optim.warmup_steps = min(5 * steps_per_epoch, c.num_train_steps // 10)
    c.eval_every_steps = 5 * steps_per_epoch
    c.checkpoint.every_steps = 5 * steps_per_epoch
  c.data.source = "npz"        # a local .npz instead of TFDS
  c.data.path = os.path.join(data_dir, FILES[name])
  c.data.tfds_name = ""
  return c
