"""How an [n, n] block of logits s * x @ y.T is computed, and the one-device losses built on it.

A `Blocks` value picks the implementation (the `blocks=` argument of
mmjax.losses.clip_loss / siglip_loss): "dense" (the block's logits in
memory), "tiled" (XLA loops over tiles, mmjax/losses/tiled.py) or "pallas"
(kernels, mmjax/pallas/contrastive.py, imported only when chosen). Each ring
step of mmjax/losses/distributed.py computes one block with it; a one-device
loss is the single block that holds the positive pairs on its diagonal, and
its custom VJP below is written once for every implementation.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from mmjax.losses import tiled
from mmjax.logit_tiles import clip_grad_tile, dot_nn, dot_nt, dot_tn

BLOCKS = ("dense", "tiled", "pallas")


def diag_logits(x, y, s):
  """[n]: s * x_i . y_i, the positive pairs' logits, float32."""
  return s * jnp.einsum("id,id->i", x, y, preferred_element_type=jnp.float32)


def _eye(n: int, positive: bool):
  """The block's positive pairs: its diagonal if `positive`, else none. [n, n] bool."""
  return jnp.eye(n, dtype=bool) & positive


@dataclasses.dataclass(frozen=True)
class Blocks:
  """How a block of logits s * x @ y.T ([n, d] x [n, d] -> [n, n]) is computed.

  impl: "dense" | "tiled" | "pallas". block: the tile side for "tiled" and
  "pallas" (None: their default). platform, interpret: for "pallas", as in
  mmjax.pallas.contrastive.config (platform None: the kernel shape is chosen
  per lowering platform when the loss is lowered, so one jitted loss exports
  for TPU and CUDA; interpret None: compiled on TPU/GPU, interpreted on CPU). `positive`
  says the block holds the positive pairs on its diagonal (a device's own
  chunk). Every method returns float32.
  """
  impl: str = "dense"
  block: int | None = None
  platform: str | None = None
  interpret: bool | None = None

  def __post_init__(self):
    if self.impl not in BLOCKS:
      raise ValueError(f"blocks={self.impl!r} is not one of {BLOCKS}")
    if self.block is not None:
      if self.impl == "dense":
        raise ValueError(f"block={self.block!r} is for blocks='tiled' or 'pallas' only; "
                         "got blocks='dense'")
      tiled.tiling(1, self.block)   # validates block
    if self.impl == "pallas":
      self._kw()                     # validates platform

  def _kw(self):
    if self.impl == "tiled":
      return dict(block=self.block or tiled.DEFAULT_BLOCK)
    from mmjax.pallas import contrastive as pallas_contrastive   # Pallas loads only when chosen
    return dict(cfg=pallas_contrastive.config(self.block, platform=self.platform,
                                              interpret=self.interpret))

  def _module(self):
    if self.impl == "tiled":
      return tiled
    from mmjax.pallas import contrastive as pallas_contrastive   # Pallas loads only when chosen
    return pallas_contrastive

  def siglip_sum(self, x, y, s, b, positive: bool):
    """sum_ij -log sigmoid(z_ij * logit_ij), z = +1 on a positive diagonal, else -1."""
    if self.impl == "dense":
      logits = s * dot_nt(x, y) + b
      z = jnp.where(_eye(x.shape[0], positive), 1.0, -1.0)
      return -jnp.sum(jax.nn.log_sigmoid(z * logits))
    return self._module().siglip_block_sum(x, y, s, b, positive=positive, **self._kw())

  def siglip_grads(self, x, y, s, b, g, positive: bool, with_loss: bool = False):
    """([g * siglip_sum,] dx, dy, ds, db) of g * siglip_sum, in one pass."""
    if self.impl == "dense":
      dots = dot_nt(x, y)
      logits = s * dots + b
      target = _eye(x.shape[0], positive).astype(jnp.float32)
      gl = g * (jax.nn.sigmoid(logits) - target)      # d / d logits, [n, n]
      grads = s * dot_nn(gl, y), s * dot_tn(gl, x), jnp.sum(gl * dots), jnp.sum(gl)
      if not with_loss:
        return grads
      return (-g * jnp.sum(jax.nn.log_sigmoid((2.0 * target - 1.0) * logits)),) + grads
    return self._module().siglip_block_grads(x, y, s, b, g, positive=positive,
                                             with_loss=with_loss, **self._kw())

  def clip_lse(self, x, y, s):
    """(row_lse [n], col_lse [n]) of the block's logits."""
    if self.impl == "dense":
      logits = s * dot_nt(x, y)
      return jax.nn.logsumexp(logits, axis=1), jax.nn.logsumexp(logits, axis=0)
    return self._module().clip_block_lse(x, y, s, **self._kw())

  def clip_grads(self, x, y, s, row_lse, col_lse, g, positive: bool):
    """(dx, dy, ds) for G = g * (exp(z - row_lse) + exp(z - col_lse) - 2 I[positive])."""
    if self.impl == "dense":
      dots = dot_nt(x, y)
      gl = clip_grad_tile(s * dots, row_lse[:, None], col_lse[None, :], g,
                          (None, _eye(x.shape[0], True)), positive=positive, padded=False)
      return s * dot_nn(gl, y), s * dot_tn(gl, x), jnp.sum(gl * dots)
    return self._module().clip_block_grads(x, y, s, row_lse, col_lse, g, positive=positive,
                                           **self._kw())


