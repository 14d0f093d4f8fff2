"""The command lines over a trained run: ``python -m vlora_jax.evaluate`` and ``... .predict``.

One tiny ViT is trained for the module (4 steps, checkpoints at 2 and 4) on a synthetic ``.npz`` of
8x8 grey uint8 images with class names: the model of ``tiny('vit')``, so that its programs are the
ones other tests compile (the session's compilation cache has them), and uint8 pixels, so that a
PNG holds an eval image exactly. The in-process tests call the Python functions; the subprocess
tests, which run each command as a user does (and every bad input's exit status 2), are marked
slow.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import types
from concurrent.futures import ThreadPoolExecutor

import jax
import numpy as np
import pytest
from helpers_train import ROOT, tiny
from PIL import Image

import vlora_jax
from vlora_jax import cli
from vlora_jax import data as data_lib
from vlora_jax import models
from vlora_jax.errors import CheckpointError, ConfigError
from vlora_jax.evaluate import EvalError, evaluate, parse_overrides
from vlora_jax.config.overrides import parse_value
from vlora_jax.runs.outputs import OutputError
from vlora_jax.predict import PredictError, load_image, predict
from vlora_jax.train import train_and_evaluate

CLASSES = tuple(f"class_{i}" for i in range(10))
STEPS = 4
N_TEST = 40  # two eval batches of 32, the second padded: the masks count


def _synthetic_npz(path):
  rng = np.random.default_rng(0)
  np.savez(path, x_train=rng.integers(0, 256, (64, 8, 8), dtype=np.uint8),
           y_train=rng.integers(0, 10, 64),
           x_test=rng.integers(0, 256, (N_TEST, 8, 8), dtype=np.uint8),
           y_test=rng.integers(0, 10, N_TEST), label_names=np.array(CLASSES))
  return path


def _lm_like(run_dir, dest):
  """A workdir whose checkpoint's meta says model.name='lm' (the family check reads only it)."""
  step_dir = dest / "checkpoints" / str(STEPS)
  shutil.copytree(run_dir / "checkpoints" / str(STEPS), step_dir)
  meta_path = step_dir / "meta" / "metadata"
  meta = json.loads(meta_path.read_text())
  meta["config"]["model"]["name"] = "lm"
  meta_path.write_text(json.dumps(meta))
  return dest


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("entry_points")
  config = tiny("vit", num_train_steps=STEPS, **{
      "checkpoint.every_steps": 2, "data.source": "npz",
      "data.path": str(_synthetic_npz(tmp / "images.npz")), "data.eval_examples": 0,
      # evaluated on the file's whole test split (the tests below read its examples)
      "data.eval_split": "test", "data.validation_fraction": 0.0})
  workdir = tmp / "vit"
  summary = train_and_evaluate(config, workdir)
  (tmp / "empty").mkdir()
  return types.SimpleNamespace(tmp=tmp, workdir=workdir, config=config, summary=summary,
                               lm_like=_lm_like(workdir, tmp / "lm_like"))


@pytest.fixture(scope="module")
def reference(run):
  """The pipeline's first eval batch (32 examples, unpadded) and the logits of the checkpoints of
  steps 2 and 4 on it (one compile)."""
  batch = next(data_lib.build(run.config).eval_batches())
  assert batch["mask"].all()
  apply = jax.jit(lambda model, p, x: model.apply({"params": p}, x), static_argnums=0)
  logits, info = {}, None
  for step in (2, STEPS):
    model, params, _, info = vlora_jax.load(run.workdir, step=step)
    logits[step] = np.asarray(apply(model, params, batch["image"]))
  return types.SimpleNamespace(batch=batch, logits=logits, info=info)


def _final_eval_row(workdir) -> dict:
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return [r for r in rows if "eval/loss" in r][-1]


# ---------------------------------------------------------------------------------------- evaluate


