"""Plots of sweep results: the metric against parameter count (with the Pareto front), rank and
compound size.

  python -m experiments.plots --results runs/sweeps/ablate_digits/results.json \
      --out experiments/results/plots/
  python -m experiments.plots --results runs/sweeps/paper_*/results.json --out /tmp/plots

Reads the rows that ``experiments/sweep.py`` writes to ``<root>/<sweep>/results.json``: one row per
finished run, with its tags (dataset, variant, rank, s, depth, seed, metric, and any extra VLoRA
keys such as ``init``) and its summary figures (``eval/accuracy``, ``params_total``, ...). Each
dataset gets up to three PNGs, ``<prefix><dataset>_{params,rank,s}.png``:

  params  the metric against parameter count (log x), one marker and colour per variant, mean over
          seeds with std error bars, dense models highlighted, and the Pareto front (the best
          metric reachable with at most that many parameters) as a step line
  rank    the metric against rank: one line per variant x compound size x depth
  s       the metric against compound size: one line per variant x rank x depth

Every function takes a plain list of row dicts, so a notebook can call them on rows it trained
itself. Seeds of a point are averaged; the same point trained for another number of steps is
another point. A partial sweep plots what it has: rows without the metric are dropped, lines
connect the points that exist, and a figure with nothing to compare (one rank, one compound size)
is skipped.
Figures are ``matplotlib.figure.Figure`` objects built without pyplot: no global figure state and
no GUI backend, so they work the same under the CLI (Agg) and in a notebook.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Sequence

from matplotlib import colormaps
from matplotlib.figure import Figure

# Tags that name a point; with the trained steps and the extras (`group_key`) they make a point,
# and with the seed, a run.
TAGS = ("dataset", "variant", "rank", "s", "depth")
# Row keys that are neither tags nor extras: the seed, bookkeeping, and the summary figures that
# experiments/sweep.py keeps (KEEP there). Keys with a "/" (metrics) are figures too.
_NOT_EXTRA = frozenset({
    "id", "seed", "metric", "error", "step", "params_total", "params_trainable",
    "params_dense_equivalent", "params_groups", "train_time_s", "wall_time_s",
    "compile_train_step_s", "examples_per_sec", "tokens_per_sec",
    "revision", "config_hash"})  # what trained a row (experiments/sweep.py), not what it varies

_COLOURS = {"dense": "black", "anchored": "C0", "cumulative": "C1", "tied": "C2"}
_MARKERS = {"dense": "*", "anchored": "o", "cumulative": "s", "tied": "^"}
_SPARE_COLOURS = ("C3", "C4", "C5", "C6", "C7", "C8", "C9")
# With several variants in one line plot, a variant's lines are shades of its colour's map.
_MAPS = {"C0": "Blues", "C1": "Oranges", "C2": "Greens", "C3": "Reds", "C4": "Purples",
         "C5": "copper", "C6": "RdPu", "C7": "Greys", "C8": "YlGn", "C9": "GnBu"}
_LINESTYLES = ("-", "--", ":", "-.")


# ---------------------------------------------------------------------------------------------
# Rows: loading, metric, grouping over seeds.


def load(paths: Iterable[str | Path], log=print) -> list[dict]:
  """The rows of several ``results.json`` files (or ``paper_table.json``, whose ``runs`` are such
  rows), concatenated; duplicates dropped (see `dedupe`).

  A missing file is reported through ``log`` and skipped, so a partly run set of sweeps still plots.
  """
  rows = []
  for p in paths:
    p = Path(p)
    if not p.is_file():
      log(f"plots: {p} not found, skipped")
      continue
    data = json.loads(p.read_text())
    rows += data["runs"] if isinstance(data, dict) else data  # a paper_table.json keeps its runs
  return dedupe(rows, log=log)


def dedupe(rows: Sequence[dict], log=print) -> list[dict]:
  """Keeps the first row of each (point, seed).

  Two sweeps can train the same run (``paper_digits``' cumulative r2 s4 and ``ablate_digits``'
  cumulative r2 s4 at depth 4, seed 0, are one config); counting it twice would shrink the std.
  A point is its tags, extras and trained steps (`group_key`): runs that differ only in another
  override (say, the learning rate) look the same here, so plot such sweeps separately.
  """
  seen, out = set(), []
  for r in rows:
    key = (group_key(r), r.get("seed"))
    if key in seen:
      continue
    seen.add(key)
    out.append(r)
  if len(out) < len(rows):
    log(f"plots: {len(rows) - len(out)} duplicate row(s) (same point and seed) dropped")
  return out


def extras(row: dict) -> dict:
  """The row's tags beyond `TAGS`: VLoRA keys a sweep varies, e.g. ``{'init': 'zero_b'}``."""
  return {k: v for k, v in row.items()
          if k not in TAGS and k not in _NOT_EXTRA and "/" not in k
          and not isinstance(v, (dict, list))}


