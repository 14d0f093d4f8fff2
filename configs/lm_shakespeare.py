"""Character-level language model on Tiny Shakespeare (1.1M characters, 65 distinct).

Decoder-only, D 128, 4 heads, 4 layers, context 64, learned positions; VLoRA: one compound of 4
layers with rank-8 increments (``vlora``, default) or ``dense``. Batch 32 windows of 65
characters, AdamW lr 2e-3, cosine. The text is cut into 20 blocks: the first 18 train, the 19th
validates (the periodic evals, best/ by eval/loss), the 20th tests (once, at the end: ``test/*``).
Beside the loss in nats per character the evals report bits per character.

Sources: ``text`` (default): ``data.path`` = ``tiny_shakespeare.txt`` in the data directory
(``$VLORA_DATA``; `vlora-data tiny_shakespeare` writes it), or ``file=<path>`` in the arg;
``tfds``: TFDS ``tiny_shakespeare`` (its train split's last block validates, its test split
tests).

  vlora-train --config configs/lm_shakespeare.py --workdir runs/lm
  vlora-train --config configs/lm_shakespeare.py:tfds,dense --workdir runs/lm_tfds

Expected (measured, text source, 2 shared CPU cores, ~15 min at ~4,800 tokens/s, when the last
10% of the text evaluated, before the validation and test blocks: the same 90% trains): 277,569
parameters (the dense model: 818,241); eval loss (nats/char) from ln(65) = 4.17 to 2.07 / 1.91 /
1.80 / 1.79 at steps 500 / 1,000 / 1,500 / 2,000 (2.58 bits per character; eval accuracy 46%): a
small, short run.

``xl``: the memory demonstration (docs/memory.md): D 2048, 48 layers = 12 compounds of 4, 16
heads, context 256, one window a step, 20 steps. Its dense twin has 2.42B parameters and a train
step that compiles to 45.0 GiB, more than a 24 GiB machine has; the VLoRA model (0.62B, 12.45 GiB)
trains on one: ~18 s a step and ~8 minutes for the run on 2 CPU cores, peak RSS 17.5 GiB with the
final checkpoint (measured: experiments/results/lm_xl/summary.json).

``arg``: ``text`` | ``tfds``; ``vlora`` | ``dense``; ``small`` | ``xl``; ``r=``, ``s=``, ``steps=``,
``file=``.
"""

from configs import default


def get_config(arg: str = "text"):
  a = default.parse_arg(arg, {"source": ("text", ("text", "tfds")),
                              "variant": ("vlora", ("vlora", "dense")), "r": 8, "s": 4,
                              "size": ("small", ("small", "xl")), "steps": None,
                              "file": "tiny_shakespeare.txt"})
  c = default.get_config()
  m = c.model
  m.name = "lm"
  m.vocab_size = 65            # the characters of Tiny Shakespeare (checked against the data)
  m.max_len = 64               # context length T; windows are T + 1 characters
  m.positions = "learned"      # learned | rope
  m.tie_embeddings = False
  m.dim, m.depth, m.num_heads = 128, 4, 4
  m.dropout = 0.1
  m.vlora = default.vlora(enabled=a["variant"] == "vlora", compound_size=a["s"], rank=a["r"])

  c.data.source = a["source"]
  c.data.split_seed = None     # held out: the text's last blocks (validation, then test)
  c.data.validation_fraction = 0.05  # of 20 blocks: one validates; text: one more tests
  if a["source"] == "text":
    c.data.path = a["file"]    # relative: in the data directory ($VLORA_DATA)
    c.data.test_fraction = 0.05
  else:
    c.data.tfds_name = "tiny_shakespeare"  # its train split's last block validates, its test
  c.data.eval_examples = 512   # split tests; non-overlapping eval windows (512 x 64 characters)

  c.batch_size = 32
  c.eval_batch_size = 128
  c.num_train_steps = int(a["steps"] or 2000)
  c.optim.lr = 2e-3
  c.optim.warmup_steps = 100
  c.optim.weight_decay = 0.1
  c.optim.wd_mults = ((r"(.*/)?(bias|scale|pos_embed)", 0.0),)
  c.log_every_steps = 50
  c.eval_every_steps = 500
  c.checkpoint.every_steps = 500
  c.checkpoint.best_metric = "eval/loss"
  c.checkpoint.best_mode = "min"
  if a["size"] == "xl":
    steps = int(a["steps"] or 20)
    m.dim, m.depth, m.num_heads, m.max_len, m.dropout = 2048, 48, 16, 256, 0.0
    c.batch_size, c.eval_batch_size, c.data.eval_examples = 1, 4, 4
    c.num_train_steps, c.optim.warmup_steps, c.optim.lr = steps, 5, 1e-4
    c.log_every_steps, c.eval_every_steps, c.checkpoint.every_steps = 2, steps, steps
  return c
