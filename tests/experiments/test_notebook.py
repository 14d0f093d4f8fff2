"""experiments/ablations.ipynb run at reduced size; experiments/plots.py on synthetic rows."""

from __future__ import annotations

import json
import math
import os
import shutil

import pytest
from helpers_train import ROOT

from experiments import plots

NOTEBOOK = ROOT / "experiments" / "ablations.ipynb"


# ---------------------------------------------------------------------------------------------
# plots.py


def test_pareto_front_higher_is_better():
  pts = [(30, 0.70), (10, 0.50), (20, 0.40), (30, 0.60), (40, 0.65), (50, 0.70), (5, None),
         (60, math.nan), (15, 0.50)]
  # (15, .50) ties (10, .50): not better, so not on the front; at 30 the better .70 counts once;
  # (50, .70) only equals it. Sorting by cost first matters: the input is out of order.
  assert plots.pareto_front(pts) == [(10, 0.50), (30, 0.70)]


def test_pareto_front_lower_is_better():
  pts = [(30, 1.2), (10, 2.0), (20, 1.5), (25, 1.7), (40, 1.2), (40, 0.9)]
  assert plots.pareto_front(pts, lower_is_better=True) == [(10, 2.0), (20, 1.5), (30, 1.2),
                                                           (40, 0.9)]
  # the same points read as "higher is better": only the cheapest is on the front
  assert plots.pareto_front(pts) == [(10, 2.0)]
  assert plots.pareto_front([]) == []


def _row(variant, seed, value, params, rank=None, s=None, depth=4, metric="eval/accuracy", **kw):
  return {"id": f"toy/{variant}_r{rank}_s{s}_L{depth}/seed{seed}", "dataset": "toy",
          "variant": variant, "rank": rank, "s": s, "depth": depth, "seed": seed, "metric": metric,
          metric: value, "params_total": params, "params_dense_equivalent": 1000 * depth,
          "train_time_s": 1.0, **kw}


def _toy_rows():
  rows = [_row("dense", seed, 0.90 + 0.01 * seed, 1000 * d, depth=d) for seed in (0, 1, 2)
          for d in (4, 8)]
  for r in (2, 4, 8):
    for s in (2, 4):
      for seed in (0, 1):
        rows.append(_row("cumulative", seed, 0.80 + 0.01 * r / s + 0.02 * seed, 100 * r + 1000 / s,
                         rank=r, s=s))
  rows.append(_row("anchored", 0, 0.85, 900, rank=8, s=4, init="zero_b"))
  rows.append(_row("anchored", 0, None, 950, rank=4, s=4))  # a run without its metric: dropped
  return rows


def test_aggregate_means_stds_extras_and_dedupe():
  rows = _toy_rows()
  groups = plots.aggregate(rows)
  dense4 = next(g for g in groups if g["variant"] == "dense" and g["depth"] == 4)
  assert dense4["n"] == 3 and dense4["mean"] == pytest.approx(0.91)
  assert dense4["std"] == pytest.approx(0.01)  # sample std of .90/.91/.92
  zero_b = next(g for g in groups if g["extras"])
  assert zero_b["label"] == "anchored (init=zero_b)" and zero_b["n"] == 1 and zero_b["std"] == 0
  assert not any(g["variant"] == "anchored" and g["rank"] == 4 for g in groups)
  # the same point and seed from a second sweep is counted once
  assert len(plots.dedupe(rows + rows[:3], log=lambda *_: None)) == len(rows)
  # ... but a shortened run of the same point is another point: neither dropped nor averaged in
  short = [{**r, "step": 200, "eval/accuracy": 0.5} for r in rows[:3]]
  long = [{**r, "step": 1000} for r in rows[:3]]
  assert len(plots.dedupe(long + short, log=lambda *_: None)) == 6
  means = sorted(g["mean"] for g in plots.aggregate(long + short))
  assert means == pytest.approx([0.5, 0.5, 0.9, 0.905])  # L4 and L8, short and long


