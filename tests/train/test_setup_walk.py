"""A run's set-up walks once (issue 27): the config is resolved (``compress.budget``'s ranks) before
the one check, the model is built once, and every source run (a dense run to compress, a teacher)
is opened and loaded at most once, through the whole of ``train_and_evaluate``.

The spies count calls by what they read: ``validate.check``; the builds of this run's model:
`validate.Plan.build_model` (``build``), and any other family build from this run's
``config.model`` (``module``); and the reads of each run's checkpoints (`trained.open_checkpoint`:
a meta; `trained.load` / `load_step`: the parameters), split into the run's own workdir and the
source run's.

Before the resolution phase (issue 27), a budget run checked its config twice and built its model
four times (the plan's model again once the budget set the ranks; the budget's and the
compression's own modules), and opened and loaded the dense run twice, three times when it was
also the teacher; without a budget, that teacher-and-source run was opened three times and loaded
twice, and the compression built its own module.
"""

import json
from collections import Counter
from pathlib import Path

import pytest
from helpers_runs import stored_run
from helpers_train import tiny

from vlora_jax.runs import trained
from vlora_jax.models.family import Family
from vlora_jax.train import train_and_evaluate, validate


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
  """A dense run's checkpoint (drawn parameters, nothing trained): a source to compress and a
  teacher."""
  config = tiny("vit", **{"model.vlora.enabled": False})
  return stored_run(tmp_path_factory.mktemp("walk") / "dense", config, steps=(3,))


@pytest.fixture
def calls(monkeypatch, dense):
  """``Counter`` of the calls set-up and start make, keyed ``(what, whose)``."""
  got = Counter()

  def whose(path) -> str:
    p = Path(path).resolve()
    return "dense" if p == dense.resolve() or dense.resolve() in p.parents else "own"

  def spy(owner, name, key):
    real = getattr(owner, name)

    def wrapped(*args, **kwargs):
      got[key(*args, **kwargs)] += 1
      return real(*args, **kwargs)
    monkeypatch.setattr(owner, name, wrapped)

  spy(validate, "check", lambda *a, **k: ("check", "own"))
  spy(validate.Plan, "build_model", lambda *a, **k: ("build", "own"))
  # A model config of the student's (VLoRA on) or the dense run's: set-up builds from a complete
  # copy of the caller's config, so identity would not tell them apart.
  spy(Family, "build_from_config",
      lambda fam, mcfg: ("family_build", "own" if mcfg.vlora.enabled else "dense"))
  spy(trained, "open_checkpoint", lambda wd, *a, **k: ("open", whose(wd)))
  spy(trained, "load", lambda wd, *a, **k: ("load", whose(wd)))
  spy(trained, "load_step", lambda step_dir, *a, **k: ("load", whose(step_dir)))
  return got


def _walk(calls, config, workdir) -> dict:
  """The counts of one ``train_and_evaluate``, ``{'what/whose': calls}``."""
  summary = train_and_evaluate(config, workdir)
  out = Counter()
  for (what, whose), n in calls.items():
    if what == "family_build":
      if whose == "own":
        out[("module", "own")] += n
      continue
    out[(what, whose)] += n
  out = {f"{what}/{whose}": n for (what, whose), n in sorted(out.items())}
  print(out)
  return summary, out


# One check and one model; the dense run opened (its meta) and loaded (its arrays) once. The one
# other module: the budget's, built at the configured ranks to read the stacks' specs and check
# the dense twin (constructed, never initialised; the specs live on the module): the minimum.
BUDGET = {"check/own": 1, "build/own": 1, "module/own": 1, "open/own": 1, "open/dense": 1,
          "load/dense": 1}


def _student(dense, **overrides):
  return tiny("vit", **{"num_train_steps": 1, "data.eval_examples": 32, **overrides})


def test_a_plain_run_checks_and_builds_once(calls, dense, tmp_path):
  _, got = _walk(calls, _student(dense), tmp_path / "plain")
  # The one open: whether the workdir holds a checkpoint to resume.
  assert got == {"check/own": 1, "build/own": 1, "open/own": 1}


def test_a_budget_compressed_run_resolves_before_the_one_check(calls, dense, tmp_path):
  config = _student(dense, **{"init_from": f"compress:{dense}", "compress.budget": 0.75})
  summary, got = _walk(calls, config, tmp_path / "budget")
  assert summary["origin"] == f"init_from compress:{dense}"
  # The resolved ranks, one per target, are what the run stores; the caller's config is its own.
  stored = json.loads((tmp_path / "budget" / "config.json").read_text())
  assert isinstance(stored["model"]["vlora"]["rank"], list)
  assert config.model.vlora.rank == tiny("vit").model.vlora.rank
  assert got == BUDGET


@pytest.mark.parametrize("budget", [0.75, 0.0])
def test_a_dense_run_that_is_the_source_and_the_teacher_is_read_once(calls, dense, tmp_path,
                                                                     budget):
  config = _student(dense, **{"init_from": f"compress:{dense}", "compress.budget": budget,
                              "distill.teacher": str(dense)})
  summary, got = _walk(calls, config, tmp_path / "heal")
  assert summary["origin"] == f"init_from compress:{dense}"
  # Without a budget, the dense twin is checked against the run's own model: no other module.
  assert got == (BUDGET if budget else {k: n for k, n in BUDGET.items() if k != "module/own"})
