"""What a finished run holds for the researcher: periodic evals and best/ on the validation split,
the test split once at the end, config.json, the step-0 metrics of a run started from given
weights, a refused step-count change with the way to train further, and vlora-compare."""

from __future__ import annotations

import json
import math
import types

import pytest
from helpers_train import tiny

import vlora_jax
from vlora_jax import compare, errors
from vlora_jax.evaluate import evaluate
from vlora_jax.train import evaluation, setup, train_and_evaluate

STEPS = 4


def _rows(workdir) -> list[dict]:
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("front_door")
  c = tiny("vit", num_train_steps=STEPS, eval_every_steps=2, **{
      "checkpoint.every_steps": 2, "checkpoint.keep_best": 1, "data.eval_examples": 0})
  a = train_and_evaluate(c, tmp / "a")
  more = tiny("vit", num_train_steps=2, init_from=f"checkpoint:{tmp / 'a'}",
              **{"data.eval_examples": 0})
  b = train_and_evaluate(more, tmp / "b")
  return types.SimpleNamespace(tmp=tmp, a=a, b=b, config=c)


def test_periodic_evals_read_validation_and_the_test_split_is_read_once(runs):
  s, workdir = runs.a, runs.tmp / "a"
  assert s["eval_split"] == "validation"
  rows = _rows(workdir)
  assert [r["step"] for r in rows if "eval/accuracy" in r] == [2, 4]
  assert [r["step"] for r in rows if "test/accuracy" in r] == [STEPS]  # once, at the end
  info = vlora_jax.load(workdir).info
  split = info["split"]  # digits: 1,438 train images, 10% of them validate (seeded)
  assert info["eval_split"] == "validation" and split["seed"] == 0
  assert (split["train"], split["validation"], split["test"]) == (1294, 144, 359)
  # eval/* is the validation split's and test/* the test split's: evaluate gives each again
  val = evaluate(workdir, out=runs.tmp / "val.json")
  test = evaluate(workdir, overrides={"data.eval_split": "test"}, out=runs.tmp / "test.json")
  assert val["eval_examples"] == 144 and test["eval_examples"] == 359
  assert val["metrics"]["eval/loss"] == pytest.approx(s["eval/loss"], rel=1e-6)
  assert test["metrics"]["eval/loss"] == pytest.approx(s["test/loss"], rel=1e-6)
  assert s["eval/loss"] != s["test/loss"]
  # best/ holds the step the validation metric ranks first
  best = vlora_jax.load(workdir, step="best")
  by_step = {r["step"]: r["eval/accuracy"] for r in rows if "eval/accuracy" in r}
  assert by_step[best.step] == max(by_step.values())


def test_every_workdir_has_its_config_as_json(runs):
  stored = json.loads((runs.tmp / "a" / "config.json").read_text())
  assert stored == json.loads(runs.config.to_json_best_effort())
  assert stored["data"]["eval_split"] == "validation"


def test_a_run_from_given_weights_records_them_at_step_0(runs):
  a, b = runs.a, runs.b
  assert b["origin"].startswith("init_from checkpoint:")
  for key in ("eval/loss", "eval/accuracy", "test/loss", "test/accuracy"):
    assert b[f"init/{key}"] == pytest.approx(a[key], rel=1e-6), key
  first = _rows(runs.tmp / "b")[0]
  assert first["step"] == 0 and "eval/loss" in first and "test/loss" in first
  assert "init/eval/loss" not in a  # a run from scratch has no such figures


def test_more_steps_for_a_finished_run_are_refused_with_the_way(runs):
  more = runs.config.copy_and_resolve_references()
  more.num_train_steps = 2 * STEPS
  with pytest.raises(errors.ConfigError,
                     match=rf"num_train_steps={2 * STEPS}: .* finished its num_train_steps="
                           rf"{STEPS}.*--config.init_from=checkpoint:{runs.tmp / 'a'}"):
    train_and_evaluate(more, runs.tmp / "a")
  stored = {"config": {"num_train_steps": STEPS}}
  setup.check_more_steps(more, runs.tmp / "a", stored, step=STEPS - 1)  # unfinished: a resume
  more.optim.schedule = "constant"  # its rate does not depend on the step count: it continues
  setup.check_more_steps(more, runs.tmp / "a", stored, step=STEPS)


def test_compare_tabulates_the_runs_and_plots_their_curves(runs, capsys):
  compare.main([str(runs.tmp / "a"), str(runs.tmp / "b"), "--plot", str(runs.tmp / "c.png")])
  out = capsys.readouterr().out
  table, diffs = out.split("config differences:")
  header = table.splitlines()[0]
  for column in ("params_total", "eval/accuracy", "test/accuracy", "init/eval/accuracy",
                 "wall_time_s"):
    assert column in header, column
  assert "| a " in table and "| b " in table
  assert "init_from" in diffs and "num_train_steps" in diffs and "seed" not in diffs
  assert (runs.tmp / "c.png").stat().st_size > 1000
  with pytest.raises(SystemExit) as e:  # an extension no image format has: one line, exit 2
    compare.main([str(runs.tmp / "a"), "--plot", str(runs.tmp / "c.xyz")])
  assert e.value.code == 2 and "allowed are" in capsys.readouterr().err
  assert not list(runs.tmp.glob("*c.xyz*"))
  result = compare.compare([runs.tmp / "a"])
  assert result["runs"][0]["test/accuracy"] == runs.a["test/accuracy"]
  with pytest.raises(compare.CompareError, match="no run's workdir"):
    compare.compare([runs.tmp / "nothing"])


def test_bits_per_character_and_per_token():
  loss = 2 * math.log(2)  # 2 bits
  info = {"kind": "text", "chars_per_token": {"validation": 1.0, "test": 4.0}}
  assert evaluation.bits({"eval/loss": loss}, info, "eval", "validation") \
      == pytest.approx({"eval/bits_per_token": 2.0, "eval/bits_per_char": 2.0})
  assert evaluation.bits({"test/loss": loss}, info, "test", "test") \
      == pytest.approx({"test/bits_per_token": 2.0, "test/bits_per_char": 0.5})
  assert evaluation.bits({"eval/loss": loss}, {"kind": "text"}, "eval", "validation") \
      == pytest.approx({"eval/bits_per_token": 2.0})  # characters per token unknown
  assert evaluation.bits({"eval/loss": loss}, {"kind": "images"}, "eval", "validation") == {}
