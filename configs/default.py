"""Every config key with its default: ``vlora_jax/defaults.py``, re-exported for the configs here.

The experiment files of this folder import it as ``from configs import default``; the table itself
is in the package, where the commands that build a config find it without this repository.
"""

from vlora_jax.defaults import *  # noqa: F401,F403  (its __all__: get_config, parse_arg, vlora...)