DENSE = Blocks()


# ---------------------------------------------------------------- one-device losses

@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _clip(x, y, s, blocks):
  return _clip_fwd(x, y, s, blocks)[0]


def _clip_fwd(x, y, s, blocks):
  row_lse, col_lse = blocks.clip_lse(x, y, s)
  diag = diag_logits(x, y, s)
  loss = 0.5 * (jnp.sum(row_lse - diag) + jnp.sum(col_lse - diag)) / x.shape[0]
  return loss, (x, y, s, row_lse, col_lse)


def _clip_bwd(blocks, res, g):
  x, y, s, row_lse, col_lse = res
  dx, dy, ds = blocks.clip_grads(x, y, s, row_lse, col_lse, 0.5 * g / x.shape[0], True)
  return dx.astype(x.dtype), dy.astype(y.dtype), ds.astype(s.dtype)


_clip.defvjp(_clip_fwd, _clip_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _siglip(x, y, s, b, blocks):
  return blocks.siglip_sum(x, y, s, b, True) / x.shape[0]


def _siglip_fwd(x, y, s, b, blocks):
  # The gradients cost one pass with the loss: keep them (O(n d)) instead of
  # recomputing every tile in the backward. Kept in the embedding dtype: the
  # cotangent g is almost always 1.
  loss, dx, dy, ds, db = blocks.siglip_grads(x, y, s, b, jnp.float32(1.0 / x.shape[0]), True,
                                             with_loss=True)
  return loss, (dx.astype(x.dtype), dy.astype(y.dtype), ds, db)


def _siglip_bwd(blocks, res, g):
  dx, dy, ds, db = res
  return (g * dx).astype(dx.dtype), (g * dy).astype(dy.dtype), g * ds, g * db


_siglip.defvjp(_siglip_fwd, _siglip_bwd)


def clip_loss(img_emb: jax.Array, txt_emb: jax.Array, scale, *, blocks: Blocks) -> jax.Array:
  """mmjax.losses.clip_loss on one device, its logits computed by `blocks`.

  img_emb, txt_emb: [n, d] float; scale: scalar. Returns a float32 scalar.
  """
  return _clip(jnp.asarray(img_emb), jnp.asarray(txt_emb), jnp.asarray(scale, jnp.float32),
               blocks)


def siglip_loss(img_emb: jax.Array, txt_emb: jax.Array, scale, bias, *,
                blocks: Blocks) -> jax.Array:
  """mmjax.losses.siglip_loss on one device, its logits computed by `blocks`.

  img_emb, txt_emb: [n, d] float; scale, bias: scalars. Returns a float32 scalar.
  """
  return _siglip(jnp.asarray(img_emb), jnp.asarray(txt_emb), jnp.asarray(scale, jnp.float32),
                 jnp.asarray(bias, jnp.float32), blocks)
