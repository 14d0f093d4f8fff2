"""Calibration statistics for activation-aware compression (`compress`'s ``increments='whitened'``).

  covs = calibrate.input_covariances(model, params, batches, targets=spec.targets)
  new_params, reports = compress.compress_tree(params, spec, base="first",
                                               increments="whitened", covariances=covs)

For every layer stack of a dense model and every targeted matrix of its block, the second moment
``E[x x^T]`` of the matrix's input in each layer, ``{stack path: {param path: [L, d_in, d_in]}}``
(float64), over the tokens of the calibration batches (SVD-LLM, Basis Sharing).

How: the model runs with its stacks unrolled (``scan=False``), so that every layer's block is a
separate call, and a Flax method interceptor sees each ``nn.Dense`` the block calls with its input.
The stack (`stack.LayerStack`) that is running names the stack, the Dense's path inside the block
names the parameter, and the order of the calls names the layer. Nothing in the model is changed
for this: the same block code, the same weights.
"""

from __future__ import annotations

import re
from typing import Iterable, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from vlora_jax.core import stack as stack_lib


def input_covariances(model: nn.Module, params, batches: Iterable[Sequence], *,
                      targets: Sequence[str], **apply_kwargs) -> dict[str, dict[str, np.ndarray]]:
  """``{stack path: {param path: E[x x^T] [L, d_in, d_in]}}`` over ``batches``.

  Args:
    model: a dense model (``vlora=None``; VLoRA and LoRA stacks are merged first by the caller,
      e.g. with `stack.to_dense`).
    params: its parameters (boxed or not).
    batches: each a tuple of the positional inputs of ``model.apply`` (e.g. ``(images,)``, or a
      family's ``family.inputs(batch)``).
    targets: regexes over block parameter paths (``spec.targets``); the kernels that match one
      get a covariance.
    apply_kwargs: passed to ``model.apply`` (default ``train=False``).
  """
  if getattr(model, "vlora", None) is not None or getattr(model, "lora", None) is not None:
    raise ValueError("input_covariances: give the dense model (vlora=None, lora=None); merge a "
                     "VLoRA or LoRA model first with stack.to_dense")
  # Unrolled, so that the interceptor sees each layer's inputs as arrays; in float32, so that no
  # layer runs under the jax.checkpoint a narrower activation dtype wraps it in (which would make
  # them tracers) and the statistics are accurate.
  model = model.clone(scan=False, remat="none",
                      **({"dtype": jnp.float32} if hasattr(model, "dtype") else {}))
  params = nn.unbox(params)
  apply_kwargs = {"train": False, **apply_kwargs}
  sums: dict[tuple[str, str], list[np.ndarray]] = {}
  rows: dict[tuple[str, str], int] = {}
  running: list[str] = []  # the stack being run (the innermost last)
  calls: dict[tuple[str, str], int] = {}  # this batch: calls so far of a kernel = its layer

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__" or module.is_initializing():
      return next_fun(*args, **kwargs)  # (shape inference and init run the block too)
    if isinstance(module, stack_lib.LayerStack):
      running.append("/".join(module.path))
      try:
        return next_fun(*args, **kwargs)
      finally:
        running.pop()
    if running and isinstance(module, nn.Dense):
      path = "/".join(module.path) + "/kernel"  # the path inside the block: the stack's key
      if any(re.fullmatch(t, path) for t in targets):
        key = (running[-1], path)
        x = np.asarray(jnp.asarray(args[0], jnp.float32), np.float64)
        x = x.reshape(-1, x.shape[-1])
        layer = calls.get(key, 0)
        calls[key] = layer + 1
        acc = sums.setdefault(key, [])
        if layer == len(acc):
          acc.append(np.zeros((x.shape[1], x.shape[1])))
        acc[layer] += x.T @ x
        if layer == 0:
          rows[key] = rows.get(key, 0) + x.shape[0]
    return next_fun(*args, **kwargs)

  count = 0
  for batch in batches:
    calls.clear()
    with nn.intercept_methods(interceptor):
      model.apply({"params": params}, *batch, **apply_kwargs)
    count += 1
  if not count:
    raise ValueError("input_covariances: batches is empty; give at least one calibration batch")
  if not sums:
    raise ValueError(f"input_covariances: targets={list(targets)} match no Dense kernel inside a "
                     "layer stack of the model")
  out: dict[str, dict[str, np.ndarray]] = {}
  for (stack_path, path), acc in sums.items():
    out.setdefault(stack_path, {})[path] = np.stack(acc) / rows[(stack_path, path)]
  return out
