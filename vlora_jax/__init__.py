"""Vertical LoRA (VLoRA) in JAX/Flax: a VLoRA model is a dense model whose layer stack is
parameterised differently (see README.md)."""

from vlora_jax import backends as _backends
from vlora_jax import cpu_malloc as _cpu_malloc

# Before JAX starts its backend: no probe for a TPU this machine lacks (vlora_jax/backends.py),
# and on CPU, XLA's freed temporaries kept in the process instead of page-faulted in again every
# step (vlora_jax/cpu_malloc.py; bit-identical results).
_backends.skip_absent_tpu()
_cpu_malloc.tune()

__all__ = ["load"]


def __getattr__(name):
  # `vlora_jax.load` (vlora_jax/trained.py) is imported on first use: `import vlora_jax` stays
  # light, and so do the modules that need none of JAX, Orbax or the models.
  if name == "load":
    from vlora_jax.trained import load
    return load
  raise AttributeError(f"module 'vlora_jax' has no attribute {name!r}")
