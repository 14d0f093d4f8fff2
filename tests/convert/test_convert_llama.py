"""Import and export of Llama checkpoints, against transformers' logits on committed fixtures
(tests/fixtures/make_llama_fixtures.py): a random grouped-query Llama in Hugging Face format
(bfloat16), a tied multi-query one with biases (float32), and the first as llama.cpp writes a GGUF.
No torch here: the fixtures hold transformers' logits.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vlora_jax
from helpers_train import DATA, ROOT
from vlora_jax.data import tokenizer as tokenizer_lib
from vlora_jax.convert import hf_llama, pretrained
from vlora_jax.convert.__main__ import convert
from vlora_jax.convert.hf_llama import ConvertError

FIX = ROOT / "tests" / "fixtures" / "llama"
REF = np.load(FIX / "logits.npz")
SOURCES = {"hf_gqa": FIX / "hf_gqa", "hf_tied": FIX / "hf_tied", "gguf_gqa": FIX / "gguf_gqa.gguf"}
MAX_LEN = 16


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
  """Every fixture imported by the command's own function into a workdir."""
  root = tmp_path_factory.mktemp("imported")
  for name, source in SOURCES.items():
    convert(str(source), str(root / name), max_len=MAX_LEN)
  return {name: root / name for name in SOURCES}


def _logits(run, tokens):
  return np.asarray(run.model.apply({"params": run.params}, jnp.asarray(tokens, jnp.int32)))


def _text() -> Path:
  text = DATA / "tiny_shakespeare.txt"
  if text.is_file():
    return text
  fallback = Path(__file__).resolve().parents[1] / "fixtures" / "llama" / "hf_gqa" / "tokenizer.json"
  return fallback  # any UTF-8 text file of a few KB exercises the same path


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_imported_logits_equal_transformers(runs, name):
  run = vlora_jax.load(runs[name])
  ours = _logits(run, REF["tokens"])
  assert ours.shape == REF[name].shape
  assert np.abs(ours - REF[name]).max() <= 1e-4
  assert run.step == 0 and run.config.model.name == "llama" and run.model.vlora is None


@pytest.mark.parametrize("name", ["hf_gqa", "hf_tied"])
def test_import_export_import_is_exact(runs, name, tmp_path):
  from safetensors.numpy import load_file
  from vlora_jax.export import export
  out = tmp_path / "hf"
  written = export(runs[name], "hf", out)
  assert {p.name for p in written} == {"config.json", "model.safetensors", "tokenizer.json",
                                       "tokenizer_config.json"}
  # the Hugging Face names and values of the source, in float32
  source = hf_llama.read_safetensors(SOURCES[name], "fixture")
  exported = load_file(str(out / "model.safetensors"))
  assert set(exported) == set(source)
  assert all(np.array_equal(exported[k], source[k]) for k in source)
  convert(str(out), str(tmp_path / "again"), max_len=MAX_LEN)
  first, again = vlora_jax.load(runs[name]), vlora_jax.load(tmp_path / "again")
  assert jax.tree.all(jax.tree.map(np.array_equal, first.params, again.params))
  assert again.info["tokenizer"] == first.info["tokenizer"]
  model_keys = lambda r: {k: v for k, v in r.config.model.to_dict().items()}  # noqa: E731
  assert model_keys(again) == model_keys(first)


def test_gguf_and_hugging_face_tokenizers_agree():
  gguf = tokenizer_lib.load(str(SOURCES["gguf_gqa"]))
  hf = tokenizer_lib.load(str(SOURCES["hf_gqa"]))
  assert (gguf.bos_id, gguf.eos_id, len(gguf)) == (hf.bos_id, hf.eos_id, len(hf)) == (0, 0, 320)
  for text in ("First Citizen:\nBefore we proceed", "  spaces\n\nand ünïcode 日本",
               "end<|endoftext|>"):
    assert gguf.encode(text) == hf.encode(text)
    assert gguf.decode(gguf.encode(text)) == text
  assert gguf.encode("<|endoftext|>") == [0]  # a control token stays whole
  assert gguf.token_id("<|endoftext|>") == 0


