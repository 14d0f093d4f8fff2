"""Bad configs fail before anything compiles, with a ValueError naming the key, value and rule."""

import jax
import jax.monitoring
import pytest
from helpers_train import tiny

from vlora_jax import errors
from vlora_jax.data import DataError
from vlora_jax.train import train_and_evaluate, validate

COMPILES = []
jax.monitoring.register_event_duration_secs_listener(
    lambda event, secs, **kw: COMPILES.append(event)
    if event == "/jax/core/compile/backend_compile_duration" else None)

BAD = [
    ({"optim.lr": 0.0}, r"optim.lr=0.0: must be a finite number > 0"),
    ({"optim.lr": -1e-3}, r"optim.lr=-0.001: must be a finite number > 0"),
    ({"mesh.data": 2}, r"mesh=.*has 2 devices but 1 are available"),
    ({"mesh.tensor": 0}, r"mesh.tensor=0: mesh sizes must be >= 1"),
    ({"data.source": "imagenet"}, r"data.source='imagenet': allowed are"),
    ({"data.source": "text"}, r"data.source='text': model.name='vit' reads"),
    ({"data.source": "npz", "data.path": "/no/such/dir/x.npz"},
     r"data.path='/no/such/dir/x.npz': file not found"),
    ({"model.name": "resnet"}, r"model.name='resnet': allowed are"),
    ({"model.dtype": "float16"}, r"model.dtype='float16': allowed are"),
    ({"model.img_size": 16}, r"model.img_size=16: the data's images are 8x8"),
    ({"model.vlora.compound_size": 3}, r"vlora.compound_size=3 does not divide num_layers=2"),
    ({"model.vlora.rank": 100}, r"vlora.rank=100 for 'attn/proj/kernel'.*min\(d_in, d_out\)=16"),
    ({"model.vlora.mode": "sideways"}, r"vlora.mode='sideways': allowed are"),
    ({"optim.freeze": "(unclosed"}, r"optim.freeze='\(unclosed': is not a valid regex"),
    ({"optim.lr_mults": (("x", -1.0),)}, r"optim.lr_mults\[0\]=-1.0: the multiplier must be"),
    ({"optim.schedule": "linear"}, r"optim.schedule='linear': allowed are"),
    ({"batch_size": 0}, r"batch_size=0: must be an integer >= 1"),
    ({"checkpoint.best_mode": "up"}, r"checkpoint.best_mode='up': allowed are"),
    ({"rng_impl": "philox"}, r"rng_impl='philox': allowed are"),
    ({"init_from": "somewhere"}, r"init_from='somewhere': format '<kind>:<arg>'"),
    ({"init_from": "hub:vit-b"}, r"init_from='hub:vit-b': unknown kind 'hub'"),
    ({"model.vlora.rank": 0}, r"model.vlora.rank=0: must be an integer >= 1"),
    ({"model.vlora.targets": ("attn/nope/kernel",)},
     r"vlora.targets\[0\]='attn/nope/kernel' matches no parameter of the block"),
    ({"model.vlora.rank": (2, 2)}, r"vlora.rank=\[2, 2\] has 2 entries but vlora.targets has 4"),
    ({"model.vlora.compound_size": 0}, r"vlora.compound_size=0: must be an integer >= 1"),
    ({"model.vlora.scaling": "log"}, r"vlora.scaling='log': allowed are"),
    ({"model.vlora.init": "xavier"}, r"vlora.init='xavier': allowed are"),
    ({"model.vlora.alpha": 0.0}, r"model.vlora.alpha=0.0: must be a finite number > 0"),
    ({"model.remat": "sometimes"}, r"remat='sometimes': allowed are"),
    ({"model.num_heads": 3}, r"model.num_heads=3: must divide model.dim=16"),
    ({"model.depth": 0}, r"model.depth=0: must be an integer >= 1"),
    ({"model.mlp_ratio": -1.0}, r"model.mlp_ratio=-1.0: must be a finite number > 0"),
    ({"model.dropout": 1.5}, r"model.dropout=1.5: must be a finite number in \[0, 1\)"),
    ({"model.patch_size": 3}, r"model.patch_size=3: must divide model.img_size=8"),
    ({"model.num_classes": 5}, r"model.num_classes=5: the data has 10 classes"),
    ({"data.source": "tfds", "data.tfds_name": "imagenet_nope"},
     r"data.tfds_name='imagenet_nope' is not a TFDS dataset"),
    ({"data.source": "tfds", "data.tfds_name": "mnist", "data.data_dir": "/no/such/dir"},
     r"TFDS dataset 'mnist' \(split 'train'\) is not prepared in data.data_dir='/no/such/dir"),
    ({"num_train_steps": -1}, r"num_train_steps=-1: must be an integer >= 0"),
    ({"eval_batch_size": 0}, r"eval_batch_size=0: must be an integer >= 1"),
    ({"checkpoint.every_steps": 0}, r"checkpoint.every_steps=0: must be an integer >= 1"),
    ({"checkpoint.keep": 0}, r"checkpoint.keep=0: must be an integer >= 1"),
    ({"optim.warmup_steps": -5}, r"optim.warmup_steps=-5: must be an integer >= 0"),
    ({"optim.b1": 1.0}, r"optim.b1=1.0: must be a finite number in \[0, 1\)"),
    ({"optim.weight_decay": -0.1}, r"optim.weight_decay=-0.1: must be a finite number >= 0"),
    ({"mesh.data": -1, "mesh.fsdp": -1}, r"at most one axis may fill"),
]


