"""Use what you trained: `vlora_jax.load` and `vlora_jax.export` (timm safetensors, npz, orbax).

One tiny VLoRA ViT is trained for the module on a synthetic ``.npz`` with the architecture of the
committed timm fixture (tests/fixtures/torch_timm_token.npz: 16x16x3 images, 5 classes, D 32, two
layers), so that its timm export has the fixture's keys and shapes. No torch.

Both cores stay busy: a tiny char LM trains in a subprocess beside the ViT; then the dense twin's
restore of the orbax export and the command-line runs go on in subprocesses beside the in-process
tests, which collect their results at the end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import jax
import numpy as np
import pytest
from helpers_train import ROOT, result, run_py, tiny

import vlora_jax
from vlora_jax import data as data_lib
from vlora_jax import models
from vlora_jax.convert import torch_vit
from vlora_jax.convert.torch_vit import _check_kwargs
from vlora_jax.errors import CheckpointError, UserError
from vlora_jax.runs import checkpoint_format
from vlora_jax.export import export
from vlora_jax.train import train_and_evaluate

pytestmark = pytest.mark.slow  # subprocesses and trained runs: `pytest -m slow`

FIXTURE = ROOT / "tests" / "fixtures" / "torch_timm_token.npz"
TOL = 1e-5
CLASSES = ("ant", "bee", "cat", "dog", "eel")
STEPS = 2


def _vit_config(npz_path, **overrides):
  """The fixture's architecture on the synthetic images; a checkpoint and an eval every step,
  the best two kept by the smallest eval loss (on random labels it rises: the best is not the
  newest)."""
  return tiny("vit", **{
      "data.source": "npz", "data.path": str(npz_path), "data.mean": (0.5, 0.4, 0.3),
      "data.std": (0.25, 0.2, 0.3), "data.eval_examples": 0, "eval_batch_size": 32,
      "model.img_size": 16, "model.in_chans": 3, "model.num_classes": 5, "model.patch_size": 4,
      "model.dim": 32, "model.mlp_ratio": 2.0, "num_train_steps": STEPS, "optim.lr": 1e-2,
      "eval_every_steps": 1, "checkpoint.every_steps": 1, "checkpoint.keep": STEPS,
      "checkpoint.keep_best": 2, "checkpoint.best_metric": "eval/loss",
      "checkpoint.best_mode": "min",
      # evaluated on the file's test split: the tests read its images (and, on random labels,
      # its loss rises, so the best step is not the newest)
      "data.eval_split": "test", "data.validation_fraction": 0.0, **overrides})


def _synthetic_npz(path):
  rng = np.random.default_rng(0)
  np.savez(path, x_train=rng.integers(0, 256, (64, 16, 16, 3), dtype=np.uint8),
           y_train=rng.integers(0, 5, 64), x_test=rng.integers(0, 256, (32, 16, 16, 3),
                                                              dtype=np.uint8),
           y_test=rng.integers(0, 5, 32), label_names=np.array(CLASSES))
  return path


def _dense_twin_code(npz_path, export_dir, workdir) -> str:
  """Python that trains the dense twin from the exported checkpoint (no step left: eval only)."""
  return f"""
import json, sys
sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})  # this file's folder
from test_use_trained import _vit_config
from vlora_jax.train import train_and_evaluate

twin = _vit_config({str(npz_path)!r}, **{{
    "model.vlora.enabled": False, "checkpoint.restore_from": {str(export_dir)!r},
    "checkpoint.keep_best": 0, "eval_every_steps": 0}})
