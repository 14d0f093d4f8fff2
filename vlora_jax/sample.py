"""Sample text from a trained language model.

  vlora-sample --workdir DIR --prompt TEXT [--max_new_tokens N] [--temperature T] [--top_k K]
               [--top_p P] [--seed S] [--num_samples N] [--stop STRING] [--step N|best]
               [--verbose]

(``python -m vlora_jax.sample`` is the same command.) ``--stop`` reads escapes as Python does:
``--stop "\\n"`` ends each sample before its first newline. Where the text of ``--stop`` is one
token, generation stops there; any other text cuts the decoded sample where it first appears.

The model, its parameters and its tokenizer come from the checkpoint (`vlora_jax.load`; the
character vocabulary or the subword tokenizer is stored with the run, so no data file is read). A
subword tokenizer encodes the prompt as Hugging Face's ``tokenizer(prompt)`` does (with the BOS its
post-processor adds, if any), and a sample ends at its EOS token unless ``--stop`` names another
token. Generation uses the KV cache with VLoRA merged once (`vlora_jax.models.decoding.generate`);
``--temperature 0`` is greedy. The ``--num_samples`` continuations of the prompt are drawn together,
in one batch. Past the model's context (``model.max_len``) the window slides: the last half window
is read again and generation goes on.

Prints each sample as the prompt followed by its continuation, samples separated by a line
``----``; a progress bar over the tokens goes to stderr when stderr is a terminal.

Exit status: 0 done; 2 a mistake in the input (no checkpoint in the workdir, a run that is not a
language model, a prompt with characters the vocabulary lacks, a ``--stop`` with a broken escape,
a bad sampling value: a temperature that underflows in float32, a seed outside [0, 2**32 - 1],
more than 2**20 new tokens), one line ``error: ...``; 130 / 143 interrupted by Ctrl-C / SIGTERM,
nothing printed; 1 an internal error.
"""

from __future__ import annotations

import dataclasses

import sys

from vlora_jax import cli
from vlora_jax.runs import trained as trained_lib
from vlora_jax.errors import UserError

PROG = "vlora-sample"

SEPARATOR = "----"
MAX_SAMPLES = 4096


class SampleError(UserError, ValueError):
  """A sampling request the run cannot serve."""


def _model_config(workdir, step) -> dict:
  """The run's ``config.model``, read from the checkpoint's meta (no JAX); a run of another family
  is refused here, before anything is loaded."""
  from vlora_jax import models
  mcfg = trained_lib.open_checkpoint(workdir, step)[2]["config"].get("model", {})
  name = mcfg.get("name")
  if name not in models.FAMILIES or not models.family(name).generates:
    serves = sorted(n for n, f in models.FAMILIES.items() if f.generates)
    raise SampleError(f"--workdir={str(workdir)!r} is a model.name={name!r} run; sampling serves "
                      f"model.name in {serves} (for a ViT: python -m vlora_jax.predict; "
                      "for seq2seq: python -m vlora_jax.evaluate)")
  return mcfg


def unescape(text: str, flag: str) -> str:
  """``text`` with its backslash escapes read as Python reads them (``\\n``, ``\\t``,
  ``\\u00e9``, ``\\\\``); any other character stays as it is."""
  try:
    return text.encode("latin-1", "backslashreplace").decode("unicode_escape")
  except UnicodeDecodeError as e:
    raise SampleError(f"{flag}={text!r}: a broken escape ({e.reason}); write a backslash as "
                      "\\\\") from None


def _stop_id(tokenizer, stop: str | None) -> int | None:
  """The token that ends a sample: ``--stop``'s where it is one token of the vocabulary (else
  None: the text is cut where it appears), or without ``--stop`` the tokenizer's EOS (None for a
  character vocabulary: no stop)."""
  if stop is None:
    return tokenizer.eos_id
  return tokenizer.token_id(stop)


def _cut(text: str, stop: str | None) -> str:
  """``text`` up to the first ``stop`` (a stop of several tokens ends the text, not decoding)."""
  return text if not stop or stop not in text else text[:text.index(stop)]


