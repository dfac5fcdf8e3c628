"""AdamW with warmup + cosine decay, global-norm clipping, a weight-decay mask, frozen params
and layer-wise learning-rate decay."""

from __future__ import annotations

import re
from typing import Sequence

import jax
import ml_collections
import numpy as np
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


# The towers layer decay applies to, and the names in a tower before its encoder (depth 0).
TOWERS = ("img", "txt")
EMBEDDING = ("embedding", "token_embedding", "pos_embedding", "cls", "ln_pre")
_BLOCK = re.compile(r"block(\d+)")
# A ResNet tower (mmjax.models.resnet): its stem (depth 0) and its residual blocks.
RESNET_STEM = re.compile(r"stem_(conv|norm)\d*")
_RESNET_BLOCK = re.compile(r"stage(\d+)_(\d+)")


def _tower_depth(tower: str, encoder) -> int:
  """L, the number of encoder blocks of params[tower]['encoder'] (scanned or not)."""
  if "blocks" in encoder:   # nn.scan: every leaf stacked on a leading [L] axis
    return jax.tree.leaves(encoder["blocks"])[0].shape[0]
  found = [int(m.group(1)) for k in encoder if (m := _BLOCK.fullmatch(k))]
  if not found:
    raise ValueError(f"config.optim.layer_decay: params['{tower}']['encoder'] has no blocks")
  return max(found) + 1


def resnet_block_depths(tower_params) -> dict[str, int]:
  """{'stage1_0': 1, 'stage1_1': 2, ..., 'stage4_2': L}: a ResNet tower's residual blocks
  (keys 'stage<s>_<i>') in forward order, the stages flattened, block k (from 0) at depth
  k + 1; {} for a tower with no such blocks (not a ResNet)."""
  found = sorted((int(m.group(1)), int(m.group(2)), k) for k in tower_params
                 if (m := _RESNET_BLOCK.fullmatch(k)))
  return {k: d for d, (_, _, k) in enumerate(found, start=1)}


def _resnet_factor(tower: str, tower_params, key: str, decay: float) -> float:
  """decay ** (L + 1 - d) for the param under params[tower][key] of a ResNet tower with L
  blocks: d = 0 for the stem (RESNET_STEM), d = k + 1 for block k of the flattened stages
  (resnet_block_depths), factor 1 for the rest (the attention pool)."""
  depths = resnet_block_depths(tower_params)
  if not depths:
    raise ValueError(f"config.optim.layer_decay: params['{tower}'] has neither a transformer "
                     "encoder nor ResNet blocks ('stage<s>_<i>'); layer decay applies to ViT, "
                     "text and ResNet towers")
  n = len(depths)
  if RESNET_STEM.fullmatch(key):
    return float(decay ** (n + 1))
  return float(decay ** (n + 1 - depths[key])) if key in depths else 1.0


def layer_decay_factors(params, decay: float):
  """Per-leaf lr factors decay ** (L + 1 - d) (BEiT / timm layer-wise lr decay).

  params: the model's params (abstract is enough). In each tower ('img', 'txt'):
    a ViT or text transformer with L blocks: d = 0 for the embeddings (EMBEDDING), d = i + 1
      for encoder block i, d = L + 1 (factor 1) for the rest (final norm, pooling head);
    a ResNet with L residual blocks in all (timm's per-block grouping): d = 0 for the stem
      (stem_conv*, stem_norm*), d = k + 1 for block k of the stages flattened in forward
      order ('stage1_0' is block 0, the first block of stage 2 follows the last of stage 1),
      d = L + 1 (factor 1) for the attention pool.
  Params outside the towers (projections, t, b, heads) get 1. Returns a pytree like params:
  a float per leaf, or for the scanned blocks (encoder/blocks, [L, ...]) a float32
  [L, 1, ..., 1] array scaling each layer along the leading axis.
  """
  def factor(path, x):
    keys = param_path(path).split("/")
    tower = keys[0]
    if tower not in TOWERS or len(keys) < 2:
      return 1.0
    encoder = params[tower].get("encoder") if hasattr(params[tower], "get") else None
    if encoder is None:
      return _resnet_factor(tower, params[tower], keys[1], decay)
    depth = _tower_depth(tower, encoder)
    if keys[1] in EMBEDDING:
      return float(decay ** (depth + 1))
    if keys[1] != "encoder":
      return 1.0
    if keys[2] == "blocks":
      per_layer = decay ** (depth - np.arange(depth, dtype=np.float64))   # d = i + 1
      return per_layer.astype(np.float32).reshape((depth,) + (1,) * (len(x.shape) - 1))
    m = _BLOCK.fullmatch(keys[2])
    return float(decay ** (depth - int(m.group(1)))) if m else 1.0
  return jax.tree_util.tree_map_with_path(factor, params)


def scale_by_tree(factors) -> optax.GradientTransformation:
  """Multiplies each update by its leaf of `factors` (a float or a broadcastable array)."""
  def scale(updates, params=None):
    del params
    return jax.tree.map(lambda u, f: u * np.asarray(f, u.dtype), updates, factors)
  return optax.stateless(scale)


def make_optimizer(optim: ml_collections.ConfigDict, total_steps: int, *,
                   frozen=None, params=None) -> tuple[optax.GradientTransformation,
                                                      optax.Schedule]:
  """Returns (tx, lr_schedule) from config.optim.

  frozen: None, or frozen_labels(params, config.frozen) ('frozen' / 'train'
  per leaf, e.g. from ['img/.*'] for LiT). The frozen parameters get zero
  updates and no optimizer state at all (optax.multi_transform with
  set_to_zero); the clip norm counts the rest.
  params: the model's params (abstract is enough), needed for optim.layer_decay < 1:
  each final update (Adam's step and its weight decay) is scaled by
  layer_decay_factors, i.e. each layer's lr is lr * layer_decay ** (L + 1 - depth).
  """
  decay = optim.get("layer_decay", 1.0)
  if not 0 < decay <= 1:
    raise ValueError(f"config.optim.layer_decay must be in (0, 1]; got {decay!r}")
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
  if decay != 1:
    if params is None:
      raise ValueError("config.optim.layer_decay < 1 needs the params (make_optimizer(params=))")
    tx = optax.chain(tx, scale_by_tree(layer_decay_factors(params, decay)))
  return tx, schedule
