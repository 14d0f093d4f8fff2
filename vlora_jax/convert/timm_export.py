"""Export a dense ViT to timm: the exact inverse of `torch_vit`'s timm mapping, without torch.

`timm_state_dict(model, params, img_size=...)` takes a `ViT` whose stack is dense (``vlora`` and
``lora`` None: merge a VLoRA model first with `vlora_jax.models.to_dense`) and returns timm's
``VisionTransformer`` state_dict as ``{name: float32 numpy array}`` with the constructor kwargs
that build it. `save_safetensors` writes both: the tensors with the ``safetensors`` package's
numpy API, the kwargs in the file's metadata (``timm_kwargs``, JSON), which `torch_vit` reads.

Layouts: our ``kernel [in, out]`` -> torch Linear ``weight [out, in]``; conv ``[kh, kw, in, out]``
-> ``[out, in, kh, kw]``; LayerNorm ``scale`` -> ``weight``; the layer stack's leading axis is
split into ``blocks.{l}.*``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

# The importer's mapping and checks, from its module (``vlora_jax.convert.torch_vit`` is the
# function of that name).
from vlora_jax.convert.torch_vit import KWARGS_KEY, _block_params, _check_kwargs, _validate
from vlora_jax.models.vit import ViT

def _to_torch(value: np.ndarray) -> np.ndarray:
  """One array of ours -> torch's layout (inverse of `torch_vit._to_ours`)."""
  if value.ndim == 2:  # kernel [in, out] -> Linear weight [out, in]
    return value.T
  if value.ndim == 4:  # flax conv [kh, kw, in, out] -> Conv2d weight [out, in, kh, kw]
    return value.transpose(3, 2, 0, 1)
  return value


def timm_kwargs(model: ViT, *, img_size: int, in_chans: int) -> dict[str, Any]:
  """The ``timm.models.vision_transformer.VisionTransformer`` kwargs of ``model``'s function.

  ``fc_norm`` and ``qkv_bias`` are given explicitly: timm's defaults depend on ``global_pool``.
  """
  return dict(img_size=img_size, patch_size=model.patch_size, in_chans=in_chans,
              num_classes=model.num_classes, global_pool=model.global_pool, embed_dim=model.dim,
              depth=model.depth, num_heads=model.num_heads, mlp_ratio=float(model.mlp_ratio),
              qkv_bias=True, class_token=model.class_token, fc_norm=model.fc_norm)


def timm_state_dict(model: ViT, params, *, img_size: int) -> tuple[dict[str, np.ndarray], dict]:
  """``(state_dict, kwargs)`` of timm's VisionTransformer computing what ``model`` does.

  Raises:
    ValueError: ``model`` is not a dense `ViT` (a subclass such as ViTRegisters, or an unmerged
      VLoRA / LoRA stack), or ``params`` are not what timm's kwargs expect (a bug: checked with
      `torch_vit`'s own key and shape check, so the file always imports back).
  """
  if type(model) is not ViT:
    raise ValueError(f"timm export: {type(model).__name__} has no timm equivalent here (only "
                     "vlora_jax.models.vit.ViT)")
  if model.vlora is not None or model.lora is not None:
    raise ValueError("timm export: merge the model first (vlora_jax.models.to_dense): timm has "
                     "no VLoRA or LoRA layers")
  p = params
  in_chans = int(np.shape(p["patch_embed"]["kernel"])[2])
  kwargs = timm_kwargs(model, img_size=img_size, in_chans=in_chans)
  f32 = lambda a: np.asarray(a, np.float32)
  norm = "fc_norm" if model.fc_norm else "norm"
  sd = {"patch_embed.proj.weight": _to_torch(f32(p["patch_embed"]["kernel"])),
        "patch_embed.proj.bias": f32(p["patch_embed"]["bias"]),
        "pos_embed": f32(p["pos_embed"]),
        f"{norm}.weight": f32(p[norm]["scale"]), f"{norm}.bias": f32(p[norm]["bias"]),
        "head.weight": _to_torch(f32(p["head"]["kernel"])), "head.bias": f32(p["head"]["bias"])}
  if model.class_token:
    sd["cls_token"] = f32(p["cls_token"])
  stack = p["blocks"]["per_layer"]
  for name, (path, _) in _block_params(model.dim, int(model.dim * model.mlp_ratio)).items():
    leaf = stack
    for k in path.split("/"):
      leaf = leaf[k]
    for layer in range(model.depth):
      sd[f"blocks.{layer}.{name}"] = _to_torch(f32(leaf[layer]))
  # The importer's own check: every key timm has, with its shape, and nothing else.
  _validate(sd, "timm", _check_kwargs("timm", dict(kwargs)))
  # safetensors writes C-contiguous buffers only (transposes are views).
  return {k: np.ascontiguousarray(v) for k, v in sd.items()}, kwargs


def safetensors_bytes(state_dict: dict[str, np.ndarray], kwargs: dict,
                      metadata: dict[str, str] | None = None) -> bytes:
  """``state_dict`` as the bytes of a ``.safetensors`` file (``format: pt``, as timm's hub files
  say) with the constructor ``kwargs`` as JSON in the metadata, and ``metadata`` beside them."""
  from safetensors.numpy import save
  return save(state_dict, metadata={"format": "pt", KWARGS_KEY: json.dumps(kwargs),
                                    **(metadata or {})})


def save_safetensors(path, state_dict: dict[str, np.ndarray], kwargs: dict) -> None:
  """Writes `safetensors_bytes` to ``path``."""
  Path(path).write_bytes(safetensors_bytes(state_dict, kwargs))
