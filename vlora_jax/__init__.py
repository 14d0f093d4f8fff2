"""Vertical LoRA (VLoRA) in JAX/Flax: a VLoRA model is a dense model whose layer stack is
parameterised differently (see README.md)."""

from vlora_jax import cpu_malloc as _cpu_malloc

# On CPU, before JAX starts its backend: keep XLA's freed temporaries in the process instead of
# page-faulting them in again every step (vlora_jax/cpu_malloc.py). Bit-identical results.
_cpu_malloc.tune()

__all__ = ["load"]


def __getattr__(name):
  # `vlora_jax.load` (vlora_jax/trained.py) is imported on first use: `import vlora_jax` stays
  # light, and so do the modules that need none of JAX, Orbax or the models.
  if name == "load":
    from vlora_jax.trained import load
    return load
  raise AttributeError(f"module 'vlora_jax' has no attribute {name!r}")
