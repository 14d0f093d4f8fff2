"""The config's schema: every key of a run, its type, what it allows and when it applies.

`check` judges a whole config against it before anything is built: a key that is not declared (a
typo in a config file), a value of the wrong type, and a value out of range are each a
`ConfigError` naming the key, the value and what is allowed. Rules between keys (a head count that
divides the width, a batch that splits over the devices) follow in `validate.check`.

The keys of ``config.model`` that one family reads are declared by the family
(``Family.config_keys``, beside its code); `keys` joins them with the table below. The commented
``configs/default.py`` and this table are tested to agree (tests/config/test_schema.py), and
``python -m vlora_jax.tools.config_doc`` prints the table as markdown (docs/config.md).
"""

from __future__ import annotations

import difflib

import ml_collections

from vlora_jax import data as data_lib
from vlora_jax.core import chain, layers, stack
from vlora_jax.config import defaults
from vlora_jax.config.keys import (Anything, Bool, Choice, Float, Int, Key, Numbers, Regex,
                                   Regexes, Rules, Str, When, bad, fill, lookup, when_in)
from vlora_jax.models import DTYPES, FAMILIES
from vlora_jax.train import optim

VLORA_ON = When("model.vlora.enabled", lambda v: v is not False, "model.vlora.enabled")
LORA_ON = When("model.lora.enabled", lambda v: v is not False, "model.lora.enabled")
IMAGES = When("data.source", lambda v: v in ("digits", "npz", "tfds"), "the data are images")
CROP = When("data.augment", lambda v: v not in (None, "none"), "data.augment != 'none'")
TOKENIZED = when_in("data.source", "tokenized")
SPLIT = when_in("data.source", "digits", "npz", "tfds", "text", "tokenized")  # train has a split
BLOCKS = when_in("data.source", "text", "tokenized", "tfds")  # text is cut into blocks
ONE_FILE_TEXT = when_in("data.source", "text", "tokenized")  # its test split is blocks too
ADAM_OR_LION = when_in("optim.name", "adamw", "lion")
BEST = When("checkpoint.keep_best", lambda v: bool(v), "checkpoint.keep_best > 0")

