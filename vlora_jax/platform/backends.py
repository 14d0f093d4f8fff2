"""Before JAX starts its backends: do not probe for a TPU that this machine does not have.

The ``tpu`` extra (``pip install -e '.[tpu]'``, which requirements.txt installs so that
`vlora_jax.compile` can compile for a TPU pod from any machine) puts libtpu beside JAX. JAX then
tries to start a TPU runtime in every process, and on a machine without TPU chips that costs a
second and prints a screen of libtpu warnings before it falls back to the CPU. When libtpu is
installed but no TPU chip is on the PCI bus, no GPU plugin is installed and ``JAX_PLATFORMS`` is
unset, CPU is the only backend JAX could start, so `skip_absent_tpu` says so up front. Compiling
for a TPU topology still works (``jax.experimental.topologies`` needs no TPU backend).
"""

from __future__ import annotations

import glob
import importlib.util
import os

GOOGLE_PCI_VENDOR = "0x1ae0"  # TPU chips enumerate under Google's PCI vendor id
GPU_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "jax_rocm7_plugin",
               "jax_plugins")


def _tpu_chips_present() -> bool:
  for path in glob.glob("/sys/bus/pci/devices/*/vendor"):
    try:
      with open(path) as f:
        if f.read().strip() == GOOGLE_PCI_VENDOR:
          return True
    except OSError:
      continue
  return False


def _installed(module: str) -> bool:
  try:
    return importlib.util.find_spec(module) is not None
  except (ImportError, ValueError):
    return False


def skip_absent_tpu() -> None:
  """Sets ``JAX_PLATFORMS=cpu`` where JAX could only end up on the CPU anyway (see above)."""
  if "JAX_PLATFORMS" in os.environ or not _installed("libtpu"):
    return
  if _tpu_chips_present() or any(_installed(p) for p in GPU_PLUGINS):
    return
  os.environ["JAX_PLATFORMS"] = "cpu"
