"""Compare finished runs side by side: ``vlora-compare RUN [RUN ...] [--plot FILE]``.

  vlora-compare runs/digits runs/digits_dense
  vlora-compare runs/sweep/* --metric eval/loss --plot curves.png

(``python -m vlora_jax.compare`` is the same command.) Reads each workdir's ``summary.json``,
``config.json`` and ``metrics.jsonl``, and prints

  * a table with a row per run: its step, parameters, every ``eval/*`` (the split the run
    evaluated while training: validation unless its config said otherwise) and ``test/*`` figure
    (the test split, evaluated once at the end), ``init/*`` where the run started from given
    weights, and its wall time;
  * the config keys whose values differ between the runs (all of them for one run: none).

``--plot FILE`` draws every run's curves from ``metrics.jsonl``: the training loss and the eval
metric (``--metric``, default ``eval/loss``) against the step (needs matplotlib). ``--json``
prints the same as JSON. A run without ``summary.json`` (still training, or stopped) is shown
with what ``metrics.jsonl`` has so far, marked unfinished.

Exit status: 0 done; 2 a path that is no run's workdir, or a plot that cannot be written.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from vlora_jax import cli
from vlora_jax.runs import outputs
from vlora_jax.errors import UserError

PROG = "vlora-compare"

HEAD = ("step", "params_total")
TAIL = ("wall_time_s",)


class CompareError(UserError, ValueError):
  """A path that is no run, or an output that cannot be written."""


def _json(path: Path) -> Any:
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError):
    return None


def metric_rows(workdir: Path) -> list[dict]:
  """The rows of ``metrics.jsonl`` that parse (a half-written last row is left out)."""
  path = workdir / "metrics.jsonl"
  rows = []
  if path.exists():
    for line in path.read_text().splitlines():
      try:
        row = json.loads(line)
      except ValueError:
        continue
      if isinstance(row, dict) and isinstance(row.get("step"), int):
        rows.append(row)
  return rows


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  if not isinstance(tree, dict):
    return {prefix[:-1]: tree}
  out = {}
  for k, v in tree.items():
    out.update(_flatten(v, f"{prefix}{k}."))
  return out


def _config_of(workdir: Path) -> dict:
  """``config.json``, else the newest checkpoint's stored config, else {}."""
  config = _json(workdir / "config.json")
  if isinstance(config, dict):
    return config
  from vlora_jax.runs import trained
  try:
    return trained.open_checkpoint(workdir)[2].get("config", {})
  except (UserError, OSError):
    return {}


def read_run(path: str | Path) -> dict:
  """``{'name', 'workdir', 'summary', 'config', 'rows', 'finished'}`` of a run's workdir."""
  workdir = Path(path).expanduser()
  summary = _json(workdir / "summary.json")
  rows = metric_rows(workdir)
  if not isinstance(summary, dict) and not rows:
    raise CompareError(f"{str(path)!r} is no run's workdir (no summary.json or metrics.jsonl "
                       "there)")
  finished = isinstance(summary, dict)
  if not finished:  # what the run has so far: its last value of every metric
    summary = {}
    for row in rows:
      summary.update(row)
  return {"name": workdir.name or str(workdir), "workdir": str(workdir), "summary": summary,
          "config": _flatten(_config_of(workdir)), "rows": rows, "finished": finished}


def metric_keys(runs: list[dict]) -> list[str]:
  """The eval, test and init figures any of the runs has, in that order."""
  keys = {k for r in runs for k, v in r["summary"].items()
          if k.startswith(("eval/", "test/", "init/")) and isinstance(v, (int, float))}
  order = lambda k: (("eval/", "test/", "init/").index(k[:5]) if k[:5] in ("eval/", "test/",
                                                                           "init/") else 3, k)
  return sorted(keys, key=order)


def config_differences(runs: list[dict]) -> dict[str, list[Any]]:
  """``{key: [value of each run]}`` for the config keys whose values are not all equal."""
  keys = sorted({k for r in runs for k in r["config"]})
  missing = object()
  out = {}
  for key in keys:
    values = [r["config"].get(key, missing) for r in runs]
    if any(v != values[0] for v in values[1:]):
      out[key] = ["(absent)" if v is missing else v for v in values]
  return out


