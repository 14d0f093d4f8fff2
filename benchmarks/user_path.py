"""A user's path to our train step: the official PyTorch VLoRA weights, imported, under plain optax.

What a researcher who brings the official model's ``state_dict`` does without our trainer:
`vlora_jax.convert.torch_vit` turns it into ``(module, variables)``, and they write the textbook
step around ``module.apply``: cross-entropy, ``jax.grad``, ``optax.chain(clip_by_global_norm,
adamw)`` with the official step's settings (`benchmarks.torch_ref.UPDATE`), jitted with the state
donated. No config, no metrics, no sharding rules.

The worker (`worker`, a fresh process each: our allocator tuning is what ``import vlora_jax``
gives it) imports the weights the official worker saved and times one step per request;
`benchmarks.bench` times it beside the official step as ``torch/user_path_over_official``.
"""

from __future__ import annotations

import json
import time

from benchmarks import harness, torch_ref


def worker(cfg: dict) -> None:
  """Imports ``cfg["weights"]`` (the official model's ``.npz``) with the official constructor
  kwargs ``cfg["official"]``, compiles the plain optax step on a random batch of ``cfg["batch"]``,
  then times one step per request."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel

  from vlora_jax.convert import torch_vit  # pylint: disable=import-outside-toplevel

  k = cfg["official"]
  module, variables = torch_vit(cfg["weights"], scan=cfg["scan"], **k)
  params = variables["params"]
  count = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(params))
  u = torch_ref.UPDATE
  tx = optax.chain(optax.clip_by_global_norm(u["clip_norm"]),
                   optax.adamw(u["lr"], weight_decay=u["weight_decay"]))
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(cfg["batch"], k["img_size"], k["img_size"], 3)), jnp.float32)
  y = jnp.asarray(rng.integers(0, k["num_classes"], cfg["batch"]))

  def loss_fn(p):
    logits = module.apply({"params": p}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def step(p, opt_state):
    loss, grads = jax.value_and_grad(loss_fn)(p)
    updates, opt_state = tx.update(grads, opt_state, p)
    return optax.apply_updates(p, updates), opt_state, loss

  state = [params, tx.init(params)]
  t0 = time.perf_counter()
  step = jax.jit(step, donate_argnums=(0, 1)).lower(*state).compile()
  compile_s = time.perf_counter() - t0

  def timed(_):
    t = time.perf_counter()
    state[0], state[1], loss = step(*state)
    jax.block_until_ready((state, loss))
    return {"s": time.perf_counter() - t, "loss": float(loss)}

  timed(None)  # the first calls settle the heap
  timed(None)
  harness.serve({"ready": "user_path", "compile_s": compile_s,
                 "params": count}, timed)


def start(weights: str, official: dict, batch: int, scan: bool = True) -> harness.Worker:
  """The resident worker of the user's path on the official weights in ``weights``."""
  cmd = harness.module_command("benchmarks.user_path", json.dumps(
      {"weights": weights, "official": official, "batch": batch, "scan": scan}))
  return harness.Worker(cmd, cwd=harness.ROOT, name="user_path")


if __name__ == "__main__":
  import sys
  worker(json.loads(sys.argv[1]))
