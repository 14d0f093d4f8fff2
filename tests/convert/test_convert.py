"""`convert.torch_vit`: parity with timm and the official VLoRA on committed fixtures (no torch).

The fixtures (tests/fixtures/torch_*.npz) come from tests/fixtures/make_torch_fixtures.py, run with
torch 2.13, timm 1.0.31 and the official ``vlora`` package; every parameter there is perturbed.
"""

import dataclasses
import json
import pathlib
import re

import jax
import numpy as np
import pytest

from vlora_jax.convert import torch_vit
from vlora_jax.models.vit import ViT

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures"
TOL = 1e-5  # max |logits - torch logits|, float32


def load(name):
  with np.load(FIXTURES / f"torch_{name}.npz") as z:
    sd = {k[len("state_dict/"):]: z[k] for k in z.files if k.startswith("state_dict/")}
    return sd, json.loads(str(z["kwargs"])), z["images"], z["logits"]


def logits(module, variables, images):
  return np.asarray(jax.jit(module.apply)(variables, images))


# name -> (mode of the imported stack or None for dense, compound size, layers)
EXPECTED = {
    "timm_token": (None, 1, 2),
    "timm_avg": (None, 1, 2),
    "official": ("anchored", 2, 4),
    "official_lists": ("anchored", 3, 3),
    "official_vectors": ("anchored", 3, 3),
    "official_tied": ("tied", 2, 2),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_fixture_parity(name):
  sd, kwargs, images, want = load(name)
  module, variables = torch_vit(sd, **kwargs)
  got = logits(module, variables, images)
  err = float(np.abs(got - want).max())
  print(f"{name}: max |dlogits| = {err:.2e}")
  assert err <= TOL, err
  assert float(np.abs(want).max()) > 0.5  # the comparison is not between near-zero outputs
  mode, size, layers = EXPECTED[name]
  assert module.depth == layers
  if mode is None:
    assert module.vlora is None
  else:
    assert (module.vlora.mode, module.vlora.compound_size) == (mode, size)
    assert module.vlora.stop_gradient_base == (mode == "anchored")


def test_official_lists_map_per_target():
  sd, kwargs, _, _ = load("official_lists")
  module, variables = torch_vit(sd, **kwargs)
  spec = module.vlora
  assert spec.ranks == (2, 3, 4, 5) and spec.alphas == (1.0, 3.0, 2.0, 5.0)
  stack = variables["params"]["blocks"]
  assert stack["inc_a"]["attn"]["qkv"]["kernel"].shape == (1, 2, 32, 2)   # [C, s-1, in, r]
  assert stack["inc_b"]["mlp"]["fc2"]["kernel"].shape == (1, 2, 5, 32)    # [C, s-1, r, out]
  # torch A [r, in] -> ours [in, r]; B [r, out] stays.
  a = sd["blocks.0.blocks.2.attn.proj.parametrizations.weight.0.A"]
  np.testing.assert_array_equal(stack["inc_a"]["attn"]["proj"]["kernel"][0, 1], a.T)


def test_official_vectors_become_inc_vec():
  sd, kwargs, _, _ = load("official_vectors")
  _, variables = torch_vit(sd, **kwargs)
  stack = variables["params"]["blocks"]
  np.testing.assert_array_equal(stack["inc_vec"]["norm1"]["scale"][0, 0],
                                sd["blocks.0.blocks.1.norm1.parametrizations.weight.0.A"])
  assert "scale" not in stack["per_layer"]["norm1"]  # targeted: base + increments only


def test_anchored_reading_is_what_the_fixture_pins():
  """The fixture tells anchored from cumulative: the same weights read cumulatively miss it."""
  sd, kwargs, images, want = load("official_lists")
  module, variables = torch_vit(sd, **kwargs)
  wrong = module.clone(vlora=dataclasses.replace(module.vlora, mode="cumulative"))
  assert float(np.abs(logits(wrong, variables, images) - want).max()) > 100 * TOL


def test_timm_avg_fc_norm():
  """timm's default for global_pool='avg' normalises after pooling (fc_norm)."""
  sd, kwargs, images, want = load("timm_avg_fc_norm")
  if "fc_norm" not in ViT.__dataclass_fields__:
    with pytest.raises(ValueError, match="fc_norm"):
      torch_vit(sd, **kwargs)
    return
  module, variables = torch_vit(sd, **kwargs)
  assert float(np.abs(logits(module, variables, images) - want).max()) <= TOL


def test_npz_path(tmp_path):
  sd, kwargs, images, want = load("timm_token")
  path = tmp_path / "sd.npz"
  np.savez(path, **sd)
  module, variables = torch_vit(str(path), **kwargs)
  assert float(np.abs(logits(module, variables, images) - want).max()) <= TOL


def test_conv_patch_embed_layout():
  sd, kwargs, _, _ = load("timm_avg")  # in_chans=1
  _, variables = torch_vit(sd, **kwargs)
  kernel = variables["params"]["patch_embed"]["kernel"]
  assert kernel.shape == (4, 4, 1, 32)  # torch [out, in, kh, kw] -> [kh, kw, in, out]
  w = sd["patch_embed.proj.weight"]
  assert float(kernel[1, 3, 0, 7]) == float(w[7, 0, 1, 3])


def test_bad_keys_listed_in_one_error():
  sd, kwargs, _, _ = load("official")
  sd = dict(sd)
  del sd["blocks.1.blocks.1.mlp.fc1.bias"]
  del sd["blocks.0.blocks.1.attn.qkv.parametrizations.weight.0.B"]
  sd["blocks.0.blocks.0.attn.extra.weight"] = np.zeros((3,), np.float32)
  sd["head.weight"] = np.zeros((7, 32), np.float32)
  sd["blocks.1.blocks.0.norm2.bias"] = np.zeros((31,), np.float32)
  with pytest.raises(ValueError) as e:
    torch_vit(sd, **kwargs)
  msg = str(e.value)
  for key in ("blocks.1.blocks.1.mlp.fc1.bias",
              "blocks.0.blocks.1.attn.qkv.parametrizations.weight.0.B",
              "blocks.0.blocks.0.attn.extra.weight", "head.weight: got (7, 32), expected (5, 32)",
              "blocks.1.blocks.0.norm2.bias: got (31,), expected (32,)"):
    assert key in msg, (key, msg)
  assert re.search(r"2 missing keys", msg) and re.search(r"1 unexpected keys", msg)
  assert re.search(r"2 wrong shapes", msg)


def test_w0_copy_that_differs_fails():
  sd, kwargs, _, _ = load("official")
  sd = dict(sd)
  key = "blocks.1.blocks.1.mlp.fc2.parametrizations.weight.original"
  sd[key] = sd[key] + 1e-3
  base = "blocks.1.blocks.0.mlp.fc2.weight"
  with pytest.raises(ValueError, match=re.escape(key) + ".*differs.*" + re.escape(base)):
    torch_vit(sd, **kwargs)


def test_wrong_kwargs_fail_clearly():
  sd, kwargs, _, _ = load("timm_token")
  with pytest.raises(ValueError, match="vl_size.*timm dense keys"):
    torch_vit(sd, vl_size=2, **kwargs)
  with pytest.raises(ValueError, match="no_embed_class=True"):
    torch_vit(sd, no_embed_class=True, **kwargs)
  with pytest.raises(ValueError, match="embed_dim=32 is not divisible by num_heads=3"):
    torch_vit(sd, **dict(kwargs, num_heads=3))
  with pytest.raises(ValueError, match=r"(?s)wrong shapes.*blocks\.0\.mlp\.fc1\.weight"):
    torch_vit(sd, **dict(kwargs, mlp_ratio=4.0))  # a wrong config surfaces as shape errors
  sd, kwargs, _, _ = load("official")
  with pytest.raises(ValueError, match=r"vl_rank=\[1, 2\] has 2 entries.*vl_param_name has 4"):
    torch_vit(sd, **dict(kwargs, vl_rank=[1, 2]))


def test_qkv_bias_false_is_a_zero_bias():
  sd, kwargs, images, _ = load("timm_token")
  no_bias = {k: v for k, v in sd.items() if not k.endswith("attn.qkv.bias")}
  zero_bias = {k: (np.zeros_like(v) if k.endswith("attn.qkv.bias") else v) for k, v in sd.items()}
  module, variables = torch_vit(no_bias, qkv_bias=False, **kwargs)
  np.testing.assert_array_equal(logits(module, variables, images),
                                logits(*torch_vit(zero_bias, **kwargs), images))
  with pytest.raises(ValueError, match="(?s)unexpected keys.*blocks.0.attn.qkv.bias"):
    torch_vit(sd, qkv_bias=False, **kwargs)


def load_grads(name):
  with np.load(FIXTURES / f"torch_{name}.npz") as z:
    grads = {k[len("grad/"):]: z[k] for k in z.files if k.startswith("grad/")}
    return grads, z["grad_cotangent"]


@pytest.mark.parametrize("name", ["official", "official_lists", "official_vectors",
                                  "official_tied"])
def test_gradients_equal_the_official_code(name):
  """Anchored + stop-gradient is the official code in its gradients too, not only its outputs.

  The official gradients of sum(g * logits), mapped into our layout by the same importer as the
  weights (it only transposes, reshapes and stacks, so gradients map as the weights do), against ours: W_0 gets gradient only through layer 0 of its
  compound on both sides.
  """
  import jax.numpy as jnp
  sd, kwargs, images, _ = load(name)
  torch_grads, cot = load_grads(name)
  module, variables = torch_vit(sd, **kwargs)
  _, want = torch_vit(torch_grads, **kwargs)
  loss = lambda p: jnp.sum(jnp.asarray(cot) * module.apply({"params": p}, images))
  got = jax.grad(loss)(variables["params"])
  flat_got = dict(jax.tree_util.tree_leaves_with_path(got))
  flat_want = dict(jax.tree_util.tree_leaves_with_path(want["params"]))
  assert flat_got.keys() == flat_want.keys()
  scale = max(float(np.abs(w).max()) for w in flat_want.values())
  assert scale > 0.1  # real gradients, not near-zero ones
  for path, g in flat_got.items():
    np.testing.assert_allclose(g, flat_want[path], atol=1e-5 * scale, rtol=1e-4,
                               err_msg=jax.tree_util.keystr(path))
  base = [p for p in flat_got if "base" in jax.tree_util.keystr(p)]
  assert base and all(float(np.abs(flat_got[p]).max()) > 0 for p in base)