def _id(overrides: dict) -> str:
  return ",".join(f"{k}={v}" for k, v in overrides.items())


@pytest.mark.parametrize("overrides,match", BAD, ids=[_id(o) for o, _ in BAD])
def test_bad_config_is_named_before_compiling(overrides, match, tmp_path):
  COMPILES.clear()
  with pytest.raises(ValueError, match=match) as info:
    train_and_evaluate(tiny("vit", **overrides), tmp_path)
  # a UserError: the command line prints its message alone (test_cli_reports_user_errors...)
  assert isinstance(info.value, errors.UserError), type(info.value)
  assert not COMPILES, f"compiled {len(COMPILES)} program(s) before the error"
  assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


def test_batch_must_split_over_the_data_parallel_devices():
  # validate directly with a device count: the rule needs more than this process's one device
  c = tiny("vit", batch_size=12, eval_batch_size=16, **{"mesh.data": -1})
  with pytest.raises(ValueError, match=r"batch_size=12: must be divisible by the data-parallel "
                                       r"size mesh.data \* mesh.fsdp = 8"):
    validate.check(c, num_devices=8)
  with pytest.raises(ValueError, match=r"batch_size=12: must be divisible by the process count 5"):
    validate.check(tiny("vit", batch_size=12, eval_batch_size=20), num_devices=1, process_count=5)
  assert validate.check(tiny("vit", batch_size=16, eval_batch_size=32,
                             **{"mesh.tensor": 2}), num_devices=8).mesh_shape == (4, 1, 2)


def test_missing_data_is_a_data_error(tmp_path):
  with pytest.raises(DataError, match=r"data.path='/nope.txt'"):
    train_and_evaluate(tiny("lm", **{"data.path": "/nope.txt"}), tmp_path)


def test_the_compile_counter_sees_compiles():
  COMPILES.clear()
  jax.jit(lambda x: x * 3 + 1)(jax.numpy.arange(7.0)).block_until_ready()
  assert COMPILES  # so the "nothing compiled" assertions above can fail


@pytest.mark.parametrize("flags,match", [
    (["--config.optim.lr=0.0"], "optim.lr=0.0: must be a finite number > 0"),       # config check
    (["--config.model.vlora.rank=100"], "vlora.rank=100 for 'attn/proj/kernel'"),  # in eval_shape
    (["--config.data.source=npz", "--config.data.path=/no/such.npz"],       # data
     "data.path='/no/such.npz': file not found"),
], ids=["config", "model", "data"])
def test_cli_reports_user_errors_without_a_traceback(flags, match, tmp_path):
  import subprocess
  import sys
  from helpers_train import ROOT
  proc = subprocess.run([sys.executable, "-m", "vlora_jax.main",
                         "--config=configs/vit_digits.py", f"--workdir={tmp_path}", *flags],
                        cwd=ROOT, capture_output=True, text=True, timeout=300,
                        env={**__import__("os").environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "error: " in proc.stderr and match in proc.stderr, proc.stderr[-2000:]
  assert "Traceback (most recent call last)" not in proc.stderr
  assert 'File "' not in proc.stderr and "jax/_src" not in proc.stderr
