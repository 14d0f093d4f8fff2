"""The edges of issue 29 (class 6): empty paths, temperatures that underflow in float32, seeds
outside the RNG's range, unbounded ``--max_new_tokens``, config files that return no ConfigDict,
config arguments that repeat, conflict or hold a value of the wrong type, and ``vlorafy`` on a
block without parameters. Each is one error naming the field, before anything is loaded or
compiled.
"""

from __future__ import annotations

import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers_runs import stored_run
from helpers_train import ROOT, tiny

import vlora_jax
from vlora_jax.errors import UserError


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("edges")
  return {"lm": stored_run(tmp / "lm", tiny("lm")), "vit": stored_run(tmp / "vit", tiny("vit")),
          "tmp": tmp}


# ------------------------------------------------------------------------------- empty paths


def _empty_path_calls(runs, empty):
  from vlora_jax import evaluate, export, predict, sample
  from vlora_jax.train import train_and_evaluate
  from vlora_jax.train.setup import set_up
  image = runs["tmp"] / "x.npy"
  np.save(image, np.zeros((8, 8), np.uint8))
  return {
      "load": lambda: vlora_jax.load(empty),
      "sample": lambda: sample.sample(empty, "F", max_new_tokens=2),
      "evaluate": lambda: evaluate.evaluate(empty),
      "evaluate --out": lambda: evaluate.evaluate(runs["vit"], out=empty),
      "predict": lambda: predict.predict(empty, [image]),
      "predict FILE": lambda: predict.predict(runs["vit"], [empty]),
      "export": lambda: export.export(empty, "npz", runs["tmp"] / "x.npz"),
      "export --out": lambda: export.export(runs["vit"], "npz", empty),
      "train --workdir": lambda: train_and_evaluate(tiny("vit"), empty),
      "init_from compress": lambda: set_up(tiny("vit", init_from=f"compress:{empty}"),
                                           runs["tmp"] / "a"),
      "init_from checkpoint": lambda: set_up(tiny("vit", init_from=f"checkpoint:{empty}"),
                                             runs["tmp"] / "b"),
  }


CALLS = ["load", "sample", "evaluate", "evaluate --out", "predict", "predict FILE", "export",
         "export --out", "train --workdir", "init_from compress", "init_from checkpoint"]