def test_evaluate_reproduces_the_runs_final_eval(run, tmp_path):
  out = tmp_path / "eval.json"
  result = evaluate(run.workdir, out=out)
  row = _final_eval_row(run.workdir)
  assert row["step"] == result["step"] == STEPS
  assert set(result["metrics"]) == {"eval/loss", "eval/accuracy"}
  for key, value in result["metrics"].items():
    assert value == pytest.approx(run.summary[key], rel=1e-6, abs=1e-7), key
    assert value == pytest.approx(row[key], rel=1e-6, abs=1e-7), key
  written = json.loads(out.read_text())
  assert written["metrics"] == result["metrics"] and written["overrides"] == {}
  assert written["checkpoint"] == str(run.workdir / "checkpoints" / str(STEPS))
  assert written["eval_examples"] == N_TEST and result["out"] == str(out)


def test_evaluate_applies_the_data_overrides(run, reference):
  """Another step, fewer examples and another batch: the model's own loss on those examples."""
  result = evaluate(run.workdir, 2, {"data.eval_examples": "12", "eval_batch_size": 8},
                    out=run.tmp / "step2.json")
  assert result["step"] == 2 and result["eval_examples"] == 12
  assert result["overrides"] == {"data.eval_examples": 12, "eval_batch_size": 8}
  fam = models.family(run.config.model.name)
  batch = {"label": reference.batch["label"][:12]}
  want = fam.finalize(jax.device_get(fam.sums(reference.logits[2][:12], batch)), "eval")
  for key in want:
    assert result["metrics"][key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), key


def test_evaluate_refuses_bad_input_before_loading(run, tmp_path):
  with pytest.raises(CheckpointError, match="holds no checkpoint"):
    evaluate(run.tmp / "empty")
  with pytest.raises(CheckpointError, match=r"no checkpoint of step 3; the steps there are: "
                                            r"checkpoints/ \[2, 4\]"):
    evaluate(run.workdir, 3)
  with pytest.raises(EvalError, match=r"--config.model.dim: cannot be overridden"):
    evaluate(run.workdir, overrides={"model.dim": "8"})
  with pytest.raises(ConfigError, match=r"data.eval_examples=-1: must be an integer >= 0"):
    evaluate(run.workdir, overrides={"data.eval_examples": "-1"})
  with pytest.raises(ConfigError, match="did you mean 'eval_examples'"):
    evaluate(run.workdir, overrides={"data.eval_exmples": "1"})
  with pytest.raises(ConfigError, match="eval_batch_size='abc'"):
    evaluate(run.workdir, overrides={"eval_batch_size": "abc"})
  with pytest.raises(OutputError, match="is a directory"):
    evaluate(run.workdir, out=tmp_path)


def test_evaluate_refuses_data_the_model_was_not_trained_on(run, tmp_path):
  with pytest.raises(EvalError, match=r"mean: \[.*\] in the checkpoint, \[0\.5\] in the eval data"):
    evaluate(run.workdir, overrides={"data.mean": "0.5"}, out=tmp_path / "e.json")
  assert not (tmp_path / "e.json").exists()


def test_override_parsing():
  assert parse_overrides(["--config.data.eval_examples=64", "--config.eval_batch_size", "8"]) == \
      {"data.eval_examples": "64", "eval_batch_size": "8"}
  with pytest.raises(EvalError, match="unrecognized argument 'stray'"):
    parse_overrides(["stray"])
  with pytest.raises(EvalError, match="no value"):
    parse_overrides(["--config.data.path"])
  assert parse_value("64", 0) == 64 and parse_value("1e-3", 0.5) == 1e-3
  assert parse_value("123", "a path") == "123" and parse_value("False", True) is False
  assert parse_value("(0.5, 0.4)", [0.3]) == (0.5, 0.4) and parse_value("0.5", [0.3]) == (0.5,)
  assert parse_value("abc", 3) == "abc"  # the schema names it


