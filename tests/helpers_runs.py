"""Runs to read back, for the tests of what a trained run is to its readers (issue 29): stored
runs written without training, ways to damage a checkpoint, and text and image data that mean the
same or something else.

`stored_run` writes a workdir's checkpoints as the trainer does (the state of `setup.Run`, the
meta `checkpoint_format.build_meta` builds, fingerprints), with parameters drawn per step instead
of trained: a reader, a resume's set-up or a restore sees a real run, in a second and with nothing
compiled.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import jax
import numpy as np


def stored_run(workdir, config, steps=(1, 2), seed: int = 0, best: dict | None = None):
  """Checkpoints of ``config``'s model at ``steps`` in ``workdir``: params drawn from N(0, 0.02)
  (other values at every step), the optimizer's initial state, the rng of ``config.seed``, and
  the meta a training run stores (its data's description from the config's pipeline).

  ``best``: ``{step: eval/accuracy}`` of the steps also saved in ``best/``.
  """
  from vlora_jax import data as data_lib, models
  from vlora_jax.runs import checkpoint_format
  from vlora_jax.core import params as params_lib
  from vlora_jax.train import checkpoint as ckpt_lib, optim, state as state_lib
  fam = models.family(config.model.name)
  model = models.build(config.model)
  shapes = params_lib.param_shapes(model, *fam.sample_inputs(config.model, batch=1), train=False)
  specs = {k: v[0] for k, v in fam.stack_specs(model).items()}
  meta = checkpoint_format.build_meta(config, shapes, specs, data_lib.build(config).info)
  opt = optim.build(config.optim, shapes, int(config.num_train_steps))
  impl = config.get("rng_impl", "threefry2x32")
  rng = np.asarray(jax.random.key_data(jax.random.key(int(config.seed), impl=impl)))
  ckpt = ckpt_lib.Checkpointer(Path(workdir), meta, keep=10, async_save=False,
                               keep_best=2 if best else 0, best_metric="eval/accuracy")
  try:
    for step in steps:
      draw = np.random.default_rng(seed * 1000 + step)
      params = jax.tree.map(lambda s: (0.02 * draw.standard_normal(s.shape)).astype(s.dtype),
                            shapes)
      state = jax.device_get(state_lib.create(params, opt.tx, rng))
      state["step"] = np.asarray(step, np.int32)
      ckpt.save(step, state)
      if best and step in best:
        ckpt.save_best(step, state, {"eval/accuracy": best[step]})
  finally:
    ckpt.close()
  return Path(workdir)


def copy_run(src, dst) -> Path:
  shutil.copytree(src, dst)
  lock = Path(dst) / "run.lock"
  if lock.exists():
    lock.unlink()
  return Path(dst)


# --------------------------------------------------------------------- damage to one step directory


def _array_files(step_dir: Path) -> list[Path]:
  """The chunk files that hold a step's array data (OCDBT's ``d/`` directories)."""
  return sorted((p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"),
                key=lambda p: p.stat().st_size)


# Each damage below touches every data file: which arrays share a file varies between saves (Orbax
# writes them concurrently), and damage to the optimizer's moments alone would not touch the params
# that a reader loads.


def flip_a_bit(step_dir: Path) -> None:
  """One bit of array data in each data file, in place: the storage reads it back; only the
  fingerprint can tell."""
  for f in _array_files(step_dir):
    b = bytearray(f.read_bytes())
    b[len(b) // 2] ^= 0x10
    f.write_bytes(bytes(b))


def truncate_data(step_dir: Path) -> None:
  for f in _array_files(step_dir):
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def delete_data(step_dir: Path) -> None:
  for f in _array_files(step_dir):
    f.unlink()


def drop_manifest(step_dir: Path) -> None:
  for f in (step_dir / "state").rglob("manifest.ocdbt"):
    f.unlink()


def drop_array_metadata(step_dir: Path) -> None:
  (step_dir / "state" / "_METADATA").unlink()


def empty_state(step_dir: Path) -> None:
  """A half-written step: its ``state`` item is there but holds nothing."""
  shutil.rmtree(step_dir / "state")
  (step_dir / "state").mkdir()


def truncate_meta(step_dir: Path) -> None:
  f = step_dir / "meta" / "metadata"
  f.write_text(f.read_text()[:50])


def meta_a_list(step_dir: Path) -> None:
  (step_dir / "meta" / "metadata").write_text("[1, 2, 3]")


def meta_without_config(step_dir: Path) -> None:
  (step_dir / "meta" / "metadata").write_text('{"layout": {}, "step": 2}')


def meta_not_utf8(step_dir: Path) -> None:
  (step_dir / "meta" / "metadata").write_bytes(b"\xff\xfe\x00garbage")


def drop_meta(step_dir: Path) -> None:
  shutil.rmtree(step_dir / "meta")


DAMAGES = (flip_a_bit, truncate_data, delete_data, drop_manifest, drop_array_metadata,
           empty_state, truncate_meta, meta_a_list, meta_without_config, meta_not_utf8, drop_meta)


# ------------------------------------------------------------------------------------- the data


TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\nAll: Speak, speak.\n" * 60


def other_charset(text: str) -> str:
  """The same text with every character mapped to another one: the same number of distinct
  characters (so the same vocabulary size), ids that mean other characters."""
  chars = sorted(set(text))
  shifted = {c: chr(0x400 + i) for i, c in enumerate(chars)}  # Cyrillic, one to one
  return "".join(shifted[c] for c in text)


def write_text(path: Path, text: str) -> Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text, encoding="utf-8")
  return path


def write_images(path: Path, names=("a", "b", "c"), seed: int = 0) -> Path:
  """An .npz of 8x8 grey uint8 images, 3 classes named ``names``."""
  rng = np.random.default_rng(seed)
  np.savez(path, x_train=rng.integers(0, 256, (48, 8, 8, 1), dtype=np.uint8),
           y_train=rng.integers(0, 3, 48), x_test=rng.integers(0, 256, (16, 8, 8, 1),
                                                              dtype=np.uint8),
           y_test=rng.integers(0, 3, 16), label_names=np.array(names))
  return path
