"""Atomic, contained outputs (issue 29, class 3): exports, ``eval.json``, summaries and sidecars.

* Nothing is written inside a run's ``checkpoints/``, ``best/`` (or their ``.bad``), a step
  directory, over a run's own records, or into a directory that holds a run, not even with
  ``--overwrite``; symbolic links are followed.
* An existing output that the command did not write is refused unless ``--overwrite``; its own
  earlier output is replaced.
* A full disk or a file size limit is one line and exit status 2, with nothing left behind and
  the earlier output intact; an interrupted export (its temporary left by a process that died) can
  be rerun.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import resource
import subprocess
import sys

import jax
import numpy as np
import pytest
from helpers_runs import stored_run
from helpers_train import ROOT, tiny

import vlora_jax
from vlora_jax import export
from vlora_jax.runs import outputs
from vlora_jax.errors import UserError
from vlora_jax.evaluate import evaluate


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("outputs")
  workdir = stored_run(tmp / "run", tiny("vit"))
  (workdir / "summary.json").write_text("{}")
  (workdir / "metrics.jsonl").write_text("")
  (workdir / "checkpoints.bad").mkdir()
  return {"vit": workdir, "llama": stored_run(tmp / "llama", tiny("llama"))}


@pytest.fixture(scope="module")
def run(runs):
  return runs["vit"]


def _listing(d):
  return sorted(str(p.relative_to(d)) for p in d.rglob("*"))


def _leftovers(d):
  return [p for p in d.rglob("*") if outputs.TMP_MARK in p.name]


def _write(kind, runs, out, **kw):
  if kind == "evaluate":
    return evaluate(runs["vit"], out=out, **kw)
  return export.export(runs["llama" if kind == "hf" else "vit"], kind, out, **kw)


CONTAINED = [  # (writer, --out relative to the run's workdir, or to tmp_path for "link/...")
    ("npz", "checkpoints/x.npz"), ("npz", "best/x.npz"), ("npz", "checkpoints/2/x.npz"),
    ("npz", "checkpoints.bad/x.npz"), ("npz", "metrics.jsonl"), ("orbax", "checkpoints"),
    ("orbax", "."), ("timm", "summary.safetensors"), ("evaluate", "checkpoints/eval.json"),
    ("evaluate", "summary.json"), ("npz", "link/x.npz"), ("hf", "best/hf"),
]


@pytest.mark.parametrize("kind, where", CONTAINED)
def test_nothing_is_written_inside_a_run_even_with_overwrite(kind, where, runs, run, tmp_path):
  (tmp_path / "link").symlink_to(run / "checkpoints")
  out = tmp_path / where if where.startswith("link") else run / where
  before = _listing(run)
  with pytest.raises(UserError) as e:
    _write(kind, runs, out, overwrite=True)
  assert "\n" not in str(e.value)
  assert _listing(run) == before


def _unrelated(kind, path):
  """A file or directory at ``path`` that no export or evaluation wrote."""
  path.parent.mkdir(parents=True, exist_ok=True)
  if kind == "npz_file":
    np.savez(path, weights=np.ones(3))
  elif kind == "timm":
    from safetensors.numpy import save_file
    save_file({"w": np.ones(3, np.float32)}, str(path))
  elif kind == "sidecar":
    path.with_suffix(".json").write_text('{"mine": true}')
  elif kind == "orbax":
    path.mkdir()
    (path / "notes.txt").write_text("keep me")
  elif kind == "hf":  # another model's directory
    path.mkdir()
    (path / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
  else:
    path.write_text("not an output of vlora_jax\n")


NOT_OURS = [("npz", "x.npz", "text"), ("npz", "x.npz", "npz_file"),
            ("timm", "x.safetensors", "timm"), ("timm", "x.safetensors", "sidecar"),
            ("evaluate", "e.json", "text"), ("orbax", "out", "orbax"), ("hf", "out", "hf")]


@pytest.mark.parametrize("kind, name, what", NOT_OURS)
def test_an_existing_output_not_written_by_the_command_needs_overwrite(kind, name, what, runs,
                                                                       tmp_path):
  out = tmp_path / name
  _unrelated(what, out)
  before = _listing(tmp_path)
  with pytest.raises(UserError, match="--overwrite"):
    _write(kind, runs, out)
  assert _listing(tmp_path) == before
  _write(kind, runs, out, overwrite=True)
  assert not _leftovers(tmp_path)


@pytest.mark.parametrize("kind, name", [("npz", "x.npz"), ("timm", "x.safetensors"),
                                        ("orbax", "out"), ("evaluate", "e.json"), ("hf", "out")])
def test_the_command_replaces_its_own_earlier_output(kind, name, runs, tmp_path):
  _write(kind, runs, tmp_path / name)
  _write(kind, runs, tmp_path / name)  # no --overwrite needed
  assert not _leftovers(tmp_path)


@contextlib.contextmanager
def _file_size_limit(nbytes):
  soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
  resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
  try:
    yield
  finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


@pytest.mark.parametrize("kind, name, limit", [("npz", "x.npz", 4096),
                                               ("timm", "x.safetensors", 4096),
                                               ("orbax", "out", 4096), ("evaluate", "e.json", 64)])
def test_a_file_size_limit_is_one_line_exit_2_and_leaves_the_earlier_output(kind, name, limit, run,
                                                                            runs, tmp_path,
                                                                            capsys):
  from vlora_jax import evaluate as evaluate_lib
  out = tmp_path / name
  _write(kind, runs, out)  # the earlier output; and every program compiled
  before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
  argv = ["--workdir", str(run), "--out", str(out)]
  main = evaluate_lib.main if kind == "evaluate" else export.main
  argv += [] if kind == "evaluate" else ["--format", kind]
  with _file_size_limit(limit), pytest.raises(SystemExit) as e:
    main(argv)
  lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
  assert e.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: --out"), lines
  assert not _leftovers(tmp_path)
  assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_a_limit_met_in_the_middle_of_the_write_leaves_nothing(run, tmp_path):
  """The file size limit just above the parameters' bytes: the check before writing lets the
  export start, and the write itself meets the limit (the archive's headers)."""
  out = tmp_path / "x.npz"
  export.export(run, "npz", out)
  good = out.read_bytes()
  _, params = vlora_jax.load(run).to_dense()
  nbytes = sum(v.nbytes for v in jax.tree.leaves(params))
  with _file_size_limit(nbytes + 16), pytest.raises(UserError, match="File too large"):
    export.export(run, "npz", out)
  assert out.read_bytes() == good and not _leftovers(tmp_path)


def test_a_summary_that_does_not_fit_leaves_the_earlier_one(tmp_path):
  from vlora_jax.train import metrics
  path = tmp_path / "summary.json"
  metrics.write_json(path, {"step": 1})
  with _file_size_limit(64), pytest.raises(UserError, match="summary.json"):
    metrics.write_json(path, {"step": 2, "padding": "x" * 200})
  assert json.loads(path.read_text()) == {"step": 1} and not _leftovers(tmp_path)


def test_a_full_disk_at_the_rename_leaves_nothing(run, tmp_path, monkeypatch):
  def full(src, dst):
    raise OSError(errno.ENOSPC, "No space left on device")
  monkeypatch.setattr(outputs.os, "replace", full)
  with pytest.raises(UserError, match="No space left on device"):
    export.export(run, "npz", tmp_path / "x.npz")
  assert not list(tmp_path.iterdir())


def _dead_pid() -> int:
  proc = subprocess.Popen(["true"])
  proc.wait()
  return proc.pid


@pytest.mark.parametrize("kind, name", [("npz", "x.npz"), ("orbax", "out")])
def test_an_interrupted_export_can_be_rerun(kind, name, run, tmp_path):
  out = tmp_path / name
  export.export(run, kind, out)
  good = sorted(p.name for p in tmp_path.iterdir())
  stale = tmp_path / f".{name}{outputs.TMP_MARK}{_dead_pid()}-0"  # what a killed export left
  if kind == "orbax":
    (stale / "checkpoints" / "2").mkdir(parents=True)
  else:
    stale.write_bytes(b"PK\x03\x04 half an archive")
  export.export(run, kind, out)
  assert sorted(p.name for p in tmp_path.iterdir()) == good and not stale.exists()


@pytest.mark.slow
def test_kill_9_during_an_export_keeps_the_earlier_export(run, tmp_path):
  """A subprocess is killed while its temporary is half written; the earlier export stays whole,
  and the same command then succeeds."""
  out = tmp_path / "x.npz"
  export.export(run, "npz", out)
  good = out.read_bytes()
  code = f"""
import os, signal, sys
from vlora_jax import export
from vlora_jax.runs import outputs
def half(path, data, flag):
  with outputs.atomic_file(path, flag) as tmp:
    tmp.write_bytes(data[: len(data) // 2])
    os.kill(os.getpid(), signal.SIGKILL)
export.outputs.write_bytes = half
export.export({str(run)!r}, "npz", {str(out)!r})
"""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                        timeout=300)
  assert done.returncode == -9, done.stderr[-2000:]
  assert out.read_bytes() == good and _leftovers(tmp_path)  # the dead process's temporary
  export.export(run, "npz", out)
  assert not _leftovers(tmp_path)
  with np.load(out) as z:
    assert "head/kernel" in z.files