def label(row: dict) -> str:
  """The variant, with its extras: ``'anchored'``, ``'cumulative (init=zero_b)'``."""
  ex = extras(row)
  if not ex:
    return row["variant"]
  return f"{row['variant']} ({', '.join(f'{k}={v}' for k, v in sorted(ex.items()))})"


def group_key(row: dict) -> tuple:
  """What makes rows one point (its seeds): the tags, the trained steps and the extras.

  The steps count because a shortened sweep (``--override num_train_steps=300``, the notebook's
  200-step runs) has the same tags as the full one and must not be averaged with it.
  """
  return (*(row.get(k) for k in TAGS), row.get("step"), *sorted(extras(row).items()))


def metric_name(rows: Sequence[dict], metric: str | None = None) -> str:
  """``metric`` if given, else the rows' ``metric`` tag (which must agree across rows)."""
  if metric:
    return metric
  names = {r.get("metric") for r in rows} - {None}
  if len(names) != 1:
    raise ValueError(f"rows name {len(names)} metrics {sorted(names)}: pass metric= explicitly")
  return names.pop()


def lower_is_better(metric: str) -> bool:
  """Losses, perplexities and error rates go down; accuracies go up."""
  m = metric.lower()
  return any(w in m for w in ("loss", "perplexity", "ppl", "error"))


def _value(row: dict, metric: str) -> float | None:
  v = row.get(metric)
  if v is None or isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
    return None
  return float(v)


def aggregate(rows: Sequence[dict], metric: str | None = None) -> list[dict]:
  """Groups rows over seeds: one dict per point with ``mean``, ``std`` (sample std, 0 for one
  seed), ``n``, ``seeds``, ``params``, the tags, ``label`` and ``key`` (its `group_key`). Rows
  without the metric are left out.

  Returns:
    The points sorted by (label, steps, depth, s, rank); dense first.
  """
  metric = metric_name(rows, metric)
  groups = defaultdict(list)
  for r in rows:
    if _value(r, metric) is not None:
      groups[group_key(r)].append(r)
  out = []
  for rs in groups.values():
    vals = [_value(r, metric) for r in rs]
    n = len(vals)
    mean = sum(vals) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1)) if n > 1 else 0.0
    first = rs[0]
    params = next((r.get("params_total") for r in rs if r.get("params_total")), None)
    dense_eq = next((r.get("params_dense_equivalent") for r in rs
                     if r.get("params_dense_equivalent")), None)
    train = [r["train_time_s"] for r in rs if isinstance(r.get("train_time_s"), (int, float))]
    out.append({"key": group_key(first), **{k: first.get(k) for k in TAGS},
                "step": first.get("step"), "extras": extras(first), "label": label(first),
                "metric": metric, "mean": mean, "std": std, "n": n,
                "seeds": sorted(r.get("seed") for r in rs), "params": params,
                "params_dense_equivalent": dense_eq,
                "train_time_s": sum(train) / len(train) if train else None})
  out.sort(key=lambda g: (g["variant"] != "dense", g["label"], g["step"] or 0, g["depth"] or 0,
                          g["s"] or 0, g["rank"] or 0))
  return out


def by_dataset(rows: Sequence[dict]) -> dict[str, list[dict]]:
  """Splits rows by their ``dataset`` tag (the plot functions take one dataset at a time)."""
  out = defaultdict(list)
  for r in rows:
    out[r.get("dataset") or "?"].append(r)
  return dict(out)


# ---------------------------------------------------------------------------------------------
# The Pareto front.