COMMON: dict[str, Key] = {
    "seed": Int(lo=0, hi=2**31 - 1, doc="model init, data order and dropout derive from it"),
    "rng_impl": Choice(choices=("threefry2x32", "rbg", "unsafe_rbg"), doc="dropout key generator"),

    "model.name": Choice(required=True, choices=tuple(sorted(FAMILIES)), doc="the model family"),
    "model.dim": Int(required=True, lo=1, doc="width D"),
    "model.depth": Int(required=True, lo=1, doc="layers L"),
    "model.num_heads": Int(required=True, lo=1, doc="attention heads (divide model.dim)"),
    "model.mlp_ratio": Float(lo=0, lo_open=True, doc="MLP hidden = mlp_ratio * dim"),
    "model.dropout": Float(lo=0, hi=1, hi_open=True, doc="dropout after attention and MLP"),
    "model.dtype": Choice(choices=tuple(DTYPES), doc="compute dtype"),
    "model.scan": Bool(doc="one scan over layers (False: unrolled)"),
    "model.remat": Choice(choices=tuple(stack.REMAT_POLICIES), doc="rematerialisation policy"),
    "model.attention": Choice(choices=layers.ATTENTION_IMPLS, doc="attention kernel"),
    "model.vlora.enabled": Bool(doc="False: the dense model"),
    "model.vlora.compound_size": Int(lo=1, when=VLORA_ON, doc="layers per compound s"),
    "model.vlora.targets": Regexes(when=VLORA_ON, doc="block parameter paths with increments"),
    "model.vlora.rank": Numbers(each=Int(lo=1), when=VLORA_ON, doc="rank r (or one per target)"),
    "model.vlora.alpha": Numbers(each=Float(lo=0, lo_open=True), when=VLORA_ON,
                                 doc="scale numerator (or one per target)"),
    "model.vlora.mode": Choice(choices=chain.MODES, when=VLORA_ON, doc="the increment chain"),
    "model.vlora.stop_gradient_base": Bool(when=VLORA_ON, doc="detach W_0 in layers k >= 1"),
    "model.vlora.scaling": Choice(choices=chain.SCALINGS, when=VLORA_ON, doc="alpha/r or rsLoRA"),
    "model.vlora.init": Choice(choices=chain.INITS, when=VLORA_ON, doc="factor init"),
    "model.lora.enabled": Bool(doc="horizontal LoRA on every stack"),
    "model.lora.targets": Regexes(when=LORA_ON, doc="LoRA target paths"),
    "model.lora.rank": Int(lo=1, when=LORA_ON, doc="LoRA rank"),
    "model.lora.alpha": Float(lo=0, lo_open=True, nullable=True, when=LORA_ON,
                              doc="LoRA scale numerator (None: the rank, scale 1)"),

    "data.source": Choice(required=True, choices=data_lib.SOURCES, doc="where the records come from"),
    "data.path": Str(when=when_in("data.source", "npz", "text", "tokenized"),
                     doc="npz / text / tokenized: a local file"),
    "data.tokenizer": Str(when=TOKENIZED, doc="tokenized: a tokenizer.json, .gguf, "
                          "Hugging Face model directory or run that stores one"),
    "data.split_blocks": Int(lo=2, when=BLOCKS, doc="text: contiguous blocks the text (or token "
                             "stream) is cut into"),
    "data.validation_fraction": Float(lo=0, hi=1, hi_open=True, when=SPLIT,
                                      doc="share of the train split (examples, or text blocks) "
                                      "that validates"),
    "data.test_fraction": Float(lo=0, hi=1, hi_open=True, when=ONE_FILE_TEXT,
                                doc="text, tokenized: share of the blocks that tests"),
    "data.split_seed": Int(lo=0, hi=2**31 - 1, nullable=True, when=SPLIT,
                           doc="which examples or blocks are held out (None: the file's last)"),
    "data.eval_split": Choice(choices=data_lib.EVAL_SPLITS, doc="what the run evaluates while it "
                              "trains and ranks best/ by; test is evaluated once at the end"),
    "data.tfds_name": Str(when=when_in("data.source", "tfds"), doc="TFDS dataset name"),
    "data.data_dir": Str(when=when_in("data.source", "tfds"), doc="TFDS data directory"),
    "data.download": Bool(when=when_in("data.source", "tfds"), doc="download when missing"),
    "data.train_split": Str(nonempty=True, when=when_in("data.source", "tfds"),
                            doc="TFDS train split (validation comes out of it)"),
    "data.test_split": Str(nonempty=True, when=when_in("data.source", "tfds"),
                           doc="TFDS test split"),
    "data.augment": Choice(choices=data_lib.AUGMENTS, when=IMAGES, doc="random crop / flip"),
    "data.crop_padding": Int(lo=0, when=CROP, doc="padding of the random crop"),
    "data.mean": Numbers(each=Float(), when=IMAGES, doc="per-channel mean after scaling"),
    "data.std": Numbers(each=Float(lo=0, lo_open=True), when=IMAGES, doc="per-channel std"),
    "data.pixel_scale": Choice(choices=("uint8", "unit"), when=when_in("data.source", "npz"),
                               doc="npz pixels: integers 0-255 or floats in [0, 1]"),
    "data.eval_examples": Int(lo=0, doc="cap on eval examples (0 = all)"),
    "data.vocab_size": Int(lo=4, when=when_in("data.source", "reverse"),
                           doc="reverse: token ids < vocab_size (0-2 are special)"),
    "data.min_len": Int(lo=1, when=when_in("data.source", "reverse"),
                        doc="reverse: shortest string"),
    "data.threads": Int(lo=0, doc="grain read-ahead threads"),

    "batch_size": Int(required=True, lo=1, doc="global batch"),
    "grad_accum_steps": Int(lo=1, doc="microbatches per step (gradient accumulation)"),
    "eval_batch_size": Int(required=True, lo=1, doc="global eval batch"),
    "num_train_steps": Int(required=True, lo=0, doc="optimizer steps"),
    "label_smoothing": Float(lo=0, hi=1, hi_open=True, doc="classification only"),

    "optim.lr": Float(required=True, lo=0, lo_open=True, doc="peak learning rate"),
    "optim.name": Choice(choices=optim.OPTIMIZERS, doc="the update rule (optax)"),
    "optim.b1": Float(lo=0, hi=1, hi_open=True, when=ADAM_OR_LION, doc="adamw, lion: beta1"),
    "optim.b2": Float(lo=0, hi=1, hi_open=True, when=ADAM_OR_LION, doc="adamw, lion: beta2"),
    "optim.eps": Float(lo=0, lo_open=True, when=when_in("optim.name", "adamw"),
                       doc="adamw: epsilon"),
    "optim.momentum": Float(lo=0, hi=1, hi_open=True, when=when_in("optim.name", "sgd"),
                            doc="sgd: momentum"),
    "optim.nesterov": Bool(when=when_in("optim.name", "sgd"), doc="sgd: Nesterov momentum"),
    "optim.weight_decay": Float(lo=0, doc="decoupled weight decay"),
    "optim.schedule": Choice(choices=optim.SCHEDULES, doc="after the warmup"),
    "optim.warmup_steps": Int(lo=0, doc="linear warmup steps"),
    "optim.min_lr_ratio": Float(lo=0, hi=1, doc="cosine ends at lr * min_lr_ratio"),
    "optim.grad_clip_norm": Float(lo=0, doc="global-norm clipping (0 = off)"),
    "optim.freeze": Regex(doc="frozen parameter paths ('' = none)"),
    "optim.lr_mults": Rules(doc="((regex, lr multiplier), ...)"),
    "optim.wd_mults": Rules(doc="((regex, weight-decay multiplier), ...)"),

    "mesh.data": Int(lo=-1, doc="data-parallel devices (-1 fills)"),
    "mesh.fsdp": Int(lo=-1, doc="FSDP devices (-1 fills)"),
    "mesh.tensor": Int(lo=-1, doc="tensor-parallel devices (-1 fills)"),
    "sharding_rules": Anything(doc="parameters: logical axis -> mesh axes"),
    "activation_rules": Anything(doc="activations: logical axis -> mesh axes"),

    "checkpoint.every_steps": Int(required=True, lo=1, doc="save interval"),
    "checkpoint.keep": Int(lo=1, doc="newest checkpoints kept"),
    "checkpoint.keep_best": Int(lo=0, doc="best checkpoints kept (0 = off)"),
    "checkpoint.best_metric": Str(nonempty=True, when=BEST, doc="an eval metric"),
    "checkpoint.best_mode": Choice(choices=("max", "min"), doc="ranks the best checkpoints"),
    "checkpoint.async_save": Bool(doc="write in the background"),
    "checkpoint.restore_from": Str(doc="explicit checkpoint to restore"),
    "init_from": Str(doc="'<kind>:<arg>' params-only init"),
    "distill.teacher": Str(doc="workdir of the teacher run ('' = no distillation)"),
    "distill.weight": Float(lo=0, hi=1, doc="KL weight w in (1 - w) task + w T^2 KL"),
    "distill.temperature": Float(lo=0, lo_open=True, doc="softmax temperature T"),
    "distill.hidden_weight": Float(lo=0, doc="weight of the per-compound output loss"),
    "compress.base": Choice(choices=("first", "mean", "auto"), doc="compress: each compound's base"),
    "compress.increments": Choice(choices=("svd", "whitened", "zero"),
                                  doc="compress: the rank-r increments"),
    "compress.calibration_batches": Int(lo=1, doc="compress (whitened): calibration train batches"),
    "compress.damping": Float(lo=0, lo_open=True, doc="compress (whitened): eigenvalue floor"),
    "compress.budget": Float(lo=0, hi=1, doc="compress: ranks for this fraction of the dense "
                             "params (0 = model.vlora.rank)"),

    "log_every_steps": Int(required=True, lo=1, doc="metrics interval"),
    "eval_every_steps": Int(lo=0, doc="periodic eval (0 = at the end)"),
    "progress": Bool(doc="progress bar"),
    "tensorboard": Bool(doc="TensorBoard event files"),
    "distributed.initialize": Bool(doc="jax.distributed.initialize()"),
}


