"""Compile a config's train step for a TPU pod (or the local devices) and report its cost per chip.

  vlora-compile --config configs/FILE.py[:ARG] [--topology v5e:16x16] [--config.KEY=VALUE ...]
                [--out FILE.json] [--nocount_flops]

(``python -m vlora_jax.compile`` is the same command.)

The step compiled is the one training runs (`train.trainer.lower_train_step`): its optimizer, its
donated state, the parameters' and activations' shardings, gradient accumulation and remat. With
``--topology`` JAX compiles ahead of time for that TPU slice (``v5e:2x2`` ... ``v5e:16x16``,
``v5p:4x4x4``, ``v4:4x4x4``, ``v6e:8x8``) on this machine, no TPU needed: it needs ``libtpu``, which
``pip install -e '.[tpu]'`` brings at the version of the pinned jax. Without it, the step is
compiled for the local devices (CPU or GPU; ``XLA_FLAGS=--xla_force_host_platform_device_count=8``
makes 8 CPU devices). Nothing is read from disk but the config: the batch's shapes come from the
model family, so no data is needed.

Printed and written (``--out``), per chip: ``temp_bytes``, ``argument_bytes``, ``output_bytes``,
``alias_bytes``, ``peak_bytes`` (temp + argument + output - alias), ``hbm_bytes`` and ``fits``;
``flops`` and ``bytes_accessed`` of the whole step (XLA's cost analysis counts a loop body once:
each layer stack is compiled again with its scan unrolled twice, and the difference, one layer,
is counted for every layer; see `whole_step_cost`); the mesh, the global batch, the parameter counts; and a roofline
estimate (``step_time_estimate_s`` = max(flops / peak FLOP/s, bytes / HBM bandwidth), and
``mfu_estimate`` from PaLM's model FLOPs, 6 N + 12 L T D per token): estimates, not measurements.

Exit status: 0 the step fits; 3 it does not fit the chip's memory (one line says by how much, and
``--out`` is written with ``fits: false``); 2 a mistake in the input (one line); 130 / 143
interrupted by Ctrl-C / SIGTERM (one line); 1 an internal error.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
import time
import traceback
from pathlib import Path

from vlora_jax import cli
from vlora_jax.errors import UserError

PROG = "vlora-compile"

EXIT_DOES_NOT_FIT = 3
GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Chip:
  """One accelerator's peak bf16 matmul rate, HBM capacity and bandwidth (vendor figures; the
  capacity is what XLA can use of it)."""
  peak_flops: float
  hbm_bytes: float
  hbm_bandwidth: float


# Google Cloud's TPU pages and NVIDIA's data sheets (dense bf16). v5e: 16 GiB, of which XLA's
# compiler gives a program 15.75 GiB (its out-of-memory messages say "of 15.75G hbm").
CHIPS = {
    "v4": Chip(275e12, 32 * GIB, 1228e9),
    "v5e": Chip(197e12, 15.75 * GIB, 819e9),
    "v5p": Chip(459e12, 95 * GIB, 2765e9),
    "v6e": Chip(918e12, 31.25 * GIB, 1640e9),
    "H100": Chip(989e12, 80e9, 3.35e12),
    "H200": Chip(989e12, 141e9, 4.8e12),
    "A100": Chip(312e12, 80e9, 2.0e12),
}


class CompileError(UserError, ValueError):
  """The request cannot be compiled as asked (a topology, a missing libtpu)."""


def devices_for(topology: str | None):
  """``(devices, chip name or None)``: a TPU topology's devices, or the local ones."""
  import jax
  if topology is None:
    devices = jax.devices()
    kind = devices[0].device_kind
    return devices, next((name for name in CHIPS if name in kind), None)
  generation = topology.split(":")[0]
  if generation not in CHIPS or ":" not in topology:
    raise CompileError(f"--topology={topology!r}: allowed are a TPU slice "
                       f"'<generation>:<shape>' with generation in "
                       f"{[c for c in CHIPS if c.startswith('v')]}, e.g. v5e:4x4 or v5p:4x4x4")
  try:
    import libtpu  # noqa: F401 -- only to say what is missing
  except ImportError:
    raise CompileError(f"--topology={topology!r} needs libtpu: pip install -e '.[tpu]' (jax's "
                       "own tpu extra, at the pinned jax's version)") from None
  _settle_libtpu(topology)
  from jax.experimental import topologies
  try:
    topo = topologies.get_topology_desc(platform="tpu", topology_name=topology)
  except Exception as e:  # noqa: BLE001 -- libtpu's own words name what it refused
    raise CompileError(f"--topology={topology!r}: libtpu refused it: {cli.one_line(e)}") from None
  return list(topo.devices), generation