def pareto_front(points: Iterable[tuple[float, float]],
                 lower_is_better: bool = False) -> list[tuple[float, float]]:
  """The points no cheaper-or-equal point beats: (params, metric) pairs sorted by params.

  A point is on the front when its metric is strictly better than that of every point with fewer
  parameters; of several points with the same parameter count only the best can be. Read as a step
  function (constant from one front point to the next), it gives the best metric reachable with at
  most that many parameters. Points with a missing or non-finite coordinate are ignored.
  """
  pts = [(float(x), float(y)) for x, y in points
         if x is not None and y is not None and math.isfinite(x) and math.isfinite(y)]
  sign = 1.0 if lower_is_better else -1.0  # minimise sign * y
  pts.sort(key=lambda p: (p[0], sign * p[1]))  # cheapest first; at equal cost, best first
  front, best = [], math.inf
  for x, y in pts:
    if sign * y < best:
      front.append((x, y))
      best = sign * y
  return front


# ---------------------------------------------------------------------------------------------
# Figures.


def _style(labels: Iterable[str]) -> dict[str, tuple[str, str, bool]]:
  """label -> (colour, marker, filled): fixed for the plain variants, spare colours for extras."""
  out, spare = {}, iter(_SPARE_COLOURS * 4)
  for lab in sorted(set(labels), key=lambda s: (" " in s, s)):
    variant = lab.split(" ")[0]
    if lab in _COLOURS:
      out[lab] = (_COLOURS[lab], _MARKERS[lab], True)
    else:  # an extra on a known variant keeps its marker, hollow, in a colour of its own
      out[lab] = (next(spare), _MARKERS.get(variant, "D"), variant not in _MARKERS)
  return out


def _ylabel(metric: str) -> str:
  return f"{metric} ({'lower' if lower_is_better(metric) else 'higher'} is better)"


def _seeds_note(points: Sequence[dict]) -> str:
  ns = sorted({g["n"] for g in points})
  n = str(ns[0]) if len(ns) == 1 else f"{ns[0]}-{ns[-1]}"
  return "1 seed" if ns == [1] else f"mean ± std over {n} seeds"


def _one_dataset(rows: Sequence[dict]) -> str:
  names = {r.get("dataset") for r in rows}
  if len(names) > 1:
    raise ValueError(f"rows of {len(names)} datasets {sorted(map(str, names))}: "
                     "split them with by_dataset() first")
  return names.pop() if names else "?"


def plot_params(rows: Sequence[dict], metric: str | None = None,
                title: str | None = None) -> Figure | None:
  """The metric against parameter count (log x) with the Pareto front; None without data."""
  if not rows:
    return None
  dataset = _one_dataset(rows)
  metric = metric_name(rows, metric)
  points = [g for g in aggregate(rows, metric) if g["params"]]
  if not points:
    return None
  fig = Figure(figsize=(7.5, 4.8), layout="constrained")
  ax = fig.add_subplot()
  styles = _style(g["label"] for g in points)
  depths = {g["depth"] for g in points}
  steps = {g["step"] for g in points}
  ss = {g["s"] for g in points if g["variant"] != "dense"}
  for lab, (colour, marker, filled) in styles.items():
    gs = [g for g in points if g["label"] == lab]
    dense = gs[0]["variant"] == "dense"
    ax.errorbar([g["params"] for g in gs], [g["mean"] for g in gs], yerr=[g["std"] for g in gs],
                fmt=marker, color=colour, ms=14 if dense else 6, capsize=3, ls="none",
                mfc=colour if filled else "none", mec="gold" if dense else colour,
                zorder=4 if dense else 3, label=lab)
    for g in gs:  # a short name on each point: which rank / size / depth it is
      name = g["variant"] if dense or g["rank"] is None else f"r{g['rank']}"
      if not dense and len(ss) > 1:
        name += f" s{g['s']}"
      if len(depths) > 1:
        name += f" L{g['depth']}"
      if len(steps) > 1:
        name += f" {g['step']}st"
      ax.annotate(name, (g["params"], g["mean"]), textcoords="offset points", xytext=(4, 4),
                  fontsize=6, color=colour)
  lib = lower_is_better(metric)
  front = pareto_front([(g["params"], g["mean"]) for g in points], lower_is_better=lib)
  if front:
    xmax = max(g["params"] for g in points)
    xs = [x for x, _ in front] + [xmax]
    ys = [y for _, y in front] + [front[-1][1]]
    ax.step(xs, ys, where="post", color="grey", lw=1.2, ls="--", zorder=2,
            label="Pareto front (best with ≤ this many params)")
  ax.set_xscale("log")
  ax.set_xlabel("parameters (params_total)")
  ax.set_ylabel(_ylabel(metric))
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=7, loc="best")
  ax.set_title(title or f"{dataset}: {metric} vs parameters ({_seeds_note(points)})", fontsize=10)
  return fig


