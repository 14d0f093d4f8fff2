"""Command-line tools (``python -m vlora_jax.tools.<name>``)."""
