"""The train state (a plain dict, so Orbax and jit see an ordinary pytree) and its shardings.

  step       int32 scalar: updates applied so far (also the data position)
  params     the model parameters (f32)
  opt_state  the optax state (frozen params have none: ``MaskedNode``)
  rng        uint32 key data; split once per step for dropout
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P


def opt_state_shardings(opt_abstract, params_abstract, param_shardings, mesh):
  """Shardings of an optax state: leaves that mirror a parameter take its sharding.

  A leaf mirrors a parameter when the trailing dict keys of its path name a parameter path and
  the shapes agree (Adam's ``mu``/``nu``...); counts and other scalars are replicated. Matching by
  path keeps this independent of how optax nests its states (chain, multi_transform, masks).
  """
  flat_p = {tuple(k.key for k in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(params_abstract)[0]}
  flat_s = {tuple(k.key for k in path): s
            for path, s in jax.tree_util.tree_flatten_with_path(param_shardings)[0]}
  rep = NamedSharding(mesh, P())

  def one(path, leaf):
    keys = tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))
    for i in range(len(keys)):
      sub = keys[i:]
      if sub in flat_p and flat_p[sub].shape == leaf.shape:
        return flat_s[sub]
    return rep
  return jax.tree_util.tree_map_with_path(one, opt_abstract)


def shardings(abstract_state, param_shardings, mesh):
  """Shardings of the whole state dict."""
  rep = NamedSharding(mesh, P())
  return {"step": rep, "rng": rep, "params": param_shardings,
          "opt_state": opt_state_shardings(abstract_state["opt_state"], abstract_state["params"],
                                           param_shardings, mesh)}


def create(params, tx, rng_data):
  """A fresh state at step 0 from params (jit this with the state shardings as out_shardings)."""
  return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
          "rng": rng_data}
