"""`python -m vlora_jax.tools.params`: the official CIFAR figures, overrides, other models, errors."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vlora_jax.models.vit import vit_param_count
from vlora_jax.tools import params as tool

ROOT = Path(__file__).resolve().parents[2]
OFFICIAL = "tests/configs/vit_cifar10_official.py"
CIFAR = dict(img_size=32, patch_size=4, in_chans=3, dim=192, depth=12, mlp_ratio=4.0,
             num_classes=10)


def _config(rel_path, arg=None):
  spec = importlib.util.spec_from_file_location("cfg", ROOT / rel_path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg is not None else module.get_config()


def _run(*args):
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "vlora_jax.tools.params", *args], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=120)


def test_official_cifar_figures_in_process():
  text = tool.describe(_config(OFFICIAL).model)
  assert "VLoRA 1,602,634 vs dense 5,362,762: ratio 0.2988" in text
  assert "compound size 4, rank 8" in text and "anchored" in text
  rows = {line.split()[0]: line.split()[1:] for line in text.splitlines() if line.strip()}
  assert rows["base"] == ["1,327,104", "0"] and rows["increments"] == ["221,184", "0"]
  assert rows["total"] == ["1,602,634", "5,362,762"]
  assert "lora" not in rows  # no adapter row without adapters


def test_cli_official_dense_and_override():
  out = _run("--config", OFFICIAL)
  assert out.returncode == 0, out.stderr
  assert "VLoRA 1,602,634 vs dense 5,362,762" in out.stdout
  out = _run(f"--config={OFFICIAL}:dense")
  assert out.returncode == 0, out.stderr
  assert "dense model: 5,362,762 parameters" in out.stdout
  out = _run(f"--config={OFFICIAL}", "--config.model.vlora.rank=4",
             "--config.model.vlora.compound_size=6")
  assert out.returncode == 0, out.stderr
  want = vit_param_count(**CIFAR, compound_size=6, rank=4)
  assert f"VLoRA {want:,} vs dense 5,362,762" in out.stdout


def test_cli_bad_config_fails_clearly():
  out = _run(f"--config={OFFICIAL}", "--config.model.vlora.compound_size=5")
  assert out.returncode != 0
  assert "vlora.compound_size=5 does not divide num_layers=12" in out.stderr
  out = _run()
  assert out.returncode != 0 and "--config" in out.stderr


@pytest.mark.parametrize("arg", ["lm", "seq2seq"])
def test_sequence_models(arg):
  text = tool.describe(_config("tests/configs/seq_models.py", arg).model)
  assert f"model: {arg}" in text and "VLoRA " in text
  if arg == "seq2seq":  # per stack: the decoder also targets its cross-attention
    assert "VLoRA encoder:" in text and "cross/kv/kernel" in text.split("VLoRA decoder:")[1]


def test_project_cifar_config_if_present():
  path = ROOT / "configs" / "vit_cifar10.py"
  if not path.exists():
    pytest.skip("configs/vit_cifar10.py is not in this checkout yet")
  model = _config("configs/vit_cifar10.py").model
  text = tool.describe(model)
  if model.get("vlora") is not None and model.vlora.get("enabled", True):
    assert "VLoRA 1,602,634 vs dense 5,362,762" in text
  else:
    assert "5,362,762" in text
