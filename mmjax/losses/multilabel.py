"""CatLIP's loss: multi-label binary cross-entropy of an image classifier over caption labels."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import optax


def multilabel_bce_loss(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Mean binary cross-entropy over the batch and the labels.

  logits: [b, V] float, targets: [b, V] in [0, 1] (multi-hot). The mean over all b * V
  entries (torch's BCEWithLogitsLoss default) keeps the loss's scale independent of V; a
  sum over labels would be V times it (under Adam the scale matters only against eps,
  and the gradient clip). Computed in float32 (optax.sigmoid_binary_cross_entropy).
  """
  if logits.ndim != 2 or targets.shape != logits.shape:
    raise ValueError(f"logits {logits.shape} and targets {targets.shape} must both be [b, V]")
  chex.assert_type(logits, float)
  return jnp.mean(optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32),
                                                     targets.astype(jnp.float32)))
