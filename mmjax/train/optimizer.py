"""AdamW with warmup + cosine decay, global-norm clipping, and a weight-decay mask."""

from __future__ import annotations

import jax
import ml_collections
import optax


def decay_mask(params):
  """True for kernels and embeddings (ndim >= 2); False for norms, biases and
  the scalar temperature t and bias b, which weight decay would only pull to 0."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(optim: ml_collections.ConfigDict, total_steps: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Returns (tx, lr_schedule) from config.optim."""
  if not 0 <= optim.warmup_steps < total_steps:
    raise ValueError(f"config.optim.warmup_steps ({optim.warmup_steps}) must be in "
                     f"[0, config.total_steps={total_steps})")
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=optim.lr, warmup_steps=optim.warmup_steps,
      decay_steps=total_steps, end_value=optim.lr * optim.end_lr_fraction)
  parts = []
  if optim.grad_clip:
    parts.append(optax.clip_by_global_norm(optim.grad_clip))
  parts.append(optax.adamw(schedule, b1=optim.b1, b2=optim.b2,
                           weight_decay=optim.weight_decay, mask=decay_mask))
  return optax.chain(*parts), schedule
