"""GGUF files (llama.cpp) of Llama-architecture models -> Hugging Face's config and tensors.

Read with the ``gguf`` package: ``GGUFReader`` for the metadata and the tensors, and
``gguf.quants.dequantize`` for every quantisation it knows (Q4_1, Q8_0, K-quants, F16, ...): the
model we import is the dequantised one, in float32. The names are mapped to Hugging Face's
(``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``), so `hf_llama` takes it
from there.

llama.cpp's converter permutes the rows of q and k so that its rotary kernel can rotate
neighbouring channels ``(2i, 2i + 1)``; Hugging Face (and `layers.rotary`) rotate ``(i, i + hd/2)``.
`unpermute` undoes it, per head.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from vlora_jax.convert.hf_llama import ConvertError

ARCHITECTURES = ("llama",)
_TOP = {"token_embd.weight": "model.embed_tokens.weight",
        "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}
_BLOCK = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
          "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
          "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
          "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
_BLK = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def open_reader(path: Path, where: str):
  """A ``gguf.GGUFReader`` of ``path``; a file it cannot parse is a `ConvertError`."""
  from gguf import GGUFReader
  try:
    return GGUFReader(path)
  except Exception as e:  # gguf raises ValueError, struct errors, ... for what it cannot parse
    raise ConvertError(f"{where}: not a GGUF file gguf can read ({type(e).__name__}: "
                       f"{str(e).splitlines()[0] if str(e) else ''})") from None


def value(reader, key: str, default=None):
  field = reader.fields.get(key)
  return default if field is None else field.contents()


def _scalar(reader, key: str, where: str, default=None):
  v = value(reader, key, default)
  if v is None:
    raise ConvertError(f"{where}: no {key!r} in its metadata (every llama GGUF has it)")
  if isinstance(v, list):
    raise ConvertError(f"{where}: {key}={v[:4]!r}... differs per layer; allowed: one value for "
                       "every layer")
  return v


def hf_config(reader, where: str) -> dict:
  """The file's metadata as a Hugging Face Llama ``config.json`` (a dict); another architecture,
  or a file without weights, is a `ConvertError`."""
  arch = value(reader, "general.architecture")
  if arch is None or not reader.tensors:
    raise ConvertError(f"{where}: a GGUF without a model (general.architecture={arch!r}, "
                       f"{len(reader.tensors)} tensors); allowed: a model's weights")
  if arch not in ARCHITECTURES:
    raise ConvertError(f"{where}: general.architecture={arch!r}; allowed: {list(ARCHITECTURES)} "
                       "(the llama family)")
  get = lambda key, default=None: _scalar(reader, f"{arch}.{key}", where, default)  # noqa: E731
  scaling = value(reader, f"{arch}.rope.scaling.type", "none")
  if scaling not in ("none", None):
    raise ConvertError(f"{where}: {arch}.rope.scaling.type={scaling!r}; allowed: 'none' (scaled "
                       "RoPE is not implemented)")
  dim, heads = int(get("embedding_length")), int(get("attention.head_count"))
  head_dim = int(get("attention.key_length", dim // heads))
  rotary = int(get("rope.dimension_count", head_dim))
  if rotary != head_dim:
    raise ConvertError(f"{where}: {arch}.rope.dimension_count={rotary} but the heads are "
                       f"{head_dim} wide; allowed: rotary positions on the whole head")
  names = {t.name: t for t in reader.tensors}
  embedding = names.get("token_embd.weight")  # [dim, vocab] in GGUF's order of dimensions
  vocab = get("vocab_size", None if embedding is None else int(embedding.shape[-1]))
  return {
      "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
      "vocab_size": int(vocab), "hidden_size": dim, "num_hidden_layers": int(get("block_count")),
      "intermediate_size": int(get("feed_forward_length")), "num_attention_heads": heads,
      "num_key_value_heads": int(get("attention.head_count_kv", heads)), "head_dim": head_dim,
      "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-5)),
      "rope_theta": float(get("rope.freq_base", 10000.0)),
      "max_position_embeddings": int(get("context_length", 2048)),
      "tie_word_embeddings": "output.weight" not in names,
      "attention_bias": "blk.0.attn_q.bias" in names, "mlp_bias": "blk.0.ffn_gate.bias" in names,
  }


def unpermute(w: np.ndarray, heads: int) -> np.ndarray:
  """The inverse of llama.cpp's ``permute`` of q/k rows (``[heads * hd, ...]`` weights or
  ``[heads * hd]`` biases): per head, rows ``(2i, 2i + 1)`` back to ``(i, i + hd/2)``."""
  half = w.shape[0] // heads // 2
  return w.reshape(heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_name(name: str) -> str | None:
  if name in _TOP:
    return _TOP[name]
  m = _BLK.fullmatch(name)
  if m and m.group(2) in _BLOCK:
    return f"model.layers.{m.group(1)}.{_BLOCK[m.group(2)]}.{m.group(3)}"
  return None


def _dequantized(tensor, where: str) -> np.ndarray:
  from gguf.quants import dequantize
  try:
    data = dequantize(tensor.data, tensor.tensor_type)
  except (NotImplementedError, KeyError, ValueError) as e:
    raise ConvertError(f"{where}: tensor {tensor.name!r} is stored as "
                       f"{tensor.tensor_type.name}, which gguf cannot dequantise ({e})") from None
  return np.asarray(data, np.float32).reshape(tuple(int(d) for d in reversed(tensor.shape)))


def tensors(reader, config: dict, where: str) -> dict[str, np.ndarray]:
  """Every tensor of the file, dequantised to float32 and named as Hugging Face names it
  (``[out, in]`` weights), q and k rows unpermuted. A tensor we have no name for is refused."""
  out, unknown = {}, []
  heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
  for t in reader.tensors:
    name = _hf_name(t.name)
    if name is None:
      unknown.append(t.name)
      continue
    w = _dequantized(t, where)
    m = _BLK.fullmatch(t.name)
    if m and m.group(2) in heads:
      w = unpermute(w, heads[m.group(2)])
    out[name] = w
  if unknown:
    raise ConvertError(f"{where}: tensors a llama model has no place for: {unknown[:5]} "
                       f"({len(unknown)} in all)")
  return out
