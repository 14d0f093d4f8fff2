"""Export a trained run's merged dense weights.

  vlora-export --workdir DIR --format {timm,hf,npz,orbax} --out PATH [--step N|best]
               [--overwrite]

(``python -m vlora_jax.export`` is the same command.)

VLoRA increments and LoRA adapters are folded into plain per-layer weights once
(`Trained.to_dense`): what is written is the weights of the run's dense twin, the same
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

Every output is written beside ``--out`` under a temporary name and renamed when complete: an
earlier export stays until the new one is whole, and a failed or interrupted export (a full disk,
a file size limit, Ctrl-C) leaves nothing behind and can be rerun. ``--out`` may not lie inside a
run's ``checkpoints/`` or ``best/``; an existing ``--out`` (or timm sidecar) that an export did not
write is refused unless ``--overwrite``.

Exit status: 0 done; 2 a mistake in the input (no checkpoint in the workdir, a format the model
does not have, an ``--out`` that cannot be written or may not be), one line ``error: ...``;
130 / 143 interrupted by Ctrl-C / SIGTERM, nothing written; 1 an internal error.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

from vlora_jax.runs import checkpoint_format as fmt
from vlora_jax import cli
from vlora_jax.runs import outputs
from vlora_jax.runs import trained as trained_lib
from vlora_jax.errors import UserError

PROG = "vlora-export"

FORMATS = ("timm", "hf", "npz", "orbax")
# What marks a file as this command's output (so a rerun may replace it): the npz archive's
# comment, a safetensors metadata key, the sidecar's and the orbax meta's keys.
MARK = "vlora_jax.export"


class ExportError(UserError, ValueError):
  """An export the run or the output path cannot take."""


def _check_format(fmt_name: str, meta: dict) -> None:
  from vlora_jax import models
  name = meta.get("config", {}).get("model", {}).get("name")
  if fmt_name not in FORMATS:
    raise ExportError(f"--format={fmt_name!r}: allowed are {list(FORMATS)}")
  if fmt_name == "timm" and (name not in models.FAMILIES or not models.family(name).exports_timm):
    serves = sorted(n for n, f in models.FAMILIES.items() if f.exports_timm)
    raise ExportError(f"--format=timm: the run's model.name={name!r} has no timm equivalent; timm "
                      f"serves model.name in {serves}; use --format npz or orbax")
  if fmt_name == "hf":
    if name not in models.FAMILIES or models.family(name).hf_architecture is None:
      serves = sorted(n for n, f in models.FAMILIES.items() if f.hf_architecture)
      raise ExportError(f"--format=hf: the run's model.name={name!r} has no Hugging Face "
                        f"equivalent; hf serves model.name in {serves}; use --format npz or "
                        "orbax")


# ------------------------------------------------------------------------- what an export wrote


def _safetensors_marked(path: Path) -> bool:
  try:
    from safetensors import safe_open
    with safe_open(str(path), "np") as f:
      return MARK in (f.metadata() or {})
  except Exception:  # noqa: BLE001 -- not a safetensors file: not ours
    return False


def _npz_marked(path: Path) -> bool:
  try:
    with zipfile.ZipFile(path) as z:
      return z.comment.decode(errors="replace").startswith(MARK)
  except (OSError, zipfile.BadZipFile):
    return False


def _sidecar_marked(path: Path) -> bool:
  return (outputs.read_json_object(path) or {}).get("written_by") == MARK


def _orbax_marked(path: Path) -> bool:
  steps = fmt.finished_steps(path / fmt.CHECKPOINTS)
  if not steps:
    return False
  try:
    return "exported_from" in fmt.read_meta(path / fmt.CHECKPOINTS / str(steps[-1]))
  except fmt.DamagedCheckpoint:
    return False


def _hf_marked(path: Path) -> bool:
  return _safetensors_marked(path / "model.safetensors")


OWNED = {"timm": _safetensors_marked, "npz": _npz_marked, "hf": _hf_marked,
         "orbax": _orbax_marked}


def sidecar(out: Path) -> Path:
  """The timm export's JSON beside the ``.safetensors`` file."""
  return out.with_suffix(".json")


def _check_out(fmt_name: str, out, overwrite: bool) -> Path:
  """Refuses, before anything is loaded, an ``--out`` the export cannot or may not write."""
  kind = "dir" if fmt_name in ("hf", "orbax") else "file"
  writer = f"an export ({MARK})"
  out = outputs.check_target(out, "--out", kind=kind, owned=OWNED[fmt_name], overwrite=overwrite,
                             writer=writer)
  if fmt_name == "timm":
    if out.suffix != ".safetensors":
      raise ExportError(f"--out={str(out)!r}: a timm export is a .safetensors file; end --out in "
                        ".safetensors")
    outputs.check_target(sidecar(out), "--out's sidecar", kind="file", owned=_sidecar_marked,
                         overwrite=overwrite, writer=writer)
  return out


# ------------------------------------------------------------------------------------ writers


def dense_twin_config(config):
  """The run's config with every stack dense: what the dense export's checkpoint is for."""
  c = config.copy_and_resolve_references()
  # Its weights are the export's, not an init's: a run restored from it starts from nothing else.
  c.init_from = ""
  if c.get("compress") is not None:
    c.compress.budget = 0.0
  if c.model.get("vlora") is not None:
    c.model.vlora.enabled = False
  if c.model.get("lora") is not None:
    c.model.lora.enabled = False
  return c


def _origin(run: trained_lib.Trained) -> str:
  return json.dumps({"checkpoint": str(run.checkpoint), "step": run.step})


