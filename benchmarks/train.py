"""Train-step throughput, dense vs VLoRA of one architecture, against the machine's matmul ceiling.

Measures, side by side in one process (interleaved rounds; the median round counts):
  * ViT (CIFAR-shaped images) examples/s and LM tokens/s, dense and VLoRA, the real train step of
    `vlora_jax.train` (AdamW, clipping, metrics, buffer donation) on synthetic batches;
  * the FLOPs of one step, from XLA's cost analysis of the same step lowered with the layer stack
    unrolled (``model.scan=False``: the analysis counts a scan's body once), and analytically
    (6 x matmul parameters x tokens + attention) as a cross-check;
  * the ceiling: a large float32 matmul (2048^3 and a ViT-shaped one), best of several;
  * the fraction of the ceiling each step reaches: (step FLOPs / step time) / ceiling.

`Variant` (one compiled train step with its state and batch) and `matmul_ceiling` are the pieces
`benchmarks.bench`, `benchmarks.malloc` and `benchmarks.profile` time. Writes the JSON (with the
environment) to ``--out`` and a markdown table beside it:

  .venv/bin/python -m benchmarks.train --out /tmp/bench_train.json [--size small|paper]
"""

from __future__ import annotations

import argparse
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vlora_jax import models
from vlora_jax.models.family import TokenFamily
from vlora_jax.train import load_config, optim, state as state_lib
from vlora_jax.train.trainer import make_train_step

from benchmarks import harness

SIZES = {  # equal architecture for dense and VLoRA; only model.vlora.enabled differs
    "small": {
        "vit": {"model.dim": 96, "model.depth": 6, "model.num_heads": 3,
                "model.vlora.compound_size": 3, "model.vlora.rank": 8, "batch_size": 64},
        "lm": {"model.dim": 128, "model.depth": 4, "model.num_heads": 4, "model.max_len": 64,
               "model.vlora.compound_size": 4, "model.vlora.rank": 8, "batch_size": 16},
    },
    "paper": {  # the official CIFAR config; an LM of similar width
        "vit": {"model.dim": 192, "model.depth": 12, "model.num_heads": 3,
                "model.vlora.compound_size": 4, "model.vlora.rank": 8, "batch_size": 128},
        "lm": {"model.dim": 256, "model.depth": 8, "model.num_heads": 4, "model.max_len": 128,
               "model.vlora.compound_size": 4, "model.vlora.rank": 8, "batch_size": 16},
    },
}
CONFIGS = {"vit": "configs/vit_cifar10.py", "lm": "configs/lm_shakespeare.py"}


def _config(family: str, size: str | dict, vlora: bool, scan: bool = True, overrides=None):
  """The config of ``family`` at ``size`` (a name of `SIZES`, or the overrides themselves).

  Raises:
    ValueError: ``overrides`` set ``model.vlora.enabled`` or ``model.scan`` against ``vlora`` or
      ``scan`` (which would otherwise win silently).
  """
  over = dict(SIZES[size][family] if isinstance(size, str) else size, **(overrides or {}))
  fixed = {"model.vlora.enabled": vlora, "model.scan": scan}
  for k, v in fixed.items():
    if over.get(k, v) != v:
      raise ValueError(f"override {k}={over[k]} contradicts the argument ({v}): pass it there")
  over.update(fixed, **{"model.dropout": 0.0})
  return load_config(str(harness.ROOT / CONFIGS[family]), **over)


def _batch(c, rng: np.random.Generator) -> dict:
  fam = models.family(c.model.name)
  return jax.tree.map(jnp.asarray, fam.example_batch(c.model, c.batch_size, rng))


def analytic_flops(c, matmul_params: int) -> float:
  """6 x (matmul weights) x tokens + attention scores and values (fwd 4*T^2*D per layer, x3)."""
  m = c.model
  t = models.family(m.name).sequence_length(m)
  tokens = c.batch_size * t
  attn = 3 * 4 * c.batch_size * t * t * m.dim * m.depth
  return 6.0 * matmul_params * tokens + attn


def _matmul_params(dense_params) -> int:
  """Weights that multiply activations per token (kernels of Dense layers and the patch conv)."""
  flat = optim.paths(dense_params)
  n = 0
  for k, v in flat.items():
    if k.endswith("kernel"):
      n += int(np.prod(v.shape))
  return n


