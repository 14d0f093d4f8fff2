"""Every bad VLoRA input fails before anything compiles, with a message naming the field and value."""

import jax
import jax.numpy as jnp
import pytest

from vlora_jax.models.vit import ViT
from vlora_jax.core.spec import VLoRASpec

TINY = dict(num_classes=3, patch_size=4, dim=16, depth=4, num_heads=2)
IMAGES = jax.ShapeDtypeStruct((2, 8, 8, 3), jnp.float32)

CONSTRUCTOR_ERRORS = [
    (dict(compound_size=0), "vlora.compound_size=0"),
    (dict(compound_size=2.5), "vlora.compound_size=2.5"),
    (dict(rank=0), "vlora.rank=0"),
    (dict(rank=-3), "vlora.rank=-3"),
    (dict(rank=2.0), "vlora.rank=2.0"),
    (dict(alpha=0.0), "vlora.alpha=0.0"),
    (dict(alpha=-1), "vlora.alpha=-1"),
    (dict(mode="cumulatve"), "vlora.mode='cumulatve'"),
    (dict(scaling="sqrt"), "vlora.scaling='sqrt'"),
    (dict(init="xavier"), "vlora.init='xavier'"),
    (dict(rank=[8, 8]), "vlora.rank=[8, 8] has 2 entries but vlora.targets has 4"),
    (dict(alpha=[1.0, 2.0, 3.0]), "vlora.alpha=[1.0, 2.0, 3.0] has 3 entries"),
    (dict(rank={"attn/qkv/kernel": 4}), "vlora.rank: dict keys must be exactly"),
    (dict(targets=()), "vlora.targets is empty"),
    (dict(targets=("attn/(qkv",)), "vlora.targets[0]='attn/(qkv' is not a valid regex"),
]


@pytest.mark.parametrize("kwargs,message", CONSTRUCTOR_ERRORS,
                         ids=[m.split("=")[0].split(":")[0] + str(i)
                              for i, (_, m) in enumerate(CONSTRUCTOR_ERRORS)])
def test_constructor_rejects(kwargs, message):
  with pytest.raises(ValueError) as e:
    VLoRASpec(**kwargs)
  assert message in str(e.value)
  assert "allowed" in str(e.value) or "must" in str(e.value) or "give" in str(e.value)


SHAPE_ERRORS = [
    (dict(compound_size=3), "vlora.compound_size=3 does not divide num_layers=4"),
    (dict(rank=17), "vlora.rank=17 for 'attn/proj/kernel'"),
    (dict(targets=("attn/qkv/kernel", "mlp/fc3/kernel"), rank=2), "vlora.targets[1]='mlp/fc3/kernel'"
     " matches no parameter"),
]


@pytest.mark.parametrize("kwargs,message", SHAPE_ERRORS, ids=["depth", "rank_too_big", "no_match"])
def test_shape_checks_fail_before_compiling(kwargs, message):
  """Raised while tracing shapes (eval_shape), so no XLA compilation ever starts."""
  model = ViT(**TINY, vlora=VLoRASpec(**kwargs))
  with pytest.raises(ValueError) as e:
    jax.eval_shape(model.init, jax.random.key(0), IMAGES)
  assert message in str(e.value)


def test_rank_error_says_what_is_allowed():
  model = ViT(**TINY, vlora=VLoRASpec(rank=17))
  with pytest.raises(ValueError, match=r"min\(d_in, d_out\)=16"):
    jax.eval_shape(model.init, jax.random.key(0), IMAGES)


def test_no_match_error_lists_the_block_parameters():
  model = ViT(**TINY, vlora=VLoRASpec(targets=("qkv",), rank=2))
  with pytest.raises(ValueError, match="attn/qkv/kernel"):
    jax.eval_shape(model.init, jax.random.key(0), IMAGES)


def test_valid_forms_normalise():
  targets = ("attn/qkv/kernel", "mlp/fc1/kernel")
  a = VLoRASpec(targets=targets, rank=[4, 2], alpha={"attn/qkv/kernel": 1, "mlp/fc1/kernel": 2})
  assert a.ranks == (4, 2) and a.alphas == (1, 2)
  assert VLoRASpec(targets="mlp/fc1/kernel").targets == ("mlp/fc1/kernel",)
  assert VLoRASpec(rank=[8, 8, 8, 8]).rank == 8  # a uniform list collapses to a scalar
  official = VLoRASpec.official(compound_size=4)
  assert (official.mode, official.stop_gradient_base, official.init, official.alpha) == (
      "anchored", True, "official", 1.0)