def test_the_eval_data_must_be_read_as_in_training():
  from vlora_jax.train.compat import check_same_data
  stored = {"kind": "text", "vocab": "abc", "vocab_size": 3}
  check = lambda found: check_same_data(stored, found, "eval", "the checkpoint", "the eval data")
  check(dict(stored, num_train=7))  # what the model reads is the same
  with pytest.raises(CheckpointError, match="vocab: 3 characters 'abc' in the checkpoint, 4 "
                                            "characters 'abcd' in the eval data"):
    check(dict(stored, vocab="abcd", vocab_size=4))
  check_same_data({}, {"vocab": "abcd"}, "eval", "a", "b")  # no data info stored: nothing to check


def test_the_shared_wrapper_maps_errors_to_exit_statuses(capsys):
  def mistake():
    raise EvalError("data.path='x': first line\n  second line")

  def bug():
    raise RuntimeError("boom")

  assert cli.guarded("vlora_jax.x", False, lambda: 7) == 7
  with pytest.raises(SystemExit) as e:
    cli.guarded("vlora_jax.x", False, mistake)
  assert e.value.code == 2
  assert capsys.readouterr().err == "error: data.path='x': first line; second line\n"
  with pytest.raises(SystemExit) as e:
    cli.guarded("vlora_jax.x", False, bug)
  err = capsys.readouterr().err
  assert e.value.code == 1 and "RuntimeError: boom" in err
  assert err.splitlines()[-1].startswith("vlora_jax.x: internal error (a bug in vlora_jax")
  with pytest.raises(SystemExit) as e:
    cli.step("last")
  assert e.value.code == 2 and "--step='last'" in capsys.readouterr().err
  assert (cli.step(None), cli.step("best"), cli.step("12")) == (None, "best", 12)


# ----------------------------------------------------------------------------------------- predict


def test_predict_reads_files_as_the_eval_pipeline(run, reference, tmp_path):
  batch, info = reference.batch, reference.info
  want = np.asarray(jax.nn.softmax(reference.logits[STEPS], axis=-1))
  with np.load(run.config.data.path) as z:
    raw = z["x_test"][:6]
  files = []
  for i, image in enumerate(raw):
    Image.fromarray(image).save(tmp_path / f"{i}.png")             # 8-bit grey, lossless
    np.save(tmp_path / f"{i}_uint8.npy", image[..., None])         # the record, as stored
    np.save(tmp_path / f"{i}_float.npy", image.astype(np.float32))  # on the run's pixel scale
    files += [tmp_path / f"{i}.png", tmp_path / f"{i}_uint8.npy", tmp_path / f"{i}_float.npy"]
  for f in files:  # the model's input, bit for bit
    i = int(f.name.split("_")[0].split(".")[0])
    np.testing.assert_array_equal(load_image(f, info), batch["image"][i], err_msg=str(f))
  preds = predict(run.workdir, files, top=3)
  assert [p["file"] for p in preds] == [str(f) for f in files]
  for f, p in zip(files, preds):
    i = int(f.name.split("_")[0].split(".")[0])
    np.testing.assert_allclose(p["probs"], want[i], atol=1e-5, err_msg=str(f))
    first, second = np.sort(want[i])[::-1][:2]
    if first - second > 1e-5:  # else the batch's rounding may break the tie either way
      assert p["top"][0][0] == int(np.argmax(want[i])), f
    assert [t[1] for t in p["top"]] == [CLASSES[k] for k, _, _ in p["top"]]
    assert [t[2] for t in p["top"]] == sorted((t[2] for t in p["top"]), reverse=True)


def test_predict_converts_channels_and_size(run, tmp_path):
  info = vlora_jax.load(run.workdir).info
  with np.load(run.config.data.path) as z:
    grey = z["x_test"][0]
  rgb = np.repeat(grey[..., None], 3, axis=-1)
  Image.fromarray(rgb).save(tmp_path / "rgb.png")
  big = np.kron(grey, np.ones((2, 2), np.uint8))  # 16x16
  Image.fromarray(big).save(tmp_path / "big.png")
  want = load_image(_save(tmp_path / "grey.png", grey), info)
  np.testing.assert_allclose(load_image(tmp_path / "rgb.png", info), want, atol=1e-5)
  resized = load_image(tmp_path / "big.png", info)
  assert resized.shape == (8, 8, 1) and np.isfinite(resized).all()


