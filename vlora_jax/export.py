"""Export a trained run's merged dense weights.

  vlora-export --workdir DIR --format {timm,hf,npz,orbax} --out PATH [--step N|best]

(``python -m vlora_jax.export`` is the same command.)

VLoRA increments and LoRA adapters are folded into plain per-layer weights once
(`vlora_jax.models.to_dense`): what is written is the weights of the run's dense twin, the same
architecture with every stack dense, computing the same function.

  timm   ViT (``model.name='vit'``) only: a ``.safetensors`` state_dict with timm's key names,
         shapes and layout (`convert.timm_export`, no torch), timm's constructor kwargs in its
         metadata, and ``<out minus .safetensors>.json`` with those kwargs and the data info (the
         normalisation, the class names). In Python: ``convert.torch_vit(PATH)``; in PyTorch:
         ``VisionTransformer(**kw).load_state_dict(safetensors.torch.load_file(PATH))``.
  hf     a family with a Hugging Face twin (``model.name='llama'``: ``LlamaForCausalLM``) only: a
         Hugging Face model directory (`convert.hf_llama`, no torch): ``config.json``,
         ``model.safetensors`` (float32) and, for a run with a subword tokenizer,
         ``tokenizer.json`` and ``tokenizer_config.json``. In PyTorch:
         ``AutoModelForCausalLM.from_pretrained(OUT)``, ``AutoTokenizer.from_pretrained(OUT)``;
         ``python -m vlora_jax.convert --from OUT`` imports it back, exactly.
  npz    ``{'/'-joined parameter path: array}`` of the dense parameters.
  orbax  a workdir-like directory whose ``checkpoints/<step>`` is in this project's checkpoint
         format for the dense twin's config (``model.vlora.enabled=False``, and
         ``model.lora.enabled=False`` if the run had LoRA): ``checkpoint.restore_from=OUT`` (the
         step and rng of the run, a fresh optimizer state) or ``init_from='checkpoint:OUT'`` (the
         parameters) with that config.

Exit status: 0 done; 2 a mistake in the input (no checkpoint in the workdir, a format the model
does not have, an ``--out`` that cannot be written), one line ``error: ...``; 1 an internal error.
"""

from __future__ import annotations

import json
from pathlib import Path

from vlora_jax import cli
from vlora_jax import trained as trained_lib
from vlora_jax.errors import UserError

FORMATS = ("timm", "hf", "npz", "orbax")
TIMM_FAMILIES = ("vit",)  # vit_registers: convert.torch_vit does not import register tokens yet


class ExportError(UserError, ValueError):
  """An export the run or the output path cannot take."""


def _check_format(fmt: str, meta: dict) -> None:
  name = meta.get("config", {}).get("model", {}).get("name")
  if fmt not in FORMATS:
    raise ExportError(f"--format={fmt!r}: allowed are {list(FORMATS)}")
  if fmt == "timm" and name not in TIMM_FAMILIES:
    raise ExportError(f"--format=timm: the run's model.name={name!r} has no timm equivalent; timm "
                      f"serves model.name in {list(TIMM_FAMILIES)}; use --format npz or orbax")
  if fmt == "hf":
    from vlora_jax import models
    if name not in models.FAMILIES or models.family(name).hf_architecture is None:
      serves = sorted(n for n, f in models.FAMILIES.items() if f.hf_architecture)
      raise ExportError(f"--format=hf: the run's model.name={name!r} has no Hugging Face "
                        f"equivalent; hf serves model.name in {serves}; use --format npz or "
                        "orbax")


def _prepare_out(fmt: str, out: Path) -> None:
  """Fails before anything is loaded when ``out`` cannot take the export."""
  if fmt == "timm" and out.suffix != ".safetensors":
    raise ExportError(f"--out={str(out)!r}: a timm export is a .safetensors file; end --out in "
                      ".safetensors")
  if fmt == "hf":
    if out.exists() and not out.is_dir():
      raise ExportError(f"--out={str(out)!r} is a file; an hf export is a directory")
    if (out / "config.json").exists() or (out / "model.safetensors").exists():
      raise ExportError(f"--out={str(out)!r} already holds a model; choose a new directory")
    directory = out
  elif fmt == "orbax":
    if out.exists() and not out.is_dir():
      raise ExportError(f"--out={str(out)!r} is a file; an orbax export is a directory")
    if (out / "checkpoints").exists():
      raise ExportError(f"--out={str(out)!r} already holds checkpoints; choose a new directory")
    directory = out
  else:
    if out.is_dir():
      raise ExportError(f"--out={str(out)!r} is a directory; a {fmt} export is a file")
    directory = out.parent
  cli.writable_dir(directory, f"--out={str(out)!r}", ExportError)


