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

from vlora_jax.runs import checkpoint_format
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



def test_spec_rules_give_each_mesh_axis_to_the_name_first_in_the_table():
  mesh = jax.sharding.AbstractMesh((1, 4, 2), sharding.MESH_AXES)  # data 1, fsdp 4, tensor 2
  rules = sharding.rules_dict((("embed", "fsdp"), ("mlp", ("tensor", "fsdp")), ("rank", None)))
  P = jax.sharding.PartitionSpec
  spec = lambda shape, names: sharding.spec_for(shape, names, rules, mesh)
  assert spec((16, 64), ("embed", "mlp")) == P("fsdp", "tensor")  # a dense kernel
  assert spec((64, 16), ("mlp", "embed")) == P("tensor", "fsdp")  # the same, whatever the order
  assert spec((8, 64), ("rank", "mlp")) == P(None, ("tensor", "fsdp"))  # a factor: fsdp too
  assert spec((64, 8), ("mlp", "rank")) == P(("tensor", "fsdp"), None)
  assert spec((8, 6), ("rank", "mlp")) == P(None, "tensor")  # 6 splits over 2, not over 8
  assert spec((8, 5), ("rank", "mlp")) == P(None, None)
  # An axis a dimension cannot keep (embed 6 over fsdp 4) stays free for the next one.
  assert spec((6, 64), ("embed", "mlp")) == P(None, ("tensor", "fsdp"))


def test_sequence_parallel_rules_split_the_residual_by_length_and_a_projection_by_width():
  """With SEQUENCE_PARALLEL_RULES the tensor axis splits the residual [B, T, D] along T, and a
  projection's output [B, T, mlp] (or [B, T, heads, kv]) along its width with T whole."""
  from vlora_jax.config.defaults import SEQUENCE_PARALLEL_RULES
  from vlora_jax.core import partitioning as p
  mesh = jax.sharding.AbstractMesh((2, 2, 2), sharding.MESH_AXES)
  rules = sharding.rules_dict(SEQUENCE_PARALLEL_RULES)
  P = jax.sharding.PartitionSpec
  assert p.spec_for((8, 16, 32), p.RESIDUAL, rules, mesh) == P(("data", "fsdp"), "tensor", None)
  assert p.spec_for((8, 16, 64), (p.BATCH, p.LENGTH, p.MLP), rules, mesh) == P(
      ("data", "fsdp"), None, "tensor")
  assert p.spec_for((8, 16, 4, 8), p.ATTENTION_HEADS, rules, mesh) == P(
      ("data", "fsdp"), None, "tensor", None)


SEQUENCE_PARALLEL = textwrap.dedent("""
    import json
    import jax
    from helpers_train import tiny
    from vlora_jax.config.defaults import SEQUENCE_PARALLEL_RULES
    from vlora_jax.train import train_and_evaluate
    assert jax.device_count() == 8
    c = tiny("llama", **%(overrides)r, **{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2})
    with c.unlocked():
      c.activation_rules = SEQUENCE_PARALLEL_RULES
    s = train_and_evaluate(c, "%(tmp)s/sp")
    print("RESULT " + json.dumps({"mesh": s["mesh"]}), flush=True)
    """)


@pytest.mark.slow
def test_sequence_parallel_llama_on_eight_devices_equals_one(tmp_path):
  """Data, FSDP and tensor parallelism with the residual split by length (2 x 2 x 2): the same
  losses and parameters as one device."""
  ref = tmp_path / "one"
  train_and_evaluate(tiny("llama", **OVERRIDES), ref)
  proc = run_py(SEQUENCE_PARALLEL % {"overrides": OVERRIDES, "tmp": str(tmp_path)}, devices=8)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert result(proc.stdout)["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
  np.testing.assert_allclose(_losses(tmp_path / "sp"), _losses(ref), rtol=0, atol=1e-5)
  got = checkpoint_format.read_path(str(tmp_path / "sp"))["params"]
  assert _max_diff(got, checkpoint_format.read_path(str(ref))["params"]) <= 1e-5


STATE_PER_DEVICE = """
import json, math, jax
from vlora_jax.train import load_config, setup
out = {}
for variant in ("vlora", "dense"):
  c = load_config("configs/lm_pod.py:1b,%s,d=1024,layers=8,batch=8" % variant,
                  **{"model.vlora.rank": 64})
  run = setup.without_data(c, jax.devices())
  whole = local = 0
  for leaf, sh in zip(jax.tree.leaves(run.abstract_state), jax.tree.leaves(run.state_shardings)):
    whole += leaf.size * leaf.dtype.itemsize
    local += math.prod(sh.shard_shape(leaf.shape)) * leaf.dtype.itemsize
  out[variant] = local / (whole / len(jax.devices()))
print("RESULT " + json.dumps(out))
"""


def test_fsdp_shards_every_parameter_and_its_optimizer_state_over_the_devices():
  """Each of 8 devices holds 1/8 of the train state, the VLoRA factors included: a factor
  [rank, mlp] has no 'embed' axis, and its hidden width falls back to 'fsdp' (whole on every
  device, the factors of a rank-64 stack made each device hold 1.38x its share)."""
  out = result(run_py(STATE_PER_DEVICE, devices=8).stdout)
  assert out["dense"] <= 1.001 and out["vlora"] <= 1.001, out


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
