"""Parity with the PyTorch references, as numbers: the committed fixtures against our imports.

  .venv/bin/python -m experiments.parity_torch    # -> experiments/results/parity_torch.{json,md}

For every fixture of tests/fixtures (made by tests/fixtures/make_torch_fixtures.py from timm and
the official `vlora` package, every parameter perturbed): the largest |our logits - torch logits|
and the largest logit, and for the official VLoRA fixtures the largest |our gradient - the official
gradient| of ``sum(g * logits)`` over every parameter, with the largest gradient; and the same
gradients with ``stop_gradient_base=False`` (the official code detaches W_0 in layers k >= 1:
without the detach the gradients of W_0 differ, by the amount shown). The tests
(tests/convert/test_convert.py) hold these to 1e-5; this script records what they are.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from vlora_jax.convert import torch_vit

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
OUT = ROOT / "experiments" / "results" / "parity_torch.json"
NAMES = ("timm_token", "timm_avg", "timm_avg_fc_norm", "official", "official_lists",
         "official_vectors", "official_tied")


def _load(name):
  with np.load(FIXTURES / f"torch_{name}.npz") as z:
    files = {k: z[k] for k in z.files}
  sd = {k[len("state_dict/"):]: v for k, v in files.items() if k.startswith("state_dict/")}
  grads = {k[len("grad/"):]: v for k, v in files.items() if k.startswith("grad/")}
  return sd, json.loads(str(files["kwargs"])), files["images"], files["logits"], grads, \
      files.get("grad_cotangent")


def _max_gap(got, want) -> float:
  flat_got = dict(jax.tree_util.tree_leaves_with_path(got))
  flat_want = dict(jax.tree_util.tree_leaves_with_path(want))
  return max(float(np.abs(np.asarray(g) - flat_want[p]).max()) for p, g in flat_got.items())


def measure(name: str) -> dict:
  sd, kwargs, images, want, torch_grads, cot = _load(name)
  module, variables = torch_vit(sd, **kwargs)
  got = np.asarray(jax.jit(module.apply)(variables, images))
  row = {"fixture": name, "logit_gap": float(np.abs(got - want).max()),
         "logit_max": float(np.abs(want).max())}
  if torch_grads:
    _, want_grads = torch_vit(torch_grads, **kwargs)
    want_grads = want_grads["params"]

    def grads(m):
      return jax.grad(lambda p: jnp.sum(jnp.asarray(cot) * m.apply({"params": p}, images)))(
          variables["params"])

    row["grad_gap"] = _max_gap(grads(module), want_grads)
    row["grad_max"] = max(float(np.abs(w).max()) for w in jax.tree.leaves(want_grads))
    if module.vlora is not None and module.vlora.stop_gradient_base:
      undetached = module.clone(vlora=dataclasses.replace(module.vlora, stop_gradient_base=False))
      row["grad_gap_without_detach"] = _max_gap(grads(undetached), want_grads)
  return row


def main():
  rows = [measure(n) for n in NAMES if (FIXTURES / f"torch_{n}.npz").exists()]
  OUT.write_text(json.dumps({"rows": rows}, indent=1) + "\n")
  fmt = lambda v: "—" if v is None else f"{v:.2g}"
  lines = ["# Parity with PyTorch (timm and the official VLoRA), on the committed fixtures", "",
           "`python -m experiments.parity_torch`; max |difference| over every output and every "
           "parameter's gradient.", "",
           "| fixture | logit gap | largest logit | gradient gap | largest gradient | "
           "gradient gap without W_0's detach |", "|---|---:|---:|---:|---:|---:|"]
  for r in rows:
    lines.append(f"| {r['fixture']} | {fmt(r['logit_gap'])} | {fmt(r['logit_max'])} | "
                 f"{fmt(r.get('grad_gap'))} | {fmt(r.get('grad_max'))} | "
                 f"{fmt(r.get('grad_gap_without_detach'))} |")
  OUT.with_suffix(".md").write_text("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