# Options of the compiles that count FLOPs. On a TPU, XLA turns a matmul whose operand FSDP
# gathers into a loop over the shards ("windowed einsum", overlapping the gather with the
# matmul), and its cost analysis counts that loop's body once; counted without it, the per-chip
# FLOPs are the step's. The compile that measures memory keeps it: it is the step that runs.
COST_OPTIONS = {"tpu": {"xla_tpu_enable_windowed_einsum_for_all_gather": False,
                        "xla_tpu_enable_windowed_einsum_for_reduce_scatter": False}}


# Cloud TPU names of a slice by generation: chips (v5e, v6e) or TensorCores (v4, v5p: 2 a chip).
_ACCELERATOR_TYPE = {"v4": ("v4", 2), "v5e": ("v5litepod", 1), "v5p": ("v5p", 2),
                     "v6e": ("v6e", 1)}


def _settle_libtpu(topology: str) -> None:
  """What libtpu would ask a TPU VM's metadata server, told up front: on a machine without TPU
  chips it otherwise prints a screen of warnings while it starts, before any compile.

  libtpu also takes a machine-wide lock for the chips it drives; compiling drives none, so two
  compiles (or a compile beside a test) may load it at once.
  """
  name, per_chip = _ACCELERATOR_TYPE[topology.split(":")[0]]
  chips = math.prod(int(n) for n in re.findall(r"\d+", topology.split(":")[1]))
  for key, value in (("ALLOW_MULTIPLE_LIBTPU_LOAD", "1"), ("TPU_SKIP_MDS_QUERY", "1"),
                     ("TPU_WORKER_HOSTNAMES", "localhost"),
                     ("TPU_ACCELERATOR_TYPE", f"{name}-{chips * per_chip}"),
                     ("TPU_STDERR_LOG_LEVEL", "3"), ("TPU_MIN_LOG_LEVEL", "3")):
    os.environ.setdefault(key, value)


def stack_depths(run) -> dict[str, int]:
  """``{stack name: layers}`` of the run's model (from its stored layouts)."""
  return {name: layout["num_layers"] for name, layout in run.meta["layout"].items()}


def _cost(compiled) -> tuple[float, float]:
  ca = compiled.cost_analysis()
  ca = ca[0] if isinstance(ca, (list, tuple)) else ca
  return float(ca.get("flops", 0.0)), float(ca.get("bytes accessed", 0.0))


def whole_step_cost(run, compiled) -> tuple[float, float]:
  """``(flops, bytes accessed)`` of one step (``compiled``: the run's), every layer counted.

  XLA counts a loop body once. Unrolling one stack's scan twice counts its layer twice, so the
  difference is one layer of that stack, fwd + bwd (+ remat): the step's cost is the scanned
  compile's plus ``layers - 1`` of those per stack. A microbatch scan is a loop too: the costs
  are taken at one microbatch (the optimizer's update then counted once per microbatch, a
  negligible part) and multiplied.
  """
  from vlora_jax.core import stack
  from vlora_jax.train import setup, trainer
  options = COST_OPTIONS.get(run.mesh.devices.flat[0].platform, {})
  accum = run.config.grad_accum_steps
  if accum > 1:
    config = run.config.copy_and_resolve_references()
    config.batch_size //= accum
    config.grad_accum_steps = 1
    run = setup.without_data(config, list(run.mesh.devices.flat))
  if accum > 1 or options:
    compiled = trainer.lower_train_step(run).compile(compiler_options=options)
  base = _cost(compiled)
  flops, nbytes = base
  for name, depth in stack_depths(run).items():
    if depth < 2:
      continue
    with stack.unrolled({name: 2}):
      twice = _cost(trainer.lower_train_step(run).compile(compiler_options=options))
    flops += (depth - 1) * (twice[0] - base[0])
    nbytes += (depth - 1) * (twice[1] - base[1])
  return flops * accum, nbytes * accum


