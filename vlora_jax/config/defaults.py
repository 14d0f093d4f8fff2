"""Every config key, with its default and what it does: `get_config()` is every config's base.

Experiment files start from it and change a few keys (``configs/*.py`` import it as ``from configs
import default``, which re-exports this module; a config file of your own imports
``from vlora_jax.config import defaults``). It lives in the package because commands that build a
config themselves (the import of pretrained models, `vlora_jax.convert`) need no repository.
"""

import dataclasses

import ml_collections

from vlora_jax.core.spec import VLoRASpec

__all__ = ["ACTIVATION_RULES", "NO_DECAY", "SEQUENCE_PARALLEL_RULES", "SHARDING_RULES", "get_config",
           "parse_arg", "vlora"]

# Logical axis -> mesh axis. Parameters name their axes in the model code
# (vlora_jax/core/layers.py); the layer stack adds 'layers', 'compound', 'step' and 'rank'
# (vlora_jax/core/stack.py). The stacked axes and the LoRA rank stay replicated: they are small or
# scanned over. A mesh axis goes to the name first in this table (vlora_jax/core/partitioning.py):
# 'embed' takes 'fsdp' in every weight that has it, and the hidden widths fall back to 'fsdp' in
# the arrays without an 'embed' axis, the VLoRA and LoRA factors [rank, mlp] and [mlp, rank],
# which would otherwise be whole on every chip.
SHARDING_RULES = (
    ("batch", ("data", "fsdp")),  # activations' batch axis (inputs are split the same way)
    ("embed", "fsdp"),            # the model width: FSDP shards parameters along it
    ("mlp", ("tensor", "fsdp")),  # MLP hidden width: tensor parallelism
    ("qkv", ("tensor", "fsdp")),  # fused q/k/v outputs
    ("heads", ("tensor", "fsdp")),  # attention output projection's input (heads x head_dim)
    ("kv_heads", ("tensor", "fsdp")),  # grouped-query key/value projections' outputs (llama)
    ("vocab", "tensor"),          # classifier / LM head outputs, token embeddings
    ("layers", None),             # per-layer stack axis [L, ...]
    ("compound", None),           # VLoRA: one entry per compound [C, ...]
    ("step", None),               # VLoRA: increments inside a compound [C, s-1, ...]
    ("rank", None),               # VLoRA / LoRA rank: always replicated
)

# Logical axis -> mesh axis for activations (vlora_jax/core/partitioning.py): every device keeps
# the activations of its own sequences (batch over data and fsdp, so that per-device cost stays
# flat as the pod grows), and tensor parallelism splits heads, MLP and vocabulary. The residual
# stream's width stays whole: FSDP gathers weights, not activations.
ACTIVATION_RULES = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", None),
    ("heads", "tensor"),
    ("kv", None),                 # head dim
    ("mlp", "tensor"),
    ("vocab", "tensor"),
)

