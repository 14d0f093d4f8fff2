"""data.source='tokenized': a text file through a subword tokenizer, split into train / validation
/ test blocks by a stored choice, in windows that never cross into held-out text."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from helpers_train import ROOT, tiny
from vlora_jax import data as data_lib
from vlora_jax.data import tokenizer as tokenizer_lib
from vlora_jax.data import DataError, tokenized

TOKENIZER = ROOT / "tests" / "fixtures" / "llama" / "hf_gqa" / "tokenizer.json"


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
  rng = np.random.default_rng(0)
  words = "thou art the king of all that we behold and yet I fear the night".split()
  lines = [" ".join(rng.choice(words, size=8)).capitalize() + "." for _ in range(400)]
  path = tmp_path_factory.mktemp("text") / "verse.txt"
  path.write_text("\n".join(lines) + "\n")
  return path


def _config(text_file, **changes):
  changes = {"data.source": "tokenized", "data.path": str(text_file),
             "data.tokenizer": str(TOKENIZER), "data.eval_split": "validation",
             "data.eval_examples": 0, "batch_size": 4, "eval_batch_size": 4, **changes}
  c = tiny("llama")
  c.unlock()
  c.model.vocab_size = 320
  for key, value in changes.items():
    node = c
    *parents, leaf = key.split(".")
    for k in parents:
      node = node[k]
    node[leaf] = value
  return c


def test_the_held_out_blocks_are_the_tail_or_a_seeded_choice():
  assert tokenized.split(10, 0.1, 0.2, None) == {"train": list(range(7)), "validation": [7],
                                                 "test": [8, 9]}
  seeded = tokenized.split(20, 0.1, 0.1, 3)
  assert seeded == tokenized.split(20, 0.1, 0.1, 3) != tokenized.split(20, 0.1, 0.1, 4)
  assert sorted(sum(seeded.values(), [])) == list(range(20))
  assert (len(seeded["validation"]), len(seeded["test"])) == (2, 2)
  assert tokenized.split(20, 0.0, 0.01, None)["test"] == [19]  # a fraction > 0 holds a block
  with pytest.raises(DataError, match="leaving none to train"):
    tokenized.split(4, 0.5, 0.5, 0)


def test_windows_stay_inside_their_spans():
  tokens = np.arange(100, dtype=np.int32)
  spans = tokenized.spans([0, 1, 3], 5, 100)
  assert spans == [(0, 40), (60, 80)]
  w = tokenized.SpanWindows(tokens, spans, 8)
  assert len(w) == (40 - 8 + 1) + (20 - 8 + 1)
  starts = [int(w[i]["tokens"][0]) for i in range(len(w))]
  assert starts == list(range(0, 33)) + list(range(60, 73))
  assert all(np.array_equal(w[i]["tokens"], np.arange(s, s + 8)) for i, s in enumerate(starts))
  evals = tokenized.SpanWindows(tokens, spans, 8, stride=8)
  assert [int(evals[i]["tokens"][0]) for i in range(len(evals))] == [0, 8, 16, 24, 32, 60, 68]
  with pytest.raises(IndexError):
    w[len(w)]


@pytest.mark.parametrize("seed", [None, 5])
def test_the_pipeline_reads_the_stored_split(text_file, seed):
  config = _config(text_file, **{"data.split_seed": seed, "data.split_blocks": 10,
                                 "data.validation_fraction": 0.2, "data.test_fraction": 0.1})
  pipe = data_lib.build(config)
  info = pipe.info
  tok = tokenizer_lib.load(str(TOKENIZER))
  ids = np.asarray(tok.encode(text_file.read_text(), special=False))
  split = info["split"]
  window = config.model.max_len + 1
  assert split["tokens"] == len(ids) and split["blocks"] == 10 and split["seed"] == seed
  assert (len(split["validation"]), len(split["test"])) == (2, 1)
  if seed is None:
    assert split["validation"] == [7, 8] and split["test"] == [9]
  assert tokenizer_lib.from_info(info).encode("the king") == tok.encode("the king")
  assert info["vocab_size"] == 320 and info["tokens_per_example"] == config.model.max_len
  # bits per character from bits per token: each eval split's own characters per token
  for name in ("validation", "test"):
    chars = sum(len(tok.decode(ids[s:e].tolist()))
                for s, e in tokenized.spans(split[name], 10, len(ids)))
    tokens = sum(e - s for s, e in tokenized.spans(split[name], 10, len(ids)))
    assert info["chars_per_token"][name] == pytest.approx(chars / tokens) and chars > tokens
  # the test split's windows are the test blocks', for the run's one evaluation at the end
  test_ranges = tokenized.spans(split["test"], 10, len(ids))
  first_test = next(pipe.eval_batches("test"))["tokens"][0]
  assert np.array_equal(first_test, ids[test_ranges[0][0]:test_ranges[0][0] + window])
  # eval windows: the validation blocks' tokens, in order, without overlap
  ranges = tokenized.spans(split["validation"], 10, len(ids))
  want = [ids[s + i:s + i + window] for s, e in ranges for i in range(0, e - s - window + 1,
                                                                      window)]
  got = [b["tokens"][j] for b in pipe.eval_batches() for j in range(len(b["tokens"]))
         if b["mask"][j]]
  assert len(got) == len(want) == pipe.num_eval and all(map(np.array_equal, got, want))
  # train windows never read a held-out token
  held = np.zeros(len(ids), bool)
  for name in ("validation", "test"):
    for s, e in tokenized.spans(split[name], 10, len(ids)):
      held[s:e] = True
  for step in range(20):
    for row in pipe.train_batch(step)["tokens"]:
      starts = [s for s in range(len(ids) - window + 1) if np.array_equal(ids[s:s + window], row)]
      assert any(not held[s:s + window].any() for s in starts)


@pytest.mark.parametrize("changes, says", [
    ({"data.eval_split": "train"}, "data.eval_split='train'"),
    ({"data.eval_split": "test", "data.test_fraction": 0.0}, "data.test_fraction=0.0"),
    ({"data.tokenizer": "/nowhere/tokenizer.json"}, "data.tokenizer='/nowhere/tokenizer.json'"),
    ({"data.tokenizer": ""}, "data.tokenizer=''"),
    ({"model.max_len": 4000}, "give no window of model.max_len + 1"),
])
def test_bad_settings_are_data_errors_naming_the_key(text_file, changes, says):
  with pytest.raises(DataError, match=says.replace("+", r"\+").replace("(", r"\(")):
    data_lib.build(_config(text_file, **changes))
