"""The harness every benchmark of this package shares.

* `environment` / `finish`: what the numbers depend on (versions, machine, CPUs, load, command);
* `timed`, `interleaved`, `paired_ratio`: timing on a shared, noisy machine, where only numbers
  measured side by side in one run are comparable: every timer runs once per round, the order
  reversed every other round, and a ratio is the median over rounds of the per-round ratio;
* `Worker` / `reply` / `serve`: a resident subprocess speaking JSON lines, for what must run in
  another process (the official PyTorch step in its own venv, a fresh process per RSS or
  allocator measurement, per-process XLA flags, the code of another git revision);
* `table`, `command`, `write`: markdown tables and a result written as JSON plus markdown beside.

Imports nothing heavy at module level: `benchmarks.torch_ref` uses the worker side without JAX.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
GIB = 2 ** 30
_started = [time.perf_counter()]  # when `environment` was last called: a run's start


# ------------------------------------------------------------------------------- environment


def available_bytes() -> int:
  """``MemAvailable`` of /proc/meminfo (0 where there is none)."""
  try:
    for line in Path("/proc/meminfo").read_text().splitlines():
      if line.startswith("MemAvailable:"):
        return int(line.split()[1]) * 1024
  except OSError:
    pass
  return 0


def _version(dist: str) -> str | None:
  try:
    return importlib.metadata.version(dist)
  except importlib.metadata.PackageNotFoundError:
    return None


def git_describe(rev: str | None = None) -> str:
  """``git describe --always`` of ``rev``, or of the working tree (``-dirty`` if it has changes)."""
  cmd = ["git", "-C", str(ROOT), "describe", "--always"] + ([rev] if rev else ["--dirty"])
  return subprocess.run(cmd, capture_output=True, text=True).stdout.strip()


def cpu() -> dict[str, Any]:
  """The CPU's model and the vector extensions that decide its matmul speed (from /proc/cpuinfo;
  empty elsewhere): the same count of cores can differ 2x between an Intel Xeon and an AMD EPYC."""
  try:
    text = Path("/proc/cpuinfo").read_text()
  except OSError:
    return {}
  info = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
  info = {k.strip(): v.strip() for k, v in info.items()}
  flags = set(info.get("flags", "").split())
  wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile")
  return {"model": info.get("model name", ""), "vector_extensions": [f for f in wanted if f in flags]}


def environment() -> dict[str, Any]:
  """Versions, device, CPUs, memory, load, code revision, date and command line of this run."""
  import jax  # pylint: disable=import-outside-toplevel
  dev = jax.devices()[0]
  env = {
      "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "python": platform.python_version(),
      "platform": platform.platform(),
      **{name: _version(dist) for name, dist in (
          ("jax", "jax"), ("jaxlib", "jaxlib"), ("flax", "flax"), ("optax", "optax"),
          ("orbax", "orbax-checkpoint"), ("numpy", "numpy"))},
      "backend": jax.default_backend(),
      "device": str(dev),
      "device_kind": dev.device_kind,
      "device_count": jax.device_count(),
      "cpu_count": os.cpu_count(),
      "cpu": cpu(),
      "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
      "ram_available_gib": available_bytes() / GIB,
      "loadavg_start": list(os.getloadavg()),
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "code": git_describe(),
      "argv": sys.argv,
  }
  _started[0] = time.perf_counter()
  return env


def finish(env: dict[str, Any]) -> dict[str, Any]:
  """Adds the load at the end and the run's wall seconds to an `environment` record."""
  env["loadavg_end"] = list(os.getloadavg())
  env["wall_s"] = time.perf_counter() - _started[0]
  return env


def describe(env: dict[str, Any]) -> str:
  """One sentence of the environment for a markdown header."""
  out = (f"Date (UTC): {env['date_utc']}. jax {env['jax']}, flax {env['flax']}, device "
         f"{env['device']} ({env['backend']}), {env['cpu_count']} CPUs, ")
  if env.get("cpu"):  # older results lack it
    out += (f"{env['cpu']['model'] or 'CPU model unknown'} "
            f"({', '.join(env['cpu']['vector_extensions']) or 'no AVX2'}), ")
  if "ram_available_gib" in env:  # with the code revision; some stored results lack both
    out += f"{env['ram_available_gib']:.1f} GiB RAM available, code {env['code']}, "
  out += f"load average {env['loadavg_start'][0]:.2f} at start"
  if "loadavg_end" in env:
    out += f", {env['loadavg_end'][0]:.2f} at end, {env['wall_s']:.0f} s"
  return out + ". The machine may be shared: read ratios measured side by side, not absolute times."


# ------------------------------------------------------------------------------------ timing


def timed(fn: Callable[[], Any]) -> float:
  """Seconds of one call of ``fn``, its result waited for (``jax.block_until_ready``)."""
  import jax  # pylint: disable=import-outside-toplevel
  t = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - t


