"""Materialisation cost against the forward pass, and compile time against depth.

Two parts, each printed as a table and saved (with the environment) to one JSON file, plus a short
markdown summary beside it:

1. ``materialize``: for a VLoRA ViT (CIFAR config by default: img 32, patch 4, D 192, 3 heads,
   12 layers, s=4, r=8, f32), the jitted `stack.materialize` of the stack parameters alone against
   the jitted forward pass of the whole model, for the cumulative and anchored modes; and the VLoRA
   forward (weights materialised on the fly) against the forward of its dense twin loaded with the
   merged weights (`stack.merge` + `params.dense_twin`) and against a plain dense ViT. All functions
   run interleaved (ABCD DCBA ...) after warm-up; each entry is the median of N timed
   calls ending in ``block_until_ready``. The machine is shared and noisy, so read the ratios.
2. ``compile``: for depth 12/24/48, scan vs unrolled (``ViT(scan=...)``), VLoRA vs dense, forward vs
   a train step (``value_and_grad`` + an optax adamw update), at a small width: the seconds of
   ``jax.jit(f).lower(...)`` (trace + lower) and ``.compile()`` with caches cleared before each
   (``jax.clear_caches()``), the number of jaxpr equations (`count_eqns`: sub-jaxprs of
   scan/remat counted once; ``tests/core/test_stack.py`` uses it too) and the number of ops in the
   lowered StableHLO text (lines with `` = ``). The 48/12 ratios are the point: a scanned stack
   should stay flat (target <= 1.2).

``--quick`` is a smoke run of every code path (it overrides sizes and repetitions); ``--render
JSON`` rewrites the markdown of an existing result. The default run takes about 10 minutes on 2
loaded CPU cores.

  .venv/bin/python -m benchmarks.core                      # -> benchmarks/results/bench_core.json
  .venv/bin/python -m benchmarks.core --quick --out /tmp/bench_core.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from vlora_jax.core import params as params_lib
from vlora_jax.core import stack
from vlora_jax.models.vit import ViT
from vlora_jax.core.spec import VLoRASpec

from benchmarks import harness

MODES = ("cumulative", "anchored")
PHASES = ("forward", "train_step")


# ----------------------------------------------------------------------------------------- utils


def count_eqns(jaxpr) -> int:
  """Equations of a jaxpr, counting those inside scan/cond/remat bodies once each."""
  n = 0
  for eqn in jaxpr.eqns:
    n += 1
    for p in eqn.params.values():
      for sub in p if isinstance(p, (tuple, list)) else (p,):
        sub = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
        if hasattr(sub, "eqns"):
          n += count_eqns(sub)
  return n


def hlo_ops(lowered) -> int:
  """Ops in the lowered StableHLO text: every op producing a value is one ``%x = ...`` line."""
  return lowered.as_text().count(" = ")


def vit(args, *, dim: int, depth: int, heads: int, spec: VLoRASpec | None, scan: bool = True):
  return ViT(num_classes=args.num_classes, patch_size=args.patch, dim=dim, depth=depth,
             num_heads=heads, vlora=spec, scan=scan)


def vlora_spec(args, mode: str) -> VLoRASpec:
  return VLoRASpec(compound_size=args.compound_size, rank=args.rank, mode=mode)


# ------------------------------------------------------------------------ part 1: materialise


def bench_materialize(args, batch: int) -> dict[str, Any]:
  """Materialise vs forward, VLoRA forward vs merged dense twin vs dense, interleaved."""
  x = jax.random.normal(jax.random.key(1), (batch, args.img, args.img, 3), jnp.float32)
  fns: dict[str, Callable[[], Any]] = {}

  dense = vit(args, dim=args.dim, depth=args.depth, heads=args.heads, spec=None)
  dense_params = nn.unbox(jax.jit(dense.init)(jax.random.key(0), x))["params"]
  dense_fwd = jax.jit(lambda p, x: dense.apply({"params": p}, x))
  fns["dense/forward"] = lambda: dense_fwd(dense_params, x)

  for mode in MODES:
    spec = vlora_spec(args, mode)
    model = vit(args, dim=args.dim, depth=args.depth, heads=args.heads, spec=spec)
    p = nn.unbox(jax.jit(model.init)(jax.random.key(0), x))["params"]
    layout = stack.layout_from_params(p["blocks"], spec)
    mat = jax.jit(lambda sp, layout=layout: stack.materialize(sp, layout))
    fwd = jax.jit(lambda p, x, model=model: model.apply({"params": p}, x))
    twin = params_lib.dense_twin(model)
    merged = jax.jit(lambda p, spec=spec: stack.merge(p, spec))(p)
    twin_fwd = jax.jit(lambda p, x, twin=twin: twin.apply({"params": p}, x))
    # The merged twin computes the same function: a wrong merge would make the timing meaningless.
    err = float(jnp.max(jnp.abs(fwd(p, x) - twin_fwd(merged, x))))
    if not err < 1e-3:
      raise AssertionError(f"{mode}: merged dense twin differs from VLoRA forward by {err}")
    fns[f"{mode}/materialize"] = lambda mat=mat, sp=p["blocks"]: mat(sp)
    fns[f"{mode}/forward"] = lambda fwd=fwd, p=p: fwd(p, x)
    fns[f"{mode}/twin_forward"] = lambda twin_fwd=twin_fwd, m=merged: twin_fwd(m, x)

  for _ in range(args.warmup):  # compiles, then settles caches and thread pools
    for fn in fns.values():
      harness.timed(fn)
  times = harness.interleaved({k: lambda fn=fn: harness.timed(fn) for k, fn in fns.items()},
                              args.reps, verbose=False)
  med = {k: statistics.median(v) for k, v in times.items()}
  paired = lambda a, b: harness.paired_ratio(times[a], times[b])

  ratios = {}
  for mode in MODES:
    ratios[mode] = {
        "materialize/forward": med[f"{mode}/materialize"] / med[f"{mode}/forward"],
        "forward/twin_forward": med[f"{mode}/forward"] / med[f"{mode}/twin_forward"],
        "forward/dense_forward": med[f"{mode}/forward"] / med["dense/forward"],
        "twin_forward/dense_forward": med[f"{mode}/twin_forward"] / med["dense/forward"],
        # What materialising costs inside the forward: the VLoRA forward minus its merged twin.
        "in_forward_overhead": 1.0 - med[f"{mode}/twin_forward"] / med[f"{mode}/forward"],
        "paired_materialize/forward": paired(f"{mode}/materialize", f"{mode}/forward"),
        "paired_forward/twin_forward": paired(f"{mode}/forward", f"{mode}/twin_forward"),
        "paired_forward/dense_forward": paired(f"{mode}/forward", "dense/forward"),
    }
  counts = {
      "vlora": params_lib.count(p)["total"],
      "dense": params_lib.count(dense_params)["total"],
  }
  return {"batch": batch, "median_s": med, "times_s": times, "ratios": ratios,
          "param_counts": counts}


# ---------------------------------------------------------------------- part 2: compile time


def compile_case(args, *, depth: int, scan: bool, spec: VLoRASpec | None, phase: str):
  """Trace+lower and compile seconds, jaxpr equations and HLO ops of one fresh program."""
  model = vit(args, dim=args.compile_dim, depth=depth, heads=args.compile_heads, spec=spec,
              scan=scan)
  x = jax.ShapeDtypeStruct((args.compile_batch, args.img, args.img, 3), jnp.float32)
  y = jax.ShapeDtypeStruct((args.compile_batch,), jnp.int32)
  p = params_lib.param_shapes(model, x)  # shapes only: nothing is initialised or run

  if phase == "forward":
    fn = lambda p, x: model.apply({"params": p}, x)
    fargs = (p, x)
  else:
    tx = optax.adamw(1e-3, weight_decay=0.05)

    def loss_fn(p, x, y):
      logits = model.apply({"params": p}, x, train=True)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def fn(p, opt_state, x, y):
      loss, grads = jax.value_and_grad(loss_fn)(p, x, y)
      updates, opt_state = tx.update(grads, opt_state, p)
      return optax.apply_updates(p, updates), opt_state, loss

    fargs = (p, jax.eval_shape(tx.init, p), x, y)

  jax.clear_caches()  # a fresh program: no tracing, lowering or compilation cache hits
  t0 = time.perf_counter()
  lowered = jax.jit(fn).lower(*fargs)
  t1 = time.perf_counter()
  lowered.compile()
  t2 = time.perf_counter()
  ops = hlo_ops(lowered)
  eqns = count_eqns(jax.make_jaxpr(fn)(*fargs).jaxpr)  # after the timing: it warms trace caches
  return {"lower_s": t1 - t0, "compile_s": t2 - t1, "total_s": t2 - t0, "jaxpr_eqns": eqns,
          "hlo_ops": ops}


def bench_compile(args) -> dict[str, Any]:
  """Every (stack, scan, phase, depth) case, ``compile_reps`` times in interleaved passes."""
  stacks = {"vlora": vlora_spec(args, args.compile_mode), "dense": None}
  cases = [(s, scan, phase, d) for s in stacks for scan in (True, False) for phase in PHASES
           for d in args.depths]
  runs: dict[tuple, list[dict]] = {c: [] for c in cases}
  # Scanned programs compile in seconds and their ratio is the target, so they get more passes;
  # the unrolled ones grow several-fold, which one pass shows.
  reps = lambda scan: args.compile_reps if scan else args.unrolled_reps
  total = max(args.compile_reps, args.unrolled_reps)
  for rep in range(total):
    for c in cases:
      s, scan, phase, d = c
      if rep >= reps(scan):
        continue
      r = compile_case(args, depth=d, scan=scan, spec=stacks[s], phase=phase)
      runs[c].append(r)
      print(f"  [{rep + 1}/{reps(scan)}] {s:5s} {'scan' if scan else 'unrolled':8s} "
            f"{phase:10s} L={d:3d}  lower {r['lower_s']:6.2f}s  compile {r['compile_s']:6.2f}s  "
            f"eqns {r['jaxpr_eqns']:6d}  hlo {r['hlo_ops']:6d}", flush=True)

  rows = []
  for c, rs in runs.items():
    s, scan, phase, d = c
    row = {"stack": s, "scan": scan, "phase": phase, "depth": d, "reps": len(rs),
           "jaxpr_eqns": rs[0]["jaxpr_eqns"], "hlo_ops": rs[0]["hlo_ops"]}
    for k in ("lower_s", "compile_s", "total_s"):
      row[k] = statistics.median(r[k] for r in rs)
      row[k + "_all"] = [r[k] for r in rs]
    row["total_s_min"] = min(row["total_s_all"])  # load only ever adds time: min is a floor
    rows.append(row)

  lo, hi = min(args.depths), max(args.depths)
  ratios = []
  for s in stacks:
    for scan in (True, False):
      for phase in PHASES:
        get = lambda d: next(r for r in rows if (r["stack"], r["scan"], r["phase"], r["depth"]) ==
                             (s, scan, phase, d))
        a, b = get(lo), get(hi)
        ratios.append({"stack": s, "scan": scan, "phase": phase, "depths": [lo, hi],
                       **{k: b[k] / a[k] for k in ("lower_s", "compile_s", "total_s",
                                                   "total_s_min", "jaxpr_eqns", "hlo_ops")}})
  return {"rows": rows, "ratios": ratios, "ratio_depths": [lo, hi]}


# ---------------------------------------------------------------------------------- reporting


def materialize_tables(res: dict[str, Any]) -> str:
  out = []
  for b in res["batches"]:
    med, rat = b["median_s"], b["ratios"]
    rows = [[name, f"{med[name] * 1e3:.2f}"] for name in med]
    out.append(f"Batch {b['batch']}: median seconds x 1000 over {res['reps']} interleaved reps")
    out.append(harness.table(["function", "ms"], rows))
    rows = [[mode] + [f"{rat[mode][k]:.4f}" for k in (
        "materialize/forward", "paired_materialize/forward", "in_forward_overhead",
        "forward/twin_forward", "forward/dense_forward", "twin_forward/dense_forward")]
            for mode in MODES]
    out.append(harness.table(["mode", "mat/fwd", "mat/fwd (paired)", "1 - twin/fwd", "fwd/twin",
                          "fwd/dense", "twin/dense"], rows))
  return "\n\n".join(out)


def compile_tables(res: dict[str, Any]) -> str:
  rows = [[r["stack"], "scan" if r["scan"] else "unrolled", r["phase"], r["depth"],
           r["reps"], f"{r['lower_s']:.2f}", f"{r['compile_s']:.2f}", f"{r['total_s']:.2f}",
           f"{r['total_s_min']:.2f}", r["jaxpr_eqns"], r["hlo_ops"]] for r in res["rows"]]
  t1 = harness.table(["stack", "layers", "phase", "depth", "reps", "lower s", "compile s",
                      "total s", "min total s", "jaxpr eqns", "HLO ops"], rows)
  lo, hi = res["ratio_depths"]
  rows = [[r["stack"], "scan" if r["scan"] else "unrolled", r["phase"], f"{r['lower_s']:.2f}",
           f"{r['compile_s']:.2f}", f"{r['total_s']:.2f}", f"{r['total_s_min']:.2f}",
           f"{r['jaxpr_eqns']:.2f}", f"{r['hlo_ops']:.2f}"] for r in res["ratios"]]
  t2 = harness.table(["stack", "layers", "phase", f"lower {hi}/{lo}", f"compile {hi}/{lo}",
                      f"total {hi}/{lo}", f"min total {hi}/{lo}", f"eqns {hi}/{lo}",
                      f"HLO {hi}/{lo}"], rows)
  return t1 + "\n\n" + t2


def summary(result: dict[str, Any]) -> list[str]:
  """The headline ratios as markdown bullets."""
  out = []
  for b in result.get("materialize", {}).get("batches", []):
    for mode in MODES:
      r = b["ratios"][mode]
      out.append(f"- batch {b['batch']}, {mode}: materialise / forward = "
                 f"{r['materialize/forward']:.3f}; VLoRA forward / merged twin = "
                 f"{r['forward/twin_forward']:.3f} (noise floor: twin / dense = "
                 f"{r['twin_forward/dense_forward']:.3f})")
  if "compile" in result:
    c = result["compile"]
    lo, hi = c["ratio_depths"]
    out.append(f"- scanned stacks, compile {hi} vs {lo} layers (target <= 1.2):")
    out += [f"  - {r['stack']} {r['phase']}: total {hi}/{lo} = {r['total_s']:.2f} (min-based "
            f"{r['total_s_min']:.2f}), jaxpr eqns {r['jaxpr_eqns']:.2f}, HLO ops "
            f"{r['hlo_ops']:.2f}{'' if r['total_s'] <= 1.2 else '  ** over the target **'}"
            for r in c["ratios"] if r["scan"]]
    out.append(f"- unrolled stacks, {hi} vs {lo} layers: total " + ", ".join(
        f"{r['stack']} {r['phase']} {r['total_s']:.2f}" for r in c["ratios"] if not r["scan"]))
  return out


def markdown(result: dict[str, Any], command: str) -> str:
  env, cfg = result["environment"], result["config"]
  parts = [
      "# Materialisation cost and compile time against depth",
      "",
      harness.describe(env),
      "",
      "Command:",
      "",
      "```",
      command,
      "```",
      "",
      f"Settings: `{json.dumps(cfg)}`",
      "",
      "## Summary",
      "",
  ] + summary(result)
  if "materialize" in result:
    m = result["materialize"]
    parts += [
        "",
        "## 1. Materialisation cost vs the forward pass",
        "",
        f"ViT img {cfg['img']}, patch {cfg['patch']}, D {cfg['dim']}, {cfg['heads']} heads, "
        f"{cfg['depth']} layers, s={cfg['compound_size']}, r={cfg['rank']}, f32. `materialize` = "
        "jitted `stack.materialize` of the stack params alone; `forward` = jitted VLoRA forward "
        "(weights materialised on the fly); `twin_forward` = the dense twin with the merged "
        "weights; `dense/forward` = a plain dense ViT. Interleaved, after "
        f"{m['warmup']} warm-up rounds, median of {m['reps']}. 'paired' = median of per-round "
        "ratios. "
        "`1 - twin/fwd` = the share of the VLoRA forward that the on-the-fly weights cost. The "
        "twin and the dense ViT run the same program with different weights, so `twin/dense` - 1 "
        "shows the noise floor of the run.",
        "",
        materialize_tables(m),
    ]
  if "compile" in result:
    parts += [
        "",
        "## 2. Compile time vs depth, scan vs unrolled",
        "",
        f"ViT D {cfg['compile_dim']}, {cfg['compile_heads']} heads, batch {cfg['compile_batch']}, "
        f"VLoRA s={cfg['compound_size']}, r={cfg['rank']}, mode {cfg['compile_mode']}. "
        "`lower` = trace + lower (`jax.jit(f).lower`), `compile` = `.compile()`, caches cleared "
        f"before each; median of {cfg['compile_reps']} fresh compiles for scan, "
        f"{cfg['unrolled_reps']} for unrolled. Train step = value_and_grad + adamw update.",
        "",
        compile_tables(result["compile"]),
    ]
  return "\n".join(parts) + "\n"


# --------------------------------------------------------------------------------------- main


def parse_args(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--out", default=None,
                  help="JSON path; a markdown summary is written beside it (same stem, .md). "
                  "Default benchmarks/results/bench_core.json, or /tmp/bench_core_quick.json "
                  "with --quick (a smoke run never overwrites the committed results)")
  ap.add_argument("--render", metavar="JSON", default=None,
                  help="only re-render the markdown beside an existing result JSON, run nothing")
  ap.add_argument("--quick", action="store_true",
                  help="a smoke run of every code path (tiny sizes, few reps; 1-3 minutes here)")
  ap.add_argument("--parts", nargs="+", default=["materialize", "compile"],
                  choices=["materialize", "compile"])
  # part 1
  ap.add_argument("--batches", type=int, nargs="+", default=[128, 8],
                  help="forward batch sizes for part 1 (the first is the headline)")
  ap.add_argument("--img", type=int, default=32)
  ap.add_argument("--patch", type=int, default=4)
  ap.add_argument("--dim", type=int, default=192)
  ap.add_argument("--heads", type=int, default=3)
  ap.add_argument("--depth", type=int, default=12)
  ap.add_argument("--num-classes", type=int, default=10)
  ap.add_argument("--compound-size", type=int, default=4)
  ap.add_argument("--rank", type=int, default=8)
  ap.add_argument("--reps", type=int, default=10)
  ap.add_argument("--warmup", type=int, default=2)
  # part 2
  ap.add_argument("--depths", type=int, nargs="+", default=[12, 24, 48])
  ap.add_argument("--compile-dim", type=int, default=64)
  ap.add_argument("--compile-heads", type=int, default=4)
  ap.add_argument("--compile-batch", type=int, default=8)
  ap.add_argument("--compile-mode", default="cumulative", choices=MODES)
  ap.add_argument("--compile-reps", type=int, default=3,
                  help="fresh compiles of each scanned case (median reported)")
  ap.add_argument("--unrolled-reps", type=int, default=1,
                  help="fresh compiles of each unrolled case (slow: tens of seconds at depth 48)")
  args = ap.parse_args(argv)
  if args.quick:
    args.batches, args.dim, args.heads, args.depth = [8], 64, 4, 8
    args.reps, args.warmup, args.compile_reps, args.unrolled_reps = 3, 1, 1, 1
    args.depths, args.compile_dim, args.compile_heads, args.compile_batch = [4, 8], 32, 2, 2
  if args.out is None:
    args.out = ("/tmp/bench_core_quick.json" if args.quick
                else str(harness.RESULTS / "bench_core.json"))
  for d in [args.depth] + args.depths:
    if d % args.compound_size:
      raise ValueError(f"--compound-size={args.compound_size} must divide every depth; got {d}")
  for k in ("reps", "warmup", "compile_reps", "unrolled_reps"):
    if getattr(args, k) < (0 if k == "warmup" else 1):
      raise ValueError(f"--{k.replace('_', '-')}={getattr(args, k)}: must be >= "
                       f"{0 if k == 'warmup' else 1}")
  return args


def main(argv=None):
  args = parse_args(argv)
  if args.render:
    path = Path(args.render)
    result = json.loads(path.read_text())
    command = harness.command("benchmarks.core", result["environment"]["argv"][1:])
    path.with_suffix(".md").write_text(markdown(result, command))
    print(f"wrote {path.with_suffix('.md')}")
    return
  command = harness.command("benchmarks.core", argv)
  env = harness.environment()
  result: dict[str, Any] = {"environment": env, "config": vars(args).copy()}
  print(json.dumps(env, indent=1))

  if "materialize" in args.parts:
    print("\n== 1. materialise vs forward ==", flush=True)
    batches = []
    for b in args.batches:
      t = time.perf_counter()
      batches.append(bench_materialize(args, b))
      print(f"  batch {b}: {time.perf_counter() - t:.0f}s", flush=True)
    result["materialize"] = {"reps": args.reps, "warmup": args.warmup, "batches": batches}
    print(materialize_tables(result["materialize"]), flush=True)

  if "compile" in args.parts:
    print("\n== 2. compile time vs depth ==", flush=True)
    result["compile"] = bench_compile(args)
    print(compile_tables(result["compile"]), flush=True)

  harness.finish(env)
  harness.write(args.out, result, markdown(result, command))


if __name__ == "__main__":
  main()
