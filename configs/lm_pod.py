"""Language models for a TPU pod: a dense twin of about 1B, 8B or 70B parameters, VLoRA or dense.

Decoder-only (the ``lm`` family: pre-norm blocks, rotary positions, GELU MLP), 2,048-token
context, a 32k vocabulary, bfloat16 compute with float32 parameters, every layer rematerialised
(``remat=full``), and FSDP over the whole pod (``mesh.fsdp=-1``: parameters, gradients and AdamW's
moments sharded over every chip, each chip's activations its own sequences'). VLoRA: compounds of
4 layers, rank D / 128 (16, 32, 64), the official anchored chain.

  size  D      layers  heads  MLP      dense twin   VLoRA
  1b    2048   24      16     8192     1.34B        0.45B
  8b    4096   32      32     21504    8.05B        2.27B
  70b   8192   80      64     36864    70.3B        18.5B

What each needs per chip is measured by compiling its train step for the pod on any machine
(docs/pod.md has the table, benchmarks/results/pod_scale.json the figures):

  python -m vlora_jax.compile --config configs/lm_pod.py:8b --topology v5e:16x16
  python -m vlora_jax.compile --config configs/lm_pod.py:8b,dense,batch=128 --topology v5p:4x4x8

The compile needs no data. Training reads a text file (``file=<path>``, or ``data.path``),
tokenized by characters: set ``data`` to your corpus.

``arg``: ``1b`` | ``8b`` | ``70b``; ``vlora`` | ``dense``; ``batch=<global batch>`` (default 256,
one sequence per chip of a v5e-256); ``remat=<policy>`` (vlora_jax/remat.py); ``r=``, ``s=``;
``d=<width>,layers=<depth>`` for any other size (heads of 128 dims, MLP 4.5 D).
"""

from configs import default

SIZES = {  # D, layers, heads, MLP width
    "1b": (2048, 24, 16, 8192),
    "8b": (4096, 32, 32, 21504),
    "70b": (8192, 80, 64, 36864),
}


def get_config(arg: str = "1b"):
  a = default.parse_arg(arg, {"size": ("1b", tuple(SIZES)),
                              "variant": ("vlora", ("vlora", "dense")), "batch": 256,
                              "remat": "full", "r": 0, "s": 4, "d": 0, "layers": 0,
                              "file": "corpus.txt"})
  dim, depth, heads, mlp = SIZES[a["size"]]
  if a["d"]:
    dim, depth, heads, mlp = a["d"], a["layers"] or depth, a["d"] // 128, a["d"] * 9 // 2
  c = default.get_config()
  m = c.model
  m.name = "lm"
  m.vocab_size = 32768
  m.max_len = 2048
  m.positions = "rope"
  m.tie_embeddings = False
  m.dim, m.depth, m.num_heads, m.mlp_ratio = dim, depth, heads, mlp / dim
  m.dropout = 0.0
  m.dtype = "bfloat16"
  m.remat = a["remat"]
  m.vlora = default.vlora(enabled=a["variant"] == "vlora", compound_size=a["s"],
                          rank=a["r"] or dim // 128)

  c.data.source = "text"
  c.data.path = a["file"]
  c.data.eval_fraction = 0.01
  c.data.eval_examples = 1024

  c.batch_size = a["batch"]
  c.eval_batch_size = a["batch"]
  c.num_train_steps = 100_000
  c.optim.lr = 3e-4
  c.optim.b2 = 0.95
  c.optim.warmup_steps = 2000
  c.optim.weight_decay = 0.1
  c.optim.min_lr_ratio = 0.1
  c.optim.wd_mults = ((r"(.*/)?(bias|scale)", 0.0),)
  c.mesh.data, c.mesh.fsdp = 1, -1
  c.checkpoint.every_steps = 1000
  c.checkpoint.best_metric = "eval/loss"
  c.checkpoint.best_mode = "min"
  c.log_every_steps = 100
  c.eval_every_steps = 5000
  c.progress = False
  return c