def interleaved(timers: dict[str, Callable[[], Any]], rounds: int,
                verbose: bool = True) -> dict[str, list[Any]]:
  """Calls every timer once per round, the order reversed every other round (no position bias);
  returns what each returned (its seconds; or a whole measurement, with ``verbose=False``) by
  round."""
  times: dict[str, list[Any]] = {k: [] for k in timers}
  names = list(timers)
  for r in range(rounds):
    for name in names if r % 2 == 0 else names[::-1]:
      times[name].append(timers[name]())
    if verbose:
      print(f"  round {r + 1}/{rounds}: " + "  ".join(
          f"{k} {v[-1] * 1e3:.1f}ms" for k, v in times.items()), flush=True)
  return times


def paired_ratio(a: Sequence[float], b: Sequence[float]) -> float:
  """Median over rounds of a[i] / b[i]: the load of round i hits both sides alike."""
  return statistics.median(x / y for x, y in zip(a, b))


# ---------------------------------------------------------------------------- worker process


class Worker:
  """A resident subprocess speaking JSON lines.

  The process prints one JSON object when it is ready (`info`), then answers every request line
  with one JSON line (`request`); see `serve` for its side. A one-shot measurement is a worker
  whose ready message is the result (`reply`, then exit). Its stderr goes to a temporary file,
  whose tail is in the error when the process dies, so that a chatty worker never blocks.
  """

  def __init__(self, cmd: Sequence[str], env: dict[str, str] | None = None,
               cwd: str | Path | None = None, name: str | None = None):
    self.name = name or " ".join(cmd)
    self.log = tempfile.TemporaryFile(mode="w+")
    self.proc = subprocess.Popen(list(cmd), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=self.log, text=True, env=env, cwd=cwd)
    self.info = self._read("starting")

  def _read(self, doing: str) -> dict:
    """The next JSON line of the process's stdout (other lines, e.g. a library's notes, skipped)."""
    for line in self.proc.stdout:
      if line.startswith("{"):
        return json.loads(line)
    self.proc.wait()
    self.log.seek(0)
    raise RuntimeError(f"worker {self.name} exited ({self.proc.returncode}) while {doing}: "
                       f"{self.log.read()[-3000:]}")

  def request(self, **message) -> dict:
    self.proc.stdin.write(json.dumps(message) + "\n")
    self.proc.stdin.flush()
    return self._read(f"answering {message}")

  def close(self, timeout: float | None = 120) -> None:
    if self.proc.stdin and not self.proc.stdin.closed:
      try:
        self.proc.stdin.close()
      except BrokenPipeError:
        pass
    try:
      self.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      self.proc.kill()
      self.proc.wait()
    self.log.close()

  def __enter__(self) -> "Worker":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def reply(message: dict) -> None:
  """The worker side: one JSON line on stdout."""
  print(json.dumps(message, default=str), flush=True)


def serve(ready: dict, handle: Callable[[dict], dict]) -> None:
  """The worker side of `Worker`: ``ready``, then ``handle(request)`` for every request line until
  stdin closes."""
  reply(ready)
  for line in sys.stdin:
    if line.strip():
      reply(handle(json.loads(line)))


def module_command(module: str, *args: str) -> list[str]:
  """``python -m module args`` with this interpreter."""
  return [sys.executable, "-m", module, *args]


# ------------------------------------------------------------------------------------ output


def _is_number(cell: str) -> bool:
  return re.fullmatch(r"-|[-+]?[\d,]*\.?\d+(e[-+]?\d+)?%?", cell) is not None


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  """A markdown table, columns padded; columns of numbers right-aligned, others left-aligned."""
  cells = [[str(c) for c in r] for r in [header, *rows]]
  n = range(len(header))
  w = [max(len(r[i]) for r in cells) for i in n]
  right = [all(_is_number(r[i]) for r in cells[1:]) and any(r[i] != "-" for r in cells[1:])
           for i in n]
  line = lambda r: "| " + " | ".join(c.rjust(w[i]) if right[i] else c.ljust(w[i])
                                     for i, c in enumerate(r)) + " |"
  sep = "|" + "|".join("-" * (w[i] + 1) + (":" if right[i] else "-") for i in n) + "|"
  return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


def command(module: str, argv: Sequence[str] | None = None) -> str:
  """The command line that runs ``module`` with ``argv`` (default: this process's arguments)."""
  return " ".join([".venv/bin/python -m", module, *(sys.argv[1:] if argv is None else argv)])


def write(out_path: str | Path, result: dict[str, Any], markdown_text: str) -> Path:
  """Writes ``result`` as JSON to ``out_path`` and ``markdown_text`` beside it (same stem, .md)."""
  out = Path(out_path)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(result, indent=1, default=str) + "\n")
  out.with_suffix(".md").write_text(markdown_text.rstrip("\n") + "\n")
  print(f"wrote {out} and {out.with_suffix('.md')}", flush=True)
  return out
