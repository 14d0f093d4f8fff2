"""Encoder-decoder toy task: reverse a random token string (synthetic, generated from the seed).

Strings of 2..15 tokens over 13 symbols (ids 3..15; 0 pad, 1 BOS, 2 EOS), padded to 16. Encoder
and decoder of 4 layers each, D 64, 4 heads; VLoRA: compounds of 2 layers with rank-4 increments
in both stacks (``vlora``, default) or ``dense``. Teacher-forced training, batch 64, 1,500 steps.

Launch (from the repository root):

  vlora-train --config configs/seq2seq_reverse.py --workdir runs/seq2seq_reverse

The periodic evals (and best/) read a fixed validation set of 512 strings from seed + 10^6 (the
eval set before the test split was added: the figures below are its), the test split 512 from
seed + 2 * 10^6, once, at the end (``test/*``).

Expected (measured, 2 CPU cores, ~220 s): 261,904 parameters (56% of the dense 471,312); eval
token accuracy 98.5% / 100% / 100% at steps 500 / 1,000 / 1,500, and exact sequences 85.9% / 100% /
100%, the same by real greedy decoding (``eval/seq_accuracy``: the encoder once, the decoder on its
own outputs with a KV cache) and by teacher forcing (``eval/seq_accuracy_teacher_forced``).

``arg``: ``vlora`` | ``dense``; ``r=``, ``s=``, ``steps=``.
"""

from configs import default


def get_config(arg: str = "vlora"):
  a = default.parse_arg(arg, {"variant": ("vlora", ("vlora", "dense")), "r": 4, "s": 2,
                              "steps": 1500})
  c = default.get_config()
  m = c.model
  m.name = "seq2seq"
  m.vocab_size = 16
  m.max_len = 16               # src, tgt_in and tgt_out are all this long
  m.dim, m.depth, m.num_heads = 64, 4, 4
  m.dec_depth = 4              # decoder layers (model.depth is the encoder's)
  m.tie_embeddings = False
  m.dropout = 0.0
  m.vlora = default.vlora(enabled=a["variant"] == "vlora", compound_size=a["s"], rank=a["r"])

  c.data.source = "reverse"
  c.data.vocab_size = 16       # token ids < 16; 3.. are symbols
  c.data.min_len = 2           # string lengths 2 .. max_len - 1
  c.data.eval_examples = 512   # a fixed eval set from another seed

  c.batch_size = 64
  c.eval_batch_size = 256
  c.num_train_steps = a["steps"]
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 100
  c.log_every_steps = 50
  c.eval_every_steps = 500
  c.checkpoint.every_steps = 500
  c.checkpoint.best_metric = "eval/accuracy"
  return c
