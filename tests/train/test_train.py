"""train_and_evaluate end to end: one real step per model family, outputs, NaN stop, optimizer rules."""

import json
import math

import jax
import numpy as np
import pytest
from helpers_train import tiny

from vlora_jax.runs import checkpoint_format
from vlora_jax.train import NonFiniteLossError, optim, train_and_evaluate


@pytest.mark.parametrize("family", ["vit", "lm", "seq2seq"])
def test_one_real_step_per_family(family, tmp_path):
  summary = train_and_evaluate(tiny(family, num_train_steps=1), tmp_path)
  assert summary["step"] == 1
  assert summary["params_total"] > 0 and summary["params_trainable"] == summary["params_total"]
  # VLoRA (compound 2, rank 2): fewer parameters than the dense twin of the same architecture.
  assert summary["params_dense_equivalent"] > summary["params_total"]
  assert math.isfinite(summary["eval/loss"]) and 0 <= summary["eval/accuracy"] <= 1
  assert math.isfinite(summary["train/loss"])
  # The step learned from the batch: its loss moved off the uniform guess's, and the run's
  # metrics file holds the same step's loss.
  metrics = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  first = next(m for m in metrics if "train/loss" in m)
  assert first["train/loss"] == pytest.approx(summary["train/loss"])
  assert summary["train/loss"] > 0 and "train/grad_norm" in first and first["train/grad_norm"] > 0
  saved = json.loads((tmp_path / "summary.json").read_text())
  assert saved["step"] == 1 and saved["eval/loss"] == pytest.approx(summary["eval/loss"])
  if family == "lm":  # characters: bits per character are bits per token, the loss / ln 2
    assert "eval/perplexity" in summary and "test/perplexity" in summary
    for split in ("eval", "test"):
      assert summary[f"{split}/bits_per_char"] == pytest.approx(
          summary[f"{split}/loss"] / math.log(2))
      assert summary[f"{split}/bits_per_token"] == summary[f"{split}/bits_per_char"]
  if family == "seq2seq":
    assert 0 <= summary["eval/seq_accuracy"] <= 1  # real greedy decoding
    assert 0 <= summary["eval/seq_accuracy_teacher_forced"] <= 1
  # the last step is always checkpointed, with the layout of every stack
  meta = checkpoint_format.meta_at(str(tmp_path))
  assert meta["step"] == 1 and meta["layout"]
  for layout in meta["layout"].values():
    assert layout["vlora"]["compound_size"] == 2


def test_outputs_metrics_tensorboard_and_resume_of_a_finished_run(tmp_path):
  c = tiny("vit", num_train_steps=4, log_every_steps=2, eval_every_steps=2, tensorboard=True,
           **{"checkpoint.keep_best": 1, "checkpoint.every_steps": 2})
  s = train_and_evaluate(c, tmp_path)
  rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  train_rows = [r for r in rows if "train/loss" in r]
  eval_rows = [r for r in rows if "eval/accuracy" in r]
  assert [r["step"] for r in train_rows] == [2, 4] and [r["step"] for r in eval_rows] == [2, 4]
  for key in ("train/grad_norm", "train/update_norm", "train/param_norm", "train/lr"):
    assert all(math.isfinite(r[key]) for r in train_rows), key
  assert train_rows[-1]["train/examples_per_sec"] > 0
  assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
  assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [2, 4]
  assert len([p for p in (tmp_path / "best").iterdir() if p.name.isdigit()]) == 1
  for key in ("wall_time_s", "examples_per_sec", "params_total", "params_trainable"):
    assert s[key] > 0, key
  # a finished run resumes at its last step, trains nothing and reports the same eval
  again = train_and_evaluate(c, tmp_path)
  assert again["start_step"] == 4 and again["step"] == 4
  assert again["eval/accuracy"] == pytest.approx(s["eval/accuracy"])


