"""Test-session set-up: an XLA compilation cache shared by this session's in-process tests.

Many tests train the same tiny configs (tests/helpers_train.py), so they compile the same programs
again and again; a cache (fresh per session, in a temporary directory) compiles each once.
Subprocess tests do not share it: some of them are SIGKILLed on purpose, mid-write.
"""

import tempfile

import vlora_jax  # noqa: F401 -- first: it settles the backend before JAX starts (platform/)
import jax

jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="vlora_jax_xla_cache_"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
