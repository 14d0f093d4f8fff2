"""Parameter counts: closed form == counted, the official figures, groups, bytes, dense twin."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from vlora_jax.core import params
from vlora_jax.models.vit import ViT, vit_param_count
from vlora_jax.core.spec import VLoRASpec


def _images(img):
  return jax.ShapeDtypeStruct((2, img, img, 3), jnp.float32)


@pytest.mark.parametrize("dim,rank,depth,s", [(32, 2, 4, 2), (48, 4, 6, 3), (64, 8, 8, 4),
                                              (96, 1, 12, 6), (64, 16, 12, 12)])
def test_closed_form_equals_counted(dim, rank, depth, s):
  kw = dict(num_classes=7, patch_size=4, dim=dim, depth=depth, num_heads=2, mlp_ratio=4.0)
  vl = ViT(**kw, vlora=VLoRASpec(compound_size=s, rank=rank))
  t = params.table(vl, _images(16))
  closed = dict(img_size=16, patch_size=4, in_chans=3, dim=dim, depth=depth, mlp_ratio=4.0,
                num_classes=7)
  assert t["model"]["total"] == vit_param_count(**closed, compound_size=s, rank=rank)
  assert t["dense"]["total"] == vit_param_count(**closed)
  assert sum(t["model"]["groups"].values()) == t["model"]["total"]


def test_official_cifar_figures():
  """VLORA.md: VLoRA 1,602,634 vs dense 5,362,762 (img 32, patch 4, D 192, 3 heads, 3 x 4, r 8)."""
  model = ViT(num_classes=10, patch_size=4, dim=192, depth=12, num_heads=3,
              vlora=VLoRASpec.official(compound_size=4, rank=8))
  t = params.table(model, _images(32))
  assert t["model"]["total"] == 1_602_634
  assert t["dense"]["total"] == 5_362_762
  assert t["model"]["bytes"] == 4 * 1_602_634
  assert round(t["ratio"], 4) == 0.2988
  # groups: 3 base blocks; 9 increment layers of rank-8 factors; 12 layers of norms and biases.
  g = t["model"]["groups"]
  assert g["base"] == 3 * (192 * 576 + 192 * 192 + 2 * 192 * 768)
  assert g["increments"] == 9 * 8 * ((192 + 576) + (192 + 192) + 2 * (192 + 768))
  assert g["per_layer"] == 12 * (4 * 192 + 576 + 192 + 768 + 192)
  text = params.format_table(t)
  assert "1,602,634" in text and "5,362,762" in text


def test_official_imagenet_figures():
  """VLORA.md: VisionTransformerVLoRA() (ViT-B/16-224, 3 x 4, r 8): 23,751,400 of 86,567,656."""
  model = ViT(num_classes=1000, patch_size=16, dim=768, depth=12, num_heads=12,
              vlora=VLoRASpec.official(compound_size=4, rank=8))
  t = params.table(model, _images(224))
  assert (t["model"]["total"], t["dense"]["total"]) == (23_751_400, 86_567_656)


def test_trainable_filter_and_tied():
  model = ViT(num_classes=3, patch_size=4, dim=16, depth=4, num_heads=2,
              vlora=VLoRASpec(compound_size=2, mode="tied"))
  shapes = params.param_shapes(model, _images(8))
  c = params.count(shapes, trainable=lambda p: "/base/" not in p)
  assert c["groups"]["increments"] == 0
  assert c["trainable"] == c["total"] - c["groups"]["base"]


def test_path_matcher_and_label_tree():
  """One rule selects params by path for ``optim.freeze`` and `lora.optimizer`: full match."""
  tree = {"blocks": {"inc_a": {"kernel": 1}, "per_layer": {"bias": 2}}, "head": {"kernel": 3}}
  head = params.path_matcher(r"head/.*", "optim.freeze")
  assert head("head/kernel") and not head("blocks/head/kernel")  # fullmatch, not search
  both = params.path_matcher((r"head/.*", r"blocks/inc_a/.*"), "trainable")
  assert params.label_tree(tree, both) == {
      "blocks": {"inc_a": {"kernel": True}, "per_layer": {"bias": False}}, "head": {"kernel": True}}
  assert not params.path_matcher("", "optim.freeze")("head/kernel")  # empty selects nothing
  with pytest.raises(ValueError, match=r"optim.freeze='\(bad' is not a valid regex"):
    params.path_matcher("(bad", "optim.freeze")


def test_label_tree_gives_plain_labels_for_boxed_params():
  """Boxed (nn.Partitioned) leaves get plain labels: one label tree serves boxed and unboxed."""
  boxed = {"head": {"kernel": nn.Partitioned(jnp.ones((2, 3)), names=("embed", "vocab"))}}
  labels = params.label_tree(boxed, lambda path: path)
  assert labels == {"head": {"kernel": "head/kernel"}}
  assert labels == params.label_tree(nn.unbox(boxed), lambda path: path)