def _save(path, image):
  Image.fromarray(image).save(path)
  return path


def test_predict_refuses_bad_input_before_loading(run, tmp_path):
  png = _save(tmp_path / "ok.png", np.zeros((8, 8), np.uint8))
  with pytest.raises(PredictError, match=r"model.name='lm' is not an image classifier; predict "
                                         r"serves model.name in \['vit', 'vit_registers'\]"):
    predict(run.lm_like, [png])
  with pytest.raises(CheckpointError, match="holds no checkpoint"):
    predict(run.tmp / "empty", [png])
  with pytest.raises(PredictError, match="--top=0"):
    predict(run.workdir, [png], top=0)
  (tmp_path / "text.png").write_text("not an image")
  np.save(tmp_path / "4d.npy", np.zeros((1, 8, 8, 1), np.uint8))
  np.save(tmp_path / "rgba.npy", np.zeros((8, 8, 4), np.uint8))
  np.save(tmp_path / "off_scale.npy", np.full((8, 8), 300.0))
  np.save(tmp_path / "unit.npy", np.full((8, 8), 0.5, np.float32))
  np.save(tmp_path / "nan.npy", np.full((8, 8), np.nan, np.float32))
  cases = {"missing.png": "missing.png: cannot read it (No such file or directory)",
           "missing.npy": "missing.npy: no such file",
           "text.png": "text.png: not an image that Pillow reads",
           "4d.npy": "4d.npy: shape (1, 8, 8, 1); allowed: a PNG or JPEG",
           "rgba.npy": "rgba.npy: 4 channels (shape (8, 8, 4)); the run's images have 1: "
                       "allowed are [1, 3] channels",
           "off_scale.npy": "off_scale.npy: values 300 to 300; allowed: float64 pixels on the "
                            "run's pixel scale (pixels * 0.00392157 in [0, 1], i.e. 0-255)",
           "unit.npy": "unit.npy: fractional values; allowed: whole numbers 0-255",
           "nan.npy": "nan.npy: 64 NaN/inf values"}
  for name, message in cases.items():
    with pytest.raises(PredictError) as e:
      predict(run.workdir, [png, tmp_path / name])
    assert f"{tmp_path / name}: " in str(e.value) and message in str(e.value), name


# ------------------------------------------------------------------------------ as a user runs them


