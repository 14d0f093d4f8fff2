"""Llama-family LMs for a TPU pod: a dense twin of about 1B, 8B or 70B parameters, VLoRA or dense.

The ``llama`` family (RMSNorm, grouped-query attention with rotary positions, SwiGLU), 2,048-token
context, a 32k vocabulary, bfloat16 compute with float32 parameters, every layer rematerialised
(``remat=full``), and FSDP over the whole pod (``mesh.fsdp=-1``: parameters, gradients and AdamW's
moments sharded over every chip; each chip's activations are its own sequences'). The blocks are
Llama 3's (8B and 70B as published; 1B as TinyLlama's block at 24 layers). VLoRA: compounds of 4
layers, rank D / 128 (16, 32, 64) on all seven block matrices, the official anchored chain.

  size  D      layers  heads (kv)  MLP      dense twin   VLoRA
  1b    2048   24      16 (8)      5632     1.27B        0.43B
  8b    4096   32      32 (8)      14336    7.25B        2.08B
  70b   8192   80      64 (8)      28672    68.99B       18.27B

What each needs per chip is measured by compiling its train step for the pod on any machine
(docs/pod.md has the tables; benchmarks/pod_scale.py writes them):

  python -m vlora_jax.compile --config configs/lm_pod.py:8b --topology v5e:16x16
  python -m vlora_jax.compile --config configs/lm_pod.py:8b,dense,batch=128 --topology v5p:4x4x4

The compile needs no data. Training reads a text file (``file=<path>``) tokenized by a byte-level
BPE (``tok=``: a tokenizer.json, .gguf, Hugging Face directory or run) with held-out validation
and test blocks (``data.source='tokenized'``).

``arg``: ``1b`` | ``8b`` | ``70b``; ``vlora`` | ``dense``; ``batch=<global batch>`` (default 256,
one sequence per chip of a v5e-256); ``remat=<policy>`` (vlora_jax/core/remat.py); ``attn=`` the
attention kernel (``xla``, the default, runs anywhere; ``pallas``, flash attention on TPUs, holds no
[heads, T, T] scores; ``cudnn`` on NVIDIA GPUs); ``tp=<chips>`` tensor parallelism over that many
chips of each FSDP group, with the sequence split between the projections
(``SEQUENCE_PARALLEL_RULES``); ``r=``, ``s=``;
``d=<width>,layers=<depth>`` for any other size (heads of 128 channels, 8 key/value heads or
fewer, MLP 3.5 D); ``file=``, ``tok=``.
"""

from configs import default
from vlora_jax.models import llama

SIZES = {  # D, layers, query heads, key/value heads, MLP width
    "1b": (2048, 24, 16, 8, 5632),
    "8b": (4096, 32, 32, 8, 14336),
    "70b": (8192, 80, 64, 8, 28672),
}


def get_config(arg: str = "1b"):
  a = default.parse_arg(arg, {"size": ("1b", tuple(SIZES)),
                              "variant": ("vlora", ("vlora", "dense")), "batch": 256,
                              "remat": "full", "attn": "xla", "tp": 1, "r": 0, "s": 4, "d": 0,
                              "layers": 0,
                              "file": "corpus.txt", "tok": ""})
  dim, depth, heads, kv_heads, mlp = SIZES[a["size"]]
  if a["d"]:
    dim, depth, heads = a["d"], a["layers"] or depth, max(a["d"] // 128, 1)
    kv_heads, mlp = min(8, heads), a["d"] * 7 // 2
  c = default.get_config()
  m = c.model
  m.name = "llama"
  m.vocab_size = 32768
  m.max_len = 2048
  m.dim, m.depth, m.num_heads, m.num_kv_heads, m.head_dim = dim, depth, heads, kv_heads, dim // heads
  m.mlp_dim = mlp
  m.rope_base = 500000.0       # Llama 3's
  m.norm_eps = 1e-5
  m.tie_embeddings = False
  m.attention_bias = m.mlp_bias = False
  m.dropout = 0.0
  m.dtype = "bfloat16"
  m.remat = a["remat"]
  m.attention = a["attn"]
  m.vlora = default.vlora(enabled=a["variant"] == "vlora", compound_size=a["s"],
                          rank=a["r"] or max(dim // 128, 1))
  m.vlora.targets = llama.TARGETS

  c.data.source = "tokenized"
  c.data.path = a["file"]
  c.data.tokenizer = a["tok"]
  c.data.eval_split = "validation"
  c.data.split_seed = None     # the text's last blocks are held out, as contiguous text
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
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, a["tp"]
  if a["tp"] > 1:
    c.activation_rules = default.SEQUENCE_PARALLEL_RULES
  c.checkpoint.every_steps = 1000
  c.checkpoint.best_metric = "eval/loss"
  c.checkpoint.best_mode = "min"
  c.log_every_steps = 100
  c.eval_every_steps = 5000
  c.progress = False
  return c
