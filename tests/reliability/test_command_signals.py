"""Ctrl-C and SIGTERM in the commands (issue 29, class 5): ``sample``, ``evaluate``, ``predict``,
``export`` and ``python -m vlora_jax.compile`` stop at once with one line and exit status 130
(SIGINT) or 143 (SIGTERM), no traceback and no partial output; the training command stopped by
Ctrl-C before its loop (in the compile) exits 130 with one line.

Each command runs in its own process with one function wrapped so that it first writes a file
saying it is there (the signal then finds the command in that function: during the generation,
the evaluation, the prediction, the rename of the export's finished temporary file, XLA's
compile) and the test sends the signal from outside.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from helpers_runs import stored_run
from helpers_train import ROOT, tiny

from vlora_jax import export
from vlora_jax.runs import outputs

pytestmark = pytest.mark.slow  # subprocesses and signals

# Where each command is caught, and what runs there once the file says so: ``None`` waits (for a
# signal), else the wrapped function goes on (a real compile).
WRAPPED = {
    "sample": ("vlora_jax.models.decoding", "generate", "wait"),
    "evaluate": ("vlora_jax.train.evaluation", "evaluate", "wait"),
    "predict": ("vlora_jax.runs.trained", "load", "after"),
    "export": ("os", "replace", "wait"),
    "compile": ("jax.stages", "Lowered.compile", "go_on"),
    "main": ("jax.stages", "Lowered.compile", "go_on"),
}

CODE = textwrap.dedent("""
    import importlib, os, runpy, sys, time
    module, name, how = {wrapped!r}
    owner = importlib.import_module(module)
    *path, attr = name.split(".")
    for part in path:
      owner = getattr(owner, part)
    real = getattr(owner, attr)
    def wrapped(*args, **kwargs):
      out = real(*args, **kwargs) if how == "after" else None
      open({ready!r}, "w").close()
      if how == "go_on":
        return real(*args, **kwargs)
      time.sleep(300)
      raise SystemExit("the signal did not stop the command")
    setattr(owner, attr, wrapped)
    sys.argv = {argv!r}
    runpy.run_module({command!r}, run_name="__main__", alter_sys=True)
    """)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("signals")
  image = tmp / "x.npy"
  np.save(image, np.zeros((8, 8), np.uint8))
  return {"lm": stored_run(tmp / "lm", tiny("lm")), "vit": stored_run(tmp / "vit", tiny("vit")),
          "image": image, "tmp": tmp}


def _argv(command, runs, out):
  vit, lm = str(runs["vit"]), str(runs["lm"])
  return {
      "sample": ["sample", "--workdir", lm, "--prompt", "F", "--max_new_tokens", "4"],
      "evaluate": ["evaluate", "--workdir", vit, "--out", str(out)],
      "predict": ["predict", "--workdir", vit, str(runs["image"])],
      "export": ["export", "--workdir", vit, "--format", "npz", "--out", str(out)],
      "compile": ["compile", "--config", str(ROOT / "configs" / "vit_digits.py"),
                  "--nocount_flops", "--out", str(out)],
      "main": ["main", "--config", str(ROOT / "configs" / "vit_digits.py"), "--workdir",
               str(out)],
  }[command]


CASES = [(c, s) for c in ("sample", "evaluate", "predict", "export", "compile")
         for s in ("SIGINT", "SIGTERM")] + [("main", "SIGINT")]


@pytest.fixture(scope="module")
def stopped(runs):
  """Every case started at once (both cores busy), each signalled once it is caught."""
  started = {}
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  for command, sig in CASES:
    d = runs["tmp"] / f"{command}-{sig}"
    d.mkdir()
    out = d / {"evaluate": "eval.json", "export": "x.npz", "compile": "report.json",
               "main": "run"}.get(command, "unused")
    if command == "export":  # an earlier good export: it must survive the interrupted one
      export.export(runs["vit"], "npz", out)
    argv = _argv(command, runs, out)
    code = CODE.format(wrapped=WRAPPED[command], ready=str(d / "ready"), argv=argv,
                       command=f"vlora_jax.{argv[0]}")
    # Output to files, not pipes: a command's progress bar must never block on a full pipe.
    logs = (open(d / "stdout", "w"), open(d / "stderr", "w"))
    # SIGINT at its default in the child: a suite started in the background (``cmd &``) runs
    # with SIGINT ignored, which Python and its children keep, as a shell's background job should.
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, text=True,
                            stdout=logs[0], stderr=logs[1],
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    started[(command, sig)] = (proc, d, out, out.read_bytes() if out.is_file() else None, logs)
  done, signalled = {}, set()
  try:
    deadline = time.time() + 400
    while len(done) < len(started) and time.time() < deadline:
      # Every caught command is signalled at once, whatever the others are doing: one waited on
      # here would let a training run finish before its turn (it did, on a loaded machine).
      for key, (proc, d, out, before, logs) in started.items():
        if key in done:
          continue
        if key not in signalled and (d / "ready").exists() and proc.poll() is None:
          proc.send_signal(getattr(signal, key[1]))
          signalled.add(key)
        if proc.poll() is not None:
          for f in logs:
            f.close()
          done[key] = (proc.returncode, (d / "stdout").read_text(), (d / "stderr").read_text(),
                       d, out, before)
      time.sleep(0.05)
  finally:
    for proc, *_ in started.values():
      if proc.poll() is None:
        proc.kill()
  return done


@pytest.mark.parametrize("command, sig", CASES)
def test_a_stop_signal_is_one_line_and_no_output(command, sig, stopped):
  rc, stdout, stderr, d, out, before = stopped[(command, sig)]
  number = getattr(signal, sig).value
  assert rc == 128 + number, (rc, stderr[-3000:])
  assert "Traceback" not in stderr, stderr[-3000:]
  said = [line for line in stderr.splitlines() if "stopped by" in line]
  prog = "vlora-train" if command == "main" else f"vlora-{command}"  # its console script
  assert len(said) == 1 and said[0].startswith(f"{prog}: ") and sig in said[0], stderr[-2000:]
  assert stderr.rstrip().splitlines()[-1] == said[0]
  assert not stdout.strip()
  assert not [p for p in d.rglob("*") if outputs.TMP_MARK in p.name]
  if command == "export":
    assert out.read_bytes() == before  # the earlier export, whole
  elif command != "main":
    assert not out.exists()
