"""Encoder-decoder Transformer, dense or VLoRA in both stacks from one field (``vlora``).

Shared token embedding (pad id 0), learned position embeddings (one table per side), an encoder stack
of pre-norm `layers.EncoderBlock` and a decoder stack of `layers.DecoderBlock` (causal self-attention,
cross-attention to the encoder memory, MLP), each its own `vlorafy` stack, final LayerNorms, and a
head (or the tied embedding).

Masks are built inside from ``tokens != 0``: encoder self-attention and cross-attention see only real
source keys; decoder self-attention is causal and sees only real target keys. Outputs at pad
positions are computed but meaningless; nothing at a real position depends on pad content.

VLoRA targets: the encoder uses ``vlora.targets`` as given. The decoder block also has
cross-attention weights (``cross/q``, ``cross/kv``, ``cross/proj``); with the default targets (the
four big matrices) the decoder adds those three (`DEC_TARGETS`), with their ranks and alphas taken
from the analogous self-attention targets. ``dec_targets`` overrides the decoder's set.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vlora_jax.models import decoding
from vlora_jax.core import layers
from vlora_jax.config.keys import Bool, Int, Regexes
from vlora_jax.core import lora as lora_lib
from vlora_jax.models import family
from vlora_jax.models.lm import check_common, embed
from vlora_jax.core.partitioning import BATCH, LENGTH, RESIDUAL, VOCAB, constrain
from vlora_jax.core.spec import VIT_TARGETS, VLoRASpec
from vlora_jax.core.stack import block_param_shapes, vlorafy
from vlora_jax.tokens import BOS_ID, EOS_ID, PAD_ID

CROSS_TARGETS = (r"cross/q/kernel", r"cross/kv/kernel", r"cross/proj/kernel")
DEC_TARGETS = VIT_TARGETS + CROSS_TARGETS
# Where a cross-attention target takes its rank/alpha from when they are given per target.
_ANALOGUE = {r"cross/q/kernel": r"attn/qkv/kernel", r"cross/kv/kernel": r"attn/qkv/kernel",
             r"cross/proj/kernel": r"attn/proj/kernel"}


def decoder_spec(spec: VLoRASpec | None, dec_targets=None) -> VLoRASpec | None:
  """The decoder stack's spec: ``spec`` with the decoder's targets (see the module docstring)."""
  if spec is None:
    return None
  if dec_targets is None:
    dec_targets = DEC_TARGETS if spec.targets == VIT_TARGETS else spec.targets
  dec_targets = (dec_targets,) if isinstance(dec_targets, str) else tuple(dec_targets)
  if dec_targets == spec.targets:
    return spec
  values = {}
  for field, per in (("rank", spec.ranks), ("alpha", spec.alphas)):
    if len(set(per)) == 1:  # one value for every target: keep it scalar
      values[field] = per[0]
      continue
    by_target = dict(zip(spec.targets, per))
    out = []
    for t in dec_targets:
      src = t if t in by_target else _ANALOGUE.get(t)
      if src not in by_target:
        raise ValueError(f"vlora.{field} is given per target {list(spec.targets)}, so decoder "
                         f"target {t!r} has no value; use one {field} for all targets or targets "
                         "the encoder also has")
      out.append(by_target[src])
    values[field] = tuple(out)
  return dataclasses.replace(spec, targets=dec_targets, **values)


def padding_mask(tokens):
  """``[B, 1, 1, S]`` True at real (non-pad) keys: broadcasts over heads and queries."""
  return (tokens != PAD_ID)[:, None, None, :]


class Seq2Seq(nn.Module):
  """``apply(variables, src [B, S], tgt_in [B, T], train=False) -> logits [B, T, V]``.

  Decoding runs the parts: ``apply(..., src, method="encode")`` once, then
  ``method="decode_logits"`` with a KV cache (`vlora_jax.models.decoding`).

  Attributes:
    vocab_size: V (shared by source and target; id 0 is padding).
    max_len: longest source or target sequence.
    dim, num_heads, mlp_ratio, dropout: both stacks.
    depth: encoder layers; dec_depth: decoder layers (None: same as ``depth``).
    tie_embeddings: logits = h @ embedding.T.
    vlora: VLoRA parameterisation of both stacks (decoder targets: see `decoder_spec`).
    dec_targets: overrides the decoder's VLoRA targets.
    lora: horizontal LoRA on both stacks; each stack takes the targets its block has, and every
      target must exist in at least one of them.
    scan, remat, dtype: as `ViT`.
  """

  vocab_size: int
  max_len: int = 128
  dim: int = 256
  depth: int = 4
  dec_depth: int | None = None
  num_heads: int = 4
  mlp_ratio: float = 4.0
  dropout: float = 0.0
  tie_embeddings: bool = False
  vlora: VLoRASpec | None = None
  dec_targets: tuple[str, ...] | None = None
  scan: bool = True
  remat: str = "none"
  dtype: jnp.dtype = jnp.float32
  lora: lora_lib.LoRASpec | None = None
  attention: str = "xla"  # `layers.ATTENTION_IMPLS`

  @property
  def decoder_depth(self) -> int:
    return self.depth if self.dec_depth is None else self.dec_depth

  def encoder_block(self) -> layers.EncoderBlock:
    return layers.EncoderBlock(self.dim, self.num_heads, int(self.dim * self.mlp_ratio),
                               self.dropout, dtype=self.dtype, attention=self.attention,
                               parent=None)

  def decoder_block(self) -> layers.DecoderBlock:
    return layers.DecoderBlock(self.dim, self.num_heads, int(self.dim * self.mlp_ratio),
                               self.dropout, dtype=self.dtype, attention=self.attention,
                               parent=None)

  def _block_paths(self):
    """Parameter paths of one encoder and one decoder block (shapes only, tiny inputs)."""
    x = jax.ShapeDtypeStruct((1, 1, self.dim), jnp.float32)
    enc, _ = block_param_shapes(self.encoder_block(), x, deterministic=True)
    dec, _ = block_param_shapes(self.decoder_block(), x, x, deterministic=True)
    return set(enc), set(dec)

  def lora_specs(self):
    """``(encoder LoRASpec | None, decoder LoRASpec | None)`` from ``lora``."""
    if self.lora is None:
      return None, None
    enc_paths, dec_paths = self._block_paths()
    for i, t in enumerate(self.lora.targets):
      if not any(lora_lib.LoRASpec((t,)).matches(p) for p in enc_paths | dec_paths):
        raise ValueError(f"lora.targets[{i}]={t!r} matches no parameter of the encoder or decoder "
                         f"block; their parameters are {sorted(enc_paths | dec_paths)}")
    return self.lora.restrict(enc_paths), self.lora.restrict(dec_paths)

  def stack_specs(self):
    """``{stack name: (vlora, lora)}``, for `stack.merge` and the checkpoint layouts."""
    enc_lora, dec_lora = self.lora_specs()
    return {"encoder": (self.vlora, enc_lora),
            "decoder": (decoder_spec(self.vlora, self.dec_targets), dec_lora)}

  def check(self, src, tgt_in) -> None:
    check_common(vocab_size=self.vocab_size, max_len=self.max_len, dim=self.dim,
                 num_heads=self.num_heads, mlp_ratio=self.mlp_ratio, dropout=self.dropout)
    for name, tok in (("src", src), ("tgt_in", tgt_in)):
      if tok.ndim != 2:
        raise ValueError(f"{name} must be [batch, time] token ids; got shape {tok.shape}")
      if tok.shape[1] > self.max_len:
        raise ValueError(f"{name} length {tok.shape[1]} exceeds model.max_len={self.max_len}")
    if src.shape[0] != tgt_in.shape[0]:
      raise ValueError(f"src batch {src.shape[0]} != tgt_in batch {tgt_in.shape[0]}")

  def setup(self):
    specs = self.stack_specs()
    self.embed = embed(self.vocab_size, self.dim, self.dtype)
    table = lambda name: self.param(name, nn.with_logical_partitioning(
        nn.initializers.normal(0.02), (None, None, "embed")), (1, self.max_len, self.dim))
    self.enc_pos_embed, self.dec_pos_embed = table("enc_pos_embed"), table("dec_pos_embed")
    self.drop = nn.Dropout(self.dropout)
    self.encoder = vlorafy(self.encoder_block(), self.depth, specs["encoder"][0], scan=self.scan,
                           remat=self.remat, lora=specs["encoder"][1], name="encoder")
    self.encoder_norm = layers.layer_norm("encoder_norm", self.dtype)
    self.decoder = vlorafy(self.decoder_block(), self.decoder_depth, specs["decoder"][0],
                           scan=self.scan, remat=self.remat, lora=specs["decoder"][1],
                           name="decoder")
    self.decoder_norm = layers.layer_norm("decoder_norm", self.dtype)
    if not self.tie_embeddings:
      self.head = layers.dense(self.vocab_size, ("embed", "vocab"), "head", jnp.float32)

  def encode(self, src, *, train: bool = False):
    """The encoder memory ``[B, S, D]`` of ``src [B, S]`` (run once per decode)."""
    x = self.embed(src)
    x = self.drop(x + self.enc_pos_embed[:, :x.shape[1]].astype(x.dtype), deterministic=not train)
    x = self.encoder(constrain(x, RESIDUAL), padding_mask(src), deterministic=not train)
    return constrain(self.encoder_norm(x), RESIDUAL)

  def decode_logits(self, tgt_in, memory, src, position_ids=None, *, train: bool = False,
                    decode=None):
    """Logits ``[B, T, V]`` of the decoder reading ``tgt_in [B, T]`` against ``memory``.

    ``src`` masks the memory's padding. ``decode`` (``"prefill"`` on the first call, ``"step"``
    after it) appends ``tgt_in`` to the decoder's KV cache instead of reading whole targets
    (apply with ``mutable=["cache"]``); ``position_ids`` ``[B, T]`` then says where the tokens
    are. `vlora_jax.models.decoding` drives it.
    """
    y = self.embed(tgt_in)
    rows = (self.dec_pos_embed[:, :y.shape[1]] if position_ids is None
            else jnp.take(self.dec_pos_embed[0], position_ids, axis=0))
    y = constrain(self.drop(y + rows.astype(y.dtype), deterministic=not train), RESIDUAL)
    # Self-attention is causal inside the block; without a cache the mask adds target padding
    # (a decode writes no padding: every sequence is at the same place).
    self_mask = padding_mask(tgt_in) if decode is None else None
    y = self.decoder(y, memory, self_mask, padding_mask(src), deterministic=not train,
                     decode=decode)
    y = self.decoder_norm(y).astype(jnp.float32)
    logits = (y @ self.embed.embedding.astype(jnp.float32).T if self.tie_embeddings
              else self.head(y))
    return constrain(logits, (BATCH, LENGTH, VOCAB))

  def __call__(self, src, tgt_in, *, train: bool = False):
    self.check(src, tgt_in)
    return self.decode_logits(tgt_in, self.encode(src, train=train), src, train=train)


class Seq2SeqFamily(family.TokenFamily):
  """Sequence to sequence: ``src [B,S]``, ``tgt_in [B,T]`` (BOS + target), ``tgt_out [B,T]``
  (target + EOS); pad id 0 is masked out of the loss and the metrics. Eval reports two sequence
  accuracies: ``seq_accuracy``, from real greedy decoding, and ``seq_accuracy_teacher_forced``,
  every token right when the decoder reads the true prefix.

  ``config.model``: vocab_size, max_len, dec_depth (``depth`` is the encoder's), tie_embeddings;
  ``vlora.dec_targets``: the decoder's targets (default: the encoder's and the cross-attention's).
  """

  name = "seq2seq"
  sources = ("reverse",)
  input_keys = ("src", "tgt_in")
  config_keys = {
      "model.vocab_size": Int(required=True, lo=1, doc="token ids < vocab_size"),
      "model.max_len": Int(required=True, lo=1, doc="source and target length"),
      "model.dec_depth": Int(lo=1, nullable=True, doc="decoder layers (None: model.depth)"),
      "model.tie_embeddings": Bool(default=False, doc="the head is the token embedding"),
      "model.vlora.dec_targets": Regexes(nullable=True, doc="the decoder's VLoRA targets"),
  }

  def build(self, mcfg, vlora, lora) -> Seq2Seq:
    vcfg = mcfg.get("vlora")  # None: the dense model
    dec_targets = vcfg.dec_targets if vcfg is not None else None
    return Seq2Seq(vocab_size=mcfg.vocab_size, max_len=mcfg.max_len,
                   dec_depth=mcfg.dec_depth, mlp_ratio=mcfg.mlp_ratio,
                   tie_embeddings=mcfg.tie_embeddings,
                   dec_targets=tuple(dec_targets) if dec_targets is not None else None,
                   **family.shared_kwargs(mcfg, vlora, lora))

  def sample_inputs(self, mcfg, batch: int = 2):
    tok = jax.ShapeDtypeStruct((batch, mcfg.max_len), jnp.int32)
    return (tok, tok)

  def targets(self, batch, example_weight):
    targets = batch["tgt_out"]
    return targets, (targets != PAD_ID).astype(jnp.float32) * example_weight[:, None]

  def stream_weights(self, batch, example_weight):
    # The encoder's real positions are the source's; the decoder's are the targets' (tgt_in's
    # BOS + tokens line up with tgt_out's tokens + EOS).
    _, w = self.targets(batch, example_weight)
    src = (batch["src"] != PAD_ID).astype(jnp.float32) * example_weight[:, None]
    return {"encoder": src, "decoder": w}

  def example_batch(self, mcfg, batch: int, rng):
    draw = lambda: rng.integers(1, mcfg.vocab_size, (batch, mcfg.max_len)).astype(np.int32)
    return {"src": draw(), "tgt_in": draw(), "tgt_out": draw()}

  def sequence_length(self, mcfg) -> int:
    return mcfg.max_len

  def extra_sums(self, hit, weight, example_weight):
    seq_ok = jnp.all((hit > 0) | (weight == 0), axis=-1).astype(jnp.float32)
    return {"seq_correct_teacher_forced": jnp.sum(seq_ok * example_weight)}

  def eval_sums(self, model, params, batch):
    """Adds ``seq_correct``: sequences that greedy decoding (`decoding.greedy`, the encoder run
    once, the decoder on its own outputs) gets exactly right, EOS and padding included."""
    sums = super().eval_sums(model, params, batch)
    decoded = decoding.greedy(model, params, batch["src"], bos=BOS_ID, eos=EOS_ID)
    ok = jnp.all(decoded == batch["tgt_out"], axis=-1).astype(jnp.float32)
    ex_w = batch.get("mask", jnp.ones(ok.shape, jnp.float32)).astype(jnp.float32)
    return dict(sums, seq_correct=jnp.sum(ok * ex_w))

  def finalize(self, sums: dict, prefix: str) -> dict[str, float]:
    """Adds ``seq_accuracy`` (real greedy decoding, in eval) and ``seq_accuracy_teacher_forced``
    (every token right when the decoder reads the true target)."""
    out = super().finalize(sums, prefix)
    n = max(float(sums["examples"]), 1e-12)
    out[f"{prefix}/seq_accuracy_teacher_forced"] = float(sums["seq_correct_teacher_forced"]) / n
    if "seq_correct" in sums:
      out[f"{prefix}/seq_accuracy"] = float(sums["seq_correct"]) / n
    return out


FAMILY = Seq2SeqFamily()