@pytest.mark.parametrize("empty", ["", " "])
@pytest.mark.parametrize("call", CALLS)
def test_an_empty_path_is_refused_naming_it(call, empty, runs, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # what an empty path would have meant
  with pytest.raises(UserError) as e:
    _empty_path_calls(runs, empty)[call]()
  assert repr(empty) in str(e.value) and "\n" not in str(e.value), str(e.value)
  assert not list(tmp_path.iterdir())


def test_the_training_command_refuses_an_empty_workdir(tmp_path):
  done = subprocess.run([sys.executable, "-m", "vlora_jax.main", "--config",
                         str(ROOT / "configs" / "vit_digits.py"), "--workdir", ""],
                        cwd=tmp_path, capture_output=True, text=True, timeout=300)
  lines = [line for line in done.stderr.splitlines() if line.strip()]
  assert done.returncode == 2 and lines == ["error: workdir='': empty; give the run's directory"]
  assert not list(tmp_path.iterdir())


# -------------------------------------------------------------------------- sampling values


@pytest.mark.parametrize("temperature", [1e-300, 5e-324, 1e-45, 1e-39, 1e-38])
def test_a_temperature_that_underflows_in_float32_is_refused(temperature, runs):
  from vlora_jax.sample import sample
  with pytest.raises(UserError, match=r"--temperature=.*underflows in float32.* use 0 for greedy"):
    sample(runs["lm"], "F", max_new_tokens=2, temperature=temperature)


@pytest.mark.parametrize("seed", [-1, 2**32, 2**63, 2**64, -2**63])
def test_a_seed_outside_the_rng_range_is_refused(seed, runs):
  from vlora_jax.sample import sample
  with pytest.raises(UserError, match=rf"--seed={seed}: must be an integer in \[0, 4294967295\]"):
    sample(runs["lm"], "F", max_new_tokens=2, seed=seed)


@pytest.mark.parametrize("count", [2**20 + 1, 10**12, 2**63])
def test_an_unbounded_max_new_tokens_is_refused(count, runs):
  from vlora_jax.sample import sample
  with pytest.raises(UserError, match=rf"--max_new_tokens={count}: must be at most 1,048,576"):
    sample(runs["lm"], "F", max_new_tokens=count)


def test_the_smallest_normal_temperature_and_the_largest_seed_sample(runs):
  from vlora_jax.sample import sample
  got = sample(runs["lm"], "F", max_new_tokens=2, temperature=1.2e-38, seed=2**32 - 1)
  assert len(got) == 1 and len(got[0]) == 2


# ---------------------------------------------------------------------------- config files


NOT_CONFIGS = {"dict": "{'model': {'name': 'vit'}}", "none": "None", "list": "[1, 2]",
               "string": "'vit'"}


@pytest.mark.parametrize("kind", sorted(NOT_CONFIGS))
def test_a_config_file_that_returns_no_config_dict_is_one_error(kind, tmp_path):
  from vlora_jax.train import load_config
  path = tmp_path / f"{kind}.py"
  path.write_text(f"def get_config(arg=None):\n  return {NOT_CONFIGS[kind]}\n")
  with pytest.raises(UserError, match=r"get_config\(\) returned .*not an ml_collections.ConfigDict"):
    load_config(str(path))


@pytest.mark.parametrize("kind", ["dict", "none"])
def test_the_command_line_says_so_in_one_line(kind, tmp_path):
  path = tmp_path / f"{kind}.py"
  path.write_text(f"def get_config(arg=None):\n  return {NOT_CONFIGS[kind]}\n")
  done = subprocess.run([sys.executable, "-m", "vlora_jax.main", "--config", str(path),
                         "--workdir", str(tmp_path / "run")], cwd=ROOT, capture_output=True,
                        text=True, timeout=300)
  lines = [line for line in done.stderr.splitlines() if line.strip()]
  assert done.returncode == 2 and len(lines) == 1, done.stderr
  assert "get_config() returned" in lines[0] and "ConfigDict" in lines[0]


@pytest.mark.parametrize("arg, key", [
    ("vlora,dense", "variant"), ("dense,vlora", "variant"), ("dense,dense", "variant"),
    ("r=4,r=8", "r"), ("r=4,dense,r=4", "r"), ("steps=10,s=2,steps=20", "steps"),
])
def test_a_config_argument_set_twice_is_refused(arg, key):
  from vlora_jax.train import load_config
  with pytest.raises(ValueError, match=rf"{key} is set twice"):
    load_config(str(ROOT / "configs" / f"vit_digits.py:{arg}"))


@pytest.mark.parametrize("arg, key", [("r=abc", "r"), ("s=1.5", "s"), ("steps=1e3", "steps"),
                                      ("steps=", "steps")])
def test_a_config_argument_of_the_wrong_type_names_its_key(arg, key):
  from vlora_jax.train import load_config
  with pytest.raises(ValueError, match=rf"{key}=.* is not an integer"):
    load_config(str(ROOT / "configs" / f"vit_digits.py:{arg}"))


# ------------------------------------------------------------------------------------ vlorafy


class _NoParams(nn.Module):
  @nn.compact
  def __call__(self, x, deterministic=True):
    return nn.gelu(x) * 2


@pytest.mark.parametrize("vlora", [False, True])
def test_vlorafy_on_a_block_without_parameters_says_so(vlora):
  from vlora_jax.core.spec import VLoRASpec
  from vlora_jax.core.stack import vlorafy
  spec = VLoRASpec(compound_size=2, targets=(r".*",), rank=1) if vlora else None
  with pytest.raises(ValueError, match="has no parameters"):
    vlorafy(_NoParams(), num_layers=4, vlora=spec).init(jax.random.key(0), jnp.ones((2, 3)))