def npz_bytes(params, comment: str) -> bytes:
  """``{'/'-joined path: array}`` as the bytes of an ``.npz`` (what ``np.savez`` writes), with
  ``comment`` as the archive's comment."""
  import numpy as np
  from flax import traverse_util
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
    for key, value in traverse_util.flatten_dict(params, sep="/").items():
      with z.open(key + ".npy", "w", force_zip64=True) as member:
        np.lib.format.write_array(member, np.asanyarray(value), allow_pickle=False)
    z.comment = comment.encode()
  return buf.getvalue()


def write_npz(out: Path, run: trained_lib.Trained, params) -> list[Path]:
  return [outputs.write_bytes(out, npz_bytes(params, f"{MARK} {_origin(run)}"), "--out")]


def write_timm(out: Path, run: trained_lib.Trained, dense_model, params) -> list[Path]:
  from vlora_jax.convert import timm_export
  state_dict, kwargs = timm_export.timm_state_dict(dense_model, params,
                                                   img_size=int(run.config.model.img_size))
  data = timm_export.safetensors_bytes(state_dict, kwargs, {MARK: _origin(run)})
  side = {"timm_kwargs": kwargs, "data": run.info, "step": run.step,
          "checkpoint": str(run.checkpoint), "written_by": MARK}
  # Both written in full before either is renamed into place.
  with outputs.atomic_file(sidecar(out), "--out's sidecar") as side_tmp, \
      outputs.atomic_file(out, "--out") as tmp:
    side_tmp.write_text(json.dumps(side, indent=1) + "\n")
    tmp.write_bytes(data)
  return [out, sidecar(out)]


def write_hf(out: Path, run: trained_lib.Trained, dense_model, params) -> list[Path]:
  """A Hugging Face Llama directory of the dense twin, with the run's subword tokenizer."""
  from vlora_jax.convert import hf_llama
  from vlora_jax.data.tokenizer import SubwordTokenizer
  keys = ("vocab_size", "dim", "depth", "num_heads", "num_kv_heads", "head_dim", "mlp_dim",
          "rope_base", "norm_eps", "tie_embeddings", "attention_bias", "mlp_bias")
  mcfg = {k: getattr(dense_model, k) for k in keys}  # resolved: num_kv_heads, head_dim set
  tokenizer = SubwordTokenizer.from_info(run.info) if run.info.get("tokenizer") else None
  context = int(run.info.get("context_length") or dense_model.max_len)
  with outputs.atomic_dir(out, "--out") as tmp:
    written = hf_llama.write_dir(tmp, params, mcfg, context=context, tokenizer=tokenizer,
                                 metadata={MARK: _origin(run)})
  return [out / p.name for p in written]


def write_orbax(out: Path, run: trained_lib.Trained, params) -> list[Path]:
  """``out/checkpoints/<step>``: the dense twin's train state, saved as the trainer saves it."""
  from vlora_jax.train import checkpoint as ckpt_lib, metrics, optim
  config = dense_twin_config(run.config)
  # The run's step and rng (the data position and dropout stream go on as they would have); the
  # optimizer starts fresh: the VLoRA run's moments belong to other parameters.
  saved = fmt.read_state(run.checkpoint, params_only=False, meta=run.meta)
  opt = optim.build(config.optim, params, int(config.num_train_steps))
  state = {"step": saved["step"], "params": params, "opt_state": opt.tx.init(params),
           "rng": saved["rng"]}
  meta = fmt.build_meta(config, params, None, run.info, exported_from=str(run.checkpoint))
  with outputs.atomic_dir(out, "--out") as tmp:
    ckpt = ckpt_lib.Checkpointer(tmp, meta, keep=1, async_save=False)
    try:
      ckpt.save(run.step, state)
    finally:
      ckpt.close()
    metrics.write_json(tmp / "config.json", meta["config"])  # as every run's workdir has
  return [out / fmt.CHECKPOINTS / str(run.step), out / "config.json"]


def _size(params, fmt_name: str) -> int:
  """About the bytes an export writes: the dense params (and the optimizer's two moments of an
  orbax export), in the largest file it writes (Orbax packs a step's arrays into one)."""
  import jax
  nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
  return 3 * nbytes if fmt_name == "orbax" else nbytes


def export(workdir, fmt_name: str, out, step: int | str | None = None, *,
           overwrite: bool = False) -> list[Path]:
  """Writes the merged dense weights of a run's checkpoint; returns the paths written.

  The workdir, the step, the format and ``out`` are checked before anything is loaded.
  """
  _, _, meta = trained_lib.open_checkpoint(workdir, step)
  _check_format(fmt_name, meta)
  out = _check_out(fmt_name, out, overwrite)
  run = trained_lib.load(workdir, step)
  dense_model, params = run.to_dense()
  outputs.check_room(out, _size(params, fmt_name), "--out")
  if fmt_name == "npz":
    return write_npz(out, run, params)
  if fmt_name == "timm":
    return write_timm(out, run, dense_model, params)
  if fmt_name == "hf":
    return write_hf(out, run, dense_model, params)
  return write_orbax(out, run, params)


def main(argv: list[str] | None = None) -> None:
  parser = cli.Parser(PROG, __doc__)
  cli.add_run_args(parser)
  parser.add_argument("--format", required=True, choices=FORMATS,
                      help="timm (vit), hf (llama), npz or orbax: see above")
  parser.add_argument("--out", required=True,
                      help="timm: a .safetensors file; npz: a file; hf, orbax: a new directory")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace an existing --out that an export did not write")
  args = parser.parse_args(argv)
  paths = cli.guarded(PROG, args.verbose, export, args.workdir, args.format,
                      args.out, cli.step(args.step), overwrite=args.overwrite)
  for p in paths:
    print(p)


if __name__ == "__main__":
  main()
