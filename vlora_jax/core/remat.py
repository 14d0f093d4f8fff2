"""Rematerialisation policies by name (``config.model.remat``), the set MaxText offers.

A policy decides which of a layer's activations the backward pass keeps and which it recomputes
from the layer's input: the memory of a train step against its compute. Blocks tag the
activations that the named policies select (`tag`, ``jax.ad_checkpoint.checkpoint_name``); a block
of your own that tags its projections with the same names gets the same policies. Whatever the
policy, a VLoRA layer's weights are rebuilt in the backward pass, never kept
(`stack.weight_policy`).

  none                   keep everything (no rematerialisation)
  full                   keep nothing: each layer's input only, the layer recomputed
  dots                   keep every matmul output
  dots_no_batch          keep the matmuls without batch dimensions: the projections and the
                         MLP, not attention's logits (MaxText's 'minimal')
  save_qkv_proj          keep the query/key/value projections only
  save_proj              keep the query/key/value and the attention output projections
  offload_qkv_proj       the query/key/value projections go to host memory, nothing else kept
  offload_dots_no_batch  'dots_no_batch', with what it keeps moved to host memory (MaxText's
                         'minimal_offloaded')
  offload_layer_inputs   'full', with each layer's input moved to host memory: device memory
                         then holds no activation of a layer that is not running (MaxText's
                         offloaded 'decoder_layer_input')

The offloading policies need a backend with a pinned host memory space (TPU, GPU, CPU).
"""

from __future__ import annotations

import jax
from jax.ad_checkpoint import checkpoint_name

QKV_PROJ = "qkv_proj"  # query, key and value projections (fused or not)
OUT_PROJ = "out_proj"  # attention's output projection
LAYER_INPUT = "layer_input"  # a layer's input in the stack (`stack.run_layers` tags it)

_cp = jax.checkpoint_policies
_OFFLOAD = {"offload_src": "device", "offload_dst": "pinned_host"}

POLICIES = {
    "none": None,
    "full": _cp.nothing_saveable,
    "dots": _cp.dots_saveable,
    "dots_no_batch": _cp.dots_with_no_batch_dims_saveable,
    "save_qkv_proj": _cp.save_only_these_names(QKV_PROJ),
    "save_proj": _cp.save_only_these_names(QKV_PROJ, OUT_PROJ),
    "offload_qkv_proj": _cp.save_and_offload_only_these_names(
        names_which_can_be_saved=(), names_which_can_be_offloaded=(QKV_PROJ,), **_OFFLOAD),
    "offload_dots_no_batch": _cp.offload_dot_with_no_batch_dims(**_OFFLOAD),
    "offload_layer_inputs": _cp.save_and_offload_only_these_names(
        names_which_can_be_saved=(), names_which_can_be_offloaded=(LAYER_INPUT,), **_OFFLOAD),
}


def tag(x: jax.Array, name: str) -> jax.Array:
  """``x`` named for the policies above (the identity outside ``jax.checkpoint``)."""
  return checkpoint_name(x, name)
