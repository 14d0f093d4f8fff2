"""The library's front door: docs/guide.md's own-block snippet runs as written, and every public
function takes parameters as ``init`` returns them (boxed) or unboxed, under x64 too."""

from __future__ import annotations

import re
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import vlora_jax
from vlora_jax import LoRASpec, VLoRASpec, dense_twin, to_dense, vlorafy
from vlora_jax.core import lora as lora_lib
from vlora_jax.core import params as params_lib
from vlora_jax.core import stack
from vlora_jax.core.layers import EncoderBlock

ROOT = Path(__file__).resolve().parents[2]
GUIDE = ROOT / "docs" / "guide.md"
# The python block after this line runs here: docs/guide.md has one, and README.md too once the
# line stands before its snippet.
MARK = "<!-- the snippet tests/commands/test_api.py runs -->"
TARGETS = (r"attn/(qkv|proj)/kernel", r"mlp/fc\d/kernel")


def _snippets() -> dict[Path, str]:
  assert MARK in GUIDE.read_text(), "docs/guide.md lost the marked snippet"
  out = {}
  for doc in (GUIDE, ROOT / "README.md"):
    text = doc.read_text()
    if MARK in text:
      out[doc] = re.search(r"```python\n(.*?)```", text[text.index(MARK):], re.S).group(1)
  return out


@pytest.mark.parametrize("doc", sorted(_snippets()), ids=lambda p: p.name)
def test_the_documents_own_block_snippet_runs(doc):
  scope: dict = {}
  exec(compile(_snippets()[doc], str(doc), "exec"), scope)  # pylint: disable=exec-used
  # It trained: the loss fell, and the merged twin is dense.
  assert float(scope["loss"]) < float(jnp.mean(scope["y"] ** 2))
  assert set(scope["twin_variables"]["params"]) == {"per_layer"}
  assert scope["twin"].vlora is None


def test_the_front_door_names():
  assert {"vlorafy", "VLoRASpec", "LoRASpec", "load", "to_dense", "dense_twin"} <= set(
      vlora_jax.__all__)
  assert vlora_jax.load is vlora_jax.runs.trained.load
  with pytest.raises(AttributeError, match="no attribute 'nope'"):
    vlora_jax.nope  # pylint: disable=pointless-statement


def _stack(mode="anchored", lora=True):
  spec = VLoRASpec(compound_size=2, targets=TARGETS, rank=2, mode=mode,
                   stop_gradient_base=mode == "anchored")
  lspec = LoRASpec(targets=("attn/qkv/kernel",), rank=2) if lora else None
  model = vlorafy(EncoderBlock(dim=16, num_heads=2, mlp_dim=32), num_layers=4, vlora=spec,
                  lora=lspec)
  x = jax.random.normal(jax.random.key(1), (2, 5, 16))
  variables = model.init(jax.random.key(0), x)
  # Every increment non-zero, so that a merge that drops one is seen.
  variables = jax.tree.map(lambda a: a + 0.01, variables)
  return model, spec, lspec, variables, x


def test_public_functions_take_boxed_and_unboxed_params():
  model, spec, lspec, variables, x = _stack()
  boxed = variables["params"]
  is_box = lambda b: isinstance(b, nn.LogicallyPartitioned)
  assert any(map(is_box, jax.tree.leaves(boxed, is_leaf=is_box)))
  plain = nn.unbox(boxed)
  want = model.apply(variables, x)
  for p in (boxed, plain):
    layout = stack.layout_from_params(p, spec)
    assert layout.num_layers == 4 and layout.compound_size == 2
    assert jax.tree.structure(stack.materialize(p, layout)) == jax.tree.structure(
        stack.merge(p, spec, lspec)["per_layer"])
    twin, twin_vars = to_dense(model, {"params": p})
    np.testing.assert_allclose(twin.apply(twin_vars, x), want, atol=1e-5)
    merged = to_dense(model, p)[1]  # params alone give params alone
    assert set(merged) == {"per_layer"}
    assert params_lib.count(p)["total"] == params_lib.count(plain)["total"]
    assert set(lora_lib.adapters(p)) == set(lora_lib.adapters(plain))
    state = lora_lib.optimizer(optax.adam(1e-3), p).init(p)
    assert jax.tree.leaves(state)
  assert twin.lora is None and dense_twin(model).vlora is None


def test_to_dense_refuses_what_is_no_model_it_knows():
  with pytest.raises(TypeError, match="neither a vlorafy stack nor a model with stack_specs"):
    to_dense(nn.Dense(3), {"params": {}})


@pytest.mark.parametrize("mode", ["anchored", "cumulative"])  # a sliced step, all steps
def test_materialize_and_apply_under_x64(mode):
  model, spec, lspec, variables, x = _stack(mode, lora=False)
  want = model.apply(variables, x)
  with jax.enable_x64(True):
    p64 = jax.tree.map(lambda a: np.asarray(a, np.float64), nn.unbox(variables["params"]))
    layout = stack.layout_from_params(p64, spec)
    per_layer = stack.materialize(p64, layout)
    assert jax.tree.leaves(per_layer)
    twin, twin_vars = to_dense(model, {"params": p64})
    got = twin.apply(twin_vars, x)
    np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=1e-4)