def model_flops_per_chip(run) -> float:
  """PaLM's model FLOPs of a step per chip (appendix B): ``6 N + 12 L T D`` a token, ``N`` the
  dense twin's non-embedding parameters; no rematerialisation, whatever the policy."""
  import jax
  from vlora_jax.core import params as params_lib
  dense = params_lib.param_shapes(params_lib.dense_twin(run.model),
                                  *run.family.sample_inputs(run.config.model, 2), train=False)
  flat = jax.tree_util.tree_leaves_with_path(dense)
  embedding = lambda path: re.search(r"(embed|pos_embed|embedding)", jax.tree_util.keystr(path))
  n = sum(math.prod(leaf.shape) for path, leaf in flat
          if len(leaf.shape) >= 2 and not embedding(path))
  t = run.family.sequence_length(run.config.model)
  layers = sum(stack_depths(run).values())
  per_token = 6 * n + 12 * layers * t * run.config.model.dim
  return per_token * t * run.config.batch_size / run.mesh.size


def _out_of_memory(message: str) -> float | None:
  """The bytes a refused program needed, from XLA's RESOURCE_EXHAUSTED message (None if it is
  not one)."""
  if "RESOURCE_EXHAUSTED" not in message and "Ran out of memory" not in message:
    return None
  # libtpu words it as "Used 20.1G of 15.75G hbm" or as "the total memory required for HLO
  # temporaries (535.45G) exceeds available HBM" (then it is the temporaries alone: at least).
  used = (re.search(r"Used ([\d.]+)([KMGT]) of [\d.]+[KMGT] hbm", message)
          or re.search(r"required for HLO temporaries \(([\d.]+)([KMGT])\)", message))
  scale = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}
  return float(used.group(1)) * scale[used.group(2)] if used else math.nan


def compile_report(config, topology: str | None = None, count_flops: bool = True) -> dict:
  """Compiles ``config``'s train step for ``topology`` (None: the local devices) and returns the
  report (see the module doc)."""
  from vlora_jax.train import setup, trainer
  devices, chip_name = devices_for(topology)
  chip = CHIPS.get(chip_name)
  run = setup.without_data(config, devices)
  report = {
      "topology": topology or f"local:{devices[0].platform}", "chip": chip_name,
      "chips": len(devices), "mesh": {k: int(v) for k, v in run.mesh.shape.items()},
      "global_batch": int(config.batch_size), "grad_accum_steps": int(config.grad_accum_steps),
      "sequence_length": run.family.sequence_length(config.model),
      "model": config.model.name, "vlora": run.plan.vlora is not None,
      "remat": config.model.remat, "dtype": config.model.dtype,
      "params_total": run.counts["total"], "params_trainable": run.counts["trainable"],
      "params_dense_equivalent": (run.dense_counts or run.counts)["total"],
      "hbm_bytes": chip.hbm_bytes if chip else _host_memory(devices),
  }
  t0 = time.time()
  lowered = trainer.lower_train_step(run)
  try:
    compiled = lowered.compile()
  except Exception as e:  # noqa: BLE001 -- only an out-of-memory refusal is an answer
    needed = _out_of_memory(str(e))
    if needed is None:
      raise
    return {**report, "fits": False, "peak_bytes": needed, "compile_s": time.time() - t0}
  report["compile_s"] = time.time() - t0
  m = compiled.memory_analysis()
  peak = (m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes
          - m.alias_size_in_bytes)
  report.update(temp_bytes=m.temp_size_in_bytes, argument_bytes=m.argument_size_in_bytes,
                output_bytes=m.output_size_in_bytes, alias_bytes=m.alias_size_in_bytes,
                peak_bytes=peak, fits=report["hbm_bytes"] is None or peak <= report["hbm_bytes"])
  if count_flops:
    flops, nbytes = whole_step_cost(run, compiled)
    report.update(flops=flops, bytes_accessed=nbytes)
    report["model_flops"] = model_flops_per_chip(run)
    if chip is not None:
      step = max(flops / chip.peak_flops, nbytes / chip.hbm_bandwidth)
      report.update(step_time_estimate_s=step,
                    mfu_estimate=report["model_flops"] / (step * chip.peak_flops))
  return report