print("RESULT " + json.dumps(train_and_evaluate(twin, {str(workdir)!r})))
"""


def _export_cli(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.Popen([sys.executable, "-m", "vlora_jax.export", *map(str, args)], cwd=ROOT,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, request):
  started = []  # every subprocess of the module: ended at its end if a failure left one running
  request.addfinalizer(lambda: [p.kill() for p in started if p.poll() is None])
  start = lambda proc: started.append(proc) or proc
  tmp = tmp_path_factory.mktemp("use_trained")
  lm_config = tiny("lm", num_train_steps=1)
  lm = tmp / "lm"
  lm_proc = start(run_py(
      "from helpers_train import tiny\nfrom vlora_jax.train import train_and_evaluate\n"
      f"train_and_evaluate(tiny('lm', **{{'num_train_steps': 1, 'data.path': "
      f"{lm_config.data.path!r}}}), {str(lm)!r})", wait=False))
  vit_config = _vit_config(_synthetic_npz(tmp / "images.npz"))
  vit = tmp / "vit"
  summary = train_and_evaluate(vit_config, vit)
  orbax_export = tmp / "dense_export"
  orbax_paths = export(vit, "orbax", orbax_export)
  dense_twin = start(run_py(_dense_twin_code(vit_config.data.path, orbax_export,
                                             tmp / "dense_twin"), wait=False))
  out, _ = lm_proc.communicate(timeout=300)
  assert lm_proc.returncode == 0, out[-4000:]
  (tmp / "empty").mkdir()
  (tmp / "a_file").write_text("")
  cli_args = {  # name -> the export command's arguments
      "npz": ["--workdir", vit, "--format", "npz", "--out", tmp / "cli" / "dense.npz"],
      "no_checkpoint": ["--workdir", tmp / "empty", "--format", "npz", "--out", tmp / "x.npz"],
      "timm_on_lm": ["--workdir", lm, "--format", "timm", "--out", tmp / "lm.safetensors"],
      "unwritable_out": ["--workdir", vit, "--format", "npz", "--out", tmp / "a_file" / "x.npz"],
      "missing_step": ["--workdir", vit, "--format", "npz", "--step", 99, "--out", tmp / "y.npz"],
  }
  cli = {name: start(_export_cli(*args)) for name, args in cli_args.items()}
  return types.SimpleNamespace(tmp=tmp, vit=vit, vit_config=vit_config, summary=summary, lm=lm,
                               lm_config=lm_config, cli=cli, orbax_export=orbax_export,
                               orbax_paths=orbax_paths, dense_twin=dense_twin,
                               loaded=vlora_jax.load(vit))


def _images_from_info(images_uint8, info):
  """The training pipeline's normalisation, from the stored info alone."""
  return ((images_uint8.astype(np.float32) * info["scale"] - np.float32(info["mean"]))
          / np.float32(info["std"]))


def test_load_gives_the_trained_model_and_what_feeds_it(runs):
  model, params, config, info = loaded = runs.loaded
  assert loaded.step == STEPS and loaded.checkpoint == runs.vit / "checkpoints" / str(STEPS)
  assert config.model.to_dict() == json.loads(runs.vit_config.model.to_json_best_effort())
  # The stored description is the pipeline's: shape, classes and their names, normalisation.
  assert info == data_lib.build(runs.vit_config).info
  assert info["class_names"] == CLASSES and info["image_shape"] == (16, 16, 3)
  assert jax.tree.all(jax.tree.map(lambda a: isinstance(a, np.ndarray), params))
  # Raw test pixels, normalised from the info alone...
  with np.load(runs.vit_config.data.path) as z:
    batch = {"image": _images_from_info(z["x_test"], info), "label": z["y_test"]}
  assert models.build(runs.vit_config.model) == model
  logits = jax.jit(lambda p, x: model.apply({"params": p}, x))  # one compile for both calls
  # ... give the same logits as the trained params (read as the trainer wrote them) ...
  trained = checkpoint_format.read_path(str(runs.vit))["params"]
  got = logits(params, batch["image"])
  np.testing.assert_array_equal(got, logits(trained, batch["image"]))
  # ... and the run's own eval loss.
  fam = models.family(config.model.name)
  got = fam.finalize(jax.device_get(fam.sums(got, batch)), "eval")
  assert abs(got["eval/loss"] - runs.summary["eval/loss"]) <= TOL
  assert got["eval/accuracy"] == pytest.approx(runs.summary["eval/accuracy"], abs=1e-6)


