"""`convert.torch_vit` refuses weights that are not finite floating point, in one error (no torch)."""

import importlib

import numpy as np
import pytest
from test_convert import load

from vlora_jax.convert.torch_vit import WeightsError
from vlora_jax.errors import UserError

module = importlib.import_module("vlora_jax.convert.torch_vit")  # the package exports the function
QKV, HEAD = "blocks.0.attn.qkv.weight", "head.bias"


def _int64(sd):
  sd[QKV] = np.round(sd[QKV] * 100).astype(np.int64)
  sd[HEAD] = sd[HEAD] > 0
  return "2 non-float keys", [f"{QKV}: int64", f"{HEAD}: bool"]


def _nan(sd):
  sd[QKV] = sd[QKV].copy()
  sd[QKV][0, :3] = np.nan
  sd[QKV][1, 0] = np.inf
  sd[HEAD] = np.full(sd[HEAD].shape, -np.inf)
  return "2 keys with NaN/inf", [f"{QKV}: 3 NaN and 1 inf of {sd[QKV].size} values",
                                 f"{HEAD}: 0 NaN and {sd[HEAD].size} inf"]


@pytest.mark.parametrize("spoil", [_int64, _nan], ids=["int64_weights", "nan_weights"])
def test_bad_weights_are_refused_in_one_error(spoil, monkeypatch):
  sd, kwargs, _, _ = load("timm_token")
  sd = dict(sd)
  assert module.torch_vit(sd, **kwargs)  # the clean checkpoint imports
  title, items = spoil(sd)
  monkeypatch.setattr(module, "ViT", None)  # refused before anything is built
  with pytest.raises(WeightsError) as e:
    module.torch_vit(sd, **kwargs)
  assert isinstance(e.value, ValueError) and isinstance(e.value, UserError)
  msg = str(e.value)
  assert title in msg and all(i in msg for i in items), msg