def test_plots_and_cli_on_partial_rows(tmp_path):
  rows = _toy_rows()
  for fn in plots.PLOTS.values():
    assert fn(rows) is not None
  one_s = [r for r in rows if r["s"] in (None, 4)]
  assert plots.plot_compound(one_s) is None  # one compound size: nothing to compare
  assert plots.plot_params([]) is None
  loss = [_row("dense", 0, 1.5, 4000, metric="eval/loss"),
          _row("anchored", 0, 1.9, 1000, rank=2, s=4, metric="eval/loss")]
  assert plots.plot_params(loss) is not None
  with pytest.raises(ValueError, match="datasets"):
    plots.plot_params(rows + [{**rows[0], "dataset": "other"}])
  assert "| toy | anchored (init=zero_b) | 8 | 4 | 4 |  | 900 | 22% | 0.8500 | 1 |" in plots.table(
      rows)
  assert "| toy | dense |  |  | 4 |  | 4,000 | 100% | 1.5000 | 1.5000 | 1 | 1.0 |" in plots.table(
      loss, also=("eval/loss",))

  (tmp_path / "a.json").write_text(json.dumps(rows))
  (tmp_path / "b.json").write_text(json.dumps(loss))  # dataset "toy" again, another metric
  out = tmp_path / "plots"
  assert plots.main(["--results", str(tmp_path / "a.json"), str(tmp_path / "missing.json"),
                     "--out", str(out), "--prefix", "x_"]) == 0
  assert sorted(p.name for p in out.iterdir()) == ["x_toy_params.png", "x_toy_rank.png",
                                                    "x_toy_s.png"]
  assert (out / "x_toy_params.png").read_bytes()[:4] == b"\x89PNG"
  assert plots.main(["--results", str(tmp_path / "missing.json"), "--out", str(out)]) == 1


# ---------------------------------------------------------------------------------------------
# The notebook, at 2 ranks x 1 depth x 1 compound size + dense, 60 steps.

REDUCED = """\
STEPS = 60
RANKS = (2, 4)
COMPOUND_SIZES = (4,)
DEPTHS = (4,)
MODE = "cumulative"
DENSE = True
SEED = 0
WORKDIR = {workdir!r}
OUT_DIR = {out_dir!r}
HEAL_BUDGET = 0.5
HEAL_STEPS = 5
"""


@pytest.mark.slow
def test_ablations_notebook_runs_at_reduced_size(tmp_path, monkeypatch):
  # Its kernel imports configs/ and experiments/ from the repository, which is not installed.
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  # A copy in a temp dir, run there: nothing is written into the checkout.
  nb_path = tmp_path / "ablations.ipynb"
  shutil.copy(NOTEBOOK, nb_path)
  nb = nbformat.read(nb_path, as_version=4)
  cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
  assert len(cells) == 1, "the notebook needs exactly one cell tagged 'parameters'"
  names = {line.split("=")[0].strip() for line in cells[0].source.splitlines()
           if "=" in line and not line.startswith("#")}
  reduced = REDUCED.format(workdir=str(tmp_path / "runs"), out_dir=str(tmp_path / "plots"))
  assert names == {line.split("=")[0].strip() for line in reduced.splitlines()}, (
      "the parameters cell and the reduced one name different parameters")
  cells[0].source = reduced

  nbclient.NotebookClient(nb, timeout=240, kernel_name="python3",
                          resources={"metadata": {"path": str(tmp_path)}}).execute()
  nbformat.write(nb, tmp_path / "executed.ipynb")  # for a look when it fails

  text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                 for o in c.get("outputs", []))
  assert "3 runs" in text, text[-2000:]
  images = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if "image/png" in o.get("data", {})]
  assert len(images) == 3  # params, rank, loss vs params; one compound size: that plot is skipped
  assert "s: skipped" in text
  assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == [
      "ablations_nb_digits_params.png", "ablations_nb_digits_rank.png"]

  rows = json.loads((tmp_path / "runs" / "60steps" / "results.json").read_text())
  assert {(r["variant"], r["rank"]) for r in rows} == {("dense", None), ("cumulative", 2),
                                                       ("cumulative", 4)}
  dense = next(r for r in rows if r["variant"] == "dense")
  for r in rows:
    assert r["step"] == 60 and 0.0 <= r["eval/accuracy"] <= 1.0
    assert r["eval/accuracy"] > 0.3, r  # chance is 0.1; 60 steps reach ~0.6-0.8
    assert r["params_dense_equivalent"] == dense["params_total"]
    if r["variant"] != "dense":
      assert r["params_total"] < dense["params_total"]
