"""The elementwise math of one [t, t] tile of contrastive logits, written once.

The XLA loops of mmjax/losses/tiled.py and the Pallas kernels of
mmjax/pallas/contrastive.py run the same algorithm and both call these
functions (so does the dense block of mmjax/losses/blocks.py where it fits);
every function here is plain jax.numpy / lax and also traces inside a kernel.
It lives beside mmjax/numerics.py, below both mmjax.losses and mmjax.pallas, so
neither package imports the other to share it (losses load Pallas only when chosen).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax


def dot_nt(a, b):
  """[t, d] x [u, d] -> [t, u] float32 (operands in their own dtype: bf16 in, f32 accumulation)."""
  return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def dot_nn(g, b):
  """[t, u] x [u, d] -> [t, d] float32, g cast to b's dtype (bf16 in, f32 accumulation)."""
  return lax.dot_general(g.astype(b.dtype), b, (((1,), (0,)), ((), ())),
                         preferred_element_type=jnp.float32)


def dot_tn(g, a):
  """[t, u] x [t, d] -> [u, d] float32: g^T a, g cast to a's dtype."""
  return lax.dot_general(g.astype(a.dtype), a, (((0,), (0,)), ((), ())),
                         preferred_element_type=jnp.float32)


def tile_masks(i, j, t: int, n: int):
  """[t, t] bools of tile (i, j) of an [n, n] block in [t, t] tiles: the real
  entries (not padding), and the block's diagonal (the positive pairs)."""
  r = lax.broadcasted_iota(jnp.int32, (t, t), 0)
  c = lax.broadcasted_iota(jnp.int32, (t, t), 1)
  valid = (i * t + r < n) & (j * t + c < n)
  return valid, (r == c) & (i == j)


def siglip_terms(z, diag, *, with_loss: bool, with_grad: bool):
  """Per entry of the logits z: -log sigmoid(u) and its derivative wrt z, one
  exp shared; u = z on the positive diagonal `diag` ([t, t] bool, or None for
  a block of negatives only), -z elsewhere. Each is None unless asked for."""
  u = -z if diag is None else jnp.where(diag, z, -z)
  e = jnp.exp(-jnp.abs(u))
  loss = jnp.maximum(-u, 0.0) + jnp.log1p(e) if with_loss else None   # softplus(-u)
  dz = None
  if with_grad:
    dloss_du = -jnp.where(u >= 0, e, 1.0) / (1.0 + e)                  # -sigmoid(-u)
    dz = -dloss_du if diag is None else jnp.where(diag, dloss_du, -dloss_du)
  return loss, dz


def clip_grad_tile(z, row_lse, col_lse, g, masks, *, positive: bool, padded: bool):
  """d/dz of g * (sum(row_lse) + sum(col_lse) - 2 trace) for one tile of CLIP logits z.

  G = g * (exp(z - row_lse) + exp(z - col_lse) - 2 I), the identity only on a
  positive block's diagonal, zero on padding. z: [t, u] float32; row_lse
  [t, 1], col_lse [1, u] (broadcastable); masks: tile_masks' (valid, diag).
  """
  valid, diag = masks
  p = jnp.exp(z - row_lse) + jnp.exp(z - col_lse)
  if positive:
    p = jnp.where(diag, p - 2.0, p)
  if padded:
    p = jnp.where(valid, p, 0.0)
  return g * p


def lse_update(m, l, z, axis: int):
  """One step of a running log-sum-exp along `axis` of the tile z: the new (max, sum)."""
  m_new = jnp.maximum(m, jnp.max(z, axis=axis, keepdims=True))
  l = l * jnp.exp(m - m_new) + jnp.sum(jnp.exp(z - m_new), axis=axis, keepdims=True)
  return m_new, l
