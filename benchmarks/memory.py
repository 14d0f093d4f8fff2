"""Train-step memory, VLoRA against dense: does VLoRA's parameter saving become a memory saving?

  .venv/bin/python -m benchmarks.memory                  # -> benchmarks/results/bench_memory.json
  .venv/bin/python -m benchmarks.memory --quick --no-rss --no-depth --out /tmp/bench_memory.json

In one run, for every size and variant (dense; VLoRA cumulative, anchored, and anchored with the
official stop-gradient; compound size 4, rank 8):

  1. compiled memory: XLA's ``memory_analysis()`` of the jitted, donated train step, as
     temp + argument + output - alias bytes, at sizes far beyond this machine's RAM. For the ViT
     and the LMs it is the real train step of `vlora_jax.train` (AdamW, clipping, metrics); for the
     bare stack of 24 `layers.EncoderBlock`s (D 2048) a sum-of-squares loss with AdamW;
  2. measured peak RSS: a fresh process per variant (a `harness.Worker`) builds the state, runs
     ``--steps`` real steps on synthetic data and reports ``ru_maxrss`` (glibc's allocator
     untuned, so that freed memory leaves the process), wherever the compiled figure fits in 75%
     of the RAM available at the start (the others are recorded as not run, with the reason);
  3. depth that fits a budget: the deepest LM at D 2048 (vocab 32k, 1 x 256 tokens) whose compiled
     train step fits ``--budget-gib``, dense against VLoRA (depth in steps of the compound size),
     with the stack's remat ``none`` (the default) and ``full``.

Writes the JSON (versions, machine, every figure) to ``--out`` and a markdown table beside it.
``--quick`` shrinks every size (a smoke run for tests; its figures mean nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from vlora_jax import models
from vlora_jax.core import layers, stack
from vlora_jax.core.spec import VLoRASpec
from vlora_jax.train import load_config, optim, state as state_lib
from vlora_jax.train.trainer import make_train_step

from benchmarks import harness
from benchmarks.harness import GIB
VARIANTS = {  # name -> model.vlora overrides (None: the dense twin)
    "dense": None,
    "vlora_cumulative": {"mode": "cumulative", "stop_gradient_base": False},
    "vlora_anchored": {"mode": "anchored", "stop_gradient_base": False},
    "vlora_official": {"mode": "anchored", "stop_gradient_base": True},
}
VLORA = {"compound_size": 4, "rank": 8}
LM = {"model.vocab_size": 32000, "model.max_len": 256, "batch_size": 1, "model.dropout": 0.0}


def sizes(quick: bool) -> dict[str, dict]:
  """Each size: ``kind`` (config | stack), and its config file and overrides or stack shape."""
  if quick:
    return {
        "cifar": {"kind": "config", "file": "configs/vit_cifar10.py",
                  "over": {"model.dim": 32, "model.depth": 8, "model.num_heads": 2,
                           "batch_size": 8, "model.dropout": 0.0}},
        "stack_d2048": {"kind": "stack", "dim": 64, "depth": 8, "tokens": 16},
        "lm_d2048": {"kind": "config", "file": "configs/lm_shakespeare.py",
                     "over": dict(LM, **{"model.dim": 64, "model.depth": 8, "model.num_heads": 2,
                                         "model.vocab_size": 512, "model.max_len": 32})},
    }
  return {
      "cifar": {"kind": "config", "file": "configs/vit_cifar10.py",
                "over": {"batch_size": 128, "model.dropout": 0.0}},
      "stack_d2048": {"kind": "stack", "dim": 2048, "depth": 24, "tokens": 256},
      "lm_d1024": {"kind": "config", "file": "configs/lm_shakespeare.py",
                   "over": dict(LM, **{"model.dim": 1024, "model.depth": 16,
                                       "model.num_heads": 16})},
      "lm_d2048": {"kind": "config", "file": "configs/lm_shakespeare.py",
                   "over": dict(LM, **{"model.dim": 2048, "model.depth": 24,
                                       "model.num_heads": 16})},
      # The README's demonstration: a dense twin of 2.42B parameters (char vocabulary).
      "lm_xl": {"kind": "config", "file": "configs/lm_shakespeare.py:xl", "over": {}},
  }


# ---------------------------------------------------------------------------------- the steps


def _config(size: dict, variant: str, extra: dict | None = None):
  over = dict(size["over"], **(extra or {}))
  vl = VARIANTS[variant]
  over["model.vlora.enabled"] = vl is not None
  for k, v in dict(VLORA, **(vl or {})).items():
    over[f"model.vlora.{k}"] = v
  return load_config(str(harness.ROOT / size["file"]), **over)


def _abstract_batch(c) -> dict:
  example = models.family(c.model.name).example_batch(c.model, c.batch_size,
                                                      np.random.default_rng(0))
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), example)


def config_step(size: dict, variant: str, extra: dict | None = None):
  """``(jitted step, abstract state, abstract batch, make_state, parameter count)`` of the real
  train step of `vlora_jax.train` for this size and variant."""
  c = _config(size, variant, extra)
  model = models.build(c.model)
  sample = [jnp.zeros(s.shape, s.dtype) for s in models.sample_inputs(c.model)]
  init = lambda k: nn.unbox(model.init(k, *sample, train=False))["params"]
  params = jax.eval_shape(init, jax.random.key(0))
  opt = optim.build(c.optim, params, max(c.num_train_steps, 1))
  rng_data = jax.random.key_data(jax.random.key(1))
  make_state = lambda: state_lib.create(init(jax.random.key(0)), opt.tx, rng_data)
  state = jax.eval_shape(make_state)
  step = jax.jit(make_train_step(model, models.family(c.model.name), opt, 0.0),
                 donate_argnums=(0,))
  n = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
  return step, state, _abstract_batch(c), make_state, n


def stack_step(size: dict, variant: str, remat: str = "none"):
  """The same for the bare stack: ``sum(stack(x)**2)`` with AdamW."""
  vl = VARIANTS[variant]
  spec = None if vl is None else VLoRASpec(**VLORA, **vl)
  d = size["dim"]
  model = stack.vlorafy(layers.EncoderBlock(d, num_heads=max(1, d // 128), mlp_dim=4 * d),
                        size["depth"], spec, remat=remat)
  x = jax.ShapeDtypeStruct((1, size["tokens"], d), jnp.float32)
  init = lambda: nn.unbox(model.init(jax.random.key(0), jnp.zeros(x.shape, x.dtype)))["params"]
  tx = optax.adamw(1e-3)
  make_state = lambda: (lambda p: {"params": p, "opt_state": tx.init(p)})(init())

  def step(st, x):
    loss, grads = jax.value_and_grad(lambda p: jnp.sum(model.apply({"params": p}, x) ** 2))(
        st["params"])
    updates, opt_state = tx.update(grads, st["opt_state"], st["params"])
    return {"params": optax.apply_updates(st["params"], updates), "opt_state": opt_state}, loss

  state = jax.eval_shape(make_state)
  n = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state["params"]))
  return jax.jit(step, donate_argnums=(0,)), state, x, make_state, n


def build(size: dict, variant: str, extra: dict | None = None):
  if size["kind"] == "stack":
    return stack_step(size, variant, **(extra or {}))
  return config_step(size, variant, extra)


def compiled_memory(step, state, batch) -> dict[str, int]:
  t0 = time.perf_counter()
  m = step.lower(state, batch).compile().memory_analysis()
  out = {k: int(getattr(m, f"{k}_size_in_bytes")) for k in ("temp", "argument", "output", "alias")}
  out["total"] = out["temp"] + out["argument"] + out["output"] - out["alias"]
  out["compile_s"] = round(time.perf_counter() - t0, 2)
  return out


# ------------------------------------------------------------------------- measured peak RSS


def _concrete_batch(batch, rng: np.random.Generator):
  def one(s):
    if jnp.issubdtype(s.dtype, jnp.integer):
      return jnp.asarray(rng.integers(0, 10, s.shape), s.dtype)
    return jnp.asarray(rng.normal(size=s.shape), s.dtype)
  return jax.tree.map(one, batch)


def rss_worker(size_name: str, variant: str, steps: int, quick: bool) -> dict:
  """Runs in a fresh process: build the state, run ``steps`` steps, report the peak RSS."""
  size = sizes(quick)[size_name]
  base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  step, state, batch, make_state, _ = build(size, variant)
  batch = _concrete_batch(batch, np.random.default_rng(0))
  st = jax.jit(make_state)()
  times, losses = [], []
  for _ in range(steps):
    t0 = time.perf_counter()
    st, metrics = step(st, batch)
    loss = metrics["train/loss"] if isinstance(metrics, dict) else metrics
    losses.append(float(loss))
    times.append(time.perf_counter() - t0)
  return {"peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
          "rss_after_imports": base_rss, "step_s": times, "loss": losses}


def measure_rss(size_name: str, variant: str, steps: int, quick: bool) -> dict:
  """`rss_worker` in a fresh process (its result, or ``{"error": ...}``)."""
  cmd = harness.module_command("benchmarks.memory", "--rss-worker", size_name, variant,
                               "--steps", str(steps), *(["--quick"] if quick else []))
  # glibc's default allocator: big blocks are mmapped and unmapped when freed, so the peak RSS is
  # the peak of live memory. With vlora_jax's tuning (vlora_jax/platform/cpu_malloc.py) freed
  # memory stays in the process and the peak RSS reads the heap's fragmentation too (up to 2x
  # here).
  env = dict(os.environ, VLORA_MALLOC_TUNING="0")
  try:
    with harness.Worker(cmd, env=env, cwd=harness.ROOT, name=f"rss {size_name} {variant}") as w:
      return w.info
  except RuntimeError as e:
    return {"error": str(e)[-2000:]}


# ----------------------------------------------------------------------------- depth search


def deepest(size: dict, variant: str, budget: int, remat: str, cap: int) -> dict:
  """The deepest stack whose compiled step fits ``budget`` bytes: any depth for dense, a
  multiple of the compound size for VLoRA (the depths each can have)."""
  unit = 1 if variant == "dense" else VLORA["compound_size"]
  fits = {}

  def ok(depth: int) -> bool:
    s = dict(size, over=dict(size["over"], **{"model.depth": depth, "model.remat": remat}))
    step, state, batch, _, _ = build(s, variant)
    fits[depth] = compiled_memory(step, state, batch)["total"]
    return fits[depth] <= budget

  lo, hi = 0, unit
  while hi <= cap and ok(hi):
    lo, hi = hi, hi * 2
  hi = min(hi, cap + unit)
  while hi - lo > unit:  # lo fits (or is 0), hi does not (or is past the cap)
    mid = (lo + hi) // 2 // unit * unit
    lo, hi = (mid, hi) if ok(mid) else (lo, mid)
  return {"depth": lo, "total_at_depth": fits.get(lo), "at_cap": lo >= cap,
          "compiled": {str(k): v for k, v in sorted(fits.items())}}


# ------------------------------------------------------------------------------------ report


def markdown(result: dict) -> str:
  lines = ["# Train-step memory: VLoRA against dense", "",
           harness.describe(result["environment"]), "",
           f"VLoRA: compound size {VLORA['compound_size']}, rank {VLORA['rank']}. "
           "Compiled = XLA's memory analysis of the jitted, donated train step "
           "(temp + argument + output - alias); RSS = the peak resident size of a fresh process "
           f"that ran {result['config']['steps']} real steps.", "",
           "```", result["command"], "```", ""]
  rows = []
  for size_name, by_variant in result["sizes"].items():
    dense = by_variant["dense"]
    for variant, r in by_variant.items():
      rss = r.get("rss", {})
      rss_gib = f"{rss['peak_rss'] / GIB:.2f}" if "peak_rss" in rss else rss.get("skipped", "-")
      d_rss = dense.get("rss", {}).get("peak_rss")
      rows.append([size_name, variant, f"{r['params']:,}", f"{r['params'] / dense['params']:.3f}",
                   f"{r['compiled']['total'] / GIB:.2f}",
                   f"{r['compiled']['total'] / dense['compiled']['total']:.3f}", rss_gib,
                   f"{rss['peak_rss'] / d_rss:.3f}" if d_rss and "peak_rss" in rss else "-"])
  lines.append(harness.table(["size", "variant", "params", "params / dense", "compiled GiB",
                              "compiled / dense", "peak RSS GiB", "RSS / dense"], rows))
  if result.get("depth"):
    d = result["depth"]
    rows = []
    for remat, r in d["by_remat"].items():
      dn, vl = r["dense"]["depth"], r["vlora_official"]["depth"]
      more = " (the search cap)" if r["vlora_official"]["at_cap"] else ""
      rows.append([remat, dn, f"{vl}{more}", f"{vl / dn:.2f}" if dn else "-"])
    lines += ["", f"Deepest LM at D {d['dim']} (vocab 32k, 1 x 256 tokens) whose compiled train "
              f"step fits {d['budget_gib']} GiB:", "",
              harness.table(["remat", "dense", "VLoRA (official)", "VLoRA / dense"], rows)]
  return "\n".join(lines)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--out", default=None,
                  help="JSON path; a markdown table goes beside it. Default "
                  "benchmarks/results/bench_memory.json, or /tmp/bench_memory_quick.json with "
                  "--quick")
  ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
  ap.add_argument("--steps", type=int, default=3, help="real steps per measured process")
  ap.add_argument("--budget-gib", type=float, default=16.0)
  ap.add_argument("--depth-cap", type=int, default=256, help="the depth search stops here")
  ap.add_argument("--no-rss", action="store_true", help="compiled figures only")
  ap.add_argument("--sizes", nargs="+", help="only these sizes (default: all)")
  ap.add_argument("--no-depth", action="store_true", help="skip the depth search")
  ap.add_argument("--rss-worker", nargs=2, metavar=("SIZE", "VARIANT"), help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if args.rss_worker:
    harness.reply(rss_worker(*args.rss_worker, args.steps, args.quick))
    return
  out = args.out or ("/tmp/bench_memory_quick.json" if args.quick
                     else harness.RESULTS / "bench_memory.json")

  env = harness.environment()
  limit = 0.75 * harness.available_bytes()
  result = {"environment": env, "command": harness.command("benchmarks.memory", argv),
            "config": {"vlora": VLORA, "steps": args.steps, "quick": args.quick}, "sizes": {}}
  for size_name, size in sizes(args.quick).items():
    if args.sizes and size_name not in args.sizes:
      continue
    rows = result["sizes"][size_name] = {}
    for variant in VARIANTS:
      step, state, batch, _, n = build(size, variant)
      rows[variant] = {"params": n, "compiled": compiled_memory(step, state, batch)}
      total = rows[variant]["compiled"]["total"]
      if args.no_rss:
        rows[variant]["rss"] = {"skipped": "--no-rss"}
      elif total > limit:
        rows[variant]["rss"] = {"skipped": f"compiled {total / GIB:.1f} GiB > 75% of the "
                                           f"{harness.available_bytes() / GIB:.1f} GiB available"}
      else:
        rows[variant]["rss"] = measure_rss(size_name, variant, args.steps, args.quick)
      print(size_name, variant, json.dumps(rows[variant])[:300], flush=True)

  result["depth"] = None
  if not args.no_depth:
    lm = sizes(args.quick)["lm_d2048"]
    if args.quick:  # the tiny LM: a budget it outgrows within a few doublings
      args.budget_gib, args.depth_cap = 0.02, 64
    budget = int(args.budget_gib * GIB)
    result["depth"] = {"dim": lm["over"]["model.dim"], "budget_gib": args.budget_gib,
                       "by_remat": {remat: {v: deepest(lm, v, budget, remat, args.depth_cap)
                                            for v in ("dense", "vlora_official")}
                                    for remat in ("none", "full")}}
  if result["depth"]:
    print("depth", json.dumps({r: {v: x["depth"] for v, x in d.items()}
                               for r, d in result["depth"]["by_remat"].items()}), flush=True)
  harness.finish(env)
  print(markdown(result))
  harness.write(out, result, markdown(result))


if __name__ == "__main__":
  main()
