"""The one reader of ``--config.KEY=VALUE`` (`vlora_jax.config.overrides`), the config-file loader
and the commands' help: per-target ranks from the command line, misspelt keys in one line."""

from __future__ import annotations

import os
import subprocess
import sys

import ml_collections
import pytest
from helpers_train import ROOT

from vlora_jax.config import overrides
from vlora_jax.config import files as config_files
from vlora_jax.train import validate


def _config():
  return config_files.load(str(ROOT / "configs/vit_digits.py"))


@pytest.mark.parametrize("text", ["4,4,2,2", "(4,4,2,2)", "[4,4,2,2]", "(4, 4, 2, 2)"])
def test_per_target_ranks_from_the_command_line(text):
  c = _config()
  pairs, rest = overrides.split([f"--config.model.vlora.rank={text}", "--workdir=w"])
  assert rest == ["--workdir=w"]
  overrides.apply(c, pairs)
  assert tuple(c.model.vlora.rank) == (4, 4, 2, 2)
  validate.check(c, num_devices=1)  # the schema takes one rank per target


def test_values_are_read_by_what_the_key_holds():
  c = _config()
  applied = overrides.apply(c, [("optim.lr", "3e-4"), ("progress", "false"),
                                ("data.mean", "0.5"), ("data.std", "0.25,"),
                                ("init_from", "checkpoint:runs/a b"), ("optim.warmup_steps", "7"),
                                ("data.split_seed", "None"), ("optim.weight_decay", "0")])
  assert c.optim.lr == 3e-4 and c.progress is False and c.optim.warmup_steps == 7
  assert tuple(c.data.mean) == (0.5,) and tuple(c.data.std) == (0.25,)
  assert c.init_from == "checkpoint:runs/a b" and c.data.split_seed is None
  assert c.optim.weight_decay == 0.0 and isinstance(c.optim.weight_decay, float)
  assert applied["optim.lr"] == 3e-4
  # the value as the next argument, as absl took it
  assert overrides.split(["--config.optim.lr", "-1", "x"]) == ([("optim.lr", "-1")], ["x"])


@pytest.mark.parametrize("key,message", [
    ("model.vlora.rnak", "--config.model.vlora.rnak: no config key 'rnak' in model.vlora; did "
                         "you mean 'rank'?"),
    ("modle.dim", "--config.modle.dim: no config key 'modle' in the config; did you mean "
                  "'model'?"),
    ("model.dim.x", "--config.model.dim.x: model.dim is a value, not a group of keys"),
    ("optim", "--config.optim is a group of keys"),
])
def test_a_key_the_config_lacks_is_one_line(key, message):
  with pytest.raises(overrides.OverrideError) as e:
    overrides.apply(_config(), [(key, "3")])
  assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_a_value_the_config_types_refuse_names_the_override():
  c = ml_collections.ConfigDict({"n": 3})  # type-safe: an int key takes no text
  with pytest.raises(overrides.OverrideError, match=r"--config.n=abc: the key holds int"):
    overrides.apply(c, [("n", "abc")])
  with pytest.raises(overrides.OverrideError, match="no value; write --config.n=VALUE"):
    overrides.split(["--config.n"])


def test_load_config_keywords_go_through_the_same_reader():
  c = config_files.load(str(ROOT / "configs/vit_digits.py"), **{"model.vlora.rank": (4, 4, 2, 2)})
  assert tuple(c.model.vlora.rank) == (4, 4, 2, 2)
  with pytest.raises(overrides.OverrideError, match="did you mean 'weight_decay'"):
    config_files.load(str(ROOT / "configs/vit_digits.py"), **{"optim.weight_decy": 0.1})