def sample(workdir, prompt: str, *, max_new_tokens: int = 200, temperature: float = 0.8,
           top_k: int = 0, top_p: float = 1.0, seed: int = 0, num_samples: int = 1,
           stop: str | None = None, step=None, progress: bool = False) -> list[str]:
  """The ``num_samples`` continuations of ``prompt`` (text, without the prompt)."""
  from vlora_jax.models import decoding
  from vlora_jax.data import tokenizer as tokenizer_lib

  if num_samples < 1:
    raise SampleError(f"--num_samples={num_samples}: must be >= 1")
  if num_samples > MAX_SAMPLES:
    raise SampleError(f"--num_samples={num_samples}: must be at most {MAX_SAMPLES} (one batch)")
  if not prompt:
    raise SampleError("--prompt is empty: give at least one character to continue")
  if stop is not None and not stop:
    raise SampleError("--stop is empty: give the text of one token of the vocabulary")
  mcfg = _model_config(workdir, step)
  sampler = decoding.Sampler(temperature=temperature, top_k=top_k, top_p=top_p)
  try:  # every value before the run loads
    sampler.check(int(mcfg.get("vocab_size", 1)))
    decoding.check_count("max_new_tokens", max_new_tokens, decoding.MAX_NEW_TOKENS)
    decoding.check_seed(seed)
  except ValueError as e:
    raise SampleError(f"--{e}") from None
  run = trained_lib.load(workdir, step)
  try:
    tokenizer = tokenizer_lib.from_info(run.info)
    ids = tokenizer.encode(prompt)
    stop_id = _stop_id(tokenizer, stop)
  except tokenizer_lib.TokenizerError as e:
    raise SampleError(f"--prompt/--stop: {e}") from None
  # Ids beyond the stored vocabulary (a model.vocab_size rounded up) have no character.
  sampler = dataclasses.replace(sampler, num_tokens=min(len(tokenizer), run.model.vocab_size))
  bar = _bar(max_new_tokens, progress)
  try:
    out = decoding.generate(run.model, run.params, [ids] * num_samples,
                            max_new_tokens=max_new_tokens, sampler=sampler, seed=seed,
                            stop_token=stop_id,
                            on_chunk=bar.update if bar else None)
  finally:
    if bar:
      bar.close()
  return [_cut(tokenizer.decode(row), stop) for row in out]


def _bar(total: int, enabled: bool):
  if not enabled:
    return None
  from tqdm.auto import tqdm
  return tqdm(total=total, unit="tok", file=sys.stderr, dynamic_ncols=True, mininterval=0.5)


def main(argv: list[str] | None = None) -> None:
  parser = cli.Parser(PROG, __doc__)
  cli.add_run_args(parser)
  parser.add_argument("--prompt", required=True, metavar="TEXT", help="the text to continue")
  parser.add_argument("--max_new_tokens", type=int, default=200, metavar="N",
                      help="tokens to generate after the prompt")
  parser.add_argument("--temperature", type=float, default=0.8, metavar="T", help="0 is greedy")
  parser.add_argument("--top_k", type=int, default=0, metavar="K",
                      help="keep the k most likely (0: all)")
  parser.add_argument("--top_p", type=float, default=1.0, metavar="P",
                      help="nucleus mass to keep (1: all)")
  parser.add_argument("--seed", type=int, default=0, help="the sampling seed")
  parser.add_argument("--num_samples", type=int, default=1, metavar="N",
                      help="continuations, drawn in one batch")
  parser.add_argument("--stop", default=None, metavar="STRING",
                      help="a sample ends before this text (escapes such as \\n are read; "
                      "default: a subword tokenizer's EOS, no stop for characters)")
  args = parser.parse_args(argv)
  stop = None if args.stop is None else cli.guarded("vlora-sample", args.verbose, unescape,
                                                     args.stop, "--stop")
  samples = cli.guarded(
      PROG, args.verbose, sample, args.workdir, args.prompt,
      max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
      top_p=args.top_p, seed=args.seed, num_samples=args.num_samples, stop=stop,
      step=cli.step(args.step), progress=sys.stderr.isatty())
  for i, text in enumerate(samples):
    if i:
      print(SEPARATOR)
    print(args.prompt + text)


if __name__ == "__main__":
  main()