def _lines(rows, metric, x_key, line_keys, title, xlabel, colour_by) -> Figure | None:
  """Shared body of `plot_rank` and `plot_compound`: one line per ``line_keys`` value."""
  if not rows:
    return None
  dataset = _one_dataset(rows)
  metric = metric_name(rows, metric)
  points = aggregate(rows, metric)
  vlora = [g for g in points if g["variant"] != "dense" and g[x_key] is not None]
  xs_all = sorted({g[x_key] for g in vlora})
  if len(xs_all) < 2:  # one rank (or one size): there is no line to draw
    return None
  fig = Figure(figsize=(7.5, 4.8), layout="constrained")
  ax = fig.add_subplot()
  styles = _style(g["label"] for g in vlora)
  depths = sorted({g["depth"] for g in points}, key=lambda d: d or 0)
  steps = {g["step"] for g in points}
  dstyle = {d: _LINESTYLES[i % len(_LINESTYLES)] for i, d in enumerate(depths)}
  cvals = sorted({g[colour_by] for g in vlora}, key=lambda v: v or 0)
  lines = defaultdict(list)
  for g in vlora:
    lines[tuple(g[k] for k in line_keys)].append(g)
  for key in sorted(lines, key=lambda k: tuple((0, v, "") if isinstance(v, (int, float))
                                               else (1, 0, str(v)) for v in k)):
    gs = sorted(lines[key], key=lambda g: g[x_key])
    g0 = gs[0]
    colour, marker, filled = styles[g0["label"]]
    i = cvals.index(g0[colour_by])
    if len(cvals) > 1 and len(styles) == 1:  # one variant: colour tells the other parameter
      colour = f"C{i % 10}"
    elif len(cvals) > 1:  # several: the variant's hue, darker for a larger rank / size
      colour = colormaps[_MAPS[colour]](0.4 + 0.6 * i / (len(cvals) - 1))
    other = "s" if colour_by == "s" else "r"
    name = f"{g0['label']} {other}{g0[colour_by]}" + (f" L{g0['depth']}" if len(depths) > 1 else "")
    name += f" {g0['step']}st" if len(steps) > 1 else ""
    ax.errorbar([g[x_key] for g in gs], [g["mean"] for g in gs], yerr=[g["std"] for g in gs],
                marker=marker, color=colour, ls=dstyle[g0["depth"]], capsize=3, ms=5,
                mfc=colour if filled else "none", label=name)
  for g in (g for g in points if g["variant"] == "dense"):
    ax.axhline(g["mean"], color="black", lw=1, ls=dstyle.get(g["depth"], "-"), alpha=0.7,
               label=f"dense L{g['depth']}" + (f" {g['step']}st" if len(steps) > 1 else ""))
  ax.set_xscale("log", base=2)
  ax.set_xticks(xs_all, [str(x) for x in xs_all])
  ax.minorticks_off()
  ax.set_xlabel(xlabel)
  ax.set_ylabel(_ylabel(metric))
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize=7, loc="best", ncol=2 if len(lines) > 6 else 1)
  ax.set_title(title or f"{dataset}: {metric} vs {xlabel} ({_seeds_note(points)})", fontsize=10)
  return fig


def plot_rank(rows: Sequence[dict], metric: str | None = None,
              title: str | None = None) -> Figure | None:
  """The metric against rank, one line per variant x compound size x depth; dense as horizontal
  lines. None when the rows have fewer than two ranks."""
  return _lines(rows, metric, "rank", ("label", "s", "depth", "step"), title, "rank",
                colour_by="s")


