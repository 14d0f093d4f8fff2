"""glibc allocator settings that stop XLA:CPU re-faulting its temporaries every step.

XLA:CPU allocates each execution's buffers with malloc and frees them after. glibc serves blocks
over its mmap threshold (the activations of a ViT step: tens to hundreds of MB each) with a fresh
mmap and gives them back with munmap, and trims the top of its heap once more than
``trim_threshold`` bytes are free there, so EVERY step page-faults all of its memory in again: for
the CIFAR config (D 192, 12 layers, batch 128) ~600k minor faults = 2.4 GB per train step, 20-30%
of the step's CPU time (benchmarks/results/perf_gap.md). PyTorch does not pay this: its tensors are
allocated one op at a time, mostly under the threshold.

The fix keeps freed memory in the process: no mmap for big blocks, one arena (XLA's worker threads
would otherwise allocate from per-thread arenas, whose heaps are mmapped and shrunk regardless),
and no trimming. Faults per step drop to 0 once the heap has grown to the step's high-water mark:
XLA's threads free and allocate the temporaries in a different order each step, so for the first
few steps (up to the 6th on the CIFAR config, benchmarks/results/bench_malloc.md) the free space
can be too fragmented for the next step and the heap grows (a step's worth of fresh pages,
faulted in once), then no more. Results are bit-identical (only where memory comes from
changes); the cost is that the resident size stays at the step's peak.

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
# mallopt parameters (glibc's malloc.h) and their values; glibc's defaults to return to.
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_SETTINGS = ((_M_MMAP_MAX, 0), (_M_ARENA_MAX, 1), (_M_TRIM_THRESHOLD, -1))
_DEFAULTS = ((_M_MMAP_MAX, 65536), (_M_TRIM_THRESHOLD, 128 * 1024))
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


def ram_bytes() -> int:
  """The memory this process may use: the machine's, or its cgroup's limit where lower."""
  total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  for limit in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
    try:
      with open(limit) as f:
        text = f.read().strip()
    except OSError:
      continue
    if text.isdigit():
      total = min(total, int(text))
  return total


def fit(step_bytes: int, ram: int | None = None) -> bool:
  """Keeps the settings for a train step of ``step_bytes`` only where the process can afford
  what they cost: with freed memory kept in the process, the heap's high-water mark reached 1.9x
  the step's compiled memory (an LM of D 2048 and 48 layers: 24.8 GB, against 13.1 GB with glibc's
  defaults, on a 24 GiB machine). Past a quarter of the RAM (``2 * step_bytes > ram / 2``) it
  returns to glibc's defaults (`untune`): big steps fault their memory in afresh, which costs
  them far less than it costs a small step, and fit. Call it before the state is allocated.
  Returns whether the settings stay in effect.
  """
  if _applied and 4 * step_bytes > (ram or ram_bytes()):
    untune()
  return _applied


def untune() -> bool:
  """Back to glibc's defaults for big blocks (mmapped, returned when freed), and the memory the
  process holds free returned to the system now. Returns whether anything was undone."""
  global _applied
  if not _applied:
    return False
  libc = ctypes.CDLL("libc.so.6")
  for param, value in _DEFAULTS:
    libc.mallopt(param, value)
  libc.malloc_trim(0)
  _applied = False
  return True
