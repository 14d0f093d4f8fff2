"""A pretrained Llama (a GGUF file or a Hugging Face directory) as a run workdir of this project.

  pre = read("SmolLM2-135M-Instruct.Q4_1.gguf")     # or a directory with config.json,
                                                     # *.safetensors and tokenizer.json
  write_run(pre, "runs/smollm2", data="../shared/data/tiny_shakespeare.txt", max_len=256)

The workdir is what a dense ``llama`` run trained here leaves at step 0: ``checkpoints/0`` in the
project's checkpoint format (`train.checkpoint.Checkpointer`: the float32 parameters, a fresh
optimizer state, the config, the stack layout and the data info with the tokenizer), so
`vlora_jax.load`, ``sample``, ``evaluate``, ``export``, ``init_from='compress:<workdir>'`` and
``distill.teacher=<workdir>`` take it as they take any run. Its config reads ``data.path`` (when
given) through its own tokenizer (``data.source='tokenized'``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from vlora_jax.data import tokenizer as tokenizer_lib
from vlora_jax.convert import gguf_llama, hf_llama
from vlora_jax.convert.hf_llama import ConvertError

DEFAULT_MAX_LEN = 256


@dataclasses.dataclass
class Pretrained:
  """A model read from a file: the ``config.model`` keys of its architecture, its dense
  parameters (float32 numpy, nested as the model's), its tokenizer and its trained context."""
  model: dict
  params: dict
  tokenizer: tokenizer_lib.SubwordTokenizer
  context: int
  source: str  # the path it was read from


def _tokenizer(load, where: str) -> tokenizer_lib.SubwordTokenizer:
  try:
    return load()
  except tokenizer_lib.TokenizerError as e:
    raise ConvertError(f"{e} (the model's tokenizer is imported with it)") from None


def read_gguf(path: Path, where: str) -> Pretrained:
  reader = gguf_llama.open_reader(path, where)
  hf = gguf_llama.hf_config(reader, where)
  tok = _tokenizer(lambda: tokenizer_lib.from_gguf(reader, where), where)
  model = hf_llama.model_config(hf, where)
  params = hf_llama.params_from_tensors(gguf_llama.tensors(reader, hf, where), model, where)
  return Pretrained(model, params, tok, int(hf["max_position_embeddings"]), str(path))


def read_hf_dir(directory: Path, where: str) -> Pretrained:
  hf = hf_llama.read_config(directory, where)
  model = hf_llama.model_config(hf, where)
  tok = _tokenizer(lambda: tokenizer_lib.from_hf_dir(directory, where), where)
  params = hf_llama.params_from_tensors(hf_llama.read_safetensors(directory, where), model,
                                        where)
  return Pretrained(model, params, tok, int(hf.get("max_position_embeddings", 2048)),
                    str(directory))


def read(path: str, where: str | None = None) -> Pretrained:
  """A pretrained model from a ``.gguf`` file or a Hugging Face model directory; anything else
  (not a model, an architecture the llama family is not, a quantisation ``gguf`` cannot read, no
  tokenizer) is a `ConvertError` naming the file."""
  where = where or f"--from={path!r}"
  p = Path(path).expanduser()
  if not p.exists():
    raise ConvertError(f"{where}: no such file or directory")
  if p.is_dir():
    return read_hf_dir(p, where)
  with open(p, "rb") as f:
    magic = f.read(4)
  if magic != b"GGUF":
    raise ConvertError(f"{where}: not a model file (it starts with {magic!r}, a GGUF with "
                       "b'GGUF'); allowed: a .gguf file or a Hugging Face model directory "
                       "(config.json, *.safetensors, tokenizer.json)")
  return read_gguf(p, where)


def run_config(pre: Pretrained, *, workdir: Path, data: str = "",
               max_len: int = DEFAULT_MAX_LEN):
  """The config of the imported run: the dense llama of ``pre``'s architecture (VLoRA off, its
  targets the family's), the ``tokenized`` text of ``data`` read by the run's own tokenizer."""
  from vlora_jax.config import defaults as default
  from vlora_jax.models import llama
  c = default.get_config()
  m = c.model
  m.name = "llama"
  for key, value in pre.model.items():
    m[key] = value
  m.max_len, m.dropout = int(max_len), 0.0
  m.vlora = default.vlora(enabled=False)
  m.vlora.targets = llama.TARGETS
  c.data.source = "tokenized"
  c.data.path = str(Path(data).expanduser().absolute()) if data else ""
  c.data.tokenizer = str(workdir.absolute())
  c.data.eval_split = "validation"
  c.data.split_seed = None     # the text's last blocks are held out, as contiguous text
  c.data.eval_examples = 32
  c.batch_size = c.eval_batch_size = 8
  c.num_train_steps = 0
  c.eval_every_steps = 0
  c.checkpoint.keep_best = 0
  c.checkpoint.best_metric, c.checkpoint.best_mode = "eval/loss", "min"
  return c


def _check_fits(pre: Pretrained, config) -> None:
  """The parameters against the model the config builds (shapes only), and the tokenizer
  against its vocabulary."""
  import flax.linen as nn
  import jax
  from vlora_jax import models
  from vlora_jax.core.params import params_mismatch
  if len(pre.tokenizer) > config.model.vocab_size:
    raise ConvertError(f"{pre.source}: the tokenizer has {len(pre.tokenizer)} tokens, the model's "
                       f"vocabulary {config.model.vocab_size}; allowed: a tokenizer within it")
  fam = models.family("llama")
  model = fam.build_from_config(config.model)
  want = jax.eval_shape(lambda *x: nn.unbox(model.init(jax.random.key(0), *x))["params"],
                        *fam.sample_inputs(config.model, batch=1))
  problems = params_mismatch(pre.params, want)
  if problems:
    raise ConvertError(f"{pre.source}: its tensors do not fit the model its config describes: "
                       + "; ".join(problems[:6]))


def data_info(pre: Pretrained, max_len: int) -> dict:
  """What the checkpoint stores of the data: the tokenizer and the model's trained context."""
  return dict(kind="text", vocab_size=len(pre.tokenizer), tokens_per_example=int(max_len),
              num_train=None, context_length=pre.context, **pre.tokenizer.to_info())


def check_request(workdir, data: str = "", max_len: int = DEFAULT_MAX_LEN) -> None:
  """Refuses, before any file is read, a workdir that holds checkpoints (or is a file), a
  ``data`` file that is not there and a ``max_len`` below 1."""
  workdir = Path(workdir).expanduser()
  where = f"--workdir={str(workdir)!r}"
  if workdir.exists() and not workdir.is_dir():
    raise ConvertError(f"{where}: a file; the workdir is a directory")
  held = [p.name for p in (workdir / "checkpoints").iterdir()] if (
      workdir / "checkpoints").is_dir() else []
  if held:
    raise ConvertError(f"{where} already holds checkpoints {sorted(held)[:4]}; a converted model "
                       "goes into a new workdir")
  if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
    raise ConvertError(f"--max_len={max_len!r}: must be an integer >= 1")
  if data and not Path(data).expanduser().is_file():
    raise ConvertError(f"--data={data!r}: no such file; allowed: a UTF-8 text file (the run's "
                       "eval and training text)")


def write_run(pre: Pretrained, workdir, *, data: str = "",
              max_len: int = DEFAULT_MAX_LEN) -> Path:
  """Writes ``pre`` as a dense llama run at step 0 into ``workdir`` (new, or without
  checkpoints); returns the checkpoint's step directory."""
  import jax
  from vlora_jax import cli
  from vlora_jax.runs import checkpoint_format as fmt
  from vlora_jax.train import checkpoint as ckpt_lib, metrics, optim, schema
  from vlora_jax.train import workdir as workdir_lib

  check_request(workdir, data, max_len)
  workdir = Path(workdir).expanduser()
  where = f"--workdir={str(workdir)!r}"
  config = run_config(pre, workdir=workdir, data=data, max_len=max_len)
  schema.check(config)
  _check_fits(pre, config)
  cli.writable_dir(workdir, where, ConvertError)
  params = jax.tree.map(np.asarray, pre.params)
  opt = optim.build(config.optim, params, int(config.num_train_steps))
  rng = jax.random.key_data(jax.random.key(int(config.seed), impl=config.rng_impl))
  state = {"step": np.zeros((), np.int32), "params": params, "opt_state": opt.tx.init(params),
           "rng": np.asarray(rng)}
  meta = fmt.build_meta(config, params, None, data_info(pre, max_len),
                        converted_from=str(Path(pre.source).absolute()))
  with workdir_lib.hold(workdir):
    metrics.write_json(workdir / "config.json", meta["config"])  # as every run's workdir has
    ckpt = ckpt_lib.Checkpointer(workdir, meta, keep=1, async_save=False)
    try:
      ckpt.save(0, state)
    finally:
      ckpt.close()
  return workdir / "checkpoints" / "0"
