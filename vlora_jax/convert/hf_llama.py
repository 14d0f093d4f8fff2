"""Hugging Face Llama checkpoints <-> the ``llama`` family's parameters, without torch.

A Hugging Face Llama directory holds ``config.json`` (``LlamaForCausalLM``), ``*.safetensors``
(``model.embed_tokens.weight``, ``model.layers.{i}.self_attn.q_proj.weight``, ...,
``model.norm.weight``, ``lm_head.weight``) and ``tokenizer.json``. Our parameters carry the same
names (`vlora_jax.models.llama`), so the map is one to one: a ``Linear``'s ``weight [out, in]``
is our ``kernel [in, out]`` transposed, an RMSNorm's ``weight`` our ``scale``, and the layers'
tensors stack into the dense stack's ``blocks/per_layer/...`` ``[L, ...]``.

  config = model_config(hf_config_json, where)   # -> the config.model keys
  params = params_from_tensors(tensors, config, where)
  tensors = tensors_from_params(params, config)   # the inverse, exact
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from vlora_jax.errors import UserError

ARCHITECTURE = "LlamaForCausalLM"
# Block tensors: Hugging Face's name inside ``model.layers.{i}.`` -> our path inside a block.
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
NORMS = ("input_layernorm", "post_attention_layernorm")
_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
# Buffers some checkpoints carry that are no parameters (recomputed from the config).
_IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


class ConvertError(UserError, ValueError):
  """A model file or directory that cannot be imported (or a run that cannot be exported): one
  line naming it, what it holds and what is allowed."""


def _first_id(value):
  if isinstance(value, list):
    return value[0] if value else None
  return value


def rope_base(hf: dict, where: str) -> float:
  """``rope_theta`` of a config, refusing a scaled rotary embedding (Llama 3.1's 'llama3', YaRN,
  ...), which this family does not compute."""
  params = hf.get("rope_parameters") or {}
  scaling = hf.get("rope_scaling")
  kind = params.get("rope_type", params.get("type", "default"))
  if scaling or kind != "default":
    raise ConvertError(f"{where}: rope_parameters/rope_scaling={params or scaling!r}; allowed: "
                       "plain rotary positions (rope_type 'default'): scaled RoPE is not "
                       "implemented")
  return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def model_config(hf: dict, where: str) -> dict:
  """A Hugging Face Llama ``config.json`` (as a dict) -> the ``config.model`` keys of the family.

  Refuses another architecture, another activation than SiLU, and scaled rotary positions.
  """
  archs = hf.get("architectures") or []
  if ARCHITECTURE not in archs and hf.get("model_type") != "llama":
    raise ConvertError(f"{where}: architectures={archs!r}, model_type={hf.get('model_type')!r}; "
                       f"allowed: {ARCHITECTURE!r} (model_type 'llama')")
  act = hf.get("hidden_act", "silu")
  if act != "silu":
    raise ConvertError(f"{where}: hidden_act={act!r}; allowed: 'silu' (SwiGLU)")
  try:
    dim, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    return {
        "vocab_size": int(hf["vocab_size"]), "dim": dim, "depth": int(hf["num_hidden_layers"]),
        "num_heads": heads, "num_kv_heads": int(hf.get("num_key_value_heads") or heads),
        "head_dim": int(hf.get("head_dim") or dim // heads),
        "mlp_dim": int(hf["intermediate_size"]), "rope_base": rope_base(hf, where),
        "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "attention_bias": bool(hf.get("attention_bias", False)),
        "mlp_bias": bool(hf.get("mlp_bias", False)),
    }
  except KeyError as e:
    raise ConvertError(f"{where}: config.json has no {e.args[0]!r}; a Llama config needs "
                       "hidden_size, num_attention_heads, num_hidden_layers, intermediate_size "
                       "and vocab_size") from None
  except (TypeError, ValueError) as e:
    raise ConvertError(f"{where}: config.json holds a value that is not a number ({e})") from None


def hf_config(mcfg, *, context: int, bos_id=None, eos_id=None) -> dict:
  """``config.model`` of a llama run -> a Hugging Face ``config.json`` (``LlamaForCausalLM``,
  float32). ``context`` is ``max_position_embeddings``."""
  base = float(mcfg["rope_base"])
  return {
      "architectures": [ARCHITECTURE], "model_type": "llama", "hidden_act": "silu",
      "vocab_size": int(mcfg["vocab_size"]), "hidden_size": int(mcfg["dim"]),
      "intermediate_size": int(mcfg["mlp_dim"]), "num_hidden_layers": int(mcfg["depth"]),
      "num_attention_heads": int(mcfg["num_heads"]),
      "num_key_value_heads": int(mcfg["num_kv_heads"]), "head_dim": int(mcfg["head_dim"]),
      "max_position_embeddings": int(context), "rms_norm_eps": float(mcfg["norm_eps"]),
      # transformers 5 reads rope_parameters, 4 reads rope_theta
      "rope_parameters": {"rope_type": "default", "rope_theta": base}, "rope_theta": base,
      "tie_word_embeddings": bool(mcfg["tie_embeddings"]),
      "attention_bias": bool(mcfg["attention_bias"]), "mlp_bias": bool(mcfg["mlp_bias"]),
      "bos_token_id": bos_id, "eos_token_id": eos_id, "torch_dtype": "float32",
      "dtype": "float32",
  }


def _block_names(mcfg) -> dict[str, tuple[str, str]]:
  """``{Hugging Face tensor name inside a layer: (our block path, kind)}``; kind says how it
  maps: 'kernel' (transposed) or 'same'."""
  out = {}
  for lin in LINEARS:
    path = lin.replace(".", "/")
    out[f"{lin}.weight"] = (f"{path}/kernel", "kernel")
    bias = mcfg["attention_bias"] if lin.startswith("self_attn") else mcfg["mlp_bias"]
    if bias:
      out[f"{lin}.bias"] = (f"{path}/bias", "same")
  for norm in NORMS:
    out[f"{norm}.weight"] = (f"{norm}/scale", "same")
  return out


def _nest(flat: dict[str, np.ndarray]) -> dict:
  out: dict = {}
  for path, value in flat.items():
    node = out
    *parents, leaf = path.split("/")
    for k in parents:
      node = node.setdefault(k, {})
    node[leaf] = value
  return out


def params_from_tensors(tensors: dict[str, np.ndarray], mcfg, where: str) -> dict:
  """Hugging Face tensors (``weight [out, in]``) -> the dense model's params (float32, nested).

  Every tensor the model needs must be there, with its shape; an unknown tensor is refused (it
  would be a part of the model that this family does not compute).
  """
  names = _block_names(mcfg)
  depth = int(mcfg["depth"])
  layers: dict[str, list] = {path: [None] * depth for path, _ in names.values()}
  top = {"model.embed_tokens.weight": ("embed_tokens/embedding", "same"),
         "model.norm.weight": ("norm/scale", "same")}
  if not mcfg["tie_embeddings"]:
    top["lm_head.weight"] = ("lm_head/kernel", "kernel")
  flat: dict[str, np.ndarray] = {}
  unknown = []
  for name, value in tensors.items():
    value = np.asarray(value, np.float32)
    m = _LAYER.fullmatch(name)
    if name in top:
      path, kind = top[name]
      flat[path] = value.T if kind == "kernel" else value
    elif m and int(m.group(1)) < depth and m.group(2) in names:
      path, kind = names[m.group(2)]
      layers[path][int(m.group(1))] = value.T if kind == "kernel" else value
    elif _IGNORED.fullmatch(name) or (name == "lm_head.weight" and mcfg["tie_embeddings"]):
      continue  # a buffer, or the tied head saved beside the embedding it is
    else:
      unknown.append(name)
  if unknown:
    raise ConvertError(f"{where}: tensors this Llama config has no place for: {unknown[:5]} "
                       f"({len(unknown)} in all)")
  missing = [n for n, (p, _) in top.items() if p not in flat]
  missing += [f"model.layers.{i}.{n}" for n, (p, _) in names.items()
              for i in range(depth) if layers[p][i] is None]
  if missing:
    raise ConvertError(f"{where}: missing tensors {missing[:5]} ({len(missing)} in all)")
  for path, per_layer in layers.items():
    shapes = {v.shape for v in per_layer}
    if len(shapes) != 1:
      raise ConvertError(f"{where}: the layers' {path} tensors differ in shape: {sorted(shapes)}")
    flat[f"blocks/per_layer/{path}"] = np.stack(per_layer)
  return _nest(flat)


def tensors_from_params(params, mcfg) -> dict[str, np.ndarray]:
  """The dense model's params -> Hugging Face tensors (float32, contiguous; no ``lm_head`` when
  the embeddings are tied, as ``save_pretrained`` writes them)."""
  from flax import traverse_util
  flat = {k: np.asarray(v, np.float32)
          for k, v in traverse_util.flatten_dict(params, sep="/").items()}
  out = {"model.embed_tokens.weight": flat["embed_tokens/embedding"],
         "model.norm.weight": flat["norm/scale"]}
  if not mcfg["tie_embeddings"]:
    out["lm_head.weight"] = flat["lm_head/kernel"].T
  for name, (path, kind) in _block_names(mcfg).items():
    stacked = flat[f"blocks/per_layer/{path}"]
    for i, value in enumerate(stacked):
      out[f"model.layers.{i}.{name}"] = value.T if kind == "kernel" else value
  return {k: np.ascontiguousarray(v) for k, v in out.items()}


def read_safetensors(directory: Path, where: str) -> dict[str, np.ndarray]:
  """Every tensor of a directory's ``*.safetensors`` files, as float32 numpy (bfloat16 and
  float16 too: read through JAX, which has those types)."""
  from safetensors import safe_open
  files = sorted(directory.glob("*.safetensors"))
  if not files:
    raise ConvertError(f"{where}: no *.safetensors file in {directory} (a Hugging Face model "
                       "directory holds its weights there; .bin files need torch and are not "
                       "read)")
  out = {}
  for path in files:
    try:
      with safe_open(str(path), framework="flax") as f:
        for name in f.keys():
          out[name] = np.asarray(f.get_tensor(name), np.float32)
    except Exception as e:  # safetensors raises its own error type for a damaged file
      raise ConvertError(f"{where}: {path.name} does not read as safetensors "
                         f"({type(e).__name__}: {e})") from None
  return out


def read_config(directory: Path, where: str) -> dict:
  path = directory / "config.json"
  if not path.is_file():
    raise ConvertError(f"{where}: {directory} has no config.json; allowed: a .gguf file or a "
                       "Hugging Face model directory (config.json, *.safetensors, tokenizer.json)")
  try:
    hf = json.loads(path.read_text())
  except ValueError as e:
    raise ConvertError(f"{where}: config.json is not JSON ({e})") from None
  if not isinstance(hf, dict):
    raise ConvertError(f"{where}: config.json holds a JSON {type(hf).__name__}, not an object")
  return hf


def write_dir(out: Path, params, mcfg, *, context: int, tokenizer=None,
              metadata: dict[str, str] | None = None) -> list[Path]:
  """A Hugging Face Llama directory: ``config.json``, ``model.safetensors`` (float32, with
  ``metadata`` beside ``format: pt``) and, with a subword ``tokenizer``, ``tokenizer.json`` and
  ``tokenizer_config.json``. Every file is written by Python (an I/O failure is an ``OSError``)."""
  from safetensors.numpy import save
  out.mkdir(parents=True, exist_ok=True)
  bos = getattr(tokenizer, "bos_id", None)
  eos = getattr(tokenizer, "eos_id", None)
  paths = [out / "config.json", out / "model.safetensors"]
  paths[0].write_text(json.dumps(hf_config(mcfg, context=context, bos_id=bos, eos_id=eos),
                                 indent=2) + "\n")
  paths[1].write_bytes(save(tensors_from_params(params, mcfg),
                            metadata={"format": "pt", **(metadata or {})}))
  if tokenizer is not None:
    tok = tokenizer.tokenizer
    name = lambda i: None if i is None else tok.id_to_token(i)  # noqa: E731
    (out / "tokenizer.json").write_text(tok.to_str(), encoding="utf-8")
    # The tokenizer.json as it is, whatever the model type's own tokenizer class would build.
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": name(bos),
         "eos_token": name(eos), "model_max_length": int(context)}, indent=2) + "\n")
    paths += [out / "tokenizer.json", out / "tokenizer_config.json"]
  return paths
