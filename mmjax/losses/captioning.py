"""CoCa's captioning loss and BLIP's image-text matching pieces, as pure functions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from mmjax.numerics import check_array


def caption_loss(logits: jax.Array, labels: jax.Array, *, pad_id: int = 0,
                 label_smoothing: float = 0.0) -> jax.Array:
  """Teacher-forced next-token cross-entropy, averaged over the non-padding targets.

  Args:
    logits: [b, L, vocab] float (computed in float32).
    labels: [b, L] int, the targets; positions equal to pad_id are ignored (torch's
      CrossEntropyLoss(ignore_index=pad_id), open_clip's CoCaLoss).
    label_smoothing: the target is (1 - s) one_hot + s / vocab (torch's label_smoothing).

  Returns:
    scalar float32 (0 when every target is padding).
  """
  check_array("logits", logits, ("b", "L", "vocab"))
  if labels.shape != logits.shape[:2]:
    raise ValueError(f"labels {labels.shape} must be logits {logits.shape} without the vocab axis")
  if not 0.0 <= label_smoothing < 1.0:
    raise ValueError(f"label_smoothing={label_smoothing} must be in [0, 1)")
  logits = logits.astype(jnp.float32)
  target = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
  per_token = optax.softmax_cross_entropy(logits, target)
  real = (labels != pad_id).astype(jnp.float32)
  return (per_token * real).sum() / jnp.maximum(real.sum(), 1.0)


def hard_negatives(rng: jax.Array, logits: jax.Array, exclude: jax.Array) -> jax.Array:
  """One hard negative per row, drawn with probability softmax(logits) over the columns
  that `exclude` leaves (BLIP): the most similar wrong candidates are the likeliest.

  Args:
    rng: a PRNG key.
    logits: [n, m] float, e.g. scale * image-text similarities (no gradient flows).
    exclude: [n, m] bool, True = never drawn (the positive pair, identical texts). A row
      with every column excluded draws from all of them.

  Returns:
    [n] int32 column indices.
  """
  check_array("logits", logits, ("n", "m"))
  if exclude.shape != logits.shape:
    raise ValueError(f"exclude {exclude.shape} must have logits' shape {logits.shape}")
  logits = jax.lax.stop_gradient(logits).astype(jnp.float32)
  none_left = exclude.all(axis=1, keepdims=True)
  masked = jnp.where(exclude & ~none_left, -jnp.inf, logits)
  return jax.random.categorical(rng, masked, axis=1).astype(jnp.int32)


def itm_loss(logits: jax.Array, match: jax.Array) -> jax.Array:
  """Binary image-text matching cross-entropy: logits [n, 2] (index 1 = match), match [n]
  bool -> scalar float32, the mean over the n pairs."""
  check_array("logits", logits, ("n", "2"))
  return optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), match.astype(jnp.int32)).mean()