def _host_memory(devices) -> float | None:
  """A local device's memory limit (GPU), or this machine's RAM (CPU)."""
  stats = devices[0].memory_stats() if hasattr(devices[0], "memory_stats") else None
  if stats and stats.get("bytes_limit"):
    return float(stats["bytes_limit"])
  try:
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
  except (ValueError, OSError):
    return None


def format_report(r: dict) -> str:
  gib = lambda key: f"{r[key] / GIB:.2f} GiB" if r.get(key) is not None else "?"
  lines = [f"{r['topology']}: {r['chips']} chips, mesh {r['mesh']}, global batch "
           f"{r['global_batch']} x {r['sequence_length']} tokens, {r['params_total']:,} params "
           f"(dense twin {r['params_dense_equivalent']:,})"]
  if not r["fits"]:
    lines.append(f"does not fit: the step needs {gib('peak_bytes')} per chip, the chip has "
                 f"{gib('hbm_bytes')}")
    return "\n".join(lines)
  lines.append(f"per chip: peak {gib('peak_bytes')} of {gib('hbm_bytes')} (temp "
               f"{gib('temp_bytes')}, arguments {gib('argument_bytes')}, outputs "
               f"{gib('output_bytes')}, aliased {gib('alias_bytes')})")
  if "flops" in r:
    lines.append(f"per chip: {r['flops'] / 1e12:.3f} TFLOP a step, "
                 f"{r['bytes_accessed'] / GIB:.2f} GiB accessed")
  if "step_time_estimate_s" in r:
    lines.append(f"estimate (roofline, not a measurement): {r['step_time_estimate_s'] * 1e3:.1f} ms"
                 f" a step, MFU {r['mfu_estimate']:.1%}")
  return "\n".join(lines)


def parser() -> cli.Parser:
  p = cli.Parser(PROG, __doc__, epilog=cli.OVERRIDES_HELP, allow_abbrev=False)
  cli.add_config_arg(p)
  p.add_argument("--topology", default=None, metavar="SLICE",
                 help="a TPU slice, e.g. v5e:4x4, v5p:4x4x4 (needs libtpu); default: the local "
                 "devices")
  p.add_argument("--out", default=None, metavar="FILE.json", help="write the report here as JSON")
  p.add_argument("--overwrite", action="store_true",
                 help="replace an existing --out that is not a report of this command")
  p.add_argument("--nocount_flops", dest="count_flops", action="store_false",
                 help="skip compiling each layer stack again, unrolled twice, to count the FLOPs "
                 "of every layer (about halves the time)")
  p.add_argument("--verbose", action="store_true", help="show the traceback of input errors too")
  return cli.with_overrides_usage(p)


def _written_by_compile(path: Path) -> bool:
  """Whether a file is a report of this command (which a new one may replace)."""
  from vlora_jax.runs import outputs
  return (outputs.read_json_object(path) or {}).get("written_by") == PROG  # as evaluate marks


def main(argv: list[str] | None = None) -> None:
  args, config = cli.parse_config_command(parser(), argv)
  from vlora_jax.runs import outputs
  from vlora_jax.train import metrics
  metrics.quiet_libraries()
  try:
    # Ctrl-C / SIGTERM: one line and 130 / 143 at once, even inside XLA's compile (`cli.guarded`).
    with cli.exit_on_signals(PROG, "nothing was written"):
      out = args.out and outputs.check_target(  # refused before minutes of compiling
          args.out, "--out", kind="file", owned=_written_by_compile, overwrite=args.overwrite,
          writer=f"a report of {PROG}")
      report = cli.in_worker(compile_report, config, args.topology, args.count_flops)
      print(format_report(report), flush=True)
      if out:
        outputs.write_json(out, {**report, "written_by": PROG}, "--out")
        print(f"report: {out}", flush=True)
  except UserError as e:
    cli.fail(cli.one_line(e), e, args.verbose)
  except Exception:  # noqa: BLE001 -- a bug: show where, and say that it is one
    traceback.print_exc()
    print(f"{PROG}: internal error (a bug in vlora_jax or a library, not in your input): the "
          "traceback above says where", file=sys.stderr, flush=True)
    sys.exit(1)
  if not report["fits"]:
    sys.exit(EXIT_DOES_NOT_FIT)


def run():
  """The ``vlora-compile`` console script."""
  main()


if __name__ == "__main__":
  run()
