"""Llama-family LMs: a tiny one trained from scratch, or one shaped as an imported model.

``tiny`` (default): D 128, 4 layers, 4 query heads sharing 2 key/value heads of width 32, SwiGLU
MLP 352, RMSNorm, rotary positions (base 10,000), tied embeddings, context 64; VLoRA: one compound
of 4 layers with rank-8 increments on all seven block matrices (``vlora``, default) or ``dense``.
Batch 32, AdamW lr 2e-3, cosine, 1,000 steps. Data (``text``, default): Tiny Shakespeare at
character level (``tiny_shakespeare.txt`` in the data directory, ``$VLORA_DATA``: `vlora-data
tiny_shakespeare`), cut into 20 blocks: the first 18 train, the 19th validates (the periodic evals
and best/), the 20th tests (once, at the end); ``bpe``: the same file tokenized by a byte-level
BPE (``tok=``: a tokenizer.json, .gguf, Hugging Face directory or run; default the test
fixture's 320-token Shakespeare BPE), the same held-out blocks.

Measured (``tiny``, VLoRA, text; 2 shared CPU cores), when the last 10% of the file evaluated
(before the validation and test blocks: the same 90% trains): 249,856 parameters (the dense
model's: 746,752), eval loss from ln(65) = 4.17 to 2.08 / 1.91 / 1.83 / 1.81 nats/char at steps
250 / 500 / 750 / 1,000 (eval accuracy 45%), 3 min 20 s in all at ~11,300 tokens/s.

``from=<workdir>``: the architecture, context, vocabulary and tokenizer of another run, e.g. a
model imported by ``python -m vlora_jax.convert`` (SmolLM2-135M), on the ``tokenized`` text of
``file=``: the config of a compress-and-heal student (``--config.init_from=compress:<workdir>``,
``--config.distill.teacher=<workdir>``) or of fine-tuning it (``dense``).

  vlora-train --config configs/llama.py --workdir runs/llama_tiny
  vlora-train --config configs/llama.py:dense,steps=300 --workdir runs/llama_dense
  vlora-train --config configs/llama.py:from=runs/smollm2,s=3,r=64 \\
      --config.init_from=compress:runs/smollm2 --workdir runs/smollm2_vlora

``arg``: ``vlora`` | ``dense``; ``text`` | ``bpe``; ``r=``, ``s=``, ``steps=``, ``file=``, ``tok=``,
``from=``.
"""

import os

from configs import default
from vlora_jax.models import llama

FIXTURE_TOKENIZER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                 "tests", "fixtures", "llama", "hf_gqa", "tokenizer.json")


def _tiny(c, a) -> None:
  m = c.model
  m.vocab_size = 65            # Tiny Shakespeare's characters (checked against the data)
  m.max_len = 64
  m.dim, m.depth, m.num_heads, m.num_kv_heads, m.head_dim = 128, 4, 4, 2, 32
  m.mlp_dim = 352
  m.rope_base = 10000.0
  m.norm_eps = 1e-5
  m.tie_embeddings = True
  m.attention_bias = m.mlp_bias = False
  m.dropout = 0.1
  c.data.path = a["file"]
  c.data.split_seed = None     # held out: the text's last blocks (validation, then test)
  if a["data"] == "text":
    c.data.source = "text"
    return
  from vlora_jax.data import tokenizer
  c.data.source = "tokenized"
  c.data.tokenizer = a["tok"]
  c.data.eval_split = "validation"
  m.vocab_size = len(tokenizer.load(a["tok"], "config arg tok"))


def _like_run(c, a) -> None:
  """``config.model`` as the run in ``from=`` has it; its tokenizer reads the text."""
  from vlora_jax.runs import trained
  source = trained.open_checkpoint(a["from"], where="config arg from")[2]["config"]["model"]
  for key in ("vocab_size", "max_len", "dim", "depth", "num_heads", "num_kv_heads", "head_dim",
              "mlp_dim", "rope_base", "norm_eps", "tie_embeddings", "attention_bias", "mlp_bias"):
    c.model[key] = source[key]  # max_len too: a teacher reads the student's windows
  c.model.dropout = 0.0
  c.data.source = "tokenized"
  c.data.path = a["file"]
  c.data.tokenizer = os.path.abspath(a["from"])
  c.data.eval_split = "validation"
  c.data.split_seed = None


def get_config(arg: str = "vlora"):
  a = default.parse_arg(arg, {"variant": ("vlora", ("vlora", "dense")),
                              "data": ("text", ("text", "bpe")), "r": 8, "s": 4, "steps": None,
                              "file": "tiny_shakespeare.txt",
                              "tok": FIXTURE_TOKENIZER, "from": ""})
  c = default.get_config()
  c.model.name = "llama"
  if a["from"]:
    _like_run(c, a)
  else:
    _tiny(c, a)
  c.model.vlora = default.vlora(enabled=a["variant"] == "vlora", compound_size=a["s"],
                                rank=a["r"])
  c.model.vlora.targets = llama.TARGETS
  c.data.eval_examples = 256

  c.batch_size = 32
  c.eval_batch_size = 64
  c.num_train_steps = int(a["steps"] or 1000)
  c.optim.lr = 2e-3
  c.optim.warmup_steps = 100
  c.optim.weight_decay = 0.1
  c.optim.wd_mults = ((r"(.*/)?(bias|scale)", 0.0),)
  c.log_every_steps = 50
  c.eval_every_steps = 250
  c.checkpoint.every_steps = 250
  c.checkpoint.best_metric = "eval/loss"
  c.checkpoint.best_mode = "min"
  if a["from"]:  # a pretrained model: gentler steps, smaller batches of longer windows
    c.batch_size, c.eval_batch_size, c.data.eval_examples = 8, 8, 32
    c.optim.lr, c.optim.warmup_steps = 1e-4, 20
    c.num_train_steps = int(a["steps"] or 200)
    c.eval_every_steps = c.checkpoint.every_steps = max(1, c.num_train_steps)
  return c
