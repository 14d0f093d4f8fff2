"""What each model family is trained to do: its inputs, loss and metrics.

  vit      classification: ``images [B,H,W,C]``, ``label [B]``; cross-entropy (label smoothing).
  lm       next token: ``tokens [B, T+1]``; the model reads ``tokens[:, :-1]`` and predicts
           ``tokens[:, 1:]``.
  seq2seq  ``src [B,S]``, ``tgt_in [B,T]`` (BOS + target), ``tgt_out [B,T]`` (target + EOS); pad id 0
           is masked out of the loss and the metrics.

`sums` returns additive statistics (so eval can add them over batches and processes) and
`finalize` turns them into means; an eval batch's ``mask`` (0 on padding examples) weights all of
them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

PAD = 0


def inputs(name: str, batch) -> tuple:
  """Positional arguments of ``model.apply`` for a batch."""
  if name == "vit":
    return (batch["image"],)
  if name == "lm":
    return (batch["tokens"][:, :-1],)
  return (batch["src"], batch["tgt_in"])


def sums(name: str, logits, batch, label_smoothing: float = 0.0) -> dict[str, jax.Array]:
  """``{'loss', 'correct', 'weight', 'examples'(, 'seq_correct')}``, each summed over the batch."""
  logits = logits.astype(jnp.float32)
  b = logits.shape[0]
  ex_w = batch.get("mask", jnp.ones((b,), jnp.float32)).astype(jnp.float32)
  if name == "vit":
    targets, w = batch["label"], ex_w
  elif name == "lm":
    targets = batch["tokens"][:, 1:]
    w = jnp.broadcast_to(ex_w[:, None], targets.shape)
  else:
    targets = batch["tgt_out"]
    w = (targets != PAD).astype(jnp.float32) * ex_w[:, None]
  k = logits.shape[-1]
  onehot = jax.nn.one_hot(targets, k, dtype=jnp.float32)
  if label_smoothing:
    onehot = optax.smooth_labels(onehot, label_smoothing)
  ce = optax.softmax_cross_entropy(logits, onehot)
  hit = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
  out = {"loss": jnp.sum(ce * w), "correct": jnp.sum(hit * w), "weight": jnp.sum(w),
         "examples": jnp.sum(ex_w)}
  if name == "seq2seq":  # a sequence counts when every non-pad token is right (teacher forcing)
    seq_ok = jnp.all((hit > 0) | (w == 0), axis=-1).astype(jnp.float32)
    out["seq_correct"] = jnp.sum(seq_ok * ex_w)
  return out


def finalize(name: str, s: dict, prefix: str) -> dict[str, float]:
  """Sums -> ``{prefix/loss, prefix/accuracy, ...}`` means (floats)."""
  w = max(float(s["weight"]), 1e-12)
  out = {f"{prefix}/loss": float(s["loss"]) / w, f"{prefix}/accuracy": float(s["correct"]) / w}
  if name == "lm":
    out[f"{prefix}/perplexity"] = float(jnp.exp(jnp.minimum(out[f"{prefix}/loss"], 50.0)))
  if name == "seq2seq":
    out[f"{prefix}/seq_accuracy"] = float(s["seq_correct"]) / max(float(s["examples"]), 1e-12)
  return out


def tokens_per_example(name: str, batch_shapes: dict) -> int:
  """Target tokens per example (for tokens/s): 1 for classification."""
  if name == "vit":
    return 1
  key = "tokens" if name == "lm" else "tgt_out"
  return batch_shapes[key][1] - (1 if name == "lm" else 0)