def test_load_chooses_the_step(runs):
  evals = {r["step"]: r["eval/loss"] for r in map(json.loads, (runs.vit / "metrics.jsonl")
                                                  .read_text().splitlines()) if "eval/loss" in r}
  kept_best = sorted(int(p.name) for p in (runs.vit / "best").iterdir() if p.name.isdigit())
  best = min(kept_best, key=evals.get)  # best_mode="min" of eval/loss
  assert best != STEPS, evals  # else this test could not tell 'best' from the newest
  assert vlora_jax.load(runs.vit, step="best").step == best
  first = vlora_jax.load(runs.vit, step=1)
  assert first.step == 1 and first.checkpoint.parent.name == "checkpoints"
  newest = runs.loaded.params["blocks"]["inc_b"]["attn"]["qkv"]["kernel"]
  assert not np.array_equal(first.params["blocks"]["inc_b"]["attn"]["qkv"]["kernel"], newest)


def test_load_errors_name_the_workdir_and_its_steps(runs):
  with pytest.raises(CheckpointError, match="holds no checkpoint") as e:
    vlora_jax.load(runs.tmp / "empty")
  assert str(runs.tmp / "empty") in str(e.value) and isinstance(e.value, UserError)
  with pytest.raises(CheckpointError, match="no such directory"):
    vlora_jax.load(runs.tmp / "nowhere")
  with pytest.raises(CheckpointError, match=r"no checkpoint of step 99; the steps there are: "
                                            r"checkpoints/ \[1, 2\], best/ \[1, 2\]"):
    vlora_jax.load(runs.vit, step=99)
  with pytest.raises(CheckpointError, match="no best checkpoint"):
    vlora_jax.load(runs.lm, step="best")
  with pytest.raises(CheckpointError, match="allowed are None"):
    vlora_jax.load(runs.vit, step="latest")


def test_lm_vocabulary_round_trips(runs):
  model, params, config, info = vlora_jax.load(runs.lm)
  pipe = data_lib.build(runs.lm_config)
  assert info == pipe.info and info["vocab_size"] == len(info["vocab"])
  vocab = info["vocab"]
  tokens = next(pipe.eval_batches())["tokens"][0]  # the first eval window, as the run read it
  text = "".join(vocab[t] for t in tokens)
  assert np.array_equal([vocab.index(c) for c in text], tokens)
  assert text in open(config.data.path, encoding="utf-8").read()
  assert model.vocab_size == config.model.vocab_size >= len(vocab)


def test_timm_export_imports_back_with_the_fixture_keys(runs):
  out = runs.tmp / "timm" / "vit.safetensors"
  assert export(runs.vit, "timm", out) == [out, out.with_suffix(".json")]
  from safetensors.numpy import load_file
  sd = load_file(str(out))
  with np.load(FIXTURE) as z:
    want = {k[len("state_dict/"):]: z[k].shape for k in z.files if k.startswith("state_dict/")}
    images, fixture_kwargs = z["images"], json.loads(str(z["kwargs"]))
  assert {k: v.shape for k, v in sd.items()} == want
  assert all(v.dtype == np.float32 for v in sd.values())
  side = json.loads(out.with_suffix(".json").read_text())
  assert _check_kwargs("timm", side["timm_kwargs"]) == _check_kwargs("timm", fixture_kwargs)
  assert side["data"]["class_names"] == list(CLASSES)
  # Back through the importer (kwargs from the file's metadata): the VLoRA model's logits.
  module, variables = torch_vit(out)
  run = runs.loaded
  assert np.abs(run.params["blocks"]["inc_b"]["mlp"]["fc1"]["kernel"]).max() > 1e-4  # merged
  want_logits = jax.jit(run.model.apply)({"params": run.params}, images)
  got = jax.jit(module.apply)(variables, images)
  assert float(np.abs(got - want_logits).max()) <= TOL


def test_orbax_export_restores_into_the_dense_twin(runs):
  out = runs.orbax_export
  assert runs.orbax_paths == [out / "checkpoints" / str(STEPS), out / "config.json"]
  output, _ = runs.dense_twin.communicate(timeout=300)
  assert runs.dense_twin.returncode == 0, output[-4000:]
  summary = result(output)
  assert summary["origin"] == f"restored {out}" and summary["step"] == STEPS
  dense = summary["params_total"]
  assert dense == summary["params_dense_equivalent"] == runs.summary["params_dense_equivalent"]
  for key in ("eval/loss", "eval/accuracy"):
    assert abs(summary[key] - runs.summary[key]) <= TOL, key


