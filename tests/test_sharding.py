"""Sharding: 8 fake CPU devices (data x tensor, fsdp) == 1 device; two jax.distributed processes.

The main pytest process has already initialised JAX with one device, so multi-device runs happen in
fresh interpreters (``XLA_FLAGS=--xla_force_host_platform_device_count=8``).
"""

import json
import textwrap

import jax
import numpy as np
import pytest
from helpers_train import free_port, result, run_py, tiny

from vlora_jax import checkpoint_format
from vlora_jax.train import sharding, train_and_evaluate

STEPS = 3
OVERRIDES = {"num_train_steps": STEPS, "checkpoint.every_steps": 1, "checkpoint.keep": 10}


def _losses(workdir):
  rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  return [r["train/loss"] for r in rows if "train/loss" in r]


def _max_diff(a, b) -> float:
  return max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


EIGHT = textwrap.dedent("""
    import json
    import jax
    from jax.sharding import PartitionSpec as P
    import flax.linen as nn
    from helpers_train import tiny
    from vlora_jax import models
    from vlora_jax.train import sharding, train_and_evaluate
    assert jax.device_count() == 8
    out = {}
    for name, mesh in (("data_tensor", dict(data=2, fsdp=1, tensor=4)),
                       ("fsdp", dict(data=2, fsdp=4, tensor=1))):
      c = tiny("vit", **%(overrides)r, **{f"mesh.{k}": v for k, v in mesh.items()})
      s = train_and_evaluate(c, f"%(tmp)s/{name}")
      m = models.build(c.model)
      boxed = jax.eval_shape(lambda k: m.init(k, *[jax.numpy.zeros(a.shape, a.dtype) for a in
                                                   models.sample_inputs(c.model)]), jax.random.key(0))
      shard = sharding.param_shardings(boxed["params"], c.sharding_rules, sharding.make_mesh(c.mesh))
      out[name] = {"summary_loss": s["train/loss"], "mesh": s["mesh"],
                   "fc1": str(shard["blocks"]["base"]["mlp"]["fc1"]["kernel"].spec),
                   "inc_a": str(shard["blocks"]["inc_a"]["mlp"]["fc1"]["kernel"].spec),
                   "head": str(shard["head"]["kernel"].spec)}
    print("RESULT " + json.dumps(out), flush=True)
    """)


@pytest.mark.slow
def test_eight_devices_equal_one(tmp_path):
  ref = tmp_path / "one"
  train_and_evaluate(tiny("vit", **OVERRIDES), ref)
  proc = run_py(EIGHT % {"overrides": OVERRIDES, "tmp": str(tmp_path)}, devices=8)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  out = result(proc.stdout)
  # the rules put the MLP on the tensor axis, embed on fsdp, and keep stack and rank axes replicated
  assert out["data_tensor"]["fc1"] == str(jax.sharding.PartitionSpec(None, None, "tensor"))
  assert out["fsdp"]["fc1"] == str(jax.sharding.PartitionSpec(None, "fsdp", None))
  assert out["fsdp"]["inc_a"] == str(jax.sharding.PartitionSpec(None, None, "fsdp", None))
  # 10 classes do not split over 4 tensor shards: that axis stays replicated, not padded
  assert out["data_tensor"]["head"] == str(jax.sharding.PartitionSpec(None, None))
  want = checkpoint_format.read_path(str(ref))["params"]
  for name in ("data_tensor", "fsdp"):
    np.testing.assert_allclose(_losses(tmp_path / name), _losses(ref), rtol=0, atol=1e-5)
    got = checkpoint_format.read_path(str(tmp_path / name))["params"]
    assert jax.tree.structure(got) == jax.tree.structure(want)
    assert _max_diff(got, want) <= 1e-5, name


def test_mesh_shape_and_spec_rules():
  assert sharding.mesh_shape({"data": -1, "fsdp": 2, "tensor": 1}, 8) == (4, 2, 1)
  with pytest.raises(ValueError, match=r"has 4 devices but 8 are available"):
    sharding.mesh_shape({"data": 2, "fsdp": 2, "tensor": 1}, 8)
  with pytest.raises(ValueError, match=r"at most one axis may fill"):
    sharding.mesh_shape({"data": -1, "fsdp": -1, "tensor": 1}, 8)
  mesh = jax.make_mesh((1, 1, 1), sharding.MESH_AXES,
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  rules = sharding.rules_dict((("embed", "fsdp"), ("mlp", "tensor"), ("rank", None)))
  # size-1 mesh axes are dropped: everything replicated on one device
  assert sharding.spec_for((4, 8), ("embed", "mlp"), rules, mesh) == jax.sharding.PartitionSpec(
      None, None)


TWO_PROCESSES = textwrap.dedent("""
    import json, os
    from helpers_train import tiny
    from vlora_jax.train import train_and_evaluate
    import jax
    c = tiny("vit", num_train_steps=3, **{"checkpoint.every_steps": 2})
    s = train_and_evaluate(c, os.environ["WORKDIR"])
    print("RESULT " + json.dumps({"process": jax.process_index(), "processes": jax.process_count(),
                                  "devices": jax.device_count(), "loss": s["train/loss"],
                                  "eval_loss": s["eval/loss"]}), flush=True)
    """)


@pytest.mark.slow
def test_two_processes_on_localhost(tmp_path):
  port = free_port()
  procs = [run_py(TWO_PROCESSES, devices=2, wait=False, env={
      "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2",
      "JAX_PROCESS_ID": str(i), "WORKDIR": str(tmp_path / "two")}) for i in range(2)]
  outs = []
  for p in procs:
    try:
      out, _ = p.communicate(timeout=300)
    finally:
      if p.poll() is None:
        p.kill()
    assert p.returncode == 0, out[-4000:]
    outs.append(result(out))
  assert {o["process"] for o in outs} == {0, 1}
  assert all(o["processes"] == 2 and o["devices"] == 4 for o in outs)
  assert outs[0]["loss"] == outs[1]["loss"] and outs[0]["eval_loss"] == outs[1]["eval_loss"]
  # and the same training as one process: the global batch does not depend on the process count
  one = train_and_evaluate(tiny("vit", num_train_steps=3), tmp_path / "one")
  assert abs(one["train/loss"] - outs[0]["loss"]) <= 1e-5
  assert (tmp_path / "two" / "summary.json").exists()  # written by process 0 only
  assert sorted(int(p.name) for p in (tmp_path / "two" / "checkpoints").iterdir()) == [2, 3]
