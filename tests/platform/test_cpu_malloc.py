"""`import vlora_jax` keeps XLA:CPU's freed temporaries in the process
(vlora_jax/platform/cpu_malloc.py): a jitted step with 130 MB of temporaries stops page-faulting
them in again on every call. Counted with getrusage in a fresh process, as a notebook or a script
that imports the library would run."""

import os
import subprocess
import sys

import pytest

from helpers_train import ROOT

PROGRAM = """
import resource, sys
import vlora_jax  # the tuning happens here, before JAX starts its backend
import jax, jax.numpy as jnp
step = jax.jit(lambda x: jnp.tanh(jnp.tanh(x @ x.T) @ x) * 1.0001)  # 64 MB temporaries
x = jnp.ones((4096, 4096), jnp.float32)  # above glibc's largest mmap threshold (32 MB)
faults = []
for _ in range(10):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  step(x).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(min(faults[3:]))  # the best call after warm-up
"""


def _faults_per_call(tuning: str) -> int:
  """Minor page faults of the best call of the step, after three warm-up calls.

  The best, not the median: kept memory fragments, and this bare loop of two 64 MB temporaries
  still faults on some calls (as with GLIBC_TUNABLES at process start); a train step reaches zero
  once the heap has grown to its high-water mark, after its first few steps
  (benchmarks/results/bench_malloc.md). Untuned, every call faults.
  """
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu", VLORA_MALLOC_TUNING=tuning)
  env.pop("GLIBC_TUNABLES", None)
  out = subprocess.run([sys.executable, "-c", PROGRAM], env=env, capture_output=True, text=True,
                       timeout=300, check=True)
  return int(out.stdout.split()[-1])


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator only")
def test_import_stops_the_per_call_page_faults():
  untuned, tuned = _faults_per_call("0"), _faults_per_call("1")
  assert untuned > 10_000, untuned  # 4 KiB pages of ~130 MB, faulted in on every call
  assert tuned < untuned / 20, (tuned, untuned)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator only")
def test_fit_keeps_the_settings_for_small_steps_and_drops_them_for_big_ones():
  """Kept memory costs up to twice a step's memory: past a quarter of the RAM, glibc's defaults
  come back (in a fresh process: dropping them here would slow the rest of the tests)."""
  program = ("from vlora_jax.platform import cpu_malloc as m\n"
             "print(m.tune(), m.fit(1 << 30, ram=8 << 30), m.fit(3 << 30, ram=8 << 30), m._applied)")
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu", VLORA_MALLOC_TUNING="1")
  out = subprocess.run([sys.executable, "-c", program], env=env, capture_output=True, text=True,
                       timeout=120, check=True)
  assert out.stdout.split() == ["True", "True", "False", "False"]
