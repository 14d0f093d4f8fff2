"""The config schema: generated bad values for every key, an independent table of bad values, and
the schema against config/defaults.py.

For every declared key (the run's and each family's), a base config where the key applies gets a
value of the wrong type and a value out of range (`Key.bad_values`); each must be refused by
`validate.check` (which compiles nothing) with a `ConfigError` that names the key.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import ml_collections
import pytest

from vlora_jax import errors
from vlora_jax.config.keys import Choice, lookup
from vlora_jax.config import files as config_files
from vlora_jax.train import schema, validate

ROOT = Path(__file__).resolve().parents[2]


def _load(spec: str, **changes) -> ml_collections.ConfigDict:
  c = config_files.load(str(ROOT / spec.split(":")[0]) + (":" + spec.split(":")[1] if ":" in spec
                                                           else ""), lock=False)
  d = c.to_dict()
  for k, v in changes.items():
    _set(d, k, v)
  return ml_collections.ConfigDict(d)


def _set(d: dict, dotted: str, value) -> None:
  *parents, leaf = dotted.split(".")
  for k in parents:
    d = d.setdefault(k, {})
  d[leaf] = value


LORA = {"model.lora": {"enabled": True, "targets": ("attn/qkv/kernel",), "rank": 2, "alpha": 2.0}}
# Base configs where every declared key applies in at least one (checked below).
BASES = {
    "vit_digits": ("configs/vit_digits.py", {}),
    "vit_npz": ("configs/vit_local.py", {"data.path": "/data/x.npz"}),
    "vit_tfds": ("configs/vit_cifar10.py", {}),
    "vit_lora": ("configs/vit_digits.py", LORA),
    "lm_text": ("configs/lm_shakespeare.py:text", {}),
    "seq2seq": ("configs/seq2seq_reverse.py", {}),
    "vit_registers": ("configs/vit_registers_digits.py", {}),
    "llama": ("configs/llama.py", {}),
    "llama_tokenized": ("configs/llama.py:bpe", {"data.split_seed": 3}),
    "vit_sgd": ("configs/vit_digits.py", {"optim.name": "sgd"}),
}


def _bases():
  out = {}
  for name, (spec, changes) in BASES.items():
    flat_changes = {}
    for k, v in changes.items():
      if isinstance(v, dict):
        flat_changes.update({f"{k}.{kk}": vv for kk, vv in v.items()})
      else:
        flat_changes[k] = v
    out[name] = _load(spec, **flat_changes)
  return out


CONFIGS = _bases()


def _base_for(key: str):
  """The first base config whose family declares ``key`` and where it applies."""
  for name, c in CONFIGS.items():
    rule = schema.keys(c.model.name).get(key)
    if rule is not None and (rule.when is None or rule.when.holds(c)):
      if lookup(c, key, None) is not None or rule.when is None:
        return name, c
  return None, None


CASES = [(key, kind, value) for key, rule in sorted(schema.keys().items())
         for kind, value in rule.bad_values().items()]


def test_every_key_has_a_base_config_where_it_applies():
  missing = [k for k in schema.keys() if _base_for(k)[0] is None]
  assert not missing, f"no base config exercises {missing}: add one to BASES"


def test_every_key_can_be_refused():
  # Anything (sharding_rules) is judged by its cross-field rule, tested in test_train_validate.
  silent = [k for k, r in schema.keys().items()
            if not r.bad_values() and type(r).__name__ != "Anything"]
  assert not silent
  assert len(CASES) >= 2 * (len(schema.keys()) - 1) - 20  # most keys: a type and a range case


@pytest.mark.parametrize("key,kind,value", CASES,
                         ids=[f"{k}:{kind}" for k, kind, _ in CASES])
def test_bad_value_is_refused_naming_the_key(key, kind, value):
  _refused_naming(key, value)


def _refused_naming(key: str, value) -> None:
  """``value`` at ``key`` in a base config where the key applies: a `ConfigError` that starts by
  naming the key."""
  name, base = _base_for(key)
  d = base.to_dict()
  _set(d, key, value)
  with pytest.raises(errors.ConfigError) as info:
    validate.check(ml_collections.ConfigDict(d), num_devices=1)
  assert re.match(rf"{re.escape(key)}(\[\d+\])?=", str(info.value)), (name, str(info.value))


@pytest.mark.parametrize("name", sorted(BASES))
def test_base_configs_pass(name):
  validate.check(CONFIGS[name], num_devices=1)


def test_a_misspelt_key_in_a_config_file_is_named_with_a_suggestion():
  c = _load("configs/vit_digits.py", **{"optim.weight_decy": 0.1})
  with pytest.raises(errors.ConfigError, match=r"optim.weight_decy=0.1: is not a config key; "
                                               r"did you mean 'optim.weight_decay'\?"):
    validate.check(c, num_devices=1)


def test_a_required_key_that_is_missing_is_named():
  d = _load("configs/vit_digits.py").to_dict()
  del d["model"]["img_size"]
  with pytest.raises(errors.ConfigError, match=r"model.img_size=None: is missing"):
    validate.check(ml_collections.ConfigDict(d), num_devices=1)


@pytest.mark.parametrize("changes,match", [
    ({"model.vlora.compound_size": 1, "model.depth": 4},
     r"model.vlora.compound_size=1: must be >= 2"),
    ({"model.mlp_ratio": 0.001}, r"model.mlp_ratio=0.001: gives an MLP of width 0"),
    ({"label_smoothing": 5.0}, r"label_smoothing=5.0: must be a finite number in \[0, 1\)"),
    ({"optim.eps": -1.0}, r"optim.eps=-1.0: must be a finite number > 0"),
    ({"data.eval_examples": -5}, r"data.eval_examples=-5: must be an integer >= 0"),
    ({"optim.lr": math.inf}, r"optim.lr=inf: must be a finite number > 0"),
    ({"optim.weight_decay": math.nan}, r"optim.weight_decay=nan: must be a finite number >= 0"),
    ({"model.mlp_ratio": math.inf}, r"model.mlp_ratio=inf: must be a finite number > 0"),
], ids=["compound_size=1", "mlp_width_0", "label_smoothing", "eps", "eval_examples", "lr_inf",
        "wd_nan", "mlp_ratio_inf"])
def test_the_reported_nonsense_is_refused(changes, match):
  with pytest.raises(errors.ConfigError, match=match):
    validate.check(_load("configs/vit_digits.py", **changes), num_devices=1)


def test_tied_allows_one_layer_compounds():
  validate.check(_load("configs/vit_digits.py", **{"model.vlora.compound_size": 1,
                                                   "model.vlora.mode": "tied"}), num_devices=1)


def test_split_fractions_out_of_range_are_refused():
  with pytest.raises(errors.ConfigError, match=r"data.validation_fraction=1.5: must be a finite "
                                               r"number in \[0, 1\)"):
    validate.check(_load("configs/lm_shakespeare.py:text", **{"data.validation_fraction": 1.5}),
                   num_devices=1)
  with pytest.raises(errors.ConfigError, match=r"data.eval_fraction=0.1: is not a config key; "
                                               r"did you mean 'data.test_fraction'\?"):
    validate.check(_load("configs/lm_shakespeare.py:text", **{"data.eval_fraction": 0.1}),
                   num_devices=1)


# ------------------------------------------------------------------ the schema and default.py agree

DEFAULT = ROOT / "vlora_jax" / "config" / "defaults.py"
# Declared, but set only by the configs whose source or option needs them.
# A model without a lora group has no LoRA; the group's defaults are `LoRASpec`'s.
NOT_IN_DEFAULT = {"model.lora.enabled", "model.lora.targets", "model.lora.rank",
                  "model.lora.alpha"}


def _default():
  from vlora_jax.config import defaults as default
  return default.get_config()


def test_default_config_keys_are_exactly_the_common_schema():
  present = set(schema.flatten(_default()))
  declared = set(schema.COMMON)
  assert present - declared == set(), "keys in vlora_jax/config/defaults.py missing from the schema"
  assert declared - present == NOT_IN_DEFAULT, (
      "schema keys missing from vlora_jax/config/defaults.py")


def test_default_values_are_allowed():
  for key, value in schema.flatten(_default()).items():
    if not (value is None and schema.COMMON[key].nullable):
      schema.COMMON[key].check(key, value)


def test_family_keys_appear_in_a_config_file():
  used = set()
  for c in CONFIGS.values():
    used |= set(schema.flatten(c))
  for name in schema.FAMILIES:
    assert set(schema.keys(name)) - set(schema.COMMON) - used - {"model.vlora.dec_targets"} == set()


# ------------------------------------------------------------------ a key left out: its one default


def _bare(name: str) -> dict:
  """A hand-written config of ``name`` with only its required keys (and a data source)."""
  need = {k for k, rule in schema.keys(name).items() if rule.required}
  full = schema.flatten(next(c for c in CONFIGS.values() if c.model.name == name))
  out = {}
  for key in need | {"data.source", "model.vlora.enabled"}:
    _set(out, key, full[key])
  return out


@pytest.mark.parametrize("name", sorted(schema.FAMILIES))
def test_a_key_left_out_takes_the_default_config_s_value(name):
  bare = _bare(name)
  done = schema.complete(bare)
  schema.check(done)
  default = schema.flatten(_default())
  flat = schema.flatten(done)
  for key, rule in schema.keys(name).items():
    if rule.required or key.startswith("model.lora."):
      continue
    want = default[key] if key in schema.COMMON else rule.default
    assert flat[key] == want, key
  # The values the code once fell back to on its own, which disagreed with default.py.
  assert (done.optim.warmup_steps, done.optim.weight_decay, done.optim.grad_clip_norm,
          done.checkpoint.keep_best) == (100, 0.05, 1.0, 1)
  assert "lora" not in done.model  # no LoRA group: no LoRA
  assert bare == _bare(name)  # the caller's config is left as it was


def test_complete_keeps_what_is_set_and_leaves_the_rest_to_the_check():
  bare = _bare("lm")
  bare["optim"]["warmup_steps"] = 7
  bare["model"]["tie_embeddings"] = True
  done = schema.complete(bare)
  assert done.optim.warmup_steps == 7 and done.model.tie_embeddings is True
  del bare["model"]["vlora"]
  assert "vlora" not in schema.complete(bare).model  # no VLoRA group: the dense model
  del bare["batch_size"]
  with pytest.raises(errors.ConfigError, match="batch_size=None: is missing"):
    schema.check(schema.complete(bare))  # a required key is never filled in
  bare["optim"] = 5  # not a group: left alone, and named by the check
  with pytest.raises(errors.ConfigError, match="optim="):
    schema.check(schema.complete(bare))


def test_a_family_s_defaults_are_allowed_and_fill_a_bare_model_config():
  from vlora_jax.models.family import SHARED_OPTIONAL
  for name, fam in schema.FAMILIES.items():
    for key, rule in fam.config_keys.items():
      if not rule.required and not (rule.default is None and rule.nullable):
        rule.check(key, rule.default)
    model = fam.model_config(_bare(name)["model"])  # a model config alone, as tests build them
    assert all(key in model for key in SHARED_OPTIONAL)
    assert all(lookup(model, key[len("model."):], KeyError) is not KeyError
               for key, rule in fam.config_keys.items()
               if not rule.required and not key.startswith("model.vlora."))


def _comment_of(key: str, source: list[str]) -> str | None:
  """The comment on the line of default.py that sets ``key``, with its continuation lines."""
  pat = re.compile(rf"^\s*c\.{re.escape(key)}\s*=.*?#(.*)$")
  for i, line in enumerate(source):
    m = pat.match(line)
    if m:
      text = [m.group(1)]
      for nxt in source[i + 1:]:
        if not nxt.strip().startswith("#"):
          break
        text.append(nxt.strip()[1:])
      return " ".join(text)
  return None


def test_default_py_comments_list_every_choice():
  source = DEFAULT.read_text().splitlines()
  checked = 0
  for key, rule in schema.COMMON.items():
    comment = _comment_of(key, source)
    if isinstance(rule, Choice) and comment is not None:
      missing = [c for c in rule.choices if str(c) not in comment]
      assert not missing, f"vlora_jax/config/defaults.py's comment on {key} omits {missing}"
      checked += 1
  assert checked >= 8


def test_docs_config_md_is_the_schema():
  doc = (ROOT / "docs" / "config.md").read_text()
  assert schema.markdown() in doc, "regenerate: python -m vlora_jax.tools.config_doc (docs/config.md)"


@pytest.mark.parametrize("key,value,named", [
    ("optim.freeze", "encoder/.*", "optim.freeze='encoder/.*' matches no parameter"),
    ("optim.lr_mults", (("blocks/inc_[ab]/.*", 2.0), ("lora_.*", 3.0)),
     "optim.lr_mults[1]='lora_.*' matches no parameter"),
    ("optim.wd_mults", (("(.*/)?gamma", 0.0),), "optim.wd_mults[0]='(.*/)?gamma' matches no"),
])
def test_a_pattern_that_selects_no_parameter_is_refused(key, value, named, tmp_path):
  # Patterns are judged against the model's parameter paths, at set-up (shapes only, no compile).
  from helpers_train import tiny
  from vlora_jax.train.setup import set_up
  with pytest.raises(errors.ConfigError) as info:
    set_up(tiny("vit", **{key: value}), tmp_path)
  assert str(info.value).startswith(named), str(info.value)
  assert "paths such as" in str(info.value)


# Written from what each key means (docs/config.md, configs/default.py), not from the rule objects
# that `validate.check` uses: a rule with the wrong bound or an open end where a closed one
# belongs fails here even though its own generated bad values pass.
REFUSED = [
    ("vit_digits", "seed", -1), ("vit_digits", "seed", 2 ** 31),
    ("vit_digits", "model.dim", 0), ("vit_digits", "model.depth", -4),
    ("vit_digits", "model.num_heads", 2.0), ("vit_digits", "model.dropout", 1.0),
    ("vit_digits", "model.dropout", -0.01), ("vit_digits", "model.mlp_ratio", 0.0),
    ("vit_digits", "model.dtype", "float16"), ("vit_digits", "model.remat", "sometimes"),
    ("vit_digits", "model.attention", "flash"), ("vit_digits", "model.vlora.rank", 0),
    ("vit_digits", "model.vlora.alpha", 0.0), ("vit_digits", "model.vlora.mode", "vertical"),
    ("vit_digits", "model.vlora.compound_size", 0), ("vit_digits", "batch_size", 0),
    ("vit_digits", "grad_accum_steps", 0), ("vit_digits", "num_train_steps", -1),
    ("vit_digits", "optim.lr", 0.0), ("vit_digits", "optim.b1", 1.0),
    ("vit_digits", "optim.b2", -0.5), ("vit_digits", "optim.eps", 0.0),
    ("vit_digits", "optim.weight_decay", -0.1), ("vit_digits", "optim.min_lr_ratio", 1.5),
    ("vit_digits", "optim.warmup_steps", -5), ("vit_digits", "optim.grad_clip_norm", -1.0),
    ("vit_digits", "checkpoint.every_steps", 0), ("vit_digits", "checkpoint.best_mode", "best"),
    ("vit_digits", "data.source", "web"), ("vit_digits", "data.std", (0.0,)),
    ("vit_digits", "label_smoothing", 1.0), ("vit_digits", "distill.weight", 1.5),
    ("vit_digits", "distill.temperature", 0.0), ("vit_digits", "compress.budget", 1.01),
    ("vit_digits", "compress.damping", 0.0), ("vit_digits", "log_every_steps", 0),
    ("lm_text", "data.eval_fraction", 1.0), ("lm_text", "data.eval_fraction", 0.0),
    ("lm_text", "model.vocab_size", 0), ("lm_text", "model.positions", "sinusoidal"),
    ("seq2seq", "data.vocab_size", 3), ("llama", "model.num_kv_heads", 0),
    ("llama", "model.rope_base", 0.0),
]
ACCEPTED = [  # the closed ends of the same intervals
    ("vit_digits", "model.dropout", 0.0), ("vit_digits", "optim.min_lr_ratio", 1.0),
    ("vit_digits", "optim.min_lr_ratio", 0.0), ("vit_digits", "optim.weight_decay", 0.0),
    ("vit_digits", "optim.warmup_steps", 0), ("vit_digits", "distill.weight", 1.0),
    ("vit_digits", "distill.weight", 0.0), ("vit_digits", "compress.budget", 0.0),
    ("vit_digits", "compress.budget", 1.0), ("vit_digits", "num_train_steps", 0),
    ("vit_digits", "seed", 0), ("vit_digits", "seed", 2 ** 31 - 1),
    ("vit_digits", "label_smoothing", 0.0), ("vit_digits", "optim.grad_clip_norm", 0.0),
    ("seq2seq", "data.vocab_size", 4),
]


@pytest.mark.parametrize("base,key,value", REFUSED, ids=[f"{k}={v!r}" for _, k, v in REFUSED])
def test_a_hand_written_bad_value_is_refused_naming_the_key(base, key, value):
  d = CONFIGS[base].to_dict()
  _set(d, key, value)
  with pytest.raises(errors.ConfigError) as info:
    validate.check(ml_collections.ConfigDict(d), num_devices=1)
  assert str(info.value).startswith(f"{key}="), str(info.value)


@pytest.mark.parametrize("base,key,value", ACCEPTED, ids=[f"{k}={v!r}" for _, k, v in ACCEPTED])
def test_a_value_at_the_closed_end_of_its_range_is_accepted(base, key, value):
  d = CONFIGS[base].to_dict()
  _set(d, key, value)
  validate.check(ml_collections.ConfigDict(d), num_devices=1)


def _independent_cases():
  """Bad values derived from each key's value in its base config, not from the rule objects that
  `CASES` come from: a word where a number is, a number where a word or a switch is, a fraction
  where a count is."""
  out = []
  for key in sorted(schema.keys()):
    name, base = _base_for(key)
    value = lookup(base, key, None) if base is not None else None
    if isinstance(value, bool):
      out += [(key, "word_for_switch", "yes"), (key, "count_for_switch", 2)]
    elif isinstance(value, int):
      out += [(key, "word_for_count", "seven"), (key, "fraction_for_count", value + 0.5)]
    elif isinstance(value, float):
      out += [(key, "word_for_number", "seven")]
    elif isinstance(value, str):
      out += [(key, "number_for_word", 7)]
  return out


INDEPENDENT = _independent_cases()


def test_the_independent_table_covers_most_keys():
  assert len({k for k, _, _ in INDEPENDENT}) >= 0.8 * len(schema.keys())


@pytest.mark.parametrize("key,kind,value", INDEPENDENT,
                         ids=[f"{k}:{kind}" for k, kind, _ in INDEPENDENT])
def test_an_independent_bad_value_is_refused_naming_the_key(key, kind, value):
  _refused_naming(key, value)
