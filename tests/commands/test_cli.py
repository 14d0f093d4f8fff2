"""Every user-error path of the command line exits 2 with one line and no traceback.

The cases cover each place an input enters: flags, the config file, config values, the data, the
workdir and ``init_from`` hooks. They run as subprocesses, four at a time.
"""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
from helpers_train import ROOT

pytestmark = pytest.mark.slow  # subprocesses and trained runs: `pytest -m slow`

DIGITS = "--config=configs/vit_digits.py"
TINY = ["--config.model.dim=16", "--config.model.depth=2", "--config.model.num_heads=2",
        "--config.model.vlora.compound_size=2", "--config.model.vlora.rank=2",
        "--config.num_train_steps=1", "--config.progress=False", "--config.tensorboard=False"]

HOOK = '''
import jax, numpy as np

def wrong_shape(arg, *, abstract_params, config):
  p = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract_params)
  p["head"]["kernel"] = np.zeros((3, 3), np.float32)
  p["head"]["bias"] = p["head"]["bias"].astype(np.float16)
  return p
'''


def _cases(tmp):
  (tmp / "syntax.py").write_text("def get_config(:\n")
  (tmp / "raises.py").write_text("def get_config():\n  return {}['no_such_thing']\n")
  (tmp / "not.npz").write_text("not an npz file")
  (tmp / "afile").write_text("a file where the workdir should be")
  (tmp / "cli_hooks.py").write_text(HOOK)
  wd = "--workdir=WORKDIR"  # each case gets its own (they run at once; a workdir holds one run)
  return {
      "typo_key": ([DIGITS, wd, "--config.modle.dim=3"],
                   "--config.modle.dim: no config key 'modle' in the config; did you mean "
                   "'model'?"),
      "wrong_type": ([DIGITS, wd, "--config.model.dim=abc"], "--config.model.dim=abc"),
      "unknown_flag": ([DIGITS, wd, "--nope=1"], "unrecognized arguments: --nope=1"),
      "no_config": ([wd], "the following arguments are required: --config"),
      "missing_file": (["--config=configs/nope.py", wd], "config file 'configs/nope.py' not found"),
      "syntax": ([f"--config={tmp / 'syntax.py'}", wd], "line 1: syntax error"),
      "bad_arg": (["--config=configs/vit_local.py:bogus", wd], "unknown word 'bogus'"),
      "get_config_raises": ([f"--config={tmp / 'raises.py'}", wd], "KeyError: 'no_such_thing'"),
      "extra_arg": ([DIGITS, wd, "stray"], "unrecognized arguments: stray"),
      "value": ([DIGITS, wd, "--config.optim.lr=-1"], "optim.lr=-1.0: must be a finite number"),
      "nonsense": ([DIGITS, wd, "--config.label_smoothing=5"], "label_smoothing=5.0: must be"),
      "data": ([DIGITS, wd, "--config.data.source=npz", f"--config.data.path={tmp / 'not.npz'}",
                *TINY], "not.npz"),
      "workdir": ([DIGITS, f"--workdir={tmp / 'afile'}", *TINY], "afile"),
      "init_from_import": ([DIGITS, wd, "--config.init_from=py:no_such_module.fn", *TINY],
                           "init_from='py:no_such_module.fn' failed: ModuleNotFoundError"),
      "init_from_shapes": ([DIGITS, wd, "--config.init_from=py:cli_hooks.wrong_shape", *TINY],
                           "['head']['kernel']: shape (3, 3), the model needs (16, 10)"),
  }


def _run(args, tmp):
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "PYTHONPATH": os.pathsep.join([str(tmp), os.environ.get("PYTHONPATH", "")])}
  return subprocess.run([sys.executable, "-m", "vlora_jax.main", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("cli")
  cases = _cases(tmp)
  argvs = [[a.replace("WORKDIR", str(tmp / name)) for a in args]
           for name, (args, _) in cases.items()]
  with ThreadPoolExecutor(4) as pool:
    procs = dict(zip(cases, pool.map(lambda args: _run(args, tmp), argvs)))
  return {name: (procs[name], cases[name][1]) for name in cases}


CASE_NAMES = ["typo_key", "wrong_type", "unknown_flag", "no_config", "missing_file", "syntax",
              "bad_arg", "get_config_raises", "extra_arg", "value", "nonsense", "data", "workdir",
              "init_from_import", "init_from_shapes"]


@pytest.mark.parametrize("name", CASE_NAMES)
def test_user_error_is_one_line_and_exit_2(name, outcomes):
  proc, expected = outcomes[name]
  assert proc.returncode == 2, (name, proc.returncode, proc.stderr[-3000:])
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1, proc.stderr[-3000:]
  assert errors[0] == proc.stderr.strip().splitlines()[-1]  # the last line, and one line
  assert expected in errors[0], errors[0]


def test_verbose_adds_the_traceback(tmp_path):
  proc = _run([DIGITS, f"--workdir={tmp_path}", "--config.optim.lr=-1", "--verbose"], tmp_path)
  assert proc.returncode == 2 and "Traceback" in proc.stderr
  assert proc.stderr.strip().splitlines()[-1].startswith("error: optim.lr=-1.0")