def plot_compound(rows: Sequence[dict], metric: str | None = None,
                  title: str | None = None) -> Figure | None:
  """The metric against compound size, one line per variant x rank x depth; dense as horizontal
  lines. None when the rows have fewer than two compound sizes."""
  return _lines(rows, metric, "s", ("label", "rank", "depth", "step"), title, "compound size s",
                colour_by="rank")


PLOTS = {"params": plot_params, "rank": plot_rank, "s": plot_compound}


def to_png(fig: Figure, dpi: int = 110) -> bytes:
  """The figure as PNG bytes (``IPython.display.Image(to_png(fig))`` shows it in a notebook)."""
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=dpi)
  return buf.getvalue()


def save_all(rows: Sequence[dict], out_dir: str | Path, prefix: str = "",
             metric: str | None = None, dpi: int = 110, log=print) -> list[Path]:
  """Writes ``<out_dir>/<prefix><dataset>_<kind>.png`` for each dataset and kind that has data."""
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  written = []
  for dataset, rs in sorted(by_dataset(rows).items()):
    for kind, fn in PLOTS.items():
      fig = fn(rs, metric)
      if fig is None:
        log(f"plots: {dataset} {kind}: nothing to compare in these rows, skipped")
        continue
      path = out_dir / f"{prefix}{dataset}_{kind}.png"
      fig.savefig(path, dpi=dpi)
      written.append(path)
  return written


# ---------------------------------------------------------------------------------------------
# A table (no pandas in requirements.txt).


def table(rows: Sequence[dict], metric: str | None = None, also: Sequence[str] = ()) -> str:
  """A Markdown table of the points (mean ± std over seeds), dense first.

  ``also`` names more row keys to show as columns, as means over seeds (e.g. ``('eval/loss',)``).
  """
  metric = metric_name(rows, metric)
  head = ["dataset", "variant", "rank", "s", "depth", "steps", "params", "of dense", metric, *also,
          "seeds", "train s"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for g in aggregate(rows, metric):
    frac = (f"{g['params'] / g['params_dense_equivalent']:.0%}"
            if g["params"] and g["params_dense_equivalent"] else "")
    val = f"{g['mean']:.4f}" + (f" ± {g['std']:.4f}" if g["n"] > 1 else "")
    more = []
    for key in also:
      vals = [v for r in rows if group_key(r) == g["key"] and (v := _value(r, key)) is not None]
      more.append(f"{sum(vals) / len(vals):.4f}" if vals else "")
    cells = [g["dataset"], g["label"], g["rank"], g["s"], g["depth"], g["step"],
             f"{g['params']:,}" if g["params"] else "", frac, val, *more, g["n"],
             f"{g['train_time_s']:.1f}" if g["train_time_s"] is not None else ""]
    lines.append("| " + " | ".join("" if c is None else str(c) for c in cells) + " |")
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  import matplotlib
  matplotlib.use("Agg")  # the CLI never needs a display
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--results", nargs="+", required=True,
                  help="results.json files of sweeps, or a paper_table.json")
  ap.add_argument("--out", required=True, help="directory for the PNGs")
  ap.add_argument("--prefix", default="", help="prepended to every file name")
  ap.add_argument("--metric", help="plot this row key instead of each row's metric tag")
  ap.add_argument("--dpi", type=int, default=110)
  ap.add_argument("--table", action="store_true", help="also print a Markdown table per dataset")
  ap.add_argument("--also", action="append", default=[], metavar="KEY",
                  help="with --table: another row key as a column (mean over seeds), e.g. "
                  "train/accuracy; repeatable")
  ap.add_argument("--datasets", nargs="+", help="only these datasets' rows")
  args = ap.parse_args(argv)
  rows = load(args.results)
  if args.datasets:
    rows = [r for r in rows if r.get("dataset") in args.datasets]
  if not rows:
    print("plots: no rows in " + ", ".join(args.results), file=sys.stderr)
    return 1
  if args.table:
    for dataset, rs in sorted(by_dataset(rows).items()):
      print(f"\n{dataset}\n\n{table(rs, args.metric, args.also)}\n")
  for p in save_all(rows, args.out, args.prefix, args.metric, args.dpi):
    print(p)
  return 0


if __name__ == "__main__":
  sys.exit(main())
