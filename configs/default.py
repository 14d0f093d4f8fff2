"""Every config key with its default: ``vlora_jax/config/defaults.py``, re-exported for the
configs here.

The experiment files of this folder import it as ``from configs import default``; the table itself
is in the package, where the commands that build a config find it without this repository.
"""

# its __all__: get_config, parse_arg, vlora, the rule tables
from vlora_jax.config.defaults import *  # noqa: F401,F403