def test_a_config_file_finds_its_package_from_anywhere(tmp_path, monkeypatch):
  # A project's own `configs` package and this repository's: each config file reads its own.
  own = tmp_path / "configs"
  own.mkdir()
  (own / "__init__.py").write_text("")
  (own / "helper.py").write_text("SEED = 7\n")
  (own / "mine.py").write_text("from configs import helper\n"
                               "from vlora_jax.config import defaults\n\n"
                               "def get_config():\n  c = defaults.get_config()\n"
                               "  c.seed = helper.SEED\n  return c\n")
  monkeypatch.chdir(tmp_path)
  assert config_files.load(str(ROOT / "configs/vit_digits.py")).model.name == "vit"
  assert config_files.load(str(own / "mine.py")).seed == 7  # the repository's configs was loaded
  assert config_files.load(str(ROOT / "configs/vit_digits.py")).model.name == "vit"  # and back
  assert config_files.package_root(ROOT / "configs/vit_digits.py") == (ROOT, "configs")
  assert config_files.package_root(tmp_path / "x.py") is None


def _command(*args, cwd):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("PYTHONPATH", None)
  return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                        text=True, timeout=120)


@pytest.mark.parametrize("module,flags", [
    ("vlora_jax.main", ["--config FILE.py[:ARG]", "--workdir DIR", "--config.KEY=VALUE",
                        "4,4,2,2"]),
    ("vlora_jax.tools.params", ["--config FILE.py[:ARG]", "--config.KEY=VALUE"]),
    ("vlora_jax.sample", ["--stop STRING", "(default: 0.8)", "--max_new_tokens", "(default: 200)"]),
    ("vlora_jax.evaluate", ["--workdir", "--step", "--out", "--config.data.KEY=VALUE"]),
    ("vlora_jax.predict", ["--top", "default 5"]),
    ("vlora_jax.export", ["--format", "--out"]),
    ("vlora_jax.compile", ["--config FILE.py[:ARG]", "--topology SLICE", "--nocount_flops",
                           "--config.KEY=VALUE"]),
])
def test_every_command_explains_itself(module, flags, tmp_path):
  out = _command("-m", module, "--help", cwd=tmp_path)
  assert out.returncode == 0, out.stderr
  assert "Try --helpfull" not in out.stdout
  for flag in flags:
    assert flag in out.stdout, (flag, out.stdout)


def test_training_command_errors_are_one_line(tmp_path):
  digits = f"--config={ROOT / 'configs/vit_digits.py'}"
  cases = {
      "--config.model.vlora.rnak=3": "error: --config.model.vlora.rnak: no config key 'rnak' in "
                                     "model.vlora; did you mean 'rank'?",
      "--nope=1": "error: unrecognized arguments: --nope=1",
  }
  for flag, message in cases.items():
    out = _command("-m", "vlora_jax.main", digits, f"--workdir={tmp_path / 'w'}", flag,
                   cwd=tmp_path)
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [message + " (see --help)"
                                                                       if "nope" in flag
                                                                       else message]
  assert not (tmp_path / "w").exists()


def test_only_the_library_is_installed():
  import importlib.metadata as md
  top = (md.distribution("vlora-jax").read_text("top_level.txt") or "").split()
  files = [str(f) for f in md.distribution("vlora-jax").files or []]
  finder = [f for f in files if "__editable__" in f and f.endswith("finder.py")]
  if finder:  # an editable install: its finder maps the top-level names it installs
    text = (md.distribution("vlora-jax").locate_file(finder[0])).read_text()
    assert "'configs'" not in text and "'experiments'" not in text and "'benchmarks'" not in text
  assert not {"configs", "experiments", "benchmarks"} & set(top)


def test_sample_stop_reads_escapes_and_cuts_at_any_text():
  # pylint: disable=protected-access
  from vlora_jax import sample
  assert sample.unescape("\\n", "--stop") == "\n" and sample.unescape("é\\t", "--stop") == "é\t"
  assert sample.unescape("ROMEO:", "--stop") == "ROMEO:"
  with pytest.raises(sample.SampleError, match=r"--stop='a\\\\': a broken escape"):
    sample.unescape("a\\", "--stop")
  assert sample._cut("thou art\nthe king", "\n") == "thou art"
  assert sample._cut("thou art the king", "the k") == "thou art "
  assert sample._cut("no stop here", None) == "no stop here"
