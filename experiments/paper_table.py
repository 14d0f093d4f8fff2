"""The paper table: dense vs VLoRA on real data, mean ± std over seeds, from the paper_* sweeps.

  python -m experiments.sweep --sweep paper      # trains (resumable; 210 runs, ~12.5 h on 2 cores)
  python -m experiments.paper_table --out experiments/results/paper_table

Reads ``<root>/paper_*/results.json`` (written by experiments/sweep.py) and writes
``<out>.json`` (every run, and the aggregated rows) and ``<out>.md`` (the table in the README).
Columns: parameters, ratio to the dense model, test metric mean ± std over seeds (accuracy in %,
or for the char LM the validation loss in nats per character, as ``summary.json`` and the plots
report it), the difference to dense, the same
metric on the last training batches (fit vs generalisation), and the training time per run
(compile and eval excluded). The targets of the claim are checked per data set, at one budget for
every task: the best VLoRA row at <= 30% of the dense parameters within 1.0 point of dense accuracy,
or for the LM a validation loss within 2% of dense.

``--from-json results/paper_table.json`` renders again from the runs a previous table recorded.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

from configs import sweeps  # noqa: E402

ORDER = {"dense": 0, "anchored": 1, "cumulative": 2, "tied": 3}


def _value(row: dict, split: str = "eval") -> float | None:
  """The reported metric: accuracy in %, or nats per character; ``split`` eval (test) or train.

  The train figure is the trainer's last logging window (augmented batches, dropout on): a
  measure of how well a model fits its training data, beside how well it generalises.
  """
  if row["metric"] == "eval/loss":
    return row.get(f"{split}/loss")
  acc = row.get(f"{split}/accuracy")
  return None if acc is None else 100 * acc


def aggregate(rows: list[dict]) -> list[dict]:
  """One line per (dataset, variant, rank): mean/std over seeds, ratio and delta to dense."""
  groups = defaultdict(list)
  for r in rows:
    groups[(r["dataset"], r["variant"], r["rank"])].append(r)
  out = []
  for (ds, variant, rank), rs in groups.items():
    vals = [_value(r) for r in rs]
    train = [_value(r, "train") for r in rs]
    out.append({"dataset": ds, "variant": variant, "rank": rank, "seeds": len(rs),
                "metric": rs[0]["metric"], "params": rs[0]["params_total"],
                "dense_params": rs[0]["params_dense_equivalent"],
                "mean": statistics.mean(vals),
                "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                "train_mean": statistics.mean(train) if None not in train else None,
                # median: a run slowed by other work on the machine does not skew it
                "train_time_s": statistics.median(r["train_time_s"] for r in rs)})
  dense = {a["dataset"]: a for a in out if a["variant"] == "dense"}
  for a in out:
    a["ratio"] = a["params"] / a["dense_params"]
    d = dense.get(a["dataset"])
    a["delta"] = a["mean"] - d["mean"] if d else None
  out.sort(key=lambda a: (list(sweeps.DATASETS).index(a["dataset"]), ORDER.get(a["variant"], 9),
                          a["rank"] or 0))
  return out


def targets(agg: list[dict]) -> list[dict]:
  """The claim, per data set: the best VLoRA line within budget, against dense."""
  res = []
  for ds in dict.fromkeys(a["dataset"] for a in agg):
    lines = [a for a in agg if a["dataset"] == ds]
    dense = next((a for a in lines if a["variant"] == "dense"), None)
    vl = [a for a in lines if a["variant"] != "dense"]
    if not dense or not vl:
      continue
    cands = [a for a in vl if a["ratio"] <= 0.30]
    if dense["metric"] == "eval/loss":  # lower is better; within 2% of dense
      best = min(cands or vl, key=lambda a: a["mean"])
      ok = bool(cands) and best["mean"] <= dense["mean"] * 1.02
      rule = "validation loss within 2% of dense at <= 30% of its parameters"
      gap = f"{100 * (best['mean'] / dense['mean'] - 1):+.1f}%"
    else:
      best = max(cands or vl, key=lambda a: a["mean"])
      ok = bool(cands) and best["delta"] >= -1.0
      rule = "accuracy within 1.0 point of dense at <= 30% of its parameters"
      gap = f"{best['delta']:+.2f} points"
    res.append({"dataset": ds, "rule": rule, "best": f"{best['variant']} r{best['rank']}",
                "ratio": best["ratio"], "gap": gap, "met": ok})
  return res


def markdown(agg: list[dict], tgt: list[dict]) -> str:
  lines = ["| data set | model | params | ratio | test metric (mean ± std) | vs dense | "
           "train metric (mean) | seeds | train s/run (median) |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
  for a in agg:
    unit = "nats/char" if a["metric"] == "eval/loss" else "%"
    model = "dense" if a["variant"] == "dense" else f"VLoRA {a['variant']} r{a['rank']}"
    delta = "" if a["delta"] is None or a["variant"] == "dense" else f"{a['delta']:+.2f}"
    train = "" if a["train_mean"] is None else f"{a['train_mean']:.2f}"
    lines.append(f"| {a['dataset']} | {model} | {a['params']:,} | {a['ratio']:.1%} | "
                 f"{a['mean']:.2f} ± {a['std']:.2f} {unit} | {delta} | {train} | {a['seeds']} | "
                 f"{a['train_time_s']:.0f} |")
  lines += ["", "| data set | target | best VLoRA | ratio | vs dense | met |",
            "|---|---|---|---:|---:|---|"]
  for t in tgt:
    lines.append(f"| {t['dataset']} | {t['rule']} | {t['best']} | {t['ratio']:.1%} | {t['gap']} | "
                 f"{'yes' if t['met'] else 'no'} |")
  lines += ["", "The train metric is the trainer's last logging window (augmented batches, dropout "
            "on), in the test metric's unit: where VLoRA trails dense on both, it fits its "
            "training data less (capacity, optimisation); where only on test, it generalises less.",
            "", "Train times come from runs made over several sessions on a shared 2-core machine, "
            "some before a faster train step (the flat dots of benchmarks/results/perf_notes.md): "
            "read them as rough costs, not as a speed comparison.",
            "", "What each data set trains (configs/sweeps.py):", ""]
  for ds in dict.fromkeys(a["dataset"] for a in agg):
    lines.append(f"- {ds}: {sweeps.DATASETS[ds][3]}")
  return "\n".join(lines) + "\n"


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--root", default=str(ROOT / "runs" / "sweeps"))
  ap.add_argument("--out", default=str(ROOT / "experiments" / "results" / "paper_table"))
  ap.add_argument("--from-json", help="render from the runs of this earlier paper_table.json")
  args = ap.parse_args()
  rows = []
  if args.from_json:
    rows = json.loads(Path(args.from_json).read_text())["runs"]
  for name in () if args.from_json else sweeps.PAPER:
    f = Path(args.root) / name / "results.json"
    if f.exists():
      rows += json.loads(f.read_text())
  if not rows:
    sys.exit(f"no results under {args.root}: run python -m experiments.sweep --sweep paper first")
  agg = aggregate(rows)
  tgt = targets(agg)
  md = markdown(agg, tgt)
  out = Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.with_suffix(".md").write_text(md)
  out.with_suffix(".json").write_text(json.dumps({"rows": agg, "targets": tgt, "runs": rows},
                                                 indent=1))
  print(md)


if __name__ == "__main__":
  main()
