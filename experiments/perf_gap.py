"""Where the CPU train-step gap to the official PyTorch VLoRA goes (issue 5), measured side by side.

  PYTHONPATH=. .venv/bin/python experiments/perf_gap.py [--rounds 7] [--no-step] [--no-sublayers]

One driver (this venv) and several resident WORKER processes, each timing the same operations:

  * ``torch``       the official code's stack (torch 2.13, timm 1.0.31, `vlora`) from
                    ``--torch-python`` (default /tmp/torchref/venv/bin/python; see
                    /work/shared/tools/setup_torch_reference.sh), 2 threads;
  * ``jax``         this repository as committed, default environment;
  * ``jax+malloc``  the same with glibc's allocator told to keep freed memory (``MALLOC_TUNABLES``
                    below), which removes XLA:CPU's per-step page faults.

Operations, all float32 fwd+bwd (loss = sum of the output times a fixed random tensor, gradients
w.r.t. input and every parameter), 8 layers deep at the ViT's shapes B 128, T 65, D 192, 3 heads,
MLP 768 (the sublayers of the CIFAR config), each sublayer with its residual:

  ln             x + LayerNorm(x)
  gelu           x + GELU_exact(x) on [B, T, 768]
  mlp            x + fc2(GELU_exact(fc1(LayerNorm(x))))
  attn           x + proj(SDPA(qkv(LayerNorm(x))))
  block          timm's Block / `layers.EncoderBlock` (attn + mlp), the JAX one through `vlorafy`

plus JAX-only variants of the fixes tried (``mlp_gelu_custom``, ``attn_manual``, ...), and the full
train step of the CIFAR config (official VLoRA + AdamW + clipping against `bench_train`'s real step).
Rounds are interleaved across workers and operations (the machine is shared and loaded: only
side-by-side ratios mean anything); medians and minima over rounds are reported, and each worker's
CPU time (user/sys) and minor page faults per call.

Writes experiments/results/perf_gap.json and perf_gap.md (the table of steps tried). The committed
results come from separate runs (sublayers; full step), combined with ``--from-json``:

  .venv/bin/python experiments/perf_gap.py --no-step --rounds 3 --run-name sublayers \\
      --out /tmp/pg_sub.json
  .venv/bin/python experiments/perf_gap.py --ops "" --step-reps 1 --rounds 5 --step-unrolled \\
      --run-name step --out /tmp/pg_step.json
  .venv/bin/python experiments/perf_gap.py --from-json /tmp/pg_sub.json /tmp/pg_step.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
B, T, D, H, HID, LAYERS = 128, 65, 192, 3, 768, 8
# glibc: never mmap (so freed blocks are reused, not unmapped), one arena (XLA's worker threads
# would otherwise allocate from per-thread arenas, whose big blocks are mmapped anyway), never
# trim. Without it every XLA:CPU execution faults in its ~2.4 GB of temporaries afresh.
MALLOC_TUNABLES = ("glibc.malloc.mmap_max=0:glibc.malloc.arena_max=1:"
                   "glibc.malloc.trim_threshold=68719476736")


# ----------------------------------------------------------------------------------------------
# worker side: torch
# ----------------------------------------------------------------------------------------------

def torch_ops(want):
  import torch
  import torch.nn.functional as F
  from torch import nn
  torch.set_num_threads(2)
  torch.manual_seed(0)
  ops = {}

  def stack_op(make):
    layers = nn.ModuleList([make() for _ in range(LAYERS)])
    x0 = torch.randn(B, T, D)
    g = torch.randn(B, T, D)

    def run():
      x = x0.clone().requires_grad_(True)
      h = x
      for l in layers:
        h = l(h)
      (h * g).sum().backward()
      for p in layers.parameters():
        p.grad = None
      return x.grad
    return run

  class Res(nn.Module):
    def __init__(self, f, **mods):
      super().__init__()
      self.m = nn.ModuleDict(mods)
      self.f = f

    def forward(self, x):
      return x + self.f(self.m, x)

  def attn(m, x):
    qkv = m["qkv"](m["ln"](x)).reshape(B, T, 3, H, D // H).permute(2, 0, 3, 1, 4)
    o = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
    return m["proj"](o.transpose(1, 2).reshape(B, T, D))

  makers = {
      "ln": lambda: Res(lambda m, x: m["ln"](x), ln=nn.LayerNorm(D, eps=1e-6)),
      "mlp": lambda: Res(lambda m, x: m["fc2"](F.gelu(m["fc1"](m["ln"](x)))),
                         ln=nn.LayerNorm(D, eps=1e-6), fc1=nn.Linear(D, HID), fc2=nn.Linear(HID, D)),
      "attn": lambda: Res(attn, ln=nn.LayerNorm(D, eps=1e-6), qkv=nn.Linear(D, 3 * D),
                          proj=nn.Linear(D, D)),
  }
  for name, make in makers.items():
    if name in want:
      ops[name] = stack_op(make)
  if "block" in want:
    from timm.models.vision_transformer import Block
    ops["block"] = stack_op(lambda: Block(D, H, 4.0, qkv_bias=True))
  if "gelu" in want:
    x0, g = torch.randn(B, T, HID), torch.randn(B, T, HID)

    def gelu_run():
      x = x0.clone().requires_grad_(True)
      h = x
      for _ in range(LAYERS):
        h = h + F.gelu(h)
      (h * g).sum().backward()
      return x.grad
    ops["gelu"] = gelu_run
  if "step" in want:
    from vlora.models.vit import VisionTransformerVLoRA
    model = VisionTransformerVLoRA(img_size=32, patch_size=4, num_classes=10, embed_dim=192,
                                   depth=3, num_heads=3, mlp_ratio=4.0, vl_size=4, vl_rank=8)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    xb, yb = torch.randn(128, 3, 32, 32), torch.randint(0, 10, (128,))

    def step():
      loss = F.cross_entropy(model(xb), yb, label_smoothing=0.1)
      opt.zero_grad(set_to_none=True)
      loss.backward()
      torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
      opt.step()
    ops["step"] = step
  return ops, lambda r: r


# ----------------------------------------------------------------------------------------------
# worker side: JAX
# ----------------------------------------------------------------------------------------------

def jax_ops(want):
  import jax
  import jax.numpy as jnp
  import numpy as np
  import flax.linen as nn
  sys.path.insert(0, str(ROOT))
  from vlora_jax import layers
  from vlora_jax.stack import vlorafy

  rng = np.random.default_rng(0)
  arr = lambda *s, scale=1.0: jnp.asarray(rng.normal(size=s) * scale, jnp.float32)
  x0, g = arr(B, T, D), arr(B, T, D)
  ln_p = {"scale": 1 + arr(LAYERS, D, scale=0.1), "bias": arr(LAYERS, D, scale=0.1)}

  def ln_ref(x, s, b):  # flax.linen.LayerNorm's arithmetic (what layers.layer_norm runs)
    mean = x.mean(-1, keepdims=True)
    var = jnp.maximum(jnp.mean(jnp.square(x), -1, keepdims=True) - jnp.square(mean), 0.0)
    return (x - mean) * jax.lax.rsqrt(var + layers.LN_EPS) * s + b

  def gelu_ref(x):
    return jax.nn.gelu(x, approximate=False)

  @jax.custom_vjp
  def gelu_custom(x):  # candidate fix: exact GELU whose backward is one fused formula
    return gelu_ref(x)

  def gelu_fwd(x):
    return gelu_ref(x), x

  def gelu_bwd(x, ct):  # d/dx x*Phi(x) = Phi(x) + x*phi(x)
    cdf = 0.5 * (1.0 + jax.lax.erf(x * np.float32(2 ** -0.5)))
    pdf = jnp.exp(-0.5 * x * x) * np.float32((2 * np.pi) ** -0.5)
    return (ct * (cdf + x * pdf),)

  gelu_custom.defvjp(gelu_fwd, gelu_bwd)
  ln_custom = None

  def stack(body, params, x=x0, gg=g, unroll=1):
    def loss(p, x):
      h, _ = jax.lax.scan(lambda h, pl: (body(h, pl), None), x, p, unroll=unroll)
      return jnp.sum(h * gg)
    f = jax.jit(jax.grad(loss, argnums=(0, 1)))
    return lambda: f(params, x)

  lin = lambda i, o: {"w": arr(LAYERS, i, o, scale=i ** -0.5), "b": arr(LAYERS, o, scale=0.02)}
  mlp_p = {"ln": ln_p, "fc1": lin(D, HID), "fc2": lin(HID, D)}

  def mlp_body(act, ln=ln_ref):
    def body(x, p):
      h = ln(x, p["ln"]["scale"], p["ln"]["bias"])
      h = act(h @ p["fc1"]["w"] + p["fc1"]["b"])
      return x + h @ p["fc2"]["w"] + p["fc2"]["b"]
    return body

  attn_p = {"ln": ln_p, "qkv": lin(D, 3 * D), "proj": lin(D, D)}

  def attn_manual(q, k, v):
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) * (q.shape[-1] ** -0.5)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v)

  def attn_body(attend, ln=ln_ref):
    def body(x, p):
      h = ln(x, p["ln"]["scale"], p["ln"]["bias"])
      qkv = (h @ p["qkv"]["w"] + p["qkv"]["b"]).reshape(B, T, 3, H, D // H)
      o = attend(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]).reshape(B, T, D)
      return x + o @ p["proj"]["w"] + p["proj"]["b"]
    return body

  ops = {}
  if "ln" in want:
    ops["ln"] = stack(lambda x, p: x + ln_ref(x, p["scale"], p["bias"]), ln_p)
    if ln_custom:
      ops["ln_custom"] = stack(lambda x, p: x + ln_custom(x, p["scale"], p["bias"], layers.LN_EPS),
                               ln_p)
  if "gelu" in want:
    xg, gg = arr(B, T, HID), arr(B, T, HID)
    none = {"z": jnp.zeros((LAYERS, 1))}
    ops["gelu"] = stack(lambda x, p: x + gelu_ref(x), none, xg, gg)
    ops["gelu_tanh"] = stack(lambda x, p: x + jax.nn.gelu(x, approximate=True), none, xg, gg)
    ops["relu"] = stack(lambda x, p: x + jax.nn.relu(x), none, xg, gg)
    if gelu_custom:
      ops["gelu_custom"] = stack(lambda x, p: x + gelu_custom(x), none, xg, gg)
  if "mlp" in want:
    ops["mlp"] = stack(mlp_body(gelu_ref), mlp_p)
    ops["mlp_relu"] = stack(mlp_body(jax.nn.relu), mlp_p)
    ops["mlp_linear"] = stack(mlp_body(lambda h: h), mlp_p)
    if gelu_custom:
      ops["mlp_gelu_custom"] = stack(mlp_body(gelu_custom), mlp_p)
    if ln_custom:
      ops["mlp_ln_custom"] = stack(
          mlp_body(gelu_ref, lambda x, s, b: ln_custom(x, s, b, layers.LN_EPS)), mlp_p)
  if "attn" in want:
    dpa = lambda q, k, v: jax.nn.dot_product_attention(q, k, v)
    ops["attn"] = stack(attn_body(dpa), attn_p)
    ops["attn_manual"] = stack(attn_body(attn_manual), attn_p)
    ops["attn_unroll2"] = stack(attn_body(dpa), attn_p, unroll=2)
  if "block" in want:
    blk = layers.EncoderBlock(D, H, HID, parent=None)
    st = vlorafy(blk, LAYERS)
    params = st.init(jax.random.key(0), x0)["params"]
    params = nn.unbox(params)

    def block_loss(p, x):
      return jnp.sum(st.apply({"params": p}, x) * g)
    fb = jax.jit(jax.grad(block_loss, argnums=(0, 1)))
    ops["block"] = lambda: fb(params, x0)
  if "step" in want:
    sys.path.insert(0, str(ROOT / "experiments"))
    import bench_train
    v = bench_train.Variant("vit", "paper", True, np.random.default_rng(0))

    def step():
      v.state, m = v.step(v.state, v.batch)
      return (v.state, m)
    ops["step"] = step
  if "step_unrolled" in want:  # the same step with the layer stack unrolled (model.scan=False)
    sys.path.insert(0, str(ROOT / "experiments"))
    import bench_train
    orig = bench_train._config
    bench_train._config = lambda family, size, vlora, scan=True: orig(family, size, vlora, False)
    try:
      u = bench_train.Variant("vit", "paper", True, np.random.default_rng(0))
    finally:
      bench_train._config = orig

    def step_unrolled():
      u.state, m = u.step(u.state, u.batch)
      return (u.state, m)
    ops["step_unrolled"] = step_unrolled
  return ops, jax.block_until_ready


def worker(kind: str, want: list[str]):
  ops, sync = (torch_ops if kind == "torch" else jax_ops)(set(want))
  for f in ops.values():  # compile / warm up
    sync(f())
    sync(f())
  out = sys.stdout
  out.write(json.dumps({"ops": sorted(ops)}) + "\n")
  out.flush()
  for line in sys.stdin:
    req = json.loads(line)
    f = ops[req["op"]]
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    for _ in range(req["reps"]):
      sync(f())
    dt = (time.perf_counter() - t0) / req["reps"]
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    n = req["reps"]
    out.write(json.dumps({"t": dt, "user": (r1.ru_utime - r0.ru_utime) / n,
                          "sys": (r1.ru_stime - r0.ru_stime) / n,
                          "minflt": (r1.ru_minflt - r0.ru_minflt) / n}) + "\n")
    out.flush()


# ----------------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------------

class Worker:
  def __init__(self, name, python, env_extra, want):
    env = dict(os.environ, PYTHONPATH=str(ROOT), **env_extra)
    kind = "torch" if name == "torch" else "jax"
    self.name = name
    self.p = subprocess.Popen([python, str(Path(__file__).resolve()), "--worker", kind,
                               "--want", ",".join(want)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, env=env, text=True, cwd="/")
    self.ops = None

  def ready(self):
    line = self.p.stdout.readline()
    if not line:
      raise RuntimeError(f"worker {self.name} died during set-up")
    self.ops = json.loads(line)["ops"]
    return self

  def time(self, op, reps):
    self.p.stdin.write(json.dumps({"op": op, "reps": reps}) + "\n")
    self.p.stdin.flush()
    return json.loads(self.p.stdout.readline())

  def close(self):
    self.p.stdin.close()
    self.p.wait()


# Each fix tried: (name, worker, op, baseline worker, baseline op, kept, why). The effect column
# is (this op's median) / (baseline's median), both from the same interleaved run.
STEPS = [
    ("glibc tunables (no mmap/trim, one arena): full step", "jax+malloc", "step", "jax", "step",
     "kept (vlora_jax/cpu_malloc.py, applied by `python -m vlora_jax.main`)",
     "removes ~614k page faults (2.4 GB) per step; bit-identical"),
    ("glibc tunables: 8-block stack fwd+bwd", "jax+malloc", "block", "jax", "block", "kept (same)",
     "the sublayer view of the same fix"),
    ("glibc tunables: exact GELU x8", "jax+malloc", "gelu", "jax", "gelu", "kept (same)",
     "GELU's gap to torch was page faults, not erf"),
    ("unrolled layer stack (model.scan=False), with tunables", "jax+malloc", "step_unrolled",
     "jax+malloc", "step", "not kept", "no stacked residuals / dynamic-update-slice copies, but "
     "no gain beyond noise; scan keeps compile time flat"),
    ("exact GELU via custom_vjp (one fused backward formula)", "jax+malloc", "mlp_gelu_custom",
     "jax+malloc", "mlp", "not kept yet",
     "a real gain (GELU alone ~0.6x, MLP stack ~0.9x) but its backward rounds differently: needs "
     "an opt-in switch, the parity tests and a full-step measurement (not done in the time box)"),
    ("manual attention (einsum + softmax) vs jax.nn.dot_product_attention", "jax+malloc",
     "attn_manual", "jax+malloc", "attn", "not kept", "within noise; dot_product_attention is "
     "already the same XLA program on CPU"),
    ("scan unroll=2 (attention stack)", "jax+malloc", "attn_unroll2", "jax+malloc", "attn",
     "not kept", "within noise"),
    ("ReLU instead of exact GELU (MLP stack; not exact, a bound only)", "jax+malloc", "mlp_relu",
     "jax+malloc", "mlp", "not applicable", "changes the model; shows what the activation costs"),
]


def write_md(rows, path, notes=""):
  """The tables of `rows` (possibly from several runs) as markdown."""
  by = {(r["run"], r["worker"], r["op"]): r for r in rows}
  lines = ["# perf_gap: the CPU train-step gap to the official PyTorch VLoRA (issue 5)", "",
           "Generated by `experiments/perf_gap.py`; medians over interleaved rounds on a shared, "
           "loaded 2-core machine: ratios within one run are what counts.", ""]
  if notes:
    lines += [notes, ""]
  lines += ["## Steps tried", "",
            "| step tried | run | effect (median, this / before) | min ratio | kept | why |",
            "|---|---|---|---|---|---|"]
  for name, w, op, bw, bop, kept, why in STEPS:
    for run in sorted({r["run"] for r in rows}):
      a, b = by.get((run, w, op)), by.get((run, bw, bop))
      if a and b:
        lines.append(f"| {name} | {run} | {a['median_ms'] / b['median_ms']:.2f} "
                     f"({a['median_ms']:.0f} / {b['median_ms']:.0f} ms) | "
                     f"{a['min_ms'] / b['min_ms']:.2f} | {kept} | {why} |")
  lines += ["", "## All measurements", "",
            "| run | op | worker | median ms | min ms | / torch (median) | / torch (min) | "
            "user ms | sys ms | minor faults |", "|---|---|---|---|---|---|---|---|---|---|"]
  f = lambda v: f"{v:.2f}" if v is not None else "-"
  for r in sorted(rows, key=lambda r: (r["run"], r["op"], r["worker"])):
    lines.append(f"| {r['run']} | {r['op']} | {r['worker']} | {r['median_ms']:.0f} | "
                 f"{r['min_ms']:.0f} | {f(r['vs_torch_median'])} | {f(r['vs_torch_min'])} | "
                 f"{r['user_ms']:.0f} | {r['sys_ms']:.0f} | {r['minflt']:.0f} |")
  Path(path).write_text("\n".join(lines) + "\n")


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--worker", help=argparse.SUPPRESS)
  ap.add_argument("--want", default="", help=argparse.SUPPRESS)
  ap.add_argument("--rounds", type=int, default=7)
  ap.add_argument("--ops", default="ln,gelu,mlp,attn,block", help="sublayer groups")
  ap.add_argument("--no-step", action="store_true", help="skip the full train step")
  ap.add_argument("--step-unrolled", action="store_true",
                  help="also the full step with the layer stack unrolled (JAX workers)")
  ap.add_argument("--step-reps", type=int, default=2)
  ap.add_argument("--target-s", type=float, default=1.5, help="seconds per timing (sublayers)")
  ap.add_argument("--workers", default="torch,jax,jax+malloc")
  ap.add_argument("--torch-python", default="/tmp/torchref/venv/bin/python")
  ap.add_argument("--out", default=str(ROOT / "experiments/results/perf_gap.json"))
  ap.add_argument("--run-name", default="all", help="label of this run's rows")
  ap.add_argument("--from-json", nargs="+", help="only rebuild --out (.json and .md) from these "
                  "earlier outputs (runs recorded separately), measuring nothing")
  ap.add_argument("--notes", default="", help="a paragraph for the markdown")
  args = ap.parse_args()
  if args.from_json:
    reports = [json.loads(Path(p).read_text()) for p in args.from_json]
    rows = [r for rep in reports for r in rep["rows"]]
    Path(args.out).write_text(json.dumps({"runs": reports, "rows": rows}, indent=2))
    write_md(rows, Path(args.out).with_suffix(".md"), args.notes)
    return
  if args.worker:
    return worker(args.worker, [w for w in args.want.split(",") if w])

  want = [o for o in args.ops.split(",") if o] + ([] if args.no_step else ["step"])
  want += ["step_unrolled"] if args.step_unrolled else []
  envs = {"torch": (args.torch_python, {"OMP_NUM_THREADS": "2"}),
          "jax": (sys.executable, {}),
          "jax+malloc": (sys.executable, {"GLIBC_TUNABLES": MALLOC_TUNABLES})}
  t_start = time.time()
  workers = []
  for name in args.workers.split(","):  # set up one at a time: compiles do not overlap timings
    workers.append(Worker(name, *envs[name], want).ready())
    print(f"{name}: ready ({len(workers[-1].ops)} ops) at {time.time() - t_start:.0f}s", flush=True)

  # reps per op: calibrated once on the first worker that has it
  reps = {}
  for w in workers:
    for op in w.ops:
      if op not in reps:
        r = w.time(op, 1)
        reps[op] = args.step_reps if op.startswith("step") else max(1, round(args.target_s / r["t"]))
  samples = {(w.name, op): [] for w in workers for op in w.ops}
  for rnd in range(args.rounds):
    order = workers if rnd % 2 == 0 else workers[::-1]
    for op in sorted(reps):
      for w in order:
        if op in w.ops:
          samples[(w.name, op)].append(w.time(op, reps[op]))
    print(f"round {rnd + 1}/{args.rounds} done at {time.time() - t_start:.0f}s", flush=True)
  for w in workers:
    w.close()

  rows = []
  for (name, op), s in samples.items():
    ts = [x["t"] for x in s]
    rows.append({"run": args.run_name, "worker": name, "op": op, "median_ms": 1e3 * statistics.median(ts),
                 "min_ms": 1e3 * min(ts), "all_ms": [1e3 * t for t in ts], "reps": reps[op],
                 "user_ms": 1e3 * statistics.median(x["user"] for x in s),
                 "sys_ms": 1e3 * statistics.median(x["sys"] for x in s),
                 "minflt": statistics.median(x["minflt"] for x in s)})
  torch_t = {r["op"]: r for r in rows if r["worker"] == "torch"}
  for r in rows:
    base = torch_t.get(r["op"].split("_")[0] if r["op"] not in torch_t else r["op"])
    if r["op"] == "step_unrolled":
      base = torch_t.get("step")
    if r["op"] in ("gelu_tanh", "relu", "gelu_custom"):
      base = torch_t.get("gelu")
    r["vs_torch_median"] = r["median_ms"] / base["median_ms"] if base else None
    r["vs_torch_min"] = r["min_ms"] / base["min_ms"] if base else None
  report = {"shapes": dict(B=B, T=T, D=D, heads=H, mlp=HID, layers=LAYERS),
            "rounds": args.rounds, "rows": rows, "malloc_tunables": MALLOC_TUNABLES,
            "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                        "load_avg": os.getloadavg()},
            "wall_s": time.time() - t_start}
  Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  Path(args.out).write_text(json.dumps(report, indent=2))
  write_md(rows, Path(args.out).with_suffix(".md"), args.notes)
  print(f"{'op':<18} {'worker':<11} {'median ms':>10} {'min ms':>9} {'/torch med':>10} "
        f"{'/torch min':>10} {'user ms':>8} {'sys ms':>7} {'minflt':>8}")
  for r in sorted(rows, key=lambda r: (r["op"], r["worker"])):
    f = lambda v: f"{v:.2f}" if v is not None else "-"
    print(f"{r['op']:<18} {r['worker']:<11} {r['median_ms']:>10.1f} {r['min_ms']:>9.1f} "
          f"{f(r['vs_torch_median']):>10} {f(r['vs_torch_min']):>10} {r['user_ms']:>8.0f} "
          f"{r['sys_ms']:>7.0f} {r['minflt']:>8.0f}")
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
