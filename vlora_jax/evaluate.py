"""Evaluate a trained run's checkpoint on its eval set, as its training evaluated it.

  vlora-evaluate --workdir DIR [--step N|best] [--out PATH] [--overwrite] [--verbose]
                 [--config.data.KEY=VALUE ...] [--config.eval_batch_size=N]
                 [--config.mesh.AXIS=N ...]

(``python -m vlora_jax.evaluate`` is the same command.) It evaluates the split that the run
evaluated while training (``data.eval_split``: the validation split unless the config said
otherwise); ``--config.data.eval_split=test`` gives the test split, as the run's summary did
once at the end.

The model, its parameters and the config come from the checkpoint (`vlora_jax.load`); the eval data
are built from the stored config (`vlora_jax.data.build`). ``--config.data.*`` overrides the data
(another ``data.path``, a cap ``data.eval_examples``), ``--config.eval_batch_size`` the eval batch,
and ``--config.mesh.*`` the device mesh (for a machine with other devices than the training's);
no other key can change: the model and its training are the checkpoint's. The overridden config is
checked as a training run's is (`train.schema`, `train.validate`), and the data must mean what the
model was trained on (`train.compat.data_changes`: the stored image shape, normalisation, class
names, vocabulary, tokenizer); where the files are does not matter.
A run whose checkpoint stores a subword tokenizer (``data.source='tokenized'``, an imported model)
reads its text with that one: ``data.tokenizer`` need not point at a file that still exists.

The metrics are computed as the training loop computes them (`train.evaluation`: the same jitted
`train.steps.make_eval_step`, the same sums over the same padded batches): on a finished run they
are its final eval metrics (``metrics.jsonl``, ``summary.json``).

Writes ``<workdir>/eval.json`` (or ``--out``): the metrics, the step, the checkpoint, the overrides
and the number of eval examples, whole or not at all (a temporary file, then a rename). ``--out``
may not lie inside a run's ``checkpoints/`` or ``best/``, and an existing file that an evaluation
did not write is refused unless ``--overwrite``. Prints the checkpoint, the metrics one per line
(sorted) and the path written. A progress bar over the eval batches goes to stderr when stderr is
a terminal.

Override values are read as the training command line reads them (`vlora_jax.config.overrides`):
numbers, ``true``/``false``, tuples ``0.5,0.5,0.5``; a key whose stored value is text takes the
text as it is.

Exit status: 0 done; 2 a mistake in the input (no checkpoint in the workdir, a bad ``--step``, a key
that cannot be overridden or a value the schema refuses, data that do not read or do not fit the
model, an ``--out`` that cannot or may not be written), one line ``error: ...``; 130 / 143
interrupted by Ctrl-C / SIGTERM, nothing written; 1 an internal error.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

from vlora_jax import cli
from vlora_jax.config import overrides as overrides_lib
from vlora_jax.runs import trained as trained_lib
from vlora_jax.errors import UserError

PROG = "vlora-evaluate"

# The keys an evaluation may change: the data, the eval batch, the mesh. A prefix ends in '.'.
OVERRIDABLE = ("data.", "eval_batch_size", "mesh.")
WRITTEN_BY = "vlora_jax.evaluate"


class EvalError(UserError, ValueError):
  """An evaluation the run, the overrides or ``--out`` cannot take."""


OVERRIDES_HELP = """\
config overrides (read as vlora-train reads them):
  --config.data.KEY=VALUE    the eval data: another data.path, data.eval_split=test, a cap
                             data.eval_examples=N
  --config.eval_batch_size=N the eval batch
  --config.mesh.AXIS=N       the device mesh