def _cell(value: Any) -> str:
  if value is None:
    return "-"
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    return str(value)
  if isinstance(value, int):
    return f"{value:,}"
  if not math.isfinite(value):
    return str(value)
  return f"{value:.4g}"


def _table(header: list[str], rows: list[list[str]]) -> str:
  widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
  line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
  return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
                   + [line(r) for r in rows])


def compare(paths: list[str | Path]) -> dict:
  """The comparison of the runs in ``paths``: ``{'runs', 'metrics', 'config_differences'}``."""
  runs = [read_run(p) for p in paths]
  if len({r["name"] for r in runs}) < len(runs):  # workdirs of one name: their paths tell them apart
    for r in runs:
      r["name"] = r["workdir"]
  keys = [*HEAD, *metric_keys(runs), *TAIL]
  return {"runs": [{"name": r["name"], "workdir": r["workdir"], "finished": r["finished"],
                    **{k: r["summary"].get(k) for k in keys}} for r in runs],
          "metrics": keys, "config_differences": config_differences(runs), "_runs": runs}


def report(result: dict) -> str:
  """The two tables as text."""
  keys = result["metrics"]
  rows = [[r["name"] + ("" if r["finished"] else " (unfinished)")] + [_cell(r[k]) for k in keys]
          for r in result["runs"]]
  out = [_table(["run", *keys], rows)]
  diffs = result["config_differences"]
  if len(result["runs"]) > 1:
    if diffs:
      names = [r["name"] for r in result["runs"]]
      out += ["", "config differences:",
              _table(["key", *names], [[k, *map(_cell, v)] for k, v in diffs.items()])]
    else:
      out += ["", "config differences: none"]
  return "\n".join(out)


def plot(result: dict, out: Path, metric: str = "eval/loss") -> Path:
  """Every run's training loss and ``metric`` against the step, side by side, into ``out``."""
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError as e:
    raise CompareError(f"--plot needs matplotlib ({e}); pip install matplotlib") from None
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  try:
    fmt, allowed = out.suffix.lstrip(".").lower(), fig.canvas.get_supported_filetypes()
    if fmt not in allowed:
      raise CompareError(f"--plot={str(out)!r}: the extension says no image format matplotlib "
                         f"writes; allowed are {sorted(allowed)}")
    cli.writable_dir(out.parent, f"--plot={str(out)!r}", CompareError)
    _draw(result, axes, metric)
    fig.tight_layout()
    with outputs.atomic_file(out, "--plot") as tmp:  # whole or not at all
      fig.savefig(tmp, dpi=120, format=fmt)
  finally:
    plt.close(fig)
  return out


def _draw(result: dict, axes, metric: str) -> None:
  for run in result["_runs"]:
    for ax, key in zip(axes, ("train/loss", metric)):
      points = [(r["step"], r[key]) for r in run["rows"] if isinstance(r.get(key), (int, float))]
      if points:
        ax.plot(*zip(*points), marker="." if len(points) < 30 else None, label=run["name"])
  for ax, key in zip(axes, ("train/loss", metric)):
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def main(argv: list[str] | None = None) -> None:
  parser = cli.Parser(PROG, __doc__, allow_abbrev=False)
  parser.add_argument("runs", nargs="+", metavar="RUN", help="a run's workdir")
  parser.add_argument("--plot", default=None, metavar="FILE",
                      help="draw the runs' curves into this image (png, pdf, svg)")
  parser.add_argument("--metric", default="eval/loss", help="the eval metric the plot draws")
  parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
  parser.add_argument("--verbose", action="store_true", help="show the traceback of input errors")
  args = parser.parse_args(argv)
  result = cli.guarded(PROG, args.verbose, compare, args.runs)
  if args.json:
    print(json.dumps({k: v for k, v in result.items() if k != "_runs"}, indent=2, default=str))
  else:
    print(report(result))
  if args.plot:
    written = cli.guarded(PROG, args.verbose, plot, result, Path(args.plot),
                          args.metric)
    print(f"plot: {written}")


if __name__ == "__main__":
  main()