class Variant:
  """One compiled train step with its state, batch and FLOP counts."""

  def __init__(self, family: str, size: str | dict, vlora: bool, rng: np.random.Generator,
               scan: bool = True, overrides: dict | None = None):
    """``size``: a name of `SIZES`, or its dotted config overrides; ``overrides``: more on top
    (e.g. ``model.remat``)."""
    self.family, self.vlora = family, vlora
    self.name = f"{family}/{'vlora' if vlora else 'dense'}{'' if scan else '_unrolled'}"
    c = _config(family, size, vlora, scan, overrides)
    self.config = c
    model = models.build(c.model)
    sample = [jnp.zeros(s.shape, s.dtype) for s in models.sample_inputs(c.model)]
    params = jax.jit(lambda k: nn.unbox(model.init(k, *sample, train=False))["params"])(
        jax.random.key(0))
    self.params_total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    opt = optim.build(c.optim, params, 1000)
    rng_data = jax.random.key_data(jax.random.key(1))
    self.state = state_lib.create(params, opt.tx, rng_data)
    self.batch = _batch(c, rng)
    fam = models.family(c.model.name)
    step = make_train_step(model, fam, opt, 0.0)
    t0 = time.perf_counter()
    self.step = jax.jit(step, donate_argnums=(0,)).lower(self.state, self.batch).compile()
    self.compile_s = time.perf_counter() - t0
    # FLOPs: the same step with the stack unrolled (cost analysis counts a scan body once).
    unrolled = models.build(_config(family, size, vlora, scan=False).model)
    ustep = make_train_step(unrolled, fam, opt, 0.0)
    self.xla_flops = float(jax.jit(ustep).lower(self.state, self.batch).cost_analysis()["flops"])
    dense = models.build(_config(family, size, False).model)
    dense_params = jax.eval_shape(lambda k: nn.unbox(dense.init(k, *sample, train=False))["params"],
                                  jax.random.key(0))
    self.analytic_flops = analytic_flops(c, _matmul_params(dense_params))
    self.examples = c.batch_size
    # Tokens/s where the family counts tokens (sequence models), not for classification.
    counts_tokens = isinstance(fam, TokenFamily)
    self.tokens = c.batch_size * fam.sequence_length(c.model) if counts_tokens else None

  def run(self, steps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(steps):
      self.state, m = self.step(self.state, self.batch)
    jax.block_until_ready((self.state, m))
    return (time.perf_counter() - t0) / steps


def matmul_ceiling(repeats: int = 5) -> dict:
  """Best float32 matmul rate (GFLOP/s) on a square 2048^3 and a ViT-shaped product."""
  out = {}
  for name, (m, k, n) in {"2048^3": (2048, 2048, 2048),
                          "vit_qkv_8320x192x576": (8320, 192, 576)}.items():
    a = jnp.asarray(np.random.default_rng(0).normal(size=(m, k)), jnp.float32)
    b = jnp.asarray(np.random.default_rng(1).normal(size=(k, n)), jnp.float32)
    f = jax.jit(lambda x, y: x @ y)
    f(a, b).block_until_ready()
    reps = max(1, int(2e10 // (2 * m * k * n)))  # ~20 GFLOP per timing
    best = 0.0
    for _ in range(repeats):
      t0 = time.perf_counter()
      for _ in range(reps):
        r = f(a, b)
      r.block_until_ready()
      best = max(best, 2.0 * m * k * n * reps / (time.perf_counter() - t0) / 1e9)
    out[name] = best
  return out


def markdown(result: dict) -> str:
  rows = [[r["variant"], f"{r['params']:,}", f"{r['step_s_median'] * 1e3:.1f}",
           f"{r['examples_per_s']:.1f}",
           f"{r['tokens_per_s']:.0f}" if r["tokens_per_s"] else "-",
           f"{r['xla_gflop_per_step']:.2f}", f"{r['analytic_gflop_per_step']:.2f}",
           f"{r['achieved_gflop_per_s']:.1f}", f"{r['fraction_of_ceiling']:.1%}"]
          for r in result["results"]]
  return "\n".join([
      "# Train-step throughput against the matmul ceiling", "",
      harness.describe(result["environment"]), "",
      "```", result["command"], "```", "",
      f"Size `{result['size']}`, {result['rounds']} interleaved rounds of "
      f"{result['steps_per_round']} step(s); matmul ceiling "
      f"{result['matmul_ceiling_gflop_per_s']:.1f} GFLOP/s (best before and after). "
      f"{result['notes']}",
      "",
      harness.table(["variant", "params", "step ms", "ex/s", "tok/s", "GFLOP/step",
                     "(analytic)", "GFLOP/s", "of ceiling"], rows)])


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", required=True, help="JSON path; a markdown table goes beside it")
  ap.add_argument("--size", default="small", choices=sorted(SIZES))
  ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median reported)")
  ap.add_argument("--steps", type=int, default=3, help="steps per variant per round")
  args = ap.parse_args(argv)

  env = harness.environment()
  rng = np.random.default_rng(0)
  variants = [Variant(f, args.size, v, rng) for f in ("vit", "lm") for v in (False, True)]
  for v in variants:  # warm-up (first calls, allocator)
    v.run(1)
  ceiling_before = matmul_ceiling()
  times = harness.interleaved({v.name: lambda v=v: v.run(args.steps) for v in variants},
                              args.rounds)
  ceiling_after = matmul_ceiling()
  ceiling = max(max(ceiling_before.values()), max(ceiling_after.values()))

  rows = []
  for v in variants:
    t = statistics.median(times[v.name])
    achieved = v.xla_flops / t / 1e9
    rows.append({
        "variant": v.name, "params": v.params_total, "batch": v.examples,
        "step_s_median": t, "step_s_all": times[v.name],
        "examples_per_s": v.examples / t,
        "tokens_per_s": v.tokens / t if v.tokens else None,
        "xla_gflop_per_step": v.xla_flops / 1e9, "analytic_gflop_per_step": v.analytic_flops / 1e9,
        "achieved_gflop_per_s": achieved, "fraction_of_ceiling": achieved / ceiling,
        "compile_s": v.compile_s, "model": v.config.model.to_dict(),
    })
  result = {
      "environment": harness.finish(env), "command": harness.command("benchmarks.train", argv),
      "size": args.size, "rounds": args.rounds, "steps_per_round": args.steps,
      "matmul_ceiling_gflop_per_s": ceiling,
      "matmul_ceiling_detail": {"before": ceiling_before, "after": ceiling_after},
      "results": rows,
      "notes": "Synthetic batches; dropout 0; float32; the real train step (AdamW, clipping, "
               "metrics, donation). FLOPs from XLA cost analysis of the unrolled twin.",
  }
  text = markdown(result)
  print(text)
  harness.write(args.out, result, text)


if __name__ == "__main__":
  main()
