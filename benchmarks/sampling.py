"""Sampling speed of the char LM: VLoRA / dense, cached / uncached, and time to first token.

  .venv/bin/python -m benchmarks.sampling --out benchmarks/results/bench_sampling.json

One process, every pair timed side by side (`harness.interleaved`, the order reversed every other
round), each ratio the median of per-round ratios. The model is the Shakespeare LM's shape (D 128, 4
heads, 4 layers = one compound of 4 at rank 8, learned positions) with a context long enough for
the longest generation, so no window slides; random weights (speed does not depend on them),
greedy, a batch of ``--batch`` prompts of 16 tokens. A call is all of `decoding.generate`:
the merge of VLoRA into dense weights (once per call), the prefill and the tokens.

  vlora / dense      tokens/s of the VLoRA model over its dense twin, ``--tokens`` new tokens
  cached / uncached  the speed-up of the KV cache over running the whole sequence again for every
                     token (``use_cache=False``: one compiled pass over the call's full buffer, the
                     later slots masked), at 64, 256 and 1,024 new tokens
  first token        seconds to the first token (prefill + one choice), VLoRA and dense
"""

from __future__ import annotations

import argparse

from benchmarks import harness

PROMPT = 16


def build(max_len: int, vlora: bool):
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  from vlora_jax.models.lm import LM
  from vlora_jax.core.spec import VLoRASpec
  model = LM(vocab_size=65, max_len=max_len, dim=128, depth=4, num_heads=4,
             vlora=VLoRASpec(compound_size=4, rank=8) if vlora else None)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
  return model, params["params"]


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--tokens", type=int, default=256, help="new tokens for vlora / dense")
  parser.add_argument("--lengths", default="64,256,1024",
                      help="new tokens, cached / uncached ('' skips them)")
  parser.add_argument("--out", default=str(harness.RESULTS / "bench_sampling.json"))
  args = parser.parse_args(argv)
  env = harness.environment()
  import numpy as np
  from vlora_jax.models import decoding

  lengths = [int(n) for n in args.lengths.split(",") if n]  # "": the ratios only
  max_len = PROMPT + max(lengths + [args.tokens])
  prompts = np.random.default_rng(0).integers(0, 65, (args.batch, PROMPT)).tolist()
  vlora, dense = build(max_len, True), build(max_len, False)

  def call(pair, n, **kw):
    model, params = pair
    return lambda: harness.timed(lambda: decoding.generate(model, params, prompts,
                                                           max_new_tokens=n, **kw))

  result = {"env": env, "args": vars(args), "model": "LM D128 4 heads 4 layers (1 x 4, r 8)",
            "prompt_tokens": PROMPT}
  timers = {"vlora": call(vlora, args.tokens), "dense": call(dense, args.tokens),
            "vlora_first": call(vlora, 1), "dense_first": call(dense, 1)}
  for t in timers.values():
    t()  # compile
  print("vlora / dense and the first token", flush=True)
  times = harness.interleaved(timers, args.rounds)
  result["vlora_over_dense_tokens_per_s"] = harness.paired_ratio(times["dense"], times["vlora"])
  result["tokens_per_s"] = {k: args.batch * args.tokens / float(np.median(times[k]))
                            for k in ("vlora", "dense")}
  result["first_token_s"] = {k: float(np.median(times[f"{k}_first"])) for k in ("vlora", "dense")}

  result["cached_over_uncached"] = {}
  for n in lengths:
    timers = {"cached": call(vlora, n), "uncached": call(vlora, n, use_cache=False)}
    for t in timers.values():
      t()
    print(f"cached / uncached at {n} new tokens", flush=True)
    rounds = args.rounds if n < 1024 else max(2, args.rounds // 2)
    times = harness.interleaved(timers, rounds)
    result["cached_over_uncached"][n] = {
        "speedup": harness.paired_ratio(times["uncached"], times["cached"]),
        "cached_tokens_per_s": args.batch * n / float(np.median(times["cached"])),
        "uncached_tokens_per_s": args.batch * n / float(np.median(times["uncached"])),
        "rounds": rounds}
  result = harness.finish(result)
  ok = result["vlora_over_dense_tokens_per_s"] >= 0.98
  rows = [["tokens/s, VLoRA / dense", f"{result['vlora_over_dense_tokens_per_s']:.3f}",
           ">= 0.98", "met" if ok else "missed"]]
  gains = [result["cached_over_uncached"][n]["speedup"] for n in lengths]
  for n, g in zip(lengths, gains):
    rows.append([f"cached / uncached, {n} new tokens", f"{g:.2f}x", "grows with length",
                 "met" if g == max(gains[:lengths.index(n) + 1]) else "missed"])
  for k in ("vlora", "dense"):
    rows.append([f"time to first token, {k} (s)", f"{result['first_token_s'][k]:.4f}", "", ""])
    rows.append([f"tokens/s, {k} ({args.tokens} new, batch {args.batch})",
                 f"{result['tokens_per_s'][k]:.0f}", "", ""])
  text = (f"# Sampling benchmark\n\n{harness.describe(env)}\n\n"
          f"`{harness.command('benchmarks.sampling', argv)}`\n\n"
          + harness.table(["measure", "value", "target", ""], rows))
  harness.write(args.out, result, text)


if __name__ == "__main__":
  main()
