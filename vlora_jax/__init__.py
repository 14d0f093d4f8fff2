"""Vertical LoRA (VLoRA) in JAX/Flax: a VLoRA model is a dense model whose layer stack is
parameterised differently (see README.md)."""

from vlora_jax.platform import backends as _backends
from vlora_jax.platform import cpu_malloc as _cpu_malloc

# Before JAX starts its backend: no probe for a TPU this machine lacks
# (vlora_jax/platform/backends.py), and on CPU, XLA's freed temporaries kept in the process instead
# of page-faulted in again every step (vlora_jax/platform/cpu_malloc.py; bit-identical results).
_backends.skip_absent_tpu()
_cpu_malloc.tune()

# The names a user starts from, each imported on first use: `import vlora_jax` stays light, and
# so do the modules that need none of JAX, Orbax or the models.
_PUBLIC = {
    "vlorafy": "vlora_jax.core.stack",      # any Flax block -> a dense or VLoRA stack, one scan
    "VLoRASpec": "vlora_jax.core.spec",     # compounds, targets, ranks, mode
    "LoRASpec": "vlora_jax.core.lora",      # horizontal LoRA on top of any stack
    "to_dense": "vlora_jax.core.stack",     # (dense twin, merged variables) of a stack or a model
    "dense_twin": "vlora_jax.core.params",  # the dense twin's module alone
    "load": "vlora_jax.runs.trained",       # a trained run: model, params, config, info
}

__all__ = sorted(_PUBLIC)


def __getattr__(name):
  if name in _PUBLIC:
    import importlib
    return getattr(importlib.import_module(_PUBLIC[name]), name)
  raise AttributeError(f"module 'vlora_jax' has no attribute {name!r}")


def __dir__():
  return sorted(set(globals()) | set(_PUBLIC))
