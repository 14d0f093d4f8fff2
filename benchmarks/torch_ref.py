"""The official PyTorch VLoRA ViT train step, served by a worker process in the torch venv.

The worker side (`main`) runs under the reference venv (torch, timm and the official ``vlora``,
no JAX): it builds the official model and a timm dense ViT of the same architecture, reports
their parameter counts and ``state_dict`` bytes when ready, then times ``{"train": steps}``
requests, and writes the official model's weights on ``{"save": "PATH.npz"}``. The driver side
(`config`, `start`) builds its configuration from one of our configs and starts it as a
`harness.Worker`. Used by `benchmarks.bench`, `benchmarks.malloc` and `benchmarks.user_path`.

The reference venv comes from ``../shared/tools/setup_torch_reference.sh /tmp/torchref``; its
python is ``$VLORA_TORCH_PYTHON``, else ``/tmp/torchref/venv/bin/python``. By hand:

  PYTHONPATH=. /tmp/torchref/venv/bin/python -m benchmarks.torch_ref '{"official": ..., ...}'
"""

from __future__ import annotations

import json
import os
import sys
import time

from benchmarks import harness

DEFAULT_PYTHON = os.environ.get("VLORA_TORCH_PYTHON", "/tmp/torchref/venv/bin/python")
# The official step's update, which ours and a user's path (`benchmarks.user_path`) also take:
# AdamW, then clipping at this global norm, no label smoothing.
UPDATE = {"lr": 1e-3, "weight_decay": 0.05, "clip_norm": 1.0}


# --------------------------------------------------------------------- worker side (torch venv)


def main(cfg: dict) -> None:
  """Official VLoRA ViT train steps on request.

  Args:
    cfg: ``{"official": VisionTransformerVLoRA kwargs, "timm": the dense VisionTransformer kwargs,
      "batch": int, "threads": int}``.
  """
  import importlib.metadata
  import io

  import timm
  import torch
  from timm.models.vision_transformer import VisionTransformer
  from vlora.models.vit import VisionTransformerVLoRA

  torch.set_num_threads(cfg["threads"])
  torch.manual_seed(0)
  model = VisionTransformerVLoRA(**cfg["official"]).train()
  dense = VisionTransformer(**cfg["timm"])

  def state_dict_bytes(m) -> int:
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    return buf.getbuffer().nbytes

  k = cfg["official"]
  x = torch.randn(cfg["batch"], 3, k["img_size"], k["img_size"])
  y = torch.randint(0, k["num_classes"], (cfg["batch"],))
  opt = torch.optim.AdamW(model.parameters(), lr=UPDATE["lr"], weight_decay=UPDATE["weight_decay"])

  def step() -> None:
    opt.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), UPDATE["clip_norm"])
    opt.step()

  def handle(request: dict) -> dict:
    if "save" in request:  # the model's weights as .npz, for a user's path to import
      import numpy as np
      np.savez(request["save"], **{k: v.detach().numpy() for k, v in model.state_dict().items()})
      return {"saved": request["save"]}
    steps = int(request["train"])
    t0 = time.perf_counter()
    for _ in range(steps):
      step()
    return {"s_per_step": (time.perf_counter() - t0) / steps}

  step()  # warm-up: first-call allocations
  harness.serve({
      "torch": torch.__version__, "timm": timm.__version__,
      "vlora": importlib.metadata.version("vlora"), "threads": torch.get_num_threads(),
      "params_official": sum(p.numel() for p in model.parameters()),  # shared W_0 once
      "params_timm_dense": sum(p.numel() for p in dense.parameters()),
      # Its state_dict names the shared W_0 again in every layer k >= 1 of a compound;
      # torch.save writes a shared storage once, so the bytes count it once.
      "state_dict_numel_official": sum(t.numel() for t in model.state_dict().values()),
      "state_dict_bytes_official": state_dict_bytes(model),
      "state_dict_bytes_timm_dense": state_dict_bytes(dense)}, handle)


# ----------------------------------------------------------------------------- driver side


def official_number(x):
  """A rank or alpha as the official code takes it: an int or a list (a float has no len there)."""
  if isinstance(x, (list, tuple)):
    return [official_number(v) for v in x]
  return int(x) if float(x).is_integer() else float(x)


def config(cfg, threads: int = 2) -> dict:
  """The official VLoRA and timm dense kwargs of the architecture of our ViT config ``cfg`` (the
  official depth counts compounds)."""
  m, v = cfg.model, cfg.model.vlora
  common = dict(img_size=m.img_size, patch_size=m.patch_size, embed_dim=m.dim,
                num_heads=m.num_heads, mlp_ratio=m.mlp_ratio, num_classes=m.num_classes)
  return {"official": dict(common, depth=m.depth // v.compound_size, vl_size=v.compound_size,
                           vl_rank=official_number(v.rank), vl_alpha=official_number(v.alpha)),
          "timm": dict(common, depth=m.depth), "batch": cfg.batch_size, "threads": threads}


def start(python: str, cfg: dict) -> harness.Worker:
  """The worker, started from the reference venv's ``python``; ``.info`` has its versions,
  parameter counts and state_dict bytes, ``.request(train=steps)["s_per_step"]`` times steps."""
  # Torch runs as shipped: none of our JAX or allocator settings (vlora_jax/platform/cpu_malloc.py).
  env = {k: v for k, v in os.environ.items()
         if k not in ("XLA_FLAGS", "GLIBC_TUNABLES", "VLORA_MALLOC_TUNED")}
  env["PYTHONPATH"] = str(harness.ROOT)  # for this package only: that venv has no JAX
  return harness.Worker([python, "-m", "benchmarks.torch_ref", json.dumps(cfg)], env=env,
                        name="torch")


if __name__ == "__main__":
  main(json.loads(sys.argv[1]))