def test_evaluate_and_sample_need_nothing_but_the_workdir(runs, tmp_path):
  """The run moved away from the path its config names as its tokenizer: evaluate reads the
  checkpoint's own; sample decodes with it."""
  from vlora_jax import evaluate, sample
  moved = tmp_path / "moved"
  shutil.copytree(runs["hf_gqa"], moved)
  stored = json.loads((moved / "checkpoints/0/meta/metadata").read_text())["config"]["data"]
  assert stored["tokenizer"] == str(runs["hf_gqa"].absolute())
  stored_cfg = moved / "checkpoints/0/meta/metadata"
  meta = json.loads(stored_cfg.read_text())
  meta["config"]["data"]["tokenizer"] = str(tmp_path / "gone")
  stored_cfg.write_text(json.dumps(meta))
  result = evaluate.evaluate(moved, overrides={"data.path": str(_text()),
                                               "data.eval_examples": 4},
                             out=tmp_path / "eval.json")
  assert result["eval_examples"] == 4 and np.isfinite(result["metrics"]["eval/perplexity"])
  out = sample.sample(moved, "First", max_new_tokens=6, temperature=0.0)
  assert isinstance(out[0], str) and out == sample.sample(moved, "First", max_new_tokens=6,
                                                         temperature=0.0)


