"""The other runs one run reads while it sets up and starts: a dense run to compress
(``init_from='compress:'``), a teacher (``distill.teacher``), each read at most once.

A run may meet the same source several times: a dense run whose ranks ``compress.budget``
chooses, which is checked against the student, compressed into its first parameters and then
distilled from. `Sources` holds what was read, keyed by the run's directory and step, so each
meta is opened once and each checkpoint's arrays are loaded (and verified) once. It lives on the
`setup.Run` until the starting state is made (`release`): the teacher keeps its own checkpoint.

A read that fails is not kept: the next caller reads again and gets its own error (the messages
name the flag that asked, ``where``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from vlora_jax.runs import trained as trained_lib


def _key(path) -> str | None:
  return None if path is None else str(Path(path).expanduser().resolve())


class Sources:
  """What one set-up read of other runs: metas, verified checkpoints, their dense twins."""

  def __init__(self):
    self._done: dict[tuple, Any] = {}

  def _once(self, key: tuple, make: Callable[[], Any]) -> Any:
    if key not in self._done:
      self._done[key] = make()
    return self._done[key]

  def meta(self, workdir, where: str, step_dir=None) -> tuple[Path, dict]:
    """``(step directory, meta)``: `trained.source_meta`, read once."""
    return self._once(("meta", _key(workdir), _key(step_dir)),
                      lambda: trained_lib.source_meta(workdir, where, step_dir))

  def config(self, workdir, where: str, step_dir=None) -> tuple[Path, Any]:
    """``(step directory, stored config)`` (a ``ConfigDict`` with every key, `schema.complete`),
    from the meta read once."""
    from vlora_jax.train import schema
    step_dir, meta = self.meta(workdir, where, step_dir)
    return step_dir, schema.complete(meta["config"])

  def load(self, workdir, where: str, step_dir=None) -> trained_lib.Trained:
    """The run's newest good checkpoint (or ``step_dir``), verified: `trained.load`, once."""
    def read():
      if step_dir is not None:
        return trained_lib.load_step(step_dir, where)
      return trained_lib.load(workdir, where=where)
    return self._once(("load", _key(workdir), _key(step_dir)), read)

  def dense(self, workdir, where: str) -> tuple[Any, Any]:
    """``(dense twin, its params)`` of the run's newest good checkpoint (`Trained.to_dense`)."""
    return self._once(("dense", _key(workdir)), lambda: self.load(workdir, where).to_dense())

  def checked(self, what: str, workdir, check: Callable[[], None]) -> None:
    """Runs ``check`` of the source in ``workdir`` once: a check that holds whatever the run's
    ranks (the dense twin's shapes) is not run again on the model at its resolved ranks."""
    self._once(("checked", what, _key(workdir)), lambda: check() or True)

  def release(self) -> None:
    """Forgets everything read: once the starting state is made, the arrays are not needed."""
    self._done.clear()
