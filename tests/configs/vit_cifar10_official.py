"""The CIFAR-10 ViT with the official VLoRA choices (a test copy for the parameter-table tool).

  python -m vlora_jax.tools.params --config tests/configs/vit_cifar10_official.py        # VLoRA
  python -m vlora_jax.tools.params --config tests/configs/vit_cifar10_official.py:dense  # dense

Expected: VLoRA 1,602,634 vs dense 5,362,762 (the official package's counts, VLORA.md).
"""

import ml_collections


def get_config(arg: str | None = None):
  config = ml_collections.ConfigDict()
  m = config.model = ml_collections.ConfigDict()
  m.name = "vit"
  m.img_size = 32        # CIFAR images
  m.in_chans = 3
  m.patch_size = 4       # 8 x 8 = 64 patches + class token
  m.num_classes = 10
  m.dim = 192
  m.depth = 12           # total layers: 3 compounds x 4
  m.num_heads = 3
  m.mlp_ratio = 4.0
  m.class_token = True
  m.global_pool = "token"
  m.dropout = 0.0
  m.dtype = "float32"
  m.scan = True
  m.remat = "none"
  v = m.vlora = ml_collections.ConfigDict()
  v.enabled = arg != "dense"  # ':dense' counts the dense model alone
  v.compound_size = 4
  v.targets = ["attn/qkv/kernel", "attn/proj/kernel", "mlp/fc1/kernel", "mlp/fc2/kernel"]
  v.rank = 8
  v.alpha = 1.0
  v.mode = "anchored"           # what the official code computes
  v.stop_gradient_base = True
  v.scaling = "standard"
  v.init = "official"
  return config
