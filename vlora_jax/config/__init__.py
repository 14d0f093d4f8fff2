"""The config: every key with its default, what each key allows, and the command line's overrides.

  defaults.py   `get_config()`, every key with its default and a comment (every config's base)
  keys.py       declared keys: a key's type, allowed values and when it applies (the schema's parts)
  overrides.py  ``--config.KEY=VALUE``: the one reader of overrides, for every command
  files.py      ``FILE.py[:ARG]`` -> the config a config file makes, overrides applied

The run's schema, which checks a whole config, is `vlora_jax.train.schema`.
"""