def test_a_nested_write_reports_its_own_file(tmp_path):
  """The timm export writes its sidecar around the weights: a failure of the inner file names
  that file, not the outer one."""
  from vlora_jax.runs import outputs
  with pytest.raises(outputs.OutputError) as e:
    with outputs.atomic_file(tmp_path / "m.json", "--out's sidecar"):
      with outputs.atomic_file(tmp_path / "m.safetensors", "--out") as inner:
        raise OSError(28, "No space left on device", str(inner))
  assert str(e.value).startswith("--out='") and "sidecar" not in str(e.value)
  assert list(tmp_path.iterdir()) == []


def test_an_interrupt_between_the_two_renames_puts_the_earlier_output_back(tmp_path, monkeypatch):
  """The earlier directory is moved aside before the new one takes its name: an interrupt in
  between (what `remove_pending` handles) leaves the earlier output where it was."""
  from vlora_jax.runs import outputs
  out = tmp_path / "export"
  out.mkdir()
  (out / "weights").write_text("earlier")
  real_replace, calls = os.replace, []

  def replace_then_interrupt(src, dst):
    real_replace(src, dst)
    calls.append(dst)
    if len(calls) == 1:  # the earlier output is aside, the new one not yet in place
      raise KeyboardInterrupt

  monkeypatch.setattr(outputs.os, "replace", replace_then_interrupt)
  with pytest.raises(KeyboardInterrupt):
    with outputs.atomic_dir(out, "--out") as tmp:
      (tmp / "weights").write_text("new")
  monkeypatch.setattr(outputs.os, "replace", real_replace)
  outputs.remove_pending()  # what the signal handler does before it exits
  assert (out / "weights").read_text() == "earlier"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_a_temporary_left_under_this_process_id_is_stale(tmp_path):
  """In a container the next run often gets the pid of the one that was killed: its leftover is
  not a write in progress."""
  from vlora_jax.runs import outputs
  out = tmp_path / "model.npz"
  left = tmp_path / f".model.npz{outputs.TMP_MARK}{os.getpid()}-999"
  left.write_bytes(b"half")
  assert outputs.remove_stale(out) == [left] and not left.exists()
