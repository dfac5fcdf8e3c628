"""CLIP (softmax) and SigLIP (sigmoid) contrastive losses.

Both take L2-normalised embeddings `img_emb`, `txt_emb` of shape [batch, dim]
where row i of each is a positive pair, and `scale`, the positive multiplier
of the logits (already exponentiated: exp(t) of the model's learned t).
Logits and the loss are computed in float32 whatever the embedding dtype:
bf16 operands, f32 accumulation (the fast path on AMX/TPU/GPU alike).

Two independent choices, each an argument, every value tested against the
default (impl="global", blocks="dense") and float64 NumPy:

impl: how the global batch is distributed.
  "global": one program sees the whole batch (one device, or XLA partitions
    it over a mesh).
  "gather", "ring", "ring_bidir" (SigLIP only): per device, inside shard_map
    or pmap over `axis_name`, on the local [n, d] shards of a global batch;
    they return the global batch's loss. See mmjax/losses/distributed.py.
blocks: how each [n, n] block of logits is computed (mmjax/losses/blocks.py).
  "dense": the block's logits in memory.
  "tiled": tile by tile in XLA loops, never all in memory; custom VJPs
    recompute tiles. O(n * d + block^2) memory. mmjax/losses/tiled.py.
  "pallas": the same as Pallas kernels (Mosaic on TPU, Triton on GPU,
    interpret mode on CPU). mmjax/pallas/contrastive.py, imported only here.
  A `Blocks` value instead of a name also picks the Pallas platform and
  interpret mode.

With impl="global" the batch is one block; each ring step computes one n x n
block (the local batch against one travelling text chunk), so "ring" with
tiled blocks keeps per-device memory at O(n * d + block^2) however large the
local and global batches are. "gather" makes the [n, N] logits by design and
takes dense blocks only. `block` (the largest tile side) belongs to tiled and
pallas blocks. (The pallas ring lowers for TPU under shard_map(check_vma=True),
but JAX's Pallas interpreter fails there, so on CPU run it with check_vma=False.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mmjax.losses import blocks as blocks_lib, distributed
from mmjax.losses.blocks import BLOCKS, Blocks
from mmjax.numerics import check_array

IMPLS = ("global", "gather", "ring", "ring_bidir")
_SHARDED = ("gather", "ring", "ring_bidir")


def _dispatch(img_emb, txt_emb, impl: str, axis_name, blocks, block) -> Blocks:
  """Checks the arguments; returns the Blocks value."""
  if impl not in IMPLS:
    raise ValueError(f"impl={impl!r} is not one of {IMPLS}")
  if impl == "global" and axis_name is not None:
    raise ValueError(f"impl='global' takes no axis_name (got axis_name={axis_name!r}); "
                     f"the sharded impls {_SHARDED} run inside shard_map/pmap")
  if impl in _SHARDED and axis_name is None:
    raise ValueError(f"impl={impl!r} needs an axis_name (got axis_name=None); "
                     "sharded impls run inside shard_map/pmap")
  if impl in _SHARDED:
    try:   # bound only inside shard_map / pmap over it; JAX's own error would not say so
      jax.lax.axis_size(axis_name)
    except NameError:
      raise ValueError(f"impl={impl!r}: axis_name={axis_name!r} is not a mapped axis here; "
                       "call the loss inside shard_map (or pmap) over that mesh axis, or use "
                       "impl='global'") from None
  if isinstance(blocks, Blocks):
    if block is not None:
      raise ValueError(f"block={block!r} goes into the Blocks value when blocks= is one")
  elif blocks in BLOCKS:
    blocks = Blocks(blocks, block)
  else:
    raise ValueError(f"blocks={blocks!r} is not one of {BLOCKS} (or a Blocks value)")
  if impl == "gather" and blocks.impl != "dense":
    raise ValueError(f"blocks={blocks.impl!r} does not apply to impl='gather', which makes "
                     "the [n, N] logits by design; use impl='ring' for tiled blocks")
  _check_pair(img_emb, txt_emb)
  return blocks


def _check_pair(img_emb, txt_emb, names=("img_emb", "txt_emb")) -> None:
  """Both float [batch, dim] arrays, nothing empty, of one shape; ValueError naming them."""
  for name, x in zip(names, (img_emb, txt_emb)):
    check_array(name, x, ("batch", "dim"))
  if img_emb.shape != txt_emb.shape:
    raise ValueError(
        f"{names[0]} {tuple(img_emb.shape)} and {names[1]} {tuple(txt_emb.shape)} "
        "must have the same shape [batch, dim]")


def _check_scalar(name: str, x) -> None:
  if jnp.ndim(x) != 0:
    raise ValueError(f"{name} must be a scalar; got shape {jnp.shape(x)}")


def _logits(img_emb: jax.Array, txt_emb: jax.Array, scale) -> jax.Array:
  """[n, d] x [n, d] -> [n, n] float32 logits scale * img_emb @ txt_emb.T."""
  dots = jnp.einsum("id,jd->ij", img_emb, txt_emb,
                    preferred_element_type=jnp.float32)
  return jnp.asarray(scale, jnp.float32) * dots


def clip_loss(img_emb: jax.Array, txt_emb: jax.Array, scale, *, impl: str = "global",
              blocks: str | Blocks = "dense", axis_name=None,
              block: int | None = None) -> jax.Array:
  """Symmetric softmax (InfoNCE) loss of CLIP, normalised as open_clip does.

  loss = (mean_i CE(logits[i, :], i) + mean_j CE(logits[:, j], j)) / 2,
  logits = scale * img_emb @ txt_emb.T.

  Args:
    img_emb: [n, d] image embeddings (f32 or bf16).
    txt_emb: [n, d] text embeddings; row i pairs with img_emb row i.
    scale: scalar > 0, the logit multiplier (exp of the learned temperature).
    impl: "global" | "gather" | "ring": how the batch is distributed (module docstring).
    blocks: "dense" | "tiled" | "pallas" (or a Blocks value): how each block
      of logits is computed.
    axis_name: the batch axis (or tuple of axes) of the sharded impls; img_emb
      and txt_emb are then this device's [n, d] shards.
    block: the largest tile side of tiled and pallas blocks (None: their
      defaults, 1024 for "tiled", 512 on TPU and 64 on GPU for "pallas").

  Returns:
    float32 scalar: the loss of the whole (global) batch.
  """
  if impl == "ring_bidir":
    raise ValueError("impl='ring_bidir' is implemented for siglip_loss only; use impl='ring'")
  blocks = _dispatch(img_emb, txt_emb, impl, axis_name, blocks, block)
  _check_scalar("scale", scale)
  if impl == "gather":
    return distributed.clip_gather(img_emb, txt_emb, scale, axis_name=axis_name)
  if impl == "ring":
    return distributed.clip_ring(img_emb, txt_emb, scale, axis_name=axis_name, blocks=blocks)
  if blocks.impl != "dense":
    return blocks_lib.clip_loss(img_emb, txt_emb, scale, blocks=blocks)
  logits = _logits(img_emb, txt_emb, scale)
  return 0.5 * (jnp.mean(_row_cross_entropy(logits)) + jnp.mean(_row_cross_entropy(logits.T)))


def _row_cross_entropy(logits: jax.Array) -> jax.Array:
  """[n, n] -> [n]: softmax cross-entropy of each row against its diagonal entry."""
  return jax.nn.logsumexp(logits, axis=1) - jnp.diagonal(logits)


def infonce_loss(query: jax.Array, key: jax.Array, scale) -> jax.Array:
  """InfoNCE (MoCo): mean_i CE(scale * query_i . key^T, i), one direction of clip_loss.

  Args:
    query: [n, d], key: [n, d] (L2-normalised; row i of each is a positive pair).
    scale: scalar > 0, 1 / temperature.

  Returns:
    float32 scalar.
  """
  _check_pair(query, key, ("query", "key"))
  _check_scalar("scale", scale)
  return jnp.mean(_row_cross_entropy(_logits(query, key, scale)))


def siglip_loss(img_emb: jax.Array, txt_emb: jax.Array, scale, bias, *, impl: str = "global",
                blocks: str | Blocks = "dense", axis_name=None,
                block: int | None = None) -> jax.Array:
  """Pairwise sigmoid loss of SigLIP, normalised as the paper and open_clip do.

  loss = -sum_ij log sigmoid(z_ij * (scale * img_i . txt_j + bias)) / n,
  z_ij = +1 if i == j else -1.

  Args:
    img_emb: [n, d] image embeddings (f32 or bf16).
    txt_emb: [n, d] text embeddings; row i pairs with img_emb row i.
    scale: scalar > 0, the logit multiplier (exp of the learned t').
    bias: scalar logit bias (SigLIP init -10).
    impl: "global" | "gather" | "ring" | "ring_bidir": how the batch is
      distributed (module docstring).
    blocks: "dense" | "tiled" | "pallas" (or a Blocks value): how each block
      of logits is computed.
    axis_name: the batch axis (or tuple of axes) of the sharded impls; img_emb
      and txt_emb are then this device's [n, d] shards.
    block: the largest tile side of tiled and pallas blocks (None: their defaults).

  Returns:
    float32 scalar: the loss of the whole (global) batch.
  """
  blocks = _dispatch(img_emb, txt_emb, impl, axis_name, blocks, block)
  _check_scalar("scale", scale)
  _check_scalar("bias", bias)
  if impl == "gather":
    return distributed.siglip_gather(img_emb, txt_emb, scale, bias, axis_name=axis_name)
  if impl in ("ring", "ring_bidir"):
    ring = distributed.siglip_ring if impl == "ring" else distributed.siglip_ring_bidir
    return ring(img_emb, txt_emb, scale, bias, axis_name=axis_name, blocks=blocks)
  if blocks.impl != "dense":
    return blocks_lib.siglip_loss(img_emb, txt_emb, scale, bias, blocks=blocks)
  n = img_emb.shape[0]
  logits = _logits(img_emb, txt_emb, scale) + jnp.asarray(bias, jnp.float32)
  z = 2.0 * jnp.eye(n, dtype=jnp.float32) - 1.0
  return -jnp.sum(jax.nn.log_sigmoid(z * logits)) / n
