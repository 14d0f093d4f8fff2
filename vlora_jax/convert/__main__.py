"""Import a pretrained Llama as a run workdir of this project.

  python -m vlora_jax.convert --from PATH --workdir DIR [--data TEXT_FILE] [--max_len N]
                              [--verbose]

PATH is a ``.gguf`` file (llama.cpp; any quantisation the ``gguf`` package dequantises, Q4_1 and
Q8_0 among them: the float32 dequantised model is imported) or a Hugging Face model directory
(``config.json`` of a ``LlamaForCausalLM``, ``*.safetensors``, ``tokenizer.json``). DIR, a new
workdir, receives a dense ``llama`` run at step 0 (`vlora_jax.convert.pretrained`): its
checkpoint holds the parameters, the config, and the tokenizer with the data description, so

  python -m vlora_jax.sample --workdir DIR --prompt "The capital of France is" --temperature 0
  python -m vlora_jax.evaluate --workdir DIR [--config.data.path=TEXT_FILE]
  python -m vlora_jax.export --workdir DIR --format hf --out HF_DIR
  python -m vlora_jax.main --config configs/llama.py:from=DIR ... \\
      --config.init_from=compress:DIR --config.distill.teacher=DIR

take it as a run trained here. ``--data`` records the text the run's config evaluates and trains
on (``data.source='tokenized'``, read by the run's own tokenizer); ``--max_len`` (default 256) is
the context of its windows and of sampling's sliding window (rotary positions need no table: up to
the model's own context, stored as ``context_length`` in its data info).

Exit status: 0 done; 2 a mistake in the input (no such file, not a model, an architecture that is
not the llama family, a quantisation ``gguf`` cannot read, no tokenizer, a workdir that holds
checkpoints), one line ``error: ...``; 1 an internal error.
"""

from __future__ import annotations

import time

from vlora_jax import cli
from vlora_jax.convert import pretrained


def convert(source: str, workdir: str, data: str = "",
            max_len: int = pretrained.DEFAULT_MAX_LEN) -> dict:
  """Reads ``source`` and writes the run; returns what the command prints."""
  start = time.perf_counter()
  pretrained.check_request(workdir, data, max_len)
  pre = pretrained.read(source)
  step_dir = pretrained.write_run(pre, workdir, data=data, max_len=max_len)
  m = pre.model
  return {"checkpoint": str(step_dir), "seconds": time.perf_counter() - start,
          "architecture": (f"llama: {m['depth']} layers, width {m['dim']}, {m['num_heads']} "
                           f"query / {m['num_kv_heads']} key-value heads of {m['head_dim']}, MLP "
                           f"{m['mlp_dim']}, vocabulary {m['vocab_size']}, "
                           f"{'tied' if m['tie_embeddings'] else 'separate'} embeddings"),
          "tokenizer": f"{len(pre.tokenizer)} tokens (BOS {pre.tokenizer.bos_id}, EOS "
                       f"{pre.tokenizer.eos_id})"}


def main(argv: list[str] | None = None) -> None:
  parser = cli.Parser("python -m vlora_jax.convert", __doc__)
  parser.add_argument("--from", dest="source", required=True,
                      help="a .gguf file or a Hugging Face model directory")
  parser.add_argument("--workdir", required=True, help="the new run's workdir")
  parser.add_argument("--data", default="", help="a text file the run's config reads")
  parser.add_argument("--max_len", type=int, default=pretrained.DEFAULT_MAX_LEN,
                      help="context of the run's windows and of sampling (default 256)")
  parser.add_argument("--verbose", action="store_true", help="show the traceback of input errors")
  args = parser.parse_args(argv)
  done = cli.guarded("vlora_jax.convert", args.verbose, convert, args.source, args.workdir,
                     args.data, args.max_len)
  print(f"{done['architecture']}\ntokenizer: {done['tokenizer']}\nwrote {done['checkpoint']} "
        f"({done['seconds']:.1f} s)")


if __name__ == "__main__":
  main()