def _command(module, *args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", f"vlora_jax.{module}", *map(str, args)], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_the_commands_as_a_user_runs_them(run, tmp_path):
  with np.load(run.config.data.path) as z:
    image = z["x_test"][0]
  png = _save(tmp_path / "first.png", image)
  np.save(tmp_path / "second.npy", image)
  out = tmp_path / "sub" / "eval.json"
  with ThreadPoolExecutor(2) as pool:
    ev = pool.submit(_command, "evaluate", "--workdir", run.workdir, "--out", out)
    pr = pool.submit(_command, "predict", "--workdir", run.workdir, "--top", 2, png,
                     tmp_path / "second.npy")
    ev, pr = ev.result(), pr.result()
  assert ev.returncode == 0, ev.stderr[-4000:]
  lines = ev.stdout.splitlines()
  assert lines[0] == (f"checkpoint: {run.workdir / 'checkpoints' / str(STEPS)} (step {STEPS}, "
                      f"{N_TEST} eval examples)")
  assert lines[1:3] == [f"eval/accuracy={run.summary['eval/accuracy']:.6g}",
                        f"eval/loss={run.summary['eval/loss']:.6g}"]
  assert lines[3:] == [f"wrote {out}"]
  assert json.loads(out.read_text())["metrics"]["eval/loss"] == pytest.approx(
      run.summary["eval/loss"], rel=1e-6)
  assert ev.stderr.strip() == ""  # no progress bar when stderr is not a terminal
  assert pr.returncode == 0, pr.stderr[-4000:]
  lines = pr.stdout.splitlines()
  assert len(lines) == 6 and lines[0] == str(png) and lines[3] == str(tmp_path / "second.npy")
  assert lines[1:3] == lines[4:6]  # the same pixels
  for line in lines[1:3]:
    prob, name = line.split()
    assert name in CLASSES and 0 < float(prob) < 1


@pytest.mark.slow
def test_bad_input_exits_2_with_one_line(run, tmp_path):
  png = _save(tmp_path / "ok.png", np.zeros((8, 8), np.uint8))
  np.save(tmp_path / "4d.npy", np.zeros((1, 8, 8, 1), np.uint8))
  (tmp_path / "text.png").write_text("not an image")
  wd = ["--workdir", run.workdir]
  cases = {
      "evaluate_no_checkpoint": ("evaluate", ["--workdir", run.tmp / "empty"],
                                 "holds no checkpoint"),
      "evaluate_bad_step": ("evaluate", [*wd, "--step", "last"], "--step='last': allowed are"),
      "evaluate_missing_step": ("evaluate", [*wd, "--step", 3], "no checkpoint of step 3"),
      "evaluate_model_key": ("evaluate", [*wd, "--config.model.dim=8"],
                             "--config.model.dim: cannot be overridden"),
      "evaluate_bad_value": ("evaluate", [*wd, "--config.data.eval_examples=-1"],
                             "data.eval_examples=-1: must be"),
      "evaluate_stray": ("evaluate", [*wd, "stray"], "unrecognized argument 'stray'"),
      "evaluate_no_data": ("evaluate", [*wd, "--config.data.path=/no/such.npz"],
                           "data.path='/no/such.npz': file not found"),
      "evaluate_out_dir": ("evaluate", [*wd, "--out", tmp_path], "is a directory"),
      "predict_no_checkpoint": ("predict", ["--workdir", run.tmp / "empty", png],
                                "holds no checkpoint"),
      "predict_bad_step": ("predict", [*wd, "--step", "x", png], "--step='x'"),
      "predict_wrong_family": ("predict", ["--workdir", run.lm_like, png],
                               "model.name='lm' is not an image classifier"),
      "predict_missing_file": ("predict", [*wd, png, tmp_path / "nope.png"],
                               "nope.png: cannot read it"),
      "predict_not_an_image": ("predict", [*wd, tmp_path / "text.png"], "not an image"),
      "predict_bad_shape": ("predict", [*wd, tmp_path / "4d.npy"], "shape (1, 8, 8, 1)"),
      "predict_no_files": ("predict", wd, "the following arguments are required: FILE"),
      "predict_top": ("predict", [*wd, "--top", 0, png], "--top=0"),
  }
  with ThreadPoolExecutor(4) as pool:
    done = dict(zip(cases, pool.map(lambda c: _command(c[0], *c[1]), cases.values())))
  for name, proc in done.items():
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), \
        (name, proc.returncode, proc.stderr[-3000:])
    assert cases[name][2] in lines[0], (name, lines[0])
    assert proc.stdout == "", name


def test_evaluate_takes_a_run_started_by_an_init_kind_this_process_lacks():
  """A kind registered by the code that trained the run (`register_init_from`) is not registered
  in vlora-evaluate's process: the evaluation does not start the run, so it does not ask."""
  from vlora_jax.evaluate import eval_config
  from vlora_jax.train import validate
  stored = tiny("vit", init_from="my_lab_kind:/weights").to_dict()
  with pytest.raises(ConfigError, match="unknown kind 'my_lab_kind'"):
    validate.check(tiny("vit", init_from="my_lab_kind:/weights"), num_devices=1)
  config, _ = eval_config(stored, {})
  validate.check(config, num_devices=1)
