"""Import a PyTorch ViT checkpoint (timm dense or the official VLoRA) without torch.

`torch_vit(state_dict, **kwargs)` takes the checkpoint as ``{name: numpy array}`` (or a path to an
``.npz`` or ``.safetensors`` file: timm's hub files are safetensors) and the constructor kwargs that
built it, and returns ``(module, variables)`` such that
``module.apply(variables, images_nhwc)`` gives the logits. Which kind it is comes from the keys:

  timm dense      ``blocks.{l}.attn.qkv.weight`` ...        -> `ViT` with a dense stack
  official VLoRA  ``blocks.{c}.blocks.{k}.attn.qkv...``     -> `ViT` with
                  ``VLoRASpec.official(compound_size=vl_size, rank=vl_rank, alpha=vl_alpha)``
                  (``vl_enabled=False`` -> mode ``tied``)

Layouts. torch Linear ``weight [out, in]`` -> our ``kernel [in, out]``; Conv2d ``weight
[out, in, kh, kw]`` -> ``[kh, kw, in, out]``; LayerNorm ``weight`` -> ``scale``. The official code
computes, for layer k >= 1 of a compound, ``W_k = detach(W_0) + (alpha / r) * B_k.T @ A_k`` with
``A_k [r, in]``, ``B_k [r, out]``: our ``inc_a [in, r] = A_k.T`` and ``inc_b [r, out] = B_k``. Its
state_dict repeats ``W_0`` in every layer k >= 1 under ``...parametrizations.weight.original``: the
copies must equal the base (they are one shared tensor in torch) and are dropped. With
``vl_enabled=False`` the official model still stores A and B; they are unused there, and dropped.

Every problem with the checkpoint (missing, extra and wrong-shape keys, W_0 copies that differ) is
collected and raised as ONE `ValueError` that lists them all. Before that, weights that are not
floating point (int64, bool...) or not finite are refused in ONE `WeightsError` (a `ValueError`).
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from vlora_jax.errors import UserError
from vlora_jax.models.vit import ViT
from vlora_jax.core.spec import VLoRASpec

# The official VisionTransformerVLoRA's default targets (its DEFAULT_PARAM_NAMES), in its order:
# a list-valued vl_rank / vl_alpha follows this order.
OFFICIAL_TARGETS = ("attn.qkv.weight", "attn.proj.weight", "mlp.fc1.weight", "mlp.fc2.weight")

# timm constructor defaults (VisionTransformer, timm 1.0.31) and the official VLoRA's own.
TIMM_DEFAULTS = dict(img_size=224, patch_size=16, in_chans=3, num_classes=1000, global_pool="token",
                     embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0, qkv_bias=True,
                     class_token=True, fc_norm=None)
OFFICIAL_DEFAULTS = dict(depth=3, vl_size=4, vl_rank=8, vl_alpha=1, vl_enabled=True,
                         vl_param_name=list(OFFICIAL_TARGETS))

# timm kwargs that change the function ViT computes: accepted only at these (timm's default) values.
FIXED = dict(qk_norm=False, scale_attn_norm=False, scale_mlp_norm=False, proj_bias=True,
             init_values=None, pos_embed="learn", no_embed_class=False, reg_tokens=0, pre_norm=False,
             final_norm=True, pool_include_prefix=False, dynamic_img_size=False)
# Kwargs that do not change the function at inference: accepted and ignored (dropout is built as 0).
IGNORED = ("drop_rate", "pos_drop_rate", "patch_drop_rate", "proj_drop_rate", "attn_drop_rate",
           "drop_path_rate", "weight_init", "fix_init", "dynamic_img_pad")

_OFFICIAL_KEY = re.compile(r"blocks\.\d+\.blocks\.\d+\.")


def _block_params(dim: int, hidden: int) -> dict[str, tuple[str, tuple[int, ...]]]:
  """torch name inside a timm Block -> (our path inside `layers.EncoderBlock`, torch shape)."""
  out = {}
  for norm in ("norm1", "norm2"):
    out[f"{norm}.weight"] = (f"{norm}/scale", (dim,))
    out[f"{norm}.bias"] = (f"{norm}/bias", (dim,))
  for mod, d_in, d_out in (("attn.qkv", dim, 3 * dim), ("attn.proj", dim, dim),
                           ("mlp.fc1", dim, hidden), ("mlp.fc2", hidden, dim)):
    path = mod.replace(".", "/")
    out[f"{mod}.weight"] = (f"{path}/kernel", (d_out, d_in))
    out[f"{mod}.bias"] = (f"{path}/bias", (d_out,))
  return out


def _to_ours(value: np.ndarray) -> np.ndarray:
  """One torch tensor -> our layout (Linear weights transposed, conv kernels to HWIO)."""
  if value.ndim == 2:  # Linear [out, in] -> kernel [in, out]
    return value.T
  if value.ndim == 4:  # Conv2d [out, in, kh, kw] -> flax [kh, kw, in, out]
    return value.transpose(2, 3, 1, 0)
  return value


class WeightsError(UserError, ValueError):
  """Checkpoint weights that are not finite floating-point numbers."""


def _is_safetensors(path) -> bool:
  return str(path).endswith(".safetensors")


def load_state_dict(state_dict: Mapping[str, Any] | str | os.PathLike) -> dict[str, np.ndarray]:
  """A mapping of names to arrays, or an ``.npz`` or ``.safetensors`` path -> ``{name: float32
  numpy array}``.

  Raises `WeightsError`, listing every such key, for weights that are not floating point (an int or
  bool tensor is not a weight this model has, and a cast would hide it) or not finite as float32.
  """
  if isinstance(state_dict, (str, os.PathLike)) and _is_safetensors(state_dict):
    from safetensors.numpy import load_file  # read with numpy: no torch
    state_dict = load_file(str(state_dict))
  elif isinstance(state_dict, (str, os.PathLike)):
    with np.load(state_dict) as f:
      state_dict = {k: f[k] for k in f.files}
  if not isinstance(state_dict, Mapping):
    raise ValueError("state_dict: expected a mapping of names to arrays or an .npz or "
                     f".safetensors path, got {type(state_dict).__name__}")
  raw = {str(k): np.asarray(v) for k, v in state_dict.items()}
  not_float = sorted(f"{k}: {a.dtype}" for k, a in raw.items()
                     if not jnp.issubdtype(a.dtype, jnp.floating))
  out = {k: a.astype(np.float32) for k, a in raw.items() if jnp.issubdtype(a.dtype, jnp.floating)}
  not_finite = []
  for k in sorted(out):
    nan, inf = int(np.isnan(out[k]).sum()), int(np.isinf(out[k]).sum())
    if nan or inf:
      not_finite.append(f"{k}: {nan} NaN and {inf} inf of {out[k].size} values (as float32)")
  if not_float or not_finite:
    parts = ["torch_vit: the state_dict has weights that are not finite floating-point numbers:"]
    for title, items in (("non-float keys", not_float), ("keys with NaN/inf", not_finite)):
      if items:
        parts.append(f"  {len(items)} {title}:\n" + "\n".join(f"    {i}" for i in items))
    raise WeightsError("\n".join(parts))
  return out


KWARGS_KEY = "timm_kwargs"  # the safetensors metadata entry with the constructor kwargs (JSON)


def saved_kwargs(path) -> dict:
  """The constructor kwargs a ``.safetensors`` file carries in its metadata (`KWARGS_KEY`:
  `vlora_jax.export` writes them), else ``{}`` (timm's hub files carry none)."""
  if not (isinstance(path, (str, os.PathLike)) and _is_safetensors(path)):
    return {}
  from safetensors import safe_open
  with safe_open(str(path), framework="np") as f:
    raw = (f.metadata() or {}).get(KWARGS_KEY)
  return json.loads(raw) if raw else {}


def detect(keys) -> str:
  """``'official'`` (VLoRA compounds: ``blocks.c.blocks.k.*``) or ``'timm'`` (dense)."""
  return "official" if any(_OFFICIAL_KEY.match(k) for k in keys) else "timm"


def _check_kwargs(kind: str, kwargs: dict) -> dict:
  """Fills defaults and rejects kwargs that would make timm compute something ViT does not."""
  allowed = set(TIMM_DEFAULTS) | set(FIXED) | set(IGNORED)
  if kind == "official":
    allowed |= set(OFFICIAL_DEFAULTS)
  unknown = sorted(set(kwargs) - allowed)
  if unknown:
    vl = [k for k in unknown if k.startswith("vl_")]
    hint = (f" ({vl} are official VLoRA kwargs but the state_dict has timm dense keys "
            "'blocks.<l>.*', not 'blocks.<c>.blocks.<k>.*')" if vl and kind == "timm" else "")
    raise ValueError(f"torch_vit: unsupported kwargs {unknown}{hint}; allowed are {sorted(allowed)}")
  for k, default in FIXED.items():
    if k in kwargs and kwargs[k] != default:
      raise ValueError(f"torch_vit: {k}={kwargs[k]!r} is not supported (vlora_jax ViT implements "
                       f"timm's default {k}={default!r})")
  cfg = dict(TIMM_DEFAULTS)
  if kind == "official":
    cfg.update(OFFICIAL_DEFAULTS)
  cfg.update({k: v for k, v in kwargs.items() if k in cfg})
  d, h = cfg["embed_dim"], cfg["num_heads"]
  for k in ("img_size", "patch_size", "in_chans", "num_classes", "embed_dim", "depth", "num_heads"):
    if isinstance(cfg[k], bool) or not isinstance(cfg[k], int) or cfg[k] < 1:
      raise ValueError(f"torch_vit: {k}={cfg[k]!r} must be an integer >= 1")
  if d % h:
    raise ValueError(f"torch_vit: embed_dim={d} is not divisible by num_heads={h}")
  if cfg["img_size"] % cfg["patch_size"]:
    raise ValueError(f"torch_vit: img_size={cfg['img_size']} is not divisible by "
                     f"patch_size={cfg['patch_size']}")
  if cfg["global_pool"] not in ("token", "avg"):
    raise ValueError(f"torch_vit: global_pool={cfg['global_pool']!r}: allowed are ['token', 'avg']")
  if cfg["global_pool"] == "token" and not cfg["class_token"]:
    raise ValueError("torch_vit: global_pool='token' needs class_token=True")
  # timm moves the final norm after pooling (fc_norm) by default for 'avg'.
  cfg["fc_norm"] = cfg["global_pool"] == "avg" if cfg["fc_norm"] is None else bool(cfg["fc_norm"])
  if cfg["fc_norm"] and "fc_norm" not in ViT.__dataclass_fields__:
    raise ValueError(
        f"torch_vit: fc_norm={cfg['fc_norm']} (timm's default for global_pool='avg': LayerNorm after "
        "pooling) is not supported by vlora_jax.models.vit.ViT, which applies the final norm before "
        "pooling; only checkpoints built with fc_norm=False import")
  if kind == "official":
    names = cfg["vl_param_name"]
    names = [names] if isinstance(names, str) else list(names)
    n = len(names)
    for k in ("vl_rank", "vl_alpha"):
      v = cfg[k]
      v = list(v) if isinstance(v, (list, tuple)) else [v] * n
      if len(v) != n:
        raise ValueError(f"torch_vit: {k}={cfg[k]!r} has {len(v)} entries but vl_param_name has {n} "
                         f"({names}); give one per name, in that order")
      cfg[k] = v
    cfg["vl_param_name"] = names
    if isinstance(cfg["vl_size"], bool) or not isinstance(cfg["vl_size"], int) or cfg["vl_size"] < 1:
      raise ValueError(f"torch_vit: vl_size={cfg['vl_size']!r} must be an integer >= 1")
  return cfg


def _expected(kind: str, cfg: dict) -> dict[str, tuple[int, ...]]:
  """Every key the torch model's state_dict has, with its shape."""
  d, p, n_cls = cfg["embed_dim"], cfg["patch_size"], cfg["num_classes"]
  tokens = (cfg["img_size"] // p) ** 2 + int(cfg["class_token"])
  block = _block_params(d, int(d * cfg["mlp_ratio"]))
  if not cfg["qkv_bias"]:
    block.pop("attn.qkv.bias")
  exp = {"patch_embed.proj.weight": (d, cfg["in_chans"], p, p), "patch_embed.proj.bias": (d,),
         "pos_embed": (1, tokens, d), "head.weight": (n_cls, d), "head.bias": (n_cls,)}
  if cfg["class_token"]:
    exp["cls_token"] = (1, 1, d)
  norm = "fc_norm" if cfg["fc_norm"] else "norm"
  exp[f"{norm}.weight"], exp[f"{norm}.bias"] = (d,), (d,)
  if kind == "timm":
    for l in range(cfg["depth"]):
      exp.update({f"blocks.{l}.{k}": s for k, (_, s) in block.items()})
    return exp
  for c in range(cfg["depth"]):
    for k in range(cfg["vl_size"]):
      pre = f"blocks.{c}.blocks.{k}."
      for name, (_, shape) in block.items():
        if k == 0 or name not in cfg["vl_param_name"]:
          exp[pre + name] = shape
          continue
        mod, _, pname = name.rpartition(".")
        par = f"{pre}{mod}.parametrizations.{pname}."
        exp[par + "original"] = shape
        r = cfg["vl_rank"][cfg["vl_param_name"].index(name)]
        if len(shape) == 1:
          exp[par + "0.A"] = shape
        else:
          exp[par + "0.A"], exp[par + "0.B"] = (r, shape[1]), (r, shape[0])
  return exp


def _validate(sd: dict[str, np.ndarray], kind: str, cfg: dict) -> None:
  """Raises ONE ValueError listing every missing, extra, wrong-shape and inconsistent key."""
  if kind == "official":
    block = _block_params(cfg["embed_dim"], int(cfg["embed_dim"] * cfg["mlp_ratio"]))
    bad = [n for n in cfg["vl_param_name"] if n not in block]
    if bad:
      raise ValueError(f"torch_vit: vl_param_name entries {bad} are not parameters of a timm Block; "
                       f"its parameters are {sorted(block)}")
  exp = _expected(kind, cfg)
  missing = sorted(set(exp) - set(sd))
  extra = sorted(set(sd) - set(exp))
  shapes = sorted(f"{k}: got {tuple(sd[k].shape)}, expected {exp[k]}"
                  for k in set(exp) & set(sd) if tuple(sd[k].shape) != exp[k])
  copies = []
  if kind == "official" and not shapes:
    for k in sorted(sd):
      m = re.fullmatch(r"(blocks\.\d+\.blocks\.)\d+\.(.*)\.parametrizations\.(\w+)\.original", k)
      if m and f"{m[1]}0.{m[2]}.{m[3]}" in sd:
        base = sd[f"{m[1]}0.{m[2]}.{m[3]}"]
        if not np.array_equal(sd[k], base):
          copies.append(f"{k} differs from the compound's W_0 {m[1]}0.{m[2]}.{m[3]} "
                        f"(max |diff| {np.abs(sd[k] - base).max():.3g})")
  if missing or extra or shapes or copies:
    parts = [f"torch_vit: the {kind} state_dict does not match the kwargs "
             f"{ {k: v for k, v in cfg.items()} }:"]
    for title, items in (("missing keys", missing), ("unexpected keys", extra),
                         ("wrong shapes", shapes), ("W_0 copies that differ from the base", copies)):
      if items:
        parts.append(f"  {len(items)} {title}:\n" + "\n".join(f"    {i}" for i in items))
    raise ValueError("\n".join(parts))


def _spec(cfg: dict, block: dict) -> VLoRASpec | None:
  if cfg["vl_size"] == 1:  # a compound of one layer is the dense model
    return None
  kw = dict(compound_size=cfg["vl_size"],
            targets=tuple(re.escape(block[n][0]) for n in cfg["vl_param_name"]),
            rank=tuple(cfg["vl_rank"]), alpha=tuple(float(a) for a in cfg["vl_alpha"]))
  if not cfg["vl_enabled"]:  # official: every layer uses W_0 itself, not detached
    return VLoRASpec(mode="tied", stop_gradient_base=False, **kw)
  return VLoRASpec.official(**kw)


def _stack(sd, kind: str, cfg: dict, spec: VLoRASpec | None, block: dict) -> dict:
  """The ``blocks`` LayerStack params: ``per_layer`` (and ``base``, ``inc_*`` for VLoRA)."""
  def get(key):
    if key not in sd and key.endswith("attn.qkv.bias") and not cfg["qkv_bias"]:
      # timm's qkv_bias=False: our block always has a bias, and zero computes the same map.
      return np.zeros((3 * cfg["embed_dim"],), np.float32)
    return _to_ours(sd[key])

  flat = {}
  if kind == "timm" or spec is None:
    if kind == "timm":
      layer_keys = [f"blocks.{l}." for l in range(cfg["depth"])]
    else:
      layer_keys = [f"blocks.{c}.blocks.0." for c in range(cfg["depth"])]
    for name, (path, _) in block.items():
      flat[f"per_layer/{path}"] = np.stack([get(pre + name) for pre in layer_keys])
    return traverse_util.unflatten_dict(flat, sep="/")
  s, n_c = cfg["vl_size"], cfg["depth"]
  for name, (path, shape) in block.items():
    if name not in cfg["vl_param_name"]:
      flat[f"per_layer/{path}"] = np.stack(
          [get(f"blocks.{c}.blocks.{k}.{name}") for c in range(n_c) for k in range(s)])
      continue
    flat[f"base/{path}"] = np.stack([get(f"blocks.{c}.blocks.0.{name}") for c in range(n_c)])
    if not cfg["vl_enabled"]:
      continue  # tied: the stored A (and B) are unused by the official forward
    mod, _, pname = name.rpartition(".")
    par = lambda c, k: f"blocks.{c}.blocks.{k}.{mod}.parametrizations.{pname}.0."
    steps = lambda leaf, f: np.stack(
        [np.stack([f(sd[par(c, k) + leaf]) for k in range(1, s)]) for c in range(n_c)])
    if len(shape) == 1:
      flat[f"inc_vec/{path}"] = steps("A", lambda a: a)
    else:
      flat[f"inc_a/{path}"] = steps("A", lambda a: a.T)  # [r, in] -> [in, r]
      flat[f"inc_b/{path}"] = steps("B", lambda b: b)    # [r, out]
  return traverse_util.unflatten_dict(flat, sep="/")


def torch_vit(state_dict: Mapping[str, Any] | str | os.PathLike, *, dtype=jnp.float32,
              scan: bool = True, **kwargs) -> tuple[ViT, dict]:
  """A timm or official-VLoRA ViT checkpoint -> ``(module, variables)``.

  Args:
    state_dict: ``{name: numpy array}`` (e.g. ``{k: v.numpy() for k, v in model.state_dict()
      .items()}``) or a path to an ``.npz`` or ``.safetensors`` file of it.
    dtype: computation dtype of the module (parameters stay float32).
    scan: run the layer stack as one scan (default) or unrolled.
    **kwargs: the torch constructor kwargs: ``img_size, patch_size, in_chans, embed_dim, depth,
      num_heads, mlp_ratio, num_classes, class_token, global_pool, qkv_bias, fc_norm`` (timm's
      defaults where absent) and, for the official VLoRA ViT, ``vl_size, vl_rank, vl_alpha,
      vl_enabled, vl_param_name`` (its defaults where absent; ``vl_rank`` / ``vl_alpha`` may be lists
      in the order of ``vl_param_name``, by default qkv, proj, fc1, fc2). The official ``depth``
      counts compounds; the returned ViT's ``depth`` counts layers (``depth * vl_size``).
      Dropout-rate kwargs are accepted and ignored. A ``.safetensors`` file written by
      `vlora_jax.export` carries its kwargs (`saved_kwargs`): they are the defaults here.

  Returns:
    ``(module, variables)``: ``module.apply(variables, images_nhwc)`` are the logits.

  Raises:
    WeightsError: (a ValueError) in one error listing them all, weights that are not floating
      point or not finite, before anything else is checked or built.
    ValueError: bad or unsupported kwargs; or, in one error listing them all, missing, unexpected
      and wrong-shape keys and official W_0 copies that differ from their base.
  """
  sd = load_state_dict(state_dict)
  kind = detect(sd)
  cfg = _check_kwargs(kind, {**saved_kwargs(state_dict), **kwargs})
  _validate(sd, kind, cfg)
  d = cfg["embed_dim"]
  block = _block_params(d, int(d * cfg["mlp_ratio"]))
  spec = _spec(cfg, block) if kind == "official" else None
  layers = cfg["depth"] * (cfg["vl_size"] if kind == "official" else 1)
  extra = {"fc_norm": True} if cfg["fc_norm"] else {}
  module = ViT(num_classes=cfg["num_classes"], patch_size=cfg["patch_size"], dim=d, depth=layers,
               num_heads=cfg["num_heads"], mlp_ratio=cfg["mlp_ratio"],
               class_token=cfg["class_token"], global_pool=cfg["global_pool"], vlora=spec,
               scan=scan, dtype=dtype, **extra)
  norm = "fc_norm" if cfg["fc_norm"] else "norm"
  params = {
      "patch_embed": {"kernel": _to_ours(sd["patch_embed.proj.weight"]),
                      "bias": sd["patch_embed.proj.bias"]},
      "pos_embed": sd["pos_embed"],
      "blocks": _stack(sd, kind, cfg, spec, block),
      norm: {"scale": sd[f"{norm}.weight"], "bias": sd[f"{norm}.bias"]},
      "head": {"kernel": sd["head.weight"].T, "bias": sd["head.bias"]},
  }
  if cfg["class_token"]:
    params["cls_token"] = sd["cls_token"]
  variables = {"params": jax.tree.map(jnp.asarray, params)}
  _check_against_init(module, variables, cfg)
  return module, variables


def _check_against_init(module: ViT, variables, cfg: dict) -> None:
  """The imported tree must be exactly what ``module.init`` makes (names, nesting, shapes)."""
  images = jax.ShapeDtypeStruct((1, cfg["img_size"], cfg["img_size"], cfg["in_chans"]), jnp.float32)
  want = nn.unbox(jax.eval_shape(module.init, jax.random.key(0), images))
  got_s = jax.tree.map(lambda a: (a.shape, str(a.dtype)), variables)
  want_s = jax.tree.map(lambda a: (a.shape, str(a.dtype)), want)
  if got_s != want_s:  # a bug here, not in the user's checkpoint: the key checks ran before
    raise AssertionError("torch_vit built a tree unlike ViT.init's:\n"
                         f"got  {json.dumps(jax.tree.map(str, got_s), sort_keys=True)[:2000]}\n"
                         f"want {json.dumps(jax.tree.map(str, want_s), sort_keys=True)[:2000]}")