def test_stops_on_nan_naming_step_and_last_good_checkpoint(tmp_path):
  c = tiny("vit", num_train_steps=2, **{"checkpoint.every_steps": 1})
  train_and_evaluate(c, tmp_path)
  # resume with an absurd learning rate: step 3's update overflows the parameters
  bad = tiny("vit", num_train_steps=4, **{"checkpoint.every_steps": 1, "optim.lr": 1e30,
                                          "optim.warmup_steps": 0,
                                          "optim.schedule": "constant"})
  with pytest.raises(NonFiniteLossError, match=r"step 3 .*Last good checkpoint: .*checkpoints/2"):
    train_and_evaluate(bad, tmp_path)
  steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert steps == [1, 2]  # nothing non-finite was written
  params = checkpoint_format.read_path(str(tmp_path))["params"]
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_freeze_gets_no_optimizer_state_and_does_not_move_in_bf16(tmp_path):
  # train only the increments and the head: base, per-layer and stem weights frozen
  # ... in mixed precision: bfloat16 compute, float32 parameters and optimizer state
  c = tiny("vit", num_train_steps=2,
           **{"optim.freeze": r"(?!(blocks/inc_[ab]/|head/)).*", "optim.lr_mults":
              ((r".*/inc_[ab]/.*", 2.0),), "checkpoint.every_steps": 1,
              "model.dtype": "bfloat16"})
  s = train_and_evaluate(c, tmp_path / "run")
  assert 0 < s["params_trainable"] < s["params_total"]
  first = checkpoint_format.read_path(str(tmp_path / "run" / "checkpoints" / "1"),
                                      params_only=False)
  last = checkpoint_format.read_path(str(tmp_path / "run"), params_only=False)
  flat0 = optim.paths(first["params"])
  flat1 = optim.paths(last["params"])
  assert all(v.dtype == np.float32 for v in flat1.values())
  assert math.isfinite(s["train/loss"])
  moved = {k for k in flat1 if not np.array_equal(flat0[k], flat1[k])}
  assert moved and all(k.startswith(("blocks/inc_a", "blocks/inc_b", "head/")) for k in moved)
  # Adam moments exist for the trainable leaves only (frozen leaves hold no state)
  n_state = sum(x.size for x in jax.tree.leaves(last["opt_state"]) if x.ndim)
  assert n_state == 2 * s["params_trainable"]


def test_optimizer_groups_and_schedule():
  params = {"blocks": {"inc_a": {"w": np.zeros((2, 3))}, "base": {"w": np.zeros((3,))}},
            "head": {"bias": np.zeros((3,)), "kernel": np.zeros((3, 3))}}
  import ml_collections
  o = ml_collections.ConfigDict(dict(lr=1.0, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1,
                                     freeze=r"blocks/base/.*", lr_mults=((r".*/inc_[ab]/.*", 3.0),),
                                     wd_mults=((r".*bias", 0.0),), weight_decay=0.1))
  labels, mults = optim.groups(params, o)
  assert labels["blocks"]["base"]["w"] == optim.FROZEN
  assert mults[labels["blocks"]["inc_a"]["w"]] == (3.0, 1.0)
  assert mults[labels["head"]["bias"]] == (1.0, 0.0)
  sched = optim.schedule(o, 110)
  assert float(sched(0)) == 0.0 and float(sched(10)) == pytest.approx(1.0)
  assert float(sched(110)) == pytest.approx(0.1)


def test_one_step_on_mocked_tfds_cifar10(tmp_path):
  import tensorflow_datasets as tfds
  from vlora_jax.train import load_config
  c = load_config("configs/vit_cifar10.py:small", lock=False)
  small = tiny("vit")
  c.model.update({k: small.model[k] for k in ("dim", "depth", "num_heads")})
  c.model.patch_size = 8
  c.model.vlora.update(compound_size=2, rank=2)
  c.update(batch_size=8, eval_batch_size=8, num_train_steps=1, progress=False, tensorboard=False)
  c.checkpoint.keep_best = 0
  with tfds.testing.mock_data(num_examples=16):
    s = train_and_evaluate(c, tmp_path)
  assert s["step"] == 1 and math.isfinite(s["eval/loss"])
