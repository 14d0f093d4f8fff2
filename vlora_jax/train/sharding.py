"""The device mesh, the parameters' shardings, and multi-host start-up.

Models name every parameter axis and every large activation's (`vlora_jax.core.partitioning`); the
config maps the names to mesh axes (``config.sharding_rules`` for parameters,
``config.activation_rules`` for activations), so the same model runs data-parallel on a laptop,
FSDP on a pod, or with tensor parallelism, by changing config only. A dimension that a mesh axis
does not divide evenly is replicated rather than padded.
"""

from __future__ import annotations

import math
import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from vlora_jax.core.partitioning import rules_dict, spec_for

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the batch is split over both: FSDP is data parallelism too


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, ...]:
  """``config.mesh`` ({data, fsdp, tensor}, one of them may be -1 = fill) -> a full shape."""
  sizes = [int(mesh_cfg.get(a, 1)) for a in MESH_AXES]
  fills = [a for a, s in zip(MESH_AXES, sizes) if s == -1]
  bad = [(a, s) for a, s in zip(MESH_AXES, sizes) if s == 0 or s < -1]
  if bad:
    raise ValueError(f"mesh.{bad[0][0]}={bad[0][1]}: mesh sizes must be >= 1, or -1 to fill")
  if len(fills) > 1:
    raise ValueError(f"mesh: {['mesh.' + a for a in fills]} are all -1; at most one axis may fill")
  known = math.prod(s for s in sizes if s != -1)
  if fills:
    if num_devices % known:
      raise ValueError(f"mesh={dict(zip(MESH_AXES, sizes))}: the fixed axes ({known} devices) do not "
                       f"divide the {num_devices} devices")
    sizes = [num_devices // known if s == -1 else s for s in sizes]
  if math.prod(sizes) != num_devices:
    raise ValueError(f"mesh={dict(zip(MESH_AXES, sizes))} has {math.prod(sizes)} devices but "
                     f"{num_devices} are available: the product must equal the device count "
                     "(use -1 for one axis to fill)")
  return tuple(sizes)


def make_mesh(mesh_cfg, devices: Sequence[Any] | None = None, *,
              shape: tuple[int, ...] | None = None) -> jax.sharding.Mesh:
  """A mesh with axes ``(data, fsdp, tensor)`` in GSPMD (Auto) mode over all devices.

  ``shape``: the full shape when the caller has it already (`validate.Plan.mesh_shape`).
  """
  devices = list(devices) if devices is not None else jax.devices()
  shape = shape or mesh_shape(mesh_cfg, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def param_shardings(boxed_abstract, rules, mesh):
  """Boxed abstract params (``nn.LogicallyPartitioned`` leaves) -> NamedShardings, unboxed tree."""
  rd = rules_dict(rules)
  is_box = lambda x: isinstance(x, nn.Partitioned)

  def one(leaf):
    if is_box(leaf):
      return NamedSharding(mesh, spec_for(leaf.value.shape, leaf.names, rd, mesh))
    return NamedSharding(mesh, P())
  return jax.tree.map(one, boxed_abstract, is_leaf=is_box)


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh) -> NamedSharding:
  """Leading (batch) axis split over the data-parallel axes, the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def global_batch(local: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
  """This process's slice of a batch -> global arrays sharded over the data-parallel axes."""
  s = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(s, v) for k, v in local.items()}


def maybe_initialize_distributed(initialize: bool = False) -> bool:
  """Starts ``jax.distributed`` when the config or the environment asks for it.

  ``initialize`` (``config.distributed.initialize``) calls ``jax.distributed.initialize()`` with JAX's own
  cluster auto-detection (TPU pods, SLURM, Open MPI...). Independently, if the environment sets
  ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` (any launcher, or two
  processes on one machine for testing), those are passed explicitly. Idempotent.
  """
  if jax.distributed.is_initialized():
    return True
  env = {k: os.environ.get(k) for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES",
                                       "JAX_PROCESS_ID")}
  if all(env.values()):
    jax.distributed.initialize(env["JAX_COORDINATOR_ADDRESS"], int(env["JAX_NUM_PROCESSES"]),
                               int(env["JAX_PROCESS_ID"]))
    return True
  if initialize:
    jax.distributed.initialize()
    return True
  return False