def keys(family_name: str | None = None) -> dict[str, Key]:
  """The declared keys of a run of ``family_name`` (every family's with None)."""
  out = dict(COMMON)
  fams = FAMILIES.values() if family_name is None else [FAMILIES[family_name]]
  for f in fams:
    out.update(f.config_keys)
  return out


def flatten(config, prefix: str = "") -> dict:
  """``{'a.b': value}`` of a (nested) ConfigDict or dict."""
  out = {}
  for k, v in config.items():
    if isinstance(v, (ml_collections.ConfigDict, dict)):
      out.update(flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def complete(config) -> ml_collections.ConfigDict:
  """A copy of ``config`` (unlocked) with every key it leaves out at its default, each written
  once: the common keys' in the default config (``vlora_jax/config/defaults.py``), a family's own
  ``config.model`` keys' beside its code (`Family.config_keys`). The run's code reads every key
  without a default of its own. A required key left out stays out, for `check` to name; a
  ``model.vlora`` (``model.lora``) group left out means the dense model (no LoRA), and a LoRA
  group's keys default to `LoRASpec`'s, as a VLoRA group's to `VLoRASpec`'s."""
  out = (config.copy_and_resolve_references() if isinstance(config, ml_collections.ConfigDict)
         else ml_collections.ConfigDict(config))
  out.unlock()
  base = flatten(defaults.get_config())
  name = lookup(out, "model.name", None)
  declared = keys(name) if isinstance(name, str) and name in FAMILIES else COMMON
  for key, rule in declared.items():
    if rule.required or (key in COMMON and key not in base):  # not in base: the LoRA keys
      continue
    fill(out, key, base[key] if key in COMMON else rule.default)
  return out


def check(config) -> None:
  """Every key of ``config`` against the schema; a `ConfigError` on the first problem."""
  name_key = COMMON["model.name"]
  name = lookup(config, "model.name", None)
  name_key.check("model.name", name)
  declared = keys(name)
  present = flatten(config)
  for key in present:
    if key not in declared:
      near = difflib.get_close_matches(key, list(declared), n=1)
      raise bad(key, present[key], "is not a config key" + (f"; did you mean {near[0]!r}?"
                                                             if near else ""))
  for key, rule in declared.items():
    if rule.when is not None and not rule.when.holds(config):
      continue
    if key in present:
      if present[key] is None and rule.nullable:
        continue
      rule.check(key, present[key])
    elif rule.required:
      raise bad(key, None, f"is missing ({rule.doc}; must be {rule.allowed()})")


def markdown() -> str:
  """The schema as a markdown table (docs/config.md; ``python -m vlora_jax.tools.config_doc``)."""
  lines = ["| key | allowed | applies when | what it does |", "|---|---|---|---|"]
  for name, rule in sorted(keys().items()):
    when = [rule.when.text] if rule.when else []
    if name not in COMMON:
      when.insert(0, f"model.name in {sorted(f for f in FAMILIES if name in keys(f))}")
    text = ", ".join(when) or "always"
    if rule.required:
      text += " (required)"
    lines.append(f"| `{name}` | {rule.allowed()}{' or None' if rule.nullable else ''} | {text} "
                 f"| {rule.doc} |")
  return "\n".join(lines) + "\n"
