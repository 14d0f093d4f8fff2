"""Shared helpers of the training tests: tiny configs, subprocess runs, the shared data dir."""

from __future__ import annotations

import json
import os
import tempfile
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("VLORA_SHARED", Path(__file__).resolve().parents[2] / "shared"))
DATA = SHARED / "data"


def need_shared(name: str) -> Path:
  """The path of a file under ``shared/data``, or skip the test with the reason."""
  p = DATA / name
  if not p.is_file():
    pytest.skip(f"{p} not found (set VLORA_SHARED to the directory holding data/{name})")
  return p


def tiny(family: str = "vit", **overrides):
  """A seconds-sized config of a model family, from the real config files.

  vit: digits, D 16, 2 layers (one VLoRA compound of 2, rank 2); lm, llama: a text file; seq2seq:
  reversal.
  ``overrides`` are dotted keys (``{'optim.lr': 1e-2}``) applied after the tiny sizes.
  """
  from vlora_jax.train import load_config
  spec = {"vit": "configs/vit_digits.py", "lm": "configs/lm_shakespeare.py",
          "llama": "configs/llama.py", "seq2seq": "configs/seq2seq_reverse.py"}[family]
  c = load_config(str(ROOT / spec), lock=True)
  sizes = {"model.dim": 16, "model.depth": 2, "model.num_heads": 2, "model.dropout": 0.0,
           "model.vlora.compound_size": 2, "model.vlora.rank": 2,
           "batch_size": 16, "eval_batch_size": 32, "num_train_steps": 2,
           "optim.warmup_steps": 1, "log_every_steps": 1, "eval_every_steps": 0,
           "checkpoint.every_steps": 1000, "checkpoint.keep_best": 0,
           "progress": False, "tensorboard": False, "data.threads": 1}
  if family == "vit":
    sizes["data.eval_examples"] = 64
  if family == "llama":
    sizes.update({"model.num_kv_heads": 1, "model.head_dim": 8, "model.mlp_dim": 24})
  if family in ("lm", "llama"):
    sizes.update({"model.max_len": 16, "data.eval_examples": 32})
    text = DATA / "tiny_shakespeare.txt"
    if not text.is_file():  # a user's clone has no shared/: any text file exercises the same path
      text = Path(tempfile.mkdtemp()) / "tiny.txt"
      text.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n" * 200)
    sizes["data.path"] = str(text)
  if family == "seq2seq":
    sizes.update({"model.dec_depth": 2, "model.max_len": 8, "data.eval_examples": 32})
  sizes.update(overrides)
  for key, value in sizes.items():
    node = c
    *parents, leaf = key.split(".")
    for k in parents:
      node = node[k]
    node[leaf] = value
  return c


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_py(code: str, *, devices: int = 1, env: dict | None = None, timeout: int = 300,
           wait: bool = True):
  """Runs Python ``code`` in a fresh interpreter from the repo root with ``devices`` CPU devices.

  Returns the CompletedProcess (``wait``) or the Popen. The code can print one JSON line starting
  with ``RESULT `` that `result` reads back.
  """
  e = dict(os.environ)
  e["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  # the code imports these helpers as the tests do
  e["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests"), str(ROOT), e.get("PYTHONPATH", "")])
  e["JAX_PLATFORMS"] = "cpu"
  e.update(env or {})
  args = [sys.executable, "-c", code]
  if not wait:
    return subprocess.Popen(args, cwd=ROOT, env=e, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
  return subprocess.run(args, cwd=ROOT, env=e, capture_output=True, text=True, timeout=timeout)


def result(output: str) -> dict:
  lines = [l for l in output.splitlines() if l.startswith("RESULT ")]
  assert lines, f"no RESULT line in the output:\n{output[-4000:]}"
  return json.loads(lines[-1][len("RESULT "):])