def dense_twin_config(config):
  """The run's config with every stack dense: what the dense export's checkpoint is for."""
  c = config.copy_and_resolve_references()
  if c.model.get("vlora") is not None:
    c.model.vlora.enabled = False
  if c.model.get("lora") is not None:
    c.model.lora.enabled = False
  return c


def write_npz(out: Path, params) -> list[Path]:
  import numpy as np
  from flax import traverse_util
  with open(out, "wb") as f:  # a file object: np.savez adds no '.npz' to the name
    np.savez(f, **traverse_util.flatten_dict(params, sep="/"))
  return [out]


def write_timm(out: Path, run: trained_lib.Trained, dense_model, params) -> list[Path]:
  from vlora_jax.convert import timm_export
  state_dict, kwargs = timm_export.timm_state_dict(dense_model, params,
                                                   img_size=int(run.config.model.img_size))
  timm_export.save_safetensors(out, state_dict, kwargs)
  side = out.with_suffix(".json")
  side.write_text(json.dumps({"timm_kwargs": kwargs, "data": run.info, "step": run.step,
                              "checkpoint": str(run.checkpoint)}, indent=1) + "\n")
  return [out, side]


def write_hf(out: Path, run: trained_lib.Trained, dense_model, params) -> list[Path]:
  """A Hugging Face Llama directory of the dense twin, with the run's subword tokenizer."""
  from vlora_jax.convert import hf_llama
  from vlora_jax.tokenizer import SubwordTokenizer
  keys = ("vocab_size", "dim", "depth", "num_heads", "num_kv_heads", "head_dim", "mlp_dim",
          "rope_base", "norm_eps", "tie_embeddings", "attention_bias", "mlp_bias")
  mcfg = {k: getattr(dense_model, k) for k in keys}  # resolved: num_kv_heads, head_dim set
  tokenizer = SubwordTokenizer.from_info(run.info) if run.info.get("tokenizer") else None
  context = int(run.info.get("context_length") or dense_model.max_len)
  return hf_llama.write_dir(out, params, mcfg, context=context, tokenizer=tokenizer)


def write_orbax(out: Path, run: trained_lib.Trained, params) -> list[Path]:
  """``out/checkpoints/<step>``: the dense twin's train state, saved as the trainer saves it."""
  from vlora_jax import params as params_lib
  from vlora_jax.train import checkpoint as ckpt_lib, metrics, optim
  config = dense_twin_config(run.config)
  # The run's step and rng (the data position and dropout stream go on as they would have); the
  # optimizer starts fresh: the VLoRA run's moments belong to other parameters.
  saved = ckpt_lib.read_state(str(run.checkpoint), params_only=False)
  opt = optim.build(config.optim, params, int(config.num_train_steps))
  state = {"step": saved["step"], "params": params, "opt_state": opt.tx.init(params),
           "rng": saved["rng"]}
  meta = {"config": json.loads(config.to_json_best_effort()),
          "layout": ckpt_lib.layouts(params, None), "data": run.info,
          "params_total": params_lib.count(params)["total"],
          "exported_from": str(run.checkpoint)}
  ckpt = ckpt_lib.Checkpointer(out, {"keep": 1, "async_save": False, "keep_best": 0}, meta)
  try:
    ckpt.save(run.step, state)
  finally:
    ckpt.close()
  metrics.write_json(out / "config.json", meta["config"])  # as every run's workdir has
  return [out / "checkpoints" / str(run.step), out / "config.json"]


def export(workdir, fmt: str, out, step: int | str | None = None) -> list[Path]:
  """Writes the merged dense weights of a run's checkpoint; returns the paths written.

  The workdir, the step, the format and ``out`` are checked before anything is loaded.
  """
  out = Path(out).expanduser()
  step_dir, _ = trained_lib.find_checkpoint(workdir, step)
  _check_format(fmt, trained_lib.read_meta(step_dir))
  _prepare_out(fmt, out)
  run = trained_lib.load(workdir, step)
  dense_model, params = run.to_dense()
  if fmt == "npz":
    return write_npz(out, params)
  if fmt == "timm":
    return write_timm(out, run, dense_model, params)
  if fmt == "hf":
    return write_hf(out, run, dense_model, params)
  return write_orbax(out, run, params)


def main(argv: list[str] | None = None) -> None:
  parser = cli.Parser("vlora-export", __doc__)
  cli.add_run_args(parser)
  parser.add_argument("--format", required=True, choices=FORMATS,
                      help="timm (vit), hf (llama), npz or orbax: see above")
  parser.add_argument("--out", required=True,
                      help="timm: a .safetensors file; npz: a file; hf, orbax: a new directory")
  args = parser.parse_args(argv)
  paths = cli.guarded("vlora_jax.export", args.verbose, export, args.workdir, args.format,
                      args.out, cli.step(args.step))
  for p in paths:
    print(p)


if __name__ == "__main__":
  main()
