"""The report of the SmolLM2 compress-and-heal experiment (`smollm2_heal.py`): spreads over seeds,
the issue's targets checked (met / missed), the markdown tables and the plot, from result rows.

A row is one measurement of one model: ``kind`` (``teacher``, ``teacher_ft``: the teacher trained
on the healing text, ``vlora``, ``drop``: layer dropping, ``tied``: plain recursion), ``budget``
(the share of the block parameters; None for the teachers), ``seed``, ``steps`` (0: before
healing), ``tokens`` (healing tokens), ``block_fraction`` and ``nll`` / ``ppl`` per domain on the
test split. Nothing here reads a model: `smollm2_heal.py` writes the rows, this turns them into
text, so the checks are testable on synthetic numbers (tests/experiments/test_smollm2_heal.py).

How a target is judged, in mean negative log-likelihood per token (log perplexity), over seeds:

  beats      A beats B when ``mean(B) - mean(A)`` exceeds the margin ``max(t * se, MIN_GAP)``:
             ``se`` the standard error of the difference of the means (Welch, ddof=1), ``t`` the
             two-sided 95% Student quantile at Welch's degrees of freedom, MIN_GAP 0.01 nats (1%
             of perplexity: a gap smaller than that is no win even if the seeds agree). Fewer than
             two seeds on either side: no spread, so no claim (missed).
  within     A is within 15% of the teacher when the upper end of A's 95% interval,
             ``mean(A) + t * se(A)``, is at most ``log(1.15)`` above the teacher's (the teacher is
             one model, no seeds); fewer than two seeds: missed.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

DOMAINS = ("shakespeare", "python")
CONDITIONS = ("vlora", "drop", "tied")
NAMES = {"teacher": "teacher (SmolLM2-135M-Instruct)", "teacher_ft": "teacher trained on the text",
         "vlora": "VLoRA (chosen on validation)", "drop": "layer dropping",
         "tied": "plain recursion (tied, average init)"}
CONFIDENCE = 0.95
MIN_GAP = 0.01  # nats
WITHIN = 0.15   # the "within 15% of the teacher's perplexity"
TARGET_BUDGET = 0.5


def spread(values) -> tuple[float, float, int]:
  """``(mean, standard deviation with ddof=1 (nan for one value), count)``."""
  v = np.asarray(list(values), float)
  return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else math.nan, len(v)


def _t(df: float) -> float:
  from scipy import stats
  return float(stats.t.ppf(0.5 + CONFIDENCE / 2, df))


def beats(a, b) -> dict:
  """Whether ``a`` (NLL per seed) is lower than ``b`` beyond the margin (module doc)."""
  (ma, sa, na), (mb, sb, nb) = spread(a), spread(b)
  out = {"gap": mb - ma, "n": (na, nb)}
  if na < 2 or nb < 2:
    return {**out, "met": False, "margin": math.nan, "why": "fewer than 2 seeds: no spread"}
  va, vb = sa ** 2 / na, sb ** 2 / nb
  se = math.sqrt(va + vb)
  df = (va + vb) ** 2 / (va ** 2 / (na - 1) + vb ** 2 / (nb - 1)) if se > 0 else math.inf
  margin = max(_t(df) * se if se > 0 else 0.0, MIN_GAP)
  met = out["gap"] > margin
  return {**out, "met": met, "margin": margin,
          "why": f"gap {out['gap']:+.3f} nats {'>' if met else '<='} margin {margin:.3f}"}


def within(a, teacher: float, tolerance: float = WITHIN) -> dict:
  """Whether ``a`` (NLL per seed) is within ``tolerance`` of the teacher's perplexity, at the
  upper end of its 95% interval (module doc)."""
  m, s, n = spread(a)
  out = {"ratio": math.exp(m - teacher), "n": n}
  if n < 2:
    return {**out, "met": False, "upper_ratio": math.nan, "why": "fewer than 2 seeds: no spread"}
  upper = m + _t(n - 1) * s / math.sqrt(n)
  met = upper - teacher <= math.log1p(tolerance)
  return {**out, "met": met, "upper_ratio": math.exp(upper - teacher),
          "why": f"perplexity x{out['ratio']:.3f} of the teacher's, upper end "
                 f"x{math.exp(upper - teacher):.3f} {'<=' if met else '>'} x{1 + tolerance:.2f}"}


def _nll(rows, kind, budget=None, steps=None, domain="shakespeare") -> list[float]:
  return [r["nll"][domain] for r in rows if r["kind"] == kind
          and (budget is None or r.get("budget") == budget)
          and (steps is None or (r["steps"] > 0) == (steps > 0))]


def check_targets(rows: list[dict], budgets) -> list[dict]:
  """Every claim of the issue's target, per budget and domain, judged on the healed rows:
  healed VLoRA beats layer dropping, beats plain recursion, and is within 15% of the teacher.
  Each check: ``{budget, domain, claim, met, why, ...}``; the issue's target is the 50% budget's."""
  teacher = {d: _nll(rows, "teacher", domain=d) for d in DOMAINS}
  checks = []
  for b in budgets:
    for d in DOMAINS:
      v = _nll(rows, "vlora", b, 1, d)
      if not v:
        continue
      for base in ("drop", "tied"):
        other = _nll(rows, base, b, 1, d)
        if other:
          checks.append({"budget": b, "domain": d, "claim": f"beats {NAMES[base]}",
                         **beats(v, other)})
      if teacher[d]:
        checks.append({"budget": b, "domain": d, "claim": "within 15% of the teacher",
                       **within(v, teacher[d][0])})
  return checks


def target_verdict(checks: list[dict], budget: float = TARGET_BUDGET) -> str:
  """'met' if every claim at ``budget`` is met (three per domain, both domains), else
  'missed'."""
  at = [c for c in checks if c["budget"] == budget]
  complete = len(at) == 3 * len(DOMAINS)
  return "met" if complete and all(c["met"] for c in at) else "missed"


def targets_markdown(checks: list[dict], budgets) -> str:
  lines = []
  for b in budgets:
    at = [c for c in checks if c["budget"] == b]
    head = (f"- **{round(100 * b)}% of the block parameters"
            + (f" (the issue's target): {target_verdict(checks, b)}**" if b == TARGET_BUDGET
               else f"** (reported, no target): {target_verdict(checks, b)}"))
    lines.append(head)
    for c in at:
      lines.append(f"  - {c['domain']}: healed VLoRA {c['claim']}: "
                   f"**{'met' if c['met'] else 'missed'}** ({c['why']})")
  return "\n".join(lines)


# --- tables -------------------------------------------------------------------------------------

def _ppl_cell(rows_: list[dict], domain: str) -> str:
  if not rows_:
    return ""
  m, s, n = spread(r["ppl"][domain] for r in rows_)
  return f"{m:.2f}" if n == 1 else f"{m:.2f} ± {s:.2f} ({n})"


def _select(rows, kind, budget, healed: bool) -> list[dict]:
  return [r for r in rows if r["kind"] == kind and r.get("budget") == budget
          and (r["steps"] > 0) == healed]


def results_table(rows: list[dict], budgets) -> str:
  """Per budget and condition: the parameters, the healing tokens and the test perplexity of
  both domains, mean ± std (ddof=1) over seeds (the count in brackets)."""
  out = ["| budget | condition | steps | healing tokens | block params (share) | "
         "Shakespeare test ppl | Python test ppl |", "|---|---|---:|---:|---:|---:|---:|"]
  for kind in ("teacher", "teacher_ft"):
    sel = [r for r in rows if r["kind"] == kind]
    if sel:
      out.append(f"| 100% | {NAMES[kind]} | {sel[0]['steps']} | {sel[0]['tokens']:,} | "
                 f"{sel[0]['block_params']:,} (100%) | {_ppl_cell(sel, 'shakespeare')} | "
                 f"{_ppl_cell(sel, 'python')} |")
  for b in budgets:
    for healed in (False, True):
      for kind in CONDITIONS:
        sel = _select(rows, kind, b, healed)
        if not sel:
          continue
        r = sel[0]
        out.append(f"| {round(100 * b)}% | {NAMES[kind]}{'' if healed else ', 0 steps'} | "
                   f"{r['steps']} | {r['tokens']:,} | {r['block_params']:,} "
                   f"({100 * r['block_fraction']:.1f}%) | {_ppl_cell(sel, 'shakespeare')} | "
                   f"{_ppl_cell(sel, 'python')} |")
  return "\n".join(out)


def selection_table(candidates: list[dict]) -> str:
  """Every compressed candidate at 0 steps: its validation perplexities and the criterion."""
  out = ["| budget | mode | compound size | init | ranks | block share | Shakespeare val ppl | "
         "Python val ppl | criterion (mean val NLL) | chosen |",
         "|---|---|---:|---|---|---:|---:|---:|---:|---|"]
  for c in sorted(candidates, key=lambda c: (-c["budget"], c["criterion"])):
    out.append(f"| {round(100 * c['budget'])}% | {c['mode']} | {c['compound_size']} | "
               f"{c['init']} | {tuple(c['ranks'])} | {100 * c['block_fraction']:.1f}% | "
               f"{c['ppl']['shakespeare']:.4g} | {c['ppl']['python']:.4g} | "
               f"{c['criterion']:.3f} | {'**yes**' if c.get('chosen') else ''} |")
  return "\n".join(out)


def greedy_table(rows: list[dict], prompts: list[str], budgets) -> str:
  """The greedy continuations of every prompt: the teachers, then every condition healed
  (its lowest seed)."""
  picks = [(NAMES[k], [r for r in rows if r["kind"] == k]) for k in ("teacher", "teacher_ft")]
  for b in budgets:
    picks += [(f"{NAMES[k]}, {round(100 * b)}%", _select(rows, k, b, True)) for k in CONDITIONS]
  out = ["| model | " + " | ".join(f"`{_cell(p)}`" for p in prompts) + " |",
         "|---|" + "---|" * len(prompts)]
  for name, sel in picks:
    if sel and sel[0].get("greedy"):
      first = min(sel, key=lambda r: r["seed"] if r["seed"] is not None else -1)
      out.append(f"| {name} | " + " | ".join(f"`{_cell(t)}`" for t in first["greedy"]) + " |")
  return "\n".join(out)


def _cell(text: str) -> str:
  return text.replace("\n", "\\n").replace("|", "\\|").replace("`", "'")


# --- plot ---------------------------------------------------------------------------------------

def plot(rows: list[dict], budgets, path: Path) -> None:
  """Test perplexity against the share of block parameters, one panel per domain: each condition
  before (dashed) and after healing (solid), std over seeds as error bars; the teachers as
  lines."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, len(DOMAINS), figsize=(10, 4))
  for ax, domain in zip(axes, DOMAINS):
    for kind, color in zip(CONDITIONS, ("C0", "C1", "C2")):
      for healed in (False, True):
        pts = []
        for b in budgets:
          sel = _select(rows, kind, b, healed)
          if sel:
            m, s, _ = spread(r["ppl"][domain] for r in sel)
            pts.append((100 * sel[0]["block_fraction"], m, 0.0 if math.isnan(s) else s))
        if pts:
          x, y, e = zip(*sorted(pts))
          ax.errorbar(x, y, yerr=e, color=color, ls="-" if healed else "--", marker="o",
                      capsize=3, label=f"{NAMES[kind]}{'' if healed else ', 0 steps'}")
    for kind, ls in (("teacher", "-"), ("teacher_ft", ":")):
      sel = [r for r in rows if r["kind"] == kind]
      if sel:
        ax.axhline(spread(r["ppl"][domain] for r in sel)[0], color="k", ls=ls, lw=1,
                   label=NAMES[kind])
    ax.set_yscale("log")
    ax.set_title(f"{domain}: test perplexity")
    ax.set_xlabel("block parameters, % of the teacher's")
  axes[0].set_ylabel("perplexity (log scale)")
  axes[-1].legend(fontsize=7, loc="best")
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
