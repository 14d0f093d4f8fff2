"""glibc allocator settings that stop XLA:CPU re-faulting its temporaries every step.

XLA:CPU allocates each execution's buffers with malloc and frees them after. glibc serves blocks
over its mmap threshold (the activations of a ViT step: tens to hundreds of MB each) with a fresh
mmap and gives them back with munmap, and trims the top of its heap once more than
``trim_threshold`` bytes are free there, so EVERY step page-faults all of its memory in again: for
the CIFAR config (D 192, 12 layers, batch 128) ~600k minor faults = 2.4 GB per train step, 20-30%
of the step's CPU time (experiments/perf_gap.py). PyTorch does not pay this: its tensors are
allocated one op at a time, mostly under the threshold.

The fix keeps freed memory in the process: no mmap for big blocks, one arena (XLA's worker threads
would otherwise allocate from per-thread arenas, whose heaps are mmapped and shrunk regardless),
and no trimming. Faults per step drop to ~0; results are bit-identical (only where memory comes
from changes); the cost is that the resident size stays at the step's peak.

`tune` sets them with ``mallopt``, which glibc honours at run time for the threads it has not yet
given an arena: `import vlora_jax` calls it, so it reaches ``python -m vlora_jax.main``, scripts
and notebooks alike, as long as JAX has not started its CPU backend before (a warning says so
otherwise; importing vlora_jax first, or exporting `TUNABLES` as ``GLIBC_TUNABLES`` before the
process starts, fixes it). The trim threshold must be "never" (``-1``, glibc's ``SIZE_MAX``): a
step's free memory can exceed the 2 GiB that an int allows, and a threshold below it undoes the
rest (an earlier attempt with 2^31 - 1 saw every fault come back).

Applied only where JAX will run on the CPU: ``JAX_PLATFORMS`` is ``cpu``, or unset with no GPU/TPU
plugin installed. ``VLORA_MALLOC_TUNING=0`` turns it off, ``=1`` forces it; a ``GLIBC_TUNABLES``
that already sets malloc options is left alone.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import sys
import warnings

# The same settings as a GLIBC_TUNABLES value, for a process started from outside (benchmarks).
TUNABLES = ("glibc.malloc.mmap_max=0:glibc.malloc.arena_max=1:"
            "glibc.malloc.trim_threshold=68719476736")
# mallopt parameters (glibc's malloc.h) and their values.
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_SETTINGS = ((_M_MMAP_MAX, 0), (_M_ARENA_MAX, 1), (_M_TRIM_THRESHOLD, -1))
_ACCEL_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm7_plugin", "libtpu",
                  "jax_plugins.xla_cuda12", "jax_plugins.xla_cuda13")
_applied = False


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
  if "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
    return False  # the user's own allocator settings
  return sys.platform.startswith("linux") and _cpu_only()


def _backend_started() -> bool:
  bridge = sys.modules.get("jax._src.xla_bridge")
  return bool(getattr(bridge, "_backends", None))


def tune() -> bool:
  """Applies the allocator settings once, if wanted; returns whether they are in effect."""
  global _applied
  if _applied or not wanted():
    return _applied
  try:
    libc = ctypes.CDLL("libc.so.6")
    _applied = all(libc.mallopt(param, value) == 1 for param, value in _SETTINGS)
  except (OSError, AttributeError):  # not glibc
    return False
  if _applied and _backend_started():
    warnings.warn("vlora_jax was imported after JAX started its CPU backend: its threads keep "
                  "allocator arenas that page-fault every step's memory afresh (20-30% of a train "
                  "step's time). Import vlora_jax before running anything in JAX, or start Python "
                  f"with GLIBC_TUNABLES={TUNABLES}.", stacklevel=3)
  return _applied