"""


def _overridable(key: str) -> bool:
  return any(key.startswith(p) if p.endswith(".") else key == p for p in OVERRIDABLE)


def _allowed_text() -> str:
  return ", ".join(f"--config.{p}*" if p.endswith(".") else f"--config.{p}" for p in OVERRIDABLE)


def parse_overrides(tokens: list[str]) -> dict[str, str]:
  """``['--config.data.eval_examples=64', '--config.eval_batch_size', '32']`` ->
  ``{'data.eval_examples': '64', 'eval_batch_size': '32'}`` (`overrides.split`); any other token
  is an `EvalError`."""
  try:
    pairs, rest = overrides_lib.split(tokens)
  except UserError as e:
    raise EvalError(str(e)) from None
  if rest:
    raise EvalError(f"unrecognized argument {rest[0]!r}: the flags are --workdir, --step, --out, "
                    f"--verbose and the overrides {_allowed_text()} (see --help)")
  return dict(pairs)




def eval_config(stored: dict, overrides_: dict[str, Any] | None):
  """The stored config (a JSON dict) with ``overrides_`` applied and checked by the schema:
  ``(locked ConfigDict, {key: value applied})``.

  ``overrides_`` maps dotted keys (``'data.eval_examples'``) to values: a string is parsed as the
  command line's text is (`overrides.parse_value`), anything else is taken as it is.
  """
  import ml_collections
  from vlora_jax.train import schema
  tree = schema.complete(stored).to_dict()  # a run stored before a key existed takes its default
  # How the run started is not evaluated, and its kind may be registered only by the code that
  # trained it (`init_from.register_init_from`).
  tree["init_from"] = ""
  applied = {}
  for key, value in (overrides_ or {}).items():
    if not _overridable(key):
      raise EvalError(f"--config.{key}: cannot be overridden in an evaluation; allowed are "
                      f"{_allowed_text()} (the model and its training are the checkpoint's)")
    text = value if isinstance(value, str) else None
    # A key the stored config lacks is an `overrides.OverrideError` (a ConfigError) naming it.
    applied[key] = overrides_lib.set_key(tree, key, value, text=text)
  config = ml_collections.ConfigDict(tree)
  config.lock()
  schema.check(config)  # a ConfigError naming the key, its value and what is allowed
  return config, applied


def _own_tokenizer(meta: dict, step_dir: Path, overrides: dict | None) -> dict:
  """The stored config, its text read by the tokenizer that the checkpoint stores (unless
  ``--config.data.tokenizer`` names another): a run evaluates without the file it came from."""
  config = meta["config"]
  if (meta.get("data") or {}).get("tokenizer") and "data.tokenizer" not in (overrides or {}):
    config = copy.deepcopy(config)
    config.setdefault("data", {})["tokenizer"] = str(step_dir)
  return config


def _written_by_evaluate(path: Path) -> bool:
  """Whether a file is an evaluation's result (which a new evaluation may replace)."""
  from vlora_jax.runs import outputs
  return (outputs.read_json_object(path) or {}).get("written_by") == WRITTEN_BY


def _check_out(out, overwrite: bool) -> Path:
  from vlora_jax.runs import outputs
  return outputs.check_target(out, "--out", kind="file", owned=_written_by_evaluate,
                              overwrite=overwrite, writer=f"an evaluation ({WRITTEN_BY})")


def evaluate(workdir, step: int | str | None = None, overrides: dict[str, Any] | None = None,
             *, out=None, progress: bool = False, overwrite: bool = False) -> dict:
  """Evaluates a run's checkpoint on its eval set (see the module doc); writes and returns the
  result: ``{'metrics', 'step', 'checkpoint', 'workdir', 'overrides', 'eval_examples', 'out'}``.

  The workdir, the step, the overrides and ``out`` are checked before anything is loaded.
  """
  step_dir, _, meta = trained_lib.open_checkpoint(workdir, step)
  workdir = Path(workdir).expanduser()
  config, applied = eval_config(_own_tokenizer(meta, step_dir, overrides), overrides)
  out = _check_out(workdir / "eval.json" if out is None else out, overwrite)

  # JAX, the data and the models only now: the checks above are instant.
  import jax
  from vlora_jax.runs import outputs
  from vlora_jax.train import compat, evaluation, metrics as metrics_lib, setup

  plan, mesh, pipe = setup.mesh_and_data(config)
  try:
    compat.check_same_data(meta.get("data"), pipe.info, "the eval data", "the checkpoint",
                           "the eval data")
  except UserError as e:
    raise EvalError(str(e)) from None
  run = trained_lib.load(workdir, step)
  shardings = evaluation.param_shardings(run.model, plan.family, config, mesh)
  params = jax.device_put(run.params, shardings)
  eval_step = evaluation.jit_step(run.model, plan.family, mesh, shardings,
                                  config.activation_rules)
  bar = metrics_lib.Progress(pipe.num_eval_batches, 0, enabled=progress, unit="batch",
                             desc="eval")
  try:
    metrics = evaluation.evaluate(eval_step, plan.family, params, pipe, mesh, progress=bar)
  finally:
    bar.close()
  result = {"metrics": metrics, "step": run.step, "checkpoint": str(run.checkpoint),
            "workdir": str(workdir), "overrides": applied, "eval_examples": pipe.num_eval,
            "eval_batch_size": int(config.eval_batch_size), "written_by": WRITTEN_BY}
  outputs.write_json(out, result, "--out")
  return {**result, "out": str(out)}


def report(result: dict) -> str:
  """What the command prints: the checkpoint, the metrics one per line (sorted), the path."""
  lines = [f"checkpoint: {result['checkpoint']} (step {result['step']}, "
           f"{result['eval_examples']} eval examples)"]
  lines += [f"{k}={v:.6g}" for k, v in sorted(result["metrics"].items())]
  lines.append(f"wrote {result['out']}")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
  parser = cli.Parser(PROG, __doc__, allow_abbrev=False, epilog=OVERRIDES_HELP)
  cli.add_run_args(parser)
  parser.add_argument("--out", default=None, help="the JSON file to write; default "
                      "<workdir>/eval.json")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace an existing --out that an evaluation did not write")
  args, rest = parser.parse_known_args(argv)
  step = cli.step(args.step)

  def go():
    return evaluate(args.workdir, step, parse_overrides(rest), out=args.out,
                    progress=sys.stderr.isatty(), overwrite=args.overwrite)

  result = cli.guarded(PROG, args.verbose, go)
  print(report(result), flush=True)


if __name__ == "__main__":
  main()
