"""The machine under JAX, settled at `import vlora_jax` before JAX starts its backends.

  backends.py    no probe for a TPU this machine lacks (libtpu installed, no chip present)
  cpu_malloc.py  glibc allocator settings that stop XLA:CPU page-faulting its temporaries in
                 again every step (bit-identical results)
"""
