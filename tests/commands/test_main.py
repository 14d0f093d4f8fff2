"""The command line (absl + config_flags) and the README's main job at reduced steps."""

import json
import os
import subprocess
import sys

import pytest
from helpers_train import ROOT

from vlora_jax.train import load_config, train_and_evaluate

TINY_FLAGS = ["--config.model.dim=16", "--config.model.depth=2", "--config.model.num_heads=2",
              "--config.model.vlora.compound_size=2", "--config.model.vlora.rank=2",
              "--config.batch_size=16", "--config.eval_every_steps=0",
              "--config.checkpoint.keep_best=0", "--config.progress=False",
              "--config.tensorboard=False"]


def _main(args, cwd):
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "vlora_jax.main", *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_cli_trains_with_overrides_from_any_directory(tmp_path):
  # launched from outside the repository: the config still finds `configs.default`
  proc = _main([f"--config={ROOT}/configs/vit_digits.py:dense,steps=2",
                f"--workdir={tmp_path / 'w'}", *TINY_FLAGS], cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  summary = json.loads((tmp_path / "w" / "summary.json").read_text())
  assert summary["step"] == 2 and summary["params_total"] == summary["params_dense_equivalent"]
  assert "eval/accuracy=" in proc.stdout and "params_total=" in proc.stdout
  meta = json.loads((tmp_path / "w" / "checkpoints" / "2" / "meta" / "metadata").read_text())
  assert meta["config"]["model"]["dim"] == 16 and meta["config"]["model"]["vlora"]["enabled"] is False
  assert f"summary: {tmp_path / 'w' / 'summary.json'}" in proc.stdout
  # Started again (progress bar on), the finished run says so and only evaluates.
  again = _main([f"--config={ROOT}/configs/vit_digits.py:dense,steps=2",
                 f"--workdir={tmp_path / 'w'}",
                 *[f for f in TINY_FLAGS if not f.startswith("--config.progress")]], cwd=tmp_path)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "is complete (step 2 of 2)" in again.stderr and "step/s" not in again.stderr


@pytest.mark.parametrize("flag,match", [
    ("--config.optim.lrr=0.1", "lrr"),                # unknown key: refused by the locked config
    ("--config.optim.lr=-1.0", "optim.lr=-1.0: must be a finite number > 0"),
])
def test_cli_rejects_bad_flags(flag, match, tmp_path):
  proc = _main(["--config=configs/vit_digits.py", f"--workdir={tmp_path}", flag], cwd=ROOT)
  assert proc.returncode != 0
  assert match in proc.stderr


def test_configs_load_and_are_locked():
  for spec in ("configs/vit_digits.py", "configs/vit_digits.py:dense,r=4,s=2",
               "configs/vit_mnist.py", "configs/vit_cifar10.py", "configs/vit_cifar10.py:small",
               "configs/vit_local.py:cifar10_jpeg,dense", "configs/lm_shakespeare.py:tfds",
               "configs/seq2seq_reverse.py:dense"):
    c = load_config(str(ROOT / spec))
    with pytest.raises(AttributeError):
      c.optim.lrr = 1.0  # locked: a misspelt key is an error
  c = load_config(str(ROOT / "configs/vit_cifar10.py"))
  assert (c.model.dim, c.model.depth, c.model.num_heads, c.model.vlora.compound_size,
          c.model.vlora.rank) == (192, 12, 3, 4, 8)
  with pytest.raises(ValueError, match="unknown word 'vlro'"):
    load_config(str(ROOT / "configs/vit_digits.py:vlro"))


@pytest.mark.slow
def test_vit_digits_main_job_at_reduced_steps(tmp_path):
  """The README's job (configs/vit_digits.py, VLoRA) for 300 of its 1,000 steps: far above chance."""
  c = load_config(str(ROOT / "configs/vit_digits.py:vlora,steps=300"), progress=False,
                  tensorboard=False)
  s = train_and_evaluate(c, tmp_path)
  assert s["step"] == 300 and s["params_total"] == 79_306
  assert s["eval/accuracy"] > 0.85, s["eval/accuracy"]  # chance is 0.10


def test_the_readme_opens_with_the_two_set_up_commands():
  """Exactly two commands, first in the README: each installs what it needs; one runs the main
  job on the embedded default (no data directory), the other the whole test suite."""
  text = (ROOT / "README.md").read_text()
  block = text[text.index("```bash\n") + len("```bash\n"):]
  lines = block[:block.index("```")].strip().splitlines()
  assert len(lines) == 2 and text.index("```bash") < text.index("\n## ")
  install = "python3 -m venv .venv && .venv/bin/pip install -q -r requirements.txt && "
  assert all(line.startswith(install) for line in lines), lines
  job, tests = (line[len(install):] for line in lines)
  assert job.startswith(".venv/bin/python -m vlora_jax.main --config configs/vit_digits.py ")
  assert "data" not in job  # the embedded default reads no data directory
  assert tests == ".venv/bin/python -m pytest -q"
  ci = (ROOT / ".ci" / "run").read_text()
  assert ".venv/bin/pip install -q -r requirements.txt && .venv/bin/python -m pytest -q" in ci
