"""AdamW with warmup + cosine decay, global-norm clipping, a weight-decay mask, and frozen params."""

from __future__ import annotations

import re
from typing import Sequence

import jax
import ml_collections
import optax


def decay_mask(params):
  """True for kernels and embeddings (ndim >= 2); False for norms, biases (the attention
  projections' [heads, head_dim] ones too) and the scalar temperature t and bias b, which
  weight decay would only pull to 0."""
  return jax.tree_util.tree_map_with_path(
      lambda path, p: p.ndim >= 2 and param_path(path).rsplit("/", 1)[-1] != "bias", params)


def param_path(path) -> str:
  """'img/encoder/block0/attn/query/kernel' for a jax tree path."""
  return jax.tree_util.keystr(path, simple=True, separator="/")


def frozen_labels(params, patterns: Sequence[str]):
  """'frozen' for each leaf whose path fully matches one of `patterns` (regexes,
  config.frozen), else 'train'. params may be abstract (shapes only): the
  labels are worked out once, for the optimizer and the objective alike."""
  compiled = []
  for p in patterns:
    try:
      compiled.append(re.compile(p))
    except re.error as e:
      raise ValueError(f"config.frozen: {p!r} is not a regex ({e})") from None
  paths = [param_path(path) for path, _ in jax.tree_util.tree_leaves_with_path(params)]
  unused = [p for p, c in zip(patterns, compiled) if not any(c.fullmatch(q) for q in paths)]
  if unused:
    raise ValueError(f"config.frozen: {unused} match no parameter (paths look like "
                     f"{paths[0]!r})")
  return jax.tree_util.tree_map_with_path(
      lambda path, _: "frozen" if any(c.fullmatch(param_path(path)) for c in compiled)
      else "train", params)


def make_optimizer(optim: ml_collections.ConfigDict, total_steps: int, *,
                   frozen=None) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Returns (tx, lr_schedule) from config.optim.

  frozen: None, or frozen_labels(params, config.frozen) ('frozen' / 'train'
  per leaf, e.g. from ['img/.*'] for LiT). The frozen parameters get zero
  updates and no optimizer state at all (optax.multi_transform with
  set_to_zero); the clip norm counts the rest.
  """
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
  tx = optax.chain(*parts)
  if frozen is not None:
    tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, frozen)
  return tx, schedule
