"""``python -m vlora_jax.tools.config_doc``: the config schema as markdown (docs/config.md)."""

from vlora_jax.train import schema

if __name__ == "__main__":
  print(schema.markdown(), end="")
