"""Model FLOP utilisation and memory of real train steps on one accelerator: run it when a GPU is lent.

  .venv/bin/python -m benchmarks.gpu_mfu                    # -> results/gpu_mfu_<device>.json
  .venv/bin/python -m benchmarks.gpu_mfu --quick --out /tmp/mfu.json   # a smoke run, any device

For each model (ViT-B/16 at 224 pixels, and configs/lm_pod.py:1b at 2,048 tokens), VLoRA and
dense, in bfloat16 with the ``--attention`` kernel (cuDNN's fused attention on a GPU): the train
step that training runs (`train.trainer.lower_train_step`: AdamW, donation, remat as configured)
is compiled, its state initialised on the device, and ``--steps`` steps timed after ``--warmup``
(each timed to ``block_until_ready``; the median is reported). MFU = PaLM's model FLOPs of a step
(`vlora_jax.compile.model_flops_per_chip`: 6 N + 12 L T D a token, no remat counted) / (step time
x the chip's peak bf16 FLOP/s, `vlora_jax.compile.CHIPS`). Memory: the device's peak bytes in use
(``memory_stats``) and XLA's compiled figure. Everything runs in about two minutes on an H100.
"""

from __future__ import annotations

import argparse
import statistics
import time

import vlora_jax  # noqa: F401 -- first: it settles the backend before JAX starts
from benchmarks import harness

MODELS = {
    # name: (config, overrides, batch)
    "vit_b16": ("configs/vit_pod.py", {"model.dim": 768, "model.depth": 12, "model.num_heads": 12,
                                       "model.patch_size": 16, "model.vlora.rank": 8}, 256),
    "lm_1b": ("configs/lm_pod.py:1b", {}, 8),
}
QUICK = {"model.dim": 64, "model.depth": 4, "model.num_heads": 2}


def measure(name: str, variant: str, args) -> dict:
  import flax.linen as nn
  import jax
  import numpy as np
  from vlora_jax import compile as compile_lib
  from vlora_jax.train import load_config, setup, state as state_lib, trainer

  spec, overrides, batch = MODELS[name]
  config = load_config(spec, lock=False)
  for key, value in {**overrides, **(QUICK if args.quick else {})}.items():
    node = config
    *parents, leaf = key.split(".")
    for k in parents:
      node = node[k]
    node[leaf] = value
  if args.quick:
    if name == "lm_1b":
      config.model.max_len = 128
      config.model.num_kv_heads, config.model.head_dim, config.model.mlp_dim = 2, 32, 128
      config.model.vocab_size = 512
    else:
      config.model.img_size, config.model.patch_size = 32, 8
    batch = 4
  config.model.vlora.enabled = variant == "vlora"
  config.model.attention = args.attention
  config.batch_size = config.eval_batch_size = batch
  config.mesh.data, config.mesh.fsdp = -1, 1
  config.lock()

  devices = jax.devices()[:1]
  run = setup.without_data(config, devices)
  t0 = time.time()
  compiled = trainer.lower_train_step(run).compile()
  compile_s = time.time() - t0
  rng_data = jax.random.key_data(jax.random.key(1))
  init = jax.jit(lambda k: state_lib.create(nn.unbox(run.init_fn(k)), run.opt.tx, rng_data),
                 out_shardings=run.state_shardings)
  st = init(jax.random.key(0))
  example = run.family.example_batch(config.model, batch, np.random.default_rng(0))
  batch_arrays = jax.device_put(example, setup.batch_shapes(run)[next(iter(example))].sharding)
  times = []
  for i in range(args.warmup + args.steps):
    t = time.perf_counter()
    st, metrics = compiled(st, batch_arrays)
    jax.block_until_ready((st, metrics))
    if i >= args.warmup:
      times.append(time.perf_counter() - t)
  step_s = statistics.median(times)
  model_flops = compile_lib.model_flops_per_chip(run)
  chip = next((c for k, c in compile_lib.CHIPS.items() if k in devices[0].device_kind), None)
  stats = devices[0].memory_stats() or {}
  mem = compiled.memory_analysis()
  return {
      "model": name, "variant": variant, "batch": batch, "attention": args.attention,
      "params_total": run.counts["total"], "compile_s": compile_s, "step_s": step_s,
      "step_s_all": times, "model_flops": model_flops,
      "model_tflops_per_s": model_flops / step_s / 1e12,
      "mfu": model_flops / (step_s * chip.peak_flops) if chip else None,
      "peak_bytes_in_use": stats.get("peak_bytes_in_use"),
      "compiled_temp_bytes": mem.temp_size_in_bytes if mem else None,
      "loss_final": float(metrics["train/loss"]),
  }


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--models", default=",".join(MODELS))
  ap.add_argument("--variants", default="vlora,dense")
  ap.add_argument("--attention", default="cudnn", help="xla | cudnn (cudnn needs an NVIDIA GPU)")
  ap.add_argument("--steps", type=int, default=10)
  ap.add_argument("--warmup", type=int, default=3)
  ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run on any device")
  ap.add_argument("--out", default=None)
  args = ap.parse_args(argv)
  env = harness.environment()
  rows = [measure(m, v, args) for m in args.models.split(",") for v in args.variants.split(",")]
  body = [[r["model"], r["variant"], r["batch"], f"{r['params_total'] / 1e6:.0f}M",
           f"{r['step_s'] * 1e3:.1f}", f"{r['model_tflops_per_s']:.1f}",
           "—" if r["mfu"] is None else f"{r['mfu']:.1%}",
           "—" if r["peak_bytes_in_use"] is None else f"{r['peak_bytes_in_use'] / 2**30:.1f}"]
          for r in rows]
  text = (f"# Train-step MFU on {env['device_kind']}\n\n{harness.describe(env)}\n\n"
          + harness.table(["model", "variant", "batch", "params", "step ms", "model TFLOP/s",
                           "MFU", "peak GiB"], body))
  out = args.out or str(harness.RESULTS / f"gpu_mfu_{env['device_kind'].replace(' ', '_')}.json")
  harness.write(out, {"env": harness.finish(env), "rows": rows}, text)
  print(text)


if __name__ == "__main__":
  main()