def test_a_vlora_student_of_an_imported_model_heals_samples_and_exports(runs, tmp_path):
  """init_from='compress:<imported>' and distill.teacher=<imported> take the imported run: at
  full ranks (and a learning rate of ~0) the VLoRA student computes the teacher; it samples, and
  exports (merged) to a Hugging Face directory whose import computes the student's logits."""
  from vlora_jax import sample
  from vlora_jax.export import export
  from vlora_jax.train import load_config, train_and_evaluate
  teacher = runs["hf_gqa"]
  full = (16, 8, 8, 16, 16, 16, 16)  # min(d_in, d_out) of q, k, v, o, gate, up, down
  config = load_config(
      str(ROOT / "configs" / f"llama.py:from={teacher},s=2,steps=2"),
      **{"model.vlora.rank": full, "optim.lr": 1e-12,
         "data.path": str(_text()), "init_from": f"compress:{teacher}",
         "distill.teacher": str(teacher), "distill.hidden_weight": 0.5, "batch_size": 4,
         "eval_batch_size": 4, "data.eval_examples": 4, "data.split_blocks": 4,
         "data.validation_fraction": 0.25, "data.test_fraction": 0.25, "log_every_steps": 1,
         "checkpoint.keep_best": 0, "progress": False, "tensorboard": False,
         "data.threads": 1})
  workdir = tmp_path / "student"
  train_and_evaluate(config, workdir)
  student = vlora_jax.load(workdir)
  assert student.model.vlora is not None and student.step == 2
  assert student.info["split"]["validation"] == [2] and student.info["split"]["test"] == [3]
  assert student.info["tokenizer"] == vlora_jax.load(teacher).info["tokenizer"]
  np.testing.assert_allclose(_logits(student, REF["tokens"]), REF["hf_gqa"], atol=1e-4)
  text = sample.sample(workdir, "First", max_new_tokens=5, temperature=0.0)[0]
  assert text == sample.sample(teacher, "First", max_new_tokens=5, temperature=0.0)[0]
  export(workdir, "hf", tmp_path / "hf")
  convert(str(tmp_path / "hf"), str(tmp_path / "back"), max_len=MAX_LEN)
  back = vlora_jax.load(tmp_path / "back")
  np.testing.assert_allclose(_logits(back, REF["tokens"]), _logits(student, REF["tokens"]),
                             atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------ bad input


def _gguf(path: Path, *, arch="llama", tokenizer=True, qtype=None) -> Path:
  """A one-layer llama GGUF (or another architecture's), optionally without a tokenizer, its
  embedding stored as ``qtype``."""
  import gguf
  w = gguf.GGUFWriter(str(path), arch)
  for key, value in (("block_count", 1), ("embedding_length", 32), ("feed_forward_length", 32),
                     ("attention.head_count", 1), ("context_length", 16)):
    w.add_uint32(f"{arch}.{key}", value)
  if tokenizer:
    w.add_tokenizer_model("gpt2")
    w.add_token_list(["a", "b", "ab"])
    w.add_token_merges(["a b"])
  if qtype is None:
    w.add_tensor("token_embd.weight", np.zeros((3, 32), np.float32))
  else:
    block, size = gguf.GGML_QUANT_SIZES[qtype]  # one block of 32 values a row
    w.add_tensor("token_embd.weight", np.zeros((3, size * 32 // block), np.uint8),
                 raw_dtype=qtype)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return path


def _hf_dir(path: Path, *, config=None, tokenizer=True) -> Path:
  shutil.copytree(SOURCES["hf_gqa"], path)
  if config is not None:
    (path / "config.json").write_text(json.dumps(config))
  if not tokenizer:
    (path / "tokenizer.json").unlink()
  return path


def _bad_inputs(tmp: Path):
  import gguf
  text = tmp / "notes.txt"
  text.write_text("not a model")
  return {
      "missing": (tmp / "nothing.gguf", "no such file"),
      "not_a_model": (text, "not a model file"),
      "other_architecture": (_gguf(tmp / "gpt2.gguf", arch="gpt2"), "general.architecture='gpt2'"),
      "unreadable_quantisation": (_gguf(tmp / "q81.gguf", qtype=gguf.GGMLQuantizationType.Q8_1),
                                  "Q8_1, which gguf cannot dequantise"),
      "gguf_without_tokenizer": (_gguf(tmp / "notok.gguf", tokenizer=False), "holds no tokenizer"),
      "hf_without_tokenizer": (_hf_dir(tmp / "notok", tokenizer=False), "has no tokenizer.json"),
      "hf_other_architecture": (_hf_dir(tmp / "gpt2", config={"architectures": ["GPT2LMHeadModel"],
                                                              "model_type": "gpt2"}),
                                "architectures=['GPT2LMHeadModel']"),
      "hf_scaled_rope": (_hf_dir(tmp / "rope", config={
          **json.loads((SOURCES["hf_gqa"] / "config.json").read_text()),
          "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}}),
                         "rope_type 'default'"),
  }


def test_bad_model_files_are_refused_naming_them(tmp_path):
  for name, (path, says) in _bad_inputs(tmp_path).items():
    with pytest.raises(ConvertError) as e:
      pretrained.read(str(path))
    assert says in str(e.value) and str(path) in str(e.value), (name, str(e.value))
    assert "\n" not in str(e.value), name


def test_a_workdir_with_checkpoints_a_missing_text_and_a_bad_context_are_refused(runs, tmp_path):
  with pytest.raises(ConvertError, match="already holds checkpoints"):
    convert(str(SOURCES["hf_gqa"]), str(runs["hf_gqa"]))
  with pytest.raises(ConvertError, match="--data='/no/text.txt': no such file"):
    convert(str(SOURCES["hf_gqa"]), str(tmp_path / "a"), data="/no/text.txt")
  with pytest.raises(ConvertError, match="--max_len=0: must be an integer >= 1"):
    convert(str(SOURCES["hf_gqa"]), str(tmp_path / "b"), max_len=0)
  assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize("case", ["not_a_model", "unreadable_quantisation"])
def test_the_command_answers_a_bad_file_with_one_line_and_exit_2(tmp_path, case):
  path, says = _bad_inputs(tmp_path)[case]
  done = subprocess.run([sys.executable, "-m", "vlora_jax.convert", "--from", str(path),
                         "--workdir", str(tmp_path / "run")], capture_output=True, text=True,
                        cwd=ROOT, timeout=300)
  lines = [line for line in done.stderr.splitlines() if line.strip()]
  assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), done.stderr
  assert says in lines[0]
  assert not (tmp_path / "run").exists()
