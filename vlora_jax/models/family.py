"""A model family: everything the rest of the package needs to know about one kind of model.

A `Family` turns ``config.model`` into a module, says which inputs the module takes and which data
sources feed it, and owns its task: the batch-to-inputs map, the loss and the metrics. The trainer,
`train.validate`, the checkpoints and the benchmarks hold a family object; none of them switches on
``config.model.name``. A new family is one file under ``models/`` that defines a `Family` subclass
(``vit.py`` is the shortest example) and one line in the registry, ``models/__init__.py``.

The loss and metric statistics are sums, so that eval can add them over batches and processes;
`finalize` turns them into means. An eval batch's ``mask`` (0 on padding examples) weights them all.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from vlora_jax.core import lora as lora_lib
from vlora_jax.config.keys import Key, bad, fill
from vlora_jax.core.lora import LoRASpec
from vlora_jax.core.spec import VLoRASpec

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# The ``config.model.vlora`` keys that are `VLoRASpec` fields (a family may read more, such as
# seq2seq's ``dec_targets``).
SPEC_KEYS = tuple(f.name for f in dataclasses.fields(VLoRASpec))


def vlora_spec(vcfg) -> VLoRASpec | None:
  """``config.model.vlora`` -> a validated `VLoRASpec`, or None for the dense model."""
  if vcfg is None or not vcfg.get("enabled", True):
    return None
  kw = {k: vcfg[k] for k in SPEC_KEYS if k in vcfg}
  for k in ("targets", "rank", "alpha"):  # config lists arrive as lists or tuples
    if k in kw and isinstance(kw[k], list):
      kw[k] = tuple(kw[k])
  return VLoRASpec(**kw)


def dtype(name: str):
  if name not in DTYPES:
    raise ValueError(f"model.dtype={name!r}: allowed are {list(DTYPES)}")
  return DTYPES[name]


# The optional ``config.model`` keys every family's module takes beside width, depth and heads: a
# model config that leaves one out gets the default config's value (`Family.model_config`).
SHARED_OPTIONAL = ("mlp_ratio", "dropout", "scan", "remat", "dtype", "attention")


def shared_kwargs(mcfg, vlora: VLoRASpec | None, lora: LoRASpec | None) -> dict:
  """The module arguments that every family reads the same way from a complete ``config.model``
  (`Family.model_config`): width, depth, heads, dropout, scan, remat, compute dtype, attention
  kernel and the two specs."""
  return dict(dim=mcfg.dim, depth=mcfg.depth, num_heads=mcfg.num_heads, dropout=mcfg.dropout,
              scan=mcfg.scan, remat=mcfg.remat, dtype=dtype(mcfg.dtype),
              attention=mcfg.attention, vlora=vlora, lora=lora)


class Family(abc.ABC):
  """One kind of model and its task. Subclasses set the class attributes and implement the
  abstract methods (a family that misses one fails when it is instantiated, at import).

  Attributes:
    name: the ``config.model.name`` that selects the family.
    sources: the ``config.data.source`` values whose records the family reads.
    input_keys: the batch keys passed to ``model.apply``, in order (see `inputs`).
    config_keys: the family's own ``config.model`` keys, declared (`vlora_jax.config.keys`):
      `train.schema` checks them with the run's other keys before anything is built.
    generates: a language model that `decoding.generate` continues (its call takes
      ``position_ids``, ``mask`` and ``decode``): `vlora_jax.sample` serves it.
    hf_architecture: the Hugging Face ``architectures`` entry that ``vlora_jax.export --format hf``
      writes the family as (None: no such export).
    classifies_images: an image classifier whose run stores its image size and normalisation:
      `vlora_jax.predict` serves it.
    exports_timm: its parameters map onto timm's ``VisionTransformer`` (`convert.timm_export`):
      ``vlora_jax.export --format timm`` serves it.
  """

  name: ClassVar[str]
  sources: ClassVar[tuple[str, ...]]
  input_keys: ClassVar[tuple[str, ...]]
  config_keys: ClassVar[dict[str, Key]] = {}
  generates: ClassVar[bool] = False
  hf_architecture: ClassVar[str | None] = None
  classifies_images: ClassVar[bool] = False
  exports_timm: ClassVar[bool] = False

  # ------------------------------------------------------------------------- the model

  @abc.abstractmethod
  def build(self, mcfg, vlora: VLoRASpec | None, lora: LoRASpec | None) -> nn.Module:
    """``config.model`` and the run's specs (built once, by the caller) -> an unbound module."""

  def build_from_config(self, mcfg) -> nn.Module:
    mcfg = self.model_config(mcfg)
    return self.build(mcfg, vlora_spec(mcfg.get("vlora")),
                      lora_lib.spec_from_config(mcfg.get("lora")))

  def model_config(self, mcfg) -> ml_collections.ConfigDict:
    """A copy of ``config.model`` (locked as it was) with every optional key it leaves out at
    its default, each written once: the shared keys' in the default config
    (``vlora_jax/config/defaults.py``), the family's own in `config_keys`. What `build` reads: a
    model config written by hand, or stored before a key existed, builds as the full one would.
    A required key left out stays out, and a model without a ``vlora`` (``lora``) group stays
    dense (without LoRA)."""
    from vlora_jax.config import defaults
    out = (mcfg.copy_and_resolve_references() if isinstance(mcfg, ml_collections.ConfigDict)
           else ml_collections.ConfigDict(mcfg))
    base = defaults.get_config().model
    with out.unlocked():
      for name in SHARED_OPTIONAL:
        fill(out, name, base[name])
      for dotted, key in self.config_keys.items():
        if not key.required:
          fill(out, dotted.removeprefix("model."), key.default)
    return out

  @abc.abstractmethod
  def sample_inputs(self, mcfg, batch: int = 2) -> tuple[jax.ShapeDtypeStruct, ...]:
    """Shapes of the positional inputs of ``model.apply`` / ``init`` for a batch."""

  @abc.abstractmethod
  def example_batch(self, mcfg, batch: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A synthetic training batch: the keys, shapes, dtypes and value ranges the data feeds (for
    benchmarks and tests)."""

  @abc.abstractmethod
  def sequence_length(self, mcfg) -> int:
    """Tokens per example that the layer stack processes (for FLOP estimates)."""

  def stack_specs(self, model: nn.Module) -> dict[str, tuple[VLoRASpec | None, LoRASpec | None]]:
    """``{stack name: (vlora, lora)}``: what `stack.merge` and the checkpoint layouts need."""
    return model.stack_specs()

  # ------------------------------------------------------------------------- the task

  def inputs(self, batch) -> tuple:
    """Positional arguments of ``model.apply`` for a batch."""
    return tuple(batch[k] for k in self.input_keys)

  @abc.abstractmethod
  def targets(self, batch, example_weight):
    """``(targets, weights)``: class ids and their loss weights, broadcast like the logits'
    leading axes; ``example_weight`` [B] is the batch's ``mask`` (ones in training)."""

  def stream_weights(self, batch, example_weight) -> dict[str, jax.Array]:
    """``{stack name: [B, T]}``: the weights of a stack's positions for a loss on its residual
    stream (distillation's per-compound loss); a stack left out counts every position."""
    del batch, example_weight
    return {}

  def sums(self, logits, batch, label_smoothing: float = 0.0) -> dict[str, jax.Array]:
    """``{'loss', 'correct', 'weight', 'examples', ...}``, each summed over the batch."""
    logits = logits.astype(jnp.float32)
    ex_w = batch.get("mask", jnp.ones((logits.shape[0],), jnp.float32)).astype(jnp.float32)
    targets, w = self.targets(batch, ex_w)
    onehot = jax.nn.one_hot(targets, logits.shape[-1], dtype=jnp.float32)
    if label_smoothing:
      onehot = optax.smooth_labels(onehot, label_smoothing)
    ce = optax.softmax_cross_entropy(logits, onehot)
    hit = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
    return {"loss": jnp.sum(ce * w), "correct": jnp.sum(hit * w), "weight": jnp.sum(w),
            "examples": jnp.sum(ex_w), **self.extra_sums(hit, w, ex_w)}

  def eval_sums(self, model, params, batch) -> dict[str, jax.Array]:
    """The eval statistics of a batch (`sums` of the model's logits; a family may add more, such
    as the encoder-decoder's real decoding)."""
    return self.sums(model.apply({"params": params}, *self.inputs(batch), train=False), batch)

  def extra_sums(self, hit, weight, example_weight) -> dict[str, jax.Array]:
    """Family-specific statistics beside the loss and accuracy (none by default)."""
    del hit, weight, example_weight
    return {}

  def finalize(self, sums: dict, prefix: str) -> dict[str, float]:
    """Sums -> ``{prefix/loss, prefix/accuracy, ...}`` means (floats)."""
    w = max(float(sums["weight"]), 1e-12)
    return {f"{prefix}/loss": float(sums["loss"]) / w,
            f"{prefix}/accuracy": float(sums["correct"]) / w}

  def tokens_per_example(self, info: dict) -> int | None:
    """Target tokens per example, for tokens/s; None where the family does not count tokens."""
    del info
    return None

  # ------------------------------------------------------------------------- checks

  @abc.abstractmethod
  def check_data(self, mcfg, info: dict) -> None:
    """The model against what the data pipeline found (``Pipeline.info``)."""


class TokenFamily(Family):
  """A family that reads token ids: the vocabulary must hold the data's."""

  def check_data(self, mcfg, info: dict) -> None:
    if mcfg.vocab_size < info["vocab_size"]:
      raise bad("model.vocab_size", mcfg.vocab_size,
                f"the data's vocabulary has {info['vocab_size']} tokens")

  def tokens_per_example(self, info: dict) -> int | None:
    return info["tokens_per_example"]

