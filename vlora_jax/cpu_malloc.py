"""glibc allocator settings that stop XLA:CPU re-faulting its temporaries every step (issue 5).

XLA:CPU allocates each execution's buffers with malloc and frees them after. glibc serves blocks
over its mmap threshold (the activations of a ViT step: tens to hundreds of MB each) with a fresh
mmap and gives them back with munmap, so EVERY step page-faults all of its memory in again: for the
CIFAR config (D 192, 12 layers, batch 128) ~614k minor faults = 2.4 GB per train step, 1.2-2.7 s of
kernel time, 20-30% of the step's CPU time (experiments/perf_gap.py, ``jax`` vs ``jax+malloc``).
PyTorch does not pay this: its tensors are allocated one op at a time, mostly under the threshold.

The fix keeps freed memory in the process: no mmap for big blocks, one arena (XLA's worker threads
would otherwise allocate from per-thread arenas, whose big blocks are mmapped regardless), no trim.
Faults per step drop to ~0; results are bit-identical (only where memory comes from changes); the
cost is that the resident size stays at the step's peak. glibc reads these tunables only at process
start, so `reexec_with_tunables` re-executes the program once with them set (the command line
entry point calls it; library users can export ``GLIBC_TUNABLES`` themselves).

Applied only where JAX will run on the CPU: ``JAX_PLATFORMS`` is ``cpu``, or unset with no GPU/TPU
plugin installed. ``VLORA_MALLOC_TUNING=0`` turns it off, ``=1`` forces it.
"""

from __future__ import annotations

import importlib.util
import os
import sys

TUNABLES = ("glibc.malloc.mmap_max=0:glibc.malloc.arena_max=1:"
            "glibc.malloc.trim_threshold=68719476736")
_MARK = "VLORA_MALLOC_TUNED"
_ACCEL_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm7_plugin", "libtpu",
                  "jax_plugins.xla_cuda12", "jax_plugins.xla_cuda13")


def _cpu_only() -> bool:
  plat = os.environ.get("JAX_PLATFORMS", "").strip().lower()
  if plat:
    return plat == "cpu"
  for name in _ACCEL_PLUGINS:
    try:
      if importlib.util.find_spec(name) is not None:
        return False
    except (ImportError, ValueError):
      continue
  return True


def wanted() -> bool:
  flag = os.environ.get("VLORA_MALLOC_TUNING", "")
  if flag in ("0", "1"):
    return flag == "1"
  return sys.platform.startswith("linux") and _cpu_only()


def reexec_with_tunables(argv: list[str]) -> None:
  """Re-executes ``argv`` (``sys.executable`` and its arguments) with `TUNABLES` set, once.

  Returns (doing nothing) when not wanted, already applied, or ``GLIBC_TUNABLES`` is set by the
  user. Call it first thing in an entry point, before any threads start.
  """
  if os.environ.get(_MARK) or os.environ.get("GLIBC_TUNABLES") or not wanted():
    return
  env = dict(os.environ, GLIBC_TUNABLES=TUNABLES, **{_MARK: "1"})
  try:
    os.execve(sys.executable, argv, env)
  except OSError:  # cannot re-exec (unusual interpreter set-up): run on, untuned
    return