# Tensor parallelism with sequence parallelism (Megatron-LM's): the residual stream between the
# projections is split along its length over 'tensor' too, so that the tensor axis divides every
# activation a chip keeps, not only the heads and the MLP. 'length' comes after the names that
# take 'tensor' inside a block: an array with heads, MLP or vocabulary (a projection's output)
# gives them the axis and keeps its length whole, an array without them (the residual) splits its
# length. For ``config.activation_rules`` with ``mesh.tensor`` > 1.
SEQUENCE_PARALLEL_RULES = (
    ("batch", ("data", "fsdp")),
    ("heads", "tensor"),
    ("kv", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("length", "tensor"),
    ("embed", None),
)

# Weight decay off for norms, biases, position embeddings and the class token (timm's habit).
NO_DECAY = ((r"(.*/)?(bias|scale|pos_embed|cls_token)", 0.0),)


def parse_arg(arg: str, defaults: dict) -> dict:
  """``'dense,r=4,s=2,steps=300'`` -> ``defaults`` updated; bare words set ``defaults``' word keys.

  Bare words (no ``=``) are matched against the allowed values of each word key: ``defaults``
  maps a key to ``(default, allowed values)`` for words and to a plain default for ``k=v`` keys.
  A key set twice (``dense,dense``, ``vlora,dense``, ``r=4,r=8``) and a value of the wrong type
  (``r=abc``) are refused, naming the key.
  """
  out = {k: (v[0] if isinstance(v, tuple) else v) for k, v in defaults.items()}
  words = {k: v[1] for k, v in defaults.items() if isinstance(v, tuple)}
  given: dict[str, str] = {}
  for part in [p.strip() for p in (arg or "").split(",") if p.strip()]:
    if "=" in part:
      k, v = (s.strip() for s in part.split("=", 1))
      if k not in out or k in words:
        raise ValueError(f"config arg {arg!r}: unknown key {k!r}; allowed are "
                         f"{sorted(k for k in out if k not in words)}")
      value = _typed(arg, k, v, out[k])
    else:
      hits = [k for k, allowed in words.items() if part in allowed]
      if not hits:
        raise ValueError(f"config arg {arg!r}: unknown word {part!r}; allowed are "
                         f"{ {k: list(a) for k, a in words.items()} }")
      k, value = hits[0], part
    if k in given:
      raise ValueError(f"config arg {arg!r}: {k} is set twice ({given[k]!r} and {part!r}); "
                       "give each at most once")
    given[k], out[k] = part, value
  return out


def _typed(arg: str, key: str, text: str, default):
  """``text`` as the type of ``default`` (None: the text itself), or a ValueError naming ``key``."""
  if default is None or isinstance(default, str):
    return text
  kind = type(default)
  if kind is bool:
    low = text.lower()
    if low not in ("true", "false", "1", "0"):
      raise ValueError(f"config arg {arg!r}: {key}={text!r} is not a bool; allowed are true, "
                       "false, 1, 0")
    return low in ("true", "1")
  try:
    return kind(text)
  except ValueError:
    what = {int: "an integer", float: "a number"}.get(kind, f"a {kind.__name__}")
    raise ValueError(f"config arg {arg!r}: {key}={text!r} is not {what}") from None


def vlora(enabled: bool = True, compound_size: int = 4, rank=8) -> ml_collections.ConfigDict:
  """``config.model.vlora``: the VLoRA parameterisation of the model's layer stack(s).

  Its keys are the fields of `vlora_jax.core.spec.VLoRASpec` (documented there), with the values of
  ``VLoRASpec.official()``, the variant the official code computes, so that the defaults and the
  target patterns are written once:

    compound_size  layers per compound s; must divide model.depth
    targets        regexes over block param paths: the four big matrices
    rank, alpha    LoRA rank r and scale numerator of each increment (one value, or one per target)
    mode           anchored (official: W_k = W_0 + dW_k) | cumulative (paper) | tied |
                   relaxed (W_k = W_0 + dW_k for every k, W_0 shared and no layer: set
                   stop_gradient_base=False)
    stop_gradient_base  detach W_0 in layers k >= 1 (official)
    scaling        standard (alpha / r) | rslora (alpha / sqrt r)
    init           official (kaiming-uniform A and B) | zero_b (B = 0: starts tied)
  """
  # Not type-safe: rank and alpha take one number or one per target, e.g. rank=(8, 8, 4, 4).
  v = ml_collections.ConfigDict(type_safe=False)
  v.enabled = enabled          # False: the dense model (same architecture, full weights per layer)
  spec = VLoRASpec.official()  # the defaults only: validate.check judges the values set here
  for field in dataclasses.fields(VLoRASpec):
    v[field.name] = getattr(spec, field.name)
  v.compound_size, v.rank = compound_size, rank
  return v


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0                   # model init, data order and dropout all derive from it
  # Generator of the per-step dropout keys: threefry2x32 (JAX's default; identical on any mesh) |
  # rbg | unsafe_rbg (XLA's RngBitGenerator: far cheaper to compile on CPU, but its bits may
  # depend on the sharding). Parameter init always uses threefry2x32.
  c.rng_impl = "threefry2x32"

  # Model: the schema of vlora_jax/models/__init__.py; experiment files fill the family's keys.
  c.model = ml_collections.ConfigDict()
  c.model.name = "vit"         # vit | vit_registers | lm | llama | seq2seq
  c.model.dim = 64             # width D
  c.model.depth = 4            # layers L (encoder layers for seq2seq)
  c.model.num_heads = 4        # attention heads (must divide dim)
  c.model.mlp_ratio = 4.0      # MLP hidden = mlp_ratio * dim
  c.model.dropout = 0.0        # dropout after attention and MLP
  c.model.dtype = "float32"    # compute dtype: float32 | bfloat16 (mixed precision; params and the
                               # VLoRA chain stay float32)
  c.model.scan = True          # one scan over layers (False: unrolled reference path)
  c.model.remat = "none"       # what the backward pass keeps (vlora_jax/core/remat.py):
                               # none | full | dots | dots_no_batch | save_qkv_proj | save_proj |
                               # offload_qkv_proj | offload_dots_no_batch | offload_layer_inputs
  c.model.attention = "xla"    # xla | cudnn (fused, NVIDIA GPUs, bfloat16) | pallas (flash, TPU)
  c.model.vlora = vlora()

  # Data: see vlora_jax/data/__init__.py for the sources.
  c.data = ml_collections.ConfigDict()
  c.data.source = "digits"     # digits | npz | tfds | text | tokenized | reverse
  c.data.path = ""             # npz / text / tokenized: a local file; a relative path is read
                               # from the data directory, $VLORA_DATA (vlora_jax/data/paths.py)
  c.data.tokenizer = ""        # tokenized: a tokenizer.json, a .gguf, a Hugging Face model
                               # directory, or a run's workdir whose checkpoints store one
  c.data.split_blocks = 20     # text, tokenized: the text is cut into this many equal blocks
  c.data.validation_fraction = 0.05  # the share of the train split (its examples, or the text's
                               # blocks) that validates: what the run evaluates while it trains
  c.data.test_fraction = 0.05  # text, tokenized: the share of the blocks that tests
  c.data.split_seed = 0        # which examples or blocks are held out: an int a seeded choice,
                               # None the file's last ones (text configs: a held-out tail)
  c.data.eval_split = "validation"  # validation | test: what the run evaluates while it trains
                               # (and ranks best/ by); the test split is evaluated once, at the end
  c.data.tfds_name = ""        # tfds: dataset name (cifar10, mnist, tiny_shakespeare)
  c.data.data_dir = ""         # tfds: data directory ('' = TFDS default, ~/tensorflow_datasets)
  c.data.download = False      # tfds: download and prepare when missing (needs network)
  c.data.train_split = "train"  # tfds split names: the train split (validation comes out of it)
  c.data.test_split = "test"   # and the test split
  c.data.augment = "none"      # images: none | crop | crop_flip (random crop with zero padding)
  c.data.crop_padding = 4      # images: padding of the random crop
  c.data.mean = (0.5,)         # images: per-channel mean after scaling pixels to [0, 1]
  c.data.std = (0.5,)          # images: per-channel std
  c.data.pixel_scale = "uint8"  # npz images: uint8 (integers 0-255) | unit (floats in [0, 1]);
                               # checked against the file, never guessed
  c.data.eval_examples = 0     # cap on the examples of each eval set, validation and test (0: all)
  c.data.vocab_size = 16       # reverse: token ids < vocab_size (0-2 are pad, bos, eos)
  c.data.min_len = 1           # reverse: the shortest string
  c.data.threads = 2           # grain read-ahead threads

  c.batch_size = 128           # global batch (all processes); divisible by mesh.data * mesh.fsdp
  c.grad_accum_steps = 1       # microbatches a step runs one after another, one update from their
                               # summed gradients: a step's memory is a batch_size /
                               # grad_accum_steps batch's (divisible by it times the data devices)
  c.eval_batch_size = 256      # global eval batch; the eval set is padded (and masked) to it
  c.num_train_steps = 1000     # optimizer steps
  c.label_smoothing = 0.0      # classification only

  c.optim = ml_collections.ConfigDict()
  c.optim.name = "adamw"       # adamw | adafactor | lion | sgd (optax; vlora_jax/train/optim.py)
  c.optim.lr = 1e-3            # peak learning rate
  c.optim.b1 = 0.9             # adamw, lion
  c.optim.b2 = 0.999           # adamw, lion (Lion's paper: 0.99)
  c.optim.eps = 1e-8           # adamw
  c.optim.momentum = 0.9       # sgd
  c.optim.nesterov = False     # sgd
  c.optim.weight_decay = 0.05  # decoupled (times the learning rate, as AdamW's); times
                               # optim.wd_mults
  c.optim.schedule = "cosine"  # cosine | constant (both after the linear warmup)
  c.optim.warmup_steps = 100
  c.optim.min_lr_ratio = 0.0   # cosine ends at lr * min_lr_ratio
  c.optim.grad_clip_norm = 1.0  # clip by global norm of the trainable grads (0 = off)
  c.optim.freeze = ""          # regex over param paths; matches are frozen (no optimizer state),
                               # e.g. '(?!head/).*' trains the head only
  c.optim.lr_mults = ()        # ((regex, mult), ...) e.g. ((r'.*/inc_[ab]/.*', 2.0),)
  c.optim.wd_mults = NO_DECAY  # ((regex, mult), ...) multiplies weight_decay; first match wins

  # Mesh axes (data, fsdp, tensor); -1 fills with the remaining devices.
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  c.sharding_rules = SHARDING_RULES
  c.activation_rules = ACTIVATION_RULES

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 500    # save interval (the last step is always saved)
  c.checkpoint.keep = 2             # newest checkpoints kept in <workdir>/checkpoints
  c.checkpoint.keep_best = 1        # best checkpoints kept in <workdir>/best (0 = off)
  c.checkpoint.best_metric = "eval/accuracy"  # ranks the best checkpoints
  c.checkpoint.best_mode = "max"    # max | min
  c.checkpoint.async_save = True    # write in the background while training continues
  c.checkpoint.restore_from = ""    # explicit checkpoint (precedence 2; the workdir's own wins)
  c.init_from = ""                  # '<kind>:<arg>' params-only init (precedence 3), e.g.
                                    # 'checkpoint:/path/to/workdir' or
                                    # 'py:<module>.<function>:<arg>' (any converter) or
                                    # 'compress:<workdir of a trained dense run>'
  c.distill = ml_collections.ConfigDict()  # knowledge distillation (vlora_jax/train/teacher.py)
  c.distill.teacher = ""            # workdir of a trained run of the same family ('' = off)
  c.distill.weight = 0.5            # w: loss = (1 - w) task + w T^2 KL(teacher || student)
  c.distill.temperature = 2.0       # T: softens both distributions
  c.distill.hidden_weight = 0.0     # h: + h * the per-compound output loss (same depth/width)
  c.compress = ml_collections.ConfigDict()  # how init_from='compress:...' compresses
  c.compress.base = "first"         # first | mean | auto: each compound's base
  c.compress.increments = "svd"     # svd | whitened (activation-aware) | zero
  c.compress.calibration_batches = 8  # whitened: train batches whose inputs weigh the SVD
  c.compress.damping = 1e-6         # whitened: relative floor on the inputs' eigenvalues
  c.compress.budget = 0.0           # > 0: model.vlora.rank becomes one rank per target, chosen
                                    # by residual energy for this fraction of the dense params

  c.log_every_steps = 50       # metrics.jsonl / TensorBoard interval
  c.eval_every_steps = 500     # periodic eval (0 = only at the end)
  c.progress = True            # tqdm progress bar on process 0
  c.tensorboard = True         # TensorBoard event files in <workdir>/tb

  # Multi-host: True calls jax.distributed.initialize() with JAX's cluster auto-detection (TPU
  # pods, SLURM, Open MPI). JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID in the
  # environment also start it, whatever this says.
  c.distributed = ml_collections.ConfigDict()
  c.distributed.initialize = False
  return c
