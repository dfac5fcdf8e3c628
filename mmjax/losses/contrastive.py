"""CLIP (softmax) and SigLIP (sigmoid) contrastive losses.

Both take L2-normalised embeddings `img_emb`, `txt_emb` of shape [batch, dim]
where row i of each is a positive pair, and `scale`, the positive multiplier
of the logits (already exponentiated: exp(t) of the model's learned t).
Logits and the loss are computed in float32 whatever the embedding dtype:
bf16 operands, f32 accumulation (the fast path on AMX/TPU/GPU alike).

Faster or sharded implementations are `impl=` values of these same functions,
tested against impl="dense":
  "dense": the n x n logits in memory, one device (or XLA's own partitioning).
  "tiled": the logits tile by tile in XLA loops, never all in memory; custom
    VJPs recompute tiles. O(n * d + block^2) memory. mmjax/losses/tiled.py
    (the custom VJPs, shared with "pallas": mmjax/losses/blocks.py).
  "pallas": the same as Pallas kernels (Mosaic on TPU, Triton on GPU,
    interpret mode on CPU). mmjax/pallas/contrastive.py.
  "gather", "ring", "ring_bidir" (SigLIP only): per device, inside shard_map
    or pmap over `axis_name`, on the local [n, d] shards of a global batch;
    they return the global batch's loss. See mmjax/losses/distributed.py.

"tiled" and "pallas" also take an `axis_name`: they are then the ring
(impl="ring") whose every step computes its n x n block tile by tile with that
impl, so per-device memory is O(n * d + block^2) however large the local and
global batches are. One knob, `block` (the largest tile side), belongs to these
two impls only; impl="ring" keeps its dense n x n blocks, fastest while they
fit. (The pallas ring lowers for TPU under shard_map(check_vma=True), but JAX's
Pallas interpreter fails there, so on CPU run it with check_vma=False.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mmjax.losses import blocks as blocks_lib, distributed

_IMPLS = ("dense", "tiled", "pallas", "gather", "ring", "ring_bidir")
_SHARDED = ("gather", "ring", "ring_bidir")


def _check(img_emb: jax.Array, txt_emb: jax.Array, impl: str, axis_name, block) -> None:
  if impl not in _IMPLS:
    raise ValueError(f"impl={impl!r} is not one of {_IMPLS}")
  if impl == "dense" and axis_name is not None:
    raise ValueError(f"impl='dense' takes no axis_name (got axis_name={axis_name!r}); "
                     "sharded impls run inside shard_map/pmap")
  if impl in _SHARDED and axis_name is None:
    raise ValueError(f"impl={impl!r} needs an axis_name (got axis_name=None); "
                     "sharded impls run inside shard_map/pmap")
  if block is not None and impl not in ("tiled", "pallas"):
    raise ValueError(f"block is for impl='tiled' or 'pallas' only; got impl={impl!r}, "
                     f"block={block!r}")
  if img_emb.ndim != 2 or txt_emb.ndim != 2:
    raise ValueError(
        "img_emb and txt_emb must be [batch, dim]; got img_emb "
        f"{tuple(img_emb.shape)} and txt_emb {tuple(txt_emb.shape)}")
  if img_emb.shape != txt_emb.shape:
    raise ValueError(
        f"img_emb {tuple(img_emb.shape)} and txt_emb {tuple(txt_emb.shape)} "
        "must have the same shape [batch, dim]")


def _check_scalar(name: str, x) -> None:
  if jnp.ndim(x) != 0:
    raise ValueError(f"{name} must be a scalar; got shape {jnp.shape(x)}")


def _logits(img_emb: jax.Array, txt_emb: jax.Array, scale) -> jax.Array:
  """[n, d] x [n, d] -> [n, n] float32 logits scale * img_emb @ txt_emb.T."""
  dots = jnp.einsum("id,jd->ij", img_emb, txt_emb,
                    preferred_element_type=jnp.float32)
  return jnp.asarray(scale, jnp.float32) * dots


def clip_loss(img_emb: jax.Array, txt_emb: jax.Array, scale, *,
              impl: str = "dense", axis_name=None, block: int | None = None) -> jax.Array:
  """Symmetric softmax (InfoNCE) loss of CLIP, normalised as open_clip does.

  loss = (mean_i CE(logits[i, :], i) + mean_j CE(logits[:, j], j)) / 2,
  logits = scale * img_emb @ txt_emb.T.

  Args:
    img_emb: [n, d] image embeddings (f32 or bf16).
    txt_emb: [n, d] text embeddings; row i pairs with img_emb row i.
    scale: scalar > 0, the logit multiplier (exp of the learned temperature).
    impl: "dense" | "tiled" | "pallas" | "gather" | "ring" (see the module docstring).
    axis_name: the batch axis (or tuple of axes) for "gather" and "ring", and
      optionally "tiled" and "pallas" (the ring with tiled blocks); img_emb
      and txt_emb are then this device's [n, d] shards.
    block: the largest tile side for "tiled" and "pallas" (None: their
      defaults, 1024 for "tiled", 512 on TPU and 64 on GPU for "pallas").

  Returns:
    float32 scalar: the loss of the whole (global) batch.
  """
  _check(img_emb, txt_emb, impl, axis_name, block)
  _check_scalar("scale", scale)
  if impl == "ring_bidir":
    raise ValueError("impl='ring_bidir' is implemented for siglip_loss only; use 'ring'")
  if impl == "gather":
    return distributed.clip_gather(img_emb, txt_emb, scale, axis_name=axis_name)
  if impl == "ring":
    return distributed.clip_ring(img_emb, txt_emb, scale, axis_name=axis_name)
  if impl in ("tiled", "pallas"):
    blocks = blocks_lib.Blocks(impl, block)
    if axis_name is not None:
      return distributed.clip_ring(img_emb, txt_emb, scale, axis_name=axis_name, blocks=blocks)
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
  _check(query, key, "dense", None, None)
  _check_scalar("scale", scale)
  return jnp.mean(_row_cross_entropy(_logits(query, key, scale)))


def siglip_loss(img_emb: jax.Array, txt_emb: jax.Array, scale, bias, *,
                impl: str = "dense", axis_name=None, block: int | None = None) -> jax.Array:
  """Pairwise sigmoid loss of SigLIP, normalised as the paper and open_clip do.

  loss = -sum_ij log sigmoid(z_ij * (scale * img_i . txt_j + bias)) / n,
  z_ij = +1 if i == j else -1.

  Args:
    img_emb: [n, d] image embeddings (f32 or bf16).
    txt_emb: [n, d] text embeddings; row i pairs with img_emb row i.
    scale: scalar > 0, the logit multiplier (exp of the learned t').
    bias: scalar logit bias (SigLIP init -10).
    impl: "dense" | "tiled" | "pallas" | "gather" | "ring" | "ring_bidir"
      (see the module docstring).
    axis_name: the batch axis (or tuple of axes) for the sharded impls, and
      optionally "tiled" and "pallas" (the ring with tiled blocks); img_emb
      and txt_emb are then this device's [n, d] shards.
    block: the largest tile side for "tiled" and "pallas" (None: their defaults).

  Returns:
    float32 scalar: the loss of the whole (global) batch.
  """
  _check(img_emb, txt_emb, impl, axis_name, block)
  _check_scalar("scale", scale)
  _check_scalar("bias", bias)
  if impl == "gather":
    return distributed.siglip_gather(img_emb, txt_emb, scale, bias, axis_name=axis_name)
  if impl == "ring":
    return distributed.siglip_ring(img_emb, txt_emb, scale, bias, axis_name=axis_name)
  if impl == "ring_bidir":
    return distributed.siglip_ring_bidir(img_emb, txt_emb, scale, bias, axis_name=axis_name)
  if impl in ("tiled", "pallas"):
    blocks = blocks_lib.Blocks(impl, block)
    if axis_name is not None:
      return distributed.siglip_ring(img_emb, txt_emb, scale, bias, axis_name=axis_name,
                                     blocks=blocks)
    return blocks_lib.siglip_loss(img_emb, txt_emb, scale, bias, blocks=blocks)
  n = img_emb.shape[0]
  logits = _logits(img_emb, txt_emb, scale) + jnp.asarray(bias, jnp.float32)
  z = 2.0 * jnp.eye(n, dtype=jnp.float32) - 1.0
  return -jnp.sum(jax.nn.log_sigmoid(z * logits)) / n