def test_export_command_line(runs):
  done = {name: (p, *p.communicate(timeout=300)) for name, p in runs.cli.items()}
  proc, stdout, stderr = done.pop("npz")
  assert proc.returncode == 0, stderr[-4000:]
  out = runs.tmp / "cli" / "dense.npz"
  assert stdout.split() == [str(out)]
  _, params = runs.loaded.to_dense()
  with np.load(out) as z:
    flat = {k: z[k] for k in z.files}
  assert "blocks/per_layer/attn/qkv/kernel" in flat and not any("inc_" in k for k in flat)
  assert len(flat) == len(jax.tree.leaves(params))
  np.testing.assert_array_equal(flat["blocks/per_layer/mlp/fc1/kernel"],
                                params["blocks"]["per_layer"]["mlp"]["fc1"]["kernel"])
  says = {"no_checkpoint": "holds no checkpoint", "timm_on_lm": "model.name='lm'",
          "unwritable_out": "--out=", "missing_step": "no checkpoint of step 99"}
  for name, (proc, stdout, stderr) in done.items():
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), \
        (name, stderr)
    assert says[name] in lines[0], (name, lines[0])


def _command(module, *args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


def test_sample_in_process_and_as_a_command(runs):
  """Greedy samples are the same on every call; seeded samples repeat with their seed; the
  command prints the prompt and its continuation, samples separated by '----'."""
  from vlora_jax.sample import SEPARATOR, sample
  greedy = sample(runs.lm, "First", max_new_tokens=20, temperature=0.0, num_samples=2)
  assert len(greedy) == 2 and greedy[0] == greedy[1] and len(greedy[0]) == 20
  hot = dict(max_new_tokens=20, temperature=1.0, top_k=10, num_samples=3)
  assert sample(runs.lm, "First", seed=1, **hot) == sample(runs.lm, "First", seed=1, **hot)
  assert sample(runs.lm, "First", seed=1, **hot) != sample(runs.lm, "First", seed=2, **hot)

  done = _command("vlora_jax.sample", "--workdir", runs.lm, "--prompt", "First",
                  "--max_new_tokens", 20, "--temperature", 0, "--num_samples", 2)
  assert done.returncode == 0, done.stderr[-4000:]
  assert done.stdout.split(SEPARATOR + "\n") == ["First" + greedy[0] + "\n"] * 2


@pytest.mark.parametrize("args, says", [
    (["--prompt", "Fi\u03a9st"], "characters the vocabulary lacks"),
    (["--prompt", ""], "--prompt is empty"),
    (["--prompt", "F", "--temperature", "-1"], "temperature=-1.0"),
    (["--prompt", "F", "--top_p", "0"], "top_p=0.0"),
    (["--prompt", "F", "--max_new_tokens", "0"], "max_new_tokens=0"),
    (["--prompt", "F", "--num_samples", "0"], "--num_samples=0"),
    (["--prompt", "F", "--stop", "a\\"], "--stop='a\\\\': a broken escape"),
    (["--prompt", "F", "--step", "x"], "--step='x'"),
    (["--prompt", "F", "--top_k", "1.5"], "--top_k"),
    ("vit", "sampling serves model.name in ['llama', 'lm']"),
    ("empty", "holds no checkpoint")])
def test_sample_bad_input_exits_2_with_one_line(runs, args, says):
  if args in ("vit", "empty"):
    workdir = runs.vit if args == "vit" else runs.tmp / "empty"
    args = ["--workdir", workdir, "--prompt", "F"]
  else:
    args = ["--workdir", runs.lm, *args]
  done = _command("vlora_jax.sample", *args)
  lines = [line for line in done.stderr.splitlines() if line.strip()]
  assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), done.stderr
  assert says in lines[0], lines[0]
  assert not done.stdout
