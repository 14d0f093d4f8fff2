"""A ViT-H/14-class image classifier for a TPU pod, VLoRA or dense.

ViT-H/14's shape (D 1280, 32 layers, 16 heads, MLP 5,120, 224-pixel images in 14-pixel patches:
256 patches and a class token), 1,000 classes, bfloat16 compute with float32 parameters, every
layer rematerialised (``remat=full``) and FSDP over the pod (``mesh.fsdp=-1``). VLoRA: compounds of
4 layers, rank 10 (D / 128) on the four big matrices, the official anchored chain. Dense twin
632M parameters, VLoRA 165M.

  python -m vlora_jax.compile --config configs/vit_pod.py --topology v5e:16x16
  python -m vlora_jax.compile --config configs/vit_pod.py:dense,batch=8192 --topology v5e:16x16

Training reads TFDS ``imagenet2012`` (prepared beforehand: ``data.data_dir``); the compile needs
no data.

``arg``: ``vlora`` | ``dense``; ``batch=<global batch>`` (default 4,096: 16 images per chip of a
v5e-256); ``remat=<policy>``; ``r=``, ``s=``.
"""

from configs import default


def get_config(arg: str = "vlora"):
  a = default.parse_arg(arg, {"variant": ("vlora", ("vlora", "dense")), "batch": 4096,
                              "remat": "full", "r": 10, "s": 4})
  c = default.get_config()
  m = c.model
  m.name = "vit"
  m.img_size, m.in_chans, m.patch_size, m.num_classes = 224, 3, 14, 1000
  m.class_token, m.global_pool = True, "token"
  m.dim, m.depth, m.num_heads, m.mlp_ratio = 1280, 32, 16, 4.0
  m.dropout = 0.0
  m.dtype = "bfloat16"
  m.remat = a["remat"]
  m.vlora = default.vlora(enabled=a["variant"] == "vlora", compound_size=a["s"], rank=a["r"])

  c.data.source = "tfds"
  c.data.tfds_name = "imagenet2012"
  c.data.test_split = "validation"  # ImageNet's validation set is the test split; the
  c.data.validation_fraction = 0.01  # validation split is 1% of train (12,812 images)
  c.data.augment = "crop_flip"
  c.data.mean = (0.485, 0.456, 0.406)
  c.data.std = (0.229, 0.224, 0.225)

  c.batch_size = a["batch"]
  c.eval_batch_size = a["batch"]
  c.num_train_steps = 90_000
  c.label_smoothing = 0.1
  c.optim.lr = 1e-3
  c.optim.b2 = 0.95
  c.optim.warmup_steps = 10_000
  c.optim.weight_decay = 0.05
  c.mesh.data, c.mesh.fsdp = 1, -1
  c.checkpoint.every_steps = 1000
  c.log_every_steps = 100
  c.eval_every_steps = 5000
  c.progress = False
  return c
