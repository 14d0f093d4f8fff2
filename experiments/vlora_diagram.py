"""The README's picture of VLoRA: a dense stack beside the same stack in compounds of low-rank
increments.

  .venv/bin/python -m experiments.vlora_diagram     # -> docs/vlora.png
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyBboxPatch  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "docs" / "vlora.png"
LAYERS, COMPOUND = 8, 4
FULL, INC, TEXT = "#4C72B0", "#DD8452", "#222222"


def _box(ax, x, y, w, h, color, label, size=9):
  ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.08",
                              fc=color, ec="none"))
  ax.text(x + w / 2, y + h / 2, label, ha="center", va="center", color="white", fontsize=size)


def draw(out: Path = OUT) -> Path:
  fig, ax = plt.subplots(figsize=(9, 4.2), dpi=150)
  ax.set_xlim(0, 10)
  ax.set_ylim(-0.9, LAYERS + 0.9)
  ax.axis("off")
  ax.text(1.6, LAYERS + 0.5, "dense: a full weight per layer", ha="center", fontsize=10,
          color=TEXT)
  ax.text(6.9, LAYERS + 0.5, "VLoRA: compounds of s = 4 layers", ha="center", fontsize=10,
          color=TEXT)
  for layer in range(LAYERS):
    y = LAYERS - 1 - layer
    _box(ax, 0.5, y + 0.1, 2.2, 0.8, FULL, f"$W_{layer}$")
    k = layer % COMPOUND
    if k == 0:
      _box(ax, 4.3, y + 0.1, 2.2, 0.8, FULL, f"$W_0$ (base of compound {layer // COMPOUND})",
           size=8)
    else:
      _box(ax, 4.3, y + 0.1, 0.35, 0.8, INC, "$A$", size=8)
      _box(ax, 4.7, y + 0.55, 0.9, 0.35, INC, "$B$", size=8)
      ax.text(5.75, y + 0.5, f"$W_{k} = W_{k - 1} + \\frac{{\\alpha}}{{r}} A_{k} B_{k}$",
              va="center", fontsize=9, color=TEXT)
    if k == COMPOUND - 1 and layer < LAYERS - 1:
      ax.plot([4.1, 9.6], [y - 0.0, y - 0.0], color="#999999", lw=0.8, ls="--")
  ax.text(5.0, -0.6, "one jax.lax.scan over the layers: each builds its weight inside the scan, "
          "and the backward pass builds it again", ha="center", fontsize=8.5, color="#555555")
  out.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(out, bbox_inches="tight", facecolor="white")
  plt.close(fig)
  return out


if __name__ == "__main__":
  print(draw())
