"""Tiled CLIP and SigLIP losses: the [n, n] logits are never in memory.

The logits s * x @ y.T of an [n, d] x [n, d] pair are made one [t, t] tile at a
time (t <= block) inside two nested lax.fori_loops, reduced on the spot and
dropped. Custom VJPs keep O(n) residuals and recompute tiles as needed, so
loss + grad needs O(n * d + block^2) memory for any batch n.

  CLIP (softmax): the forward keeps a running max and sum per row (image to
    text) and per column (text to image), i.e. the two log-sum-exps; the
    backward recomputes each tile, dL/dz = (softmax_row + softmax_col - 2 I) / 2n,
    and accumulates dx = s G y, dy = s G^T x, ds = sum(G * x.y). Four tile
    matmuls per tile (forward 1, backward 3) against the dense path's three.
  SigLIP (sigmoid): every tile's loss and gradient are local, so under
    differentiation the forward pass computes the gradients too and keeps them
    (O(n * d)) as residuals; the backward only scales them. Three tile matmuls,
    as many as the dense path.

A batch that is not a multiple of the tile is padded inside and the padded
rows and columns are masked. Tiles are [t, t] with t = ceil(n / ceil(n / block))
rounded up to a multiple of 8 (so padding is small); one tile when n <= block.
Operands stay in the embedding dtype (bf16 in, f32 accumulation); everything
else is f32 and the embedding gradients come back in the embedding dtype.

These are block functions (`clip_block_lse`, `clip_block_grads`,
`siglip_block_sum`, `siglip_block_grads`); mmjax/losses/blocks.py joins them
into the one-device losses (custom VJPs) and each step of the tiled ring in
mmjax/losses/distributed.py calls them on its n x n block.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

# The elementwise tile math is the Pallas kernels' own: the same algorithm.
from mmjax.logit_tiles import (clip_grad_tile, dot_nn, dot_nt, dot_tn, lse_update, siglip_terms,
                               tile_masks)
from mmjax.numerics import MASKED, round_up, vary_like

DEFAULT_BLOCK = 1024


def tiling(n: int, block: int) -> tuple[int, int]:
  """(t, nb): tile size and tiles per side for a batch of n, tiles of at most block."""
  if not isinstance(block, int) or isinstance(block, bool) or block < 1:
    raise ValueError(f"block must be a positive int; got block={block!r}")
  if n <= block:
    return n, 1
  nb = -(-n // block)
  t = -(-n // nb)
  t = min(block, round_up(t, 8))
  return t, -(-n // t)


def _blocks(x: jax.Array, t: int, nb: int) -> jax.Array:
  """[n, d] -> [nb, t, d], zero rows padded at the end."""
  n, d = x.shape
  if nb * t != n:
    x = jnp.pad(x, ((0, nb * t - n), (0, 0)))
  return x.reshape(nb, t, d)


def _vec_blocks(v: jax.Array, t: int, nb: int) -> jax.Array:
  """[n] -> [nb, t], zeros padded."""
  return jnp.pad(v, (0, nb * t - v.shape[0])).reshape(nb, t)


def _accumulate_grads(tile_grad, x, y, t: int, nb: int, extra_init, refs):
  """Loops over tiles; tile_grad(i, j, x_i, y_j) -> (G [t, t] f32, dots-like extras).

  Returns dx [nb*t, d], dy [nb*t, d] (float32, before the factor s) and the
  summed extras. G is d(objective)/d(logits) of the tile; dx_i += G y_j,
  dy_j += G^T x_i, with G cast to the operand dtype (bf16 in, f32 accumulation).
  """
  d = x.shape[-1]
  zeros_t = vary_like(jnp.zeros((t, d), jnp.float32), *refs)

  def row(i, carry):
    dx, dy, extra = carry
    x_i = x[i]

    def col(j, carry):
      dx_i, dy, extra = carry
      y_j = y[j]
      g, e = tile_grad(i, j, x_i, y_j)
      dx_i = dx_i + dot_nn(g, y_j)
      dy = lax.dynamic_update_index_in_dim(dy, dy[j] + dot_tn(g, x_i), j, 0)
      return dx_i, dy, jax.tree.map(jnp.add, extra, e)

    dx_i, dy, extra = lax.fori_loop(0, nb, col, (zeros_t, dy, extra))
    return lax.dynamic_update_index_in_dim(dx, dx_i, i, 0), dy, extra

  zeros = jnp.zeros((nb, t, d), jnp.float32)
  init = vary_like((zeros, zeros, extra_init), *refs)
  dx, dy, extra = lax.fori_loop(0, nb, row, init)
  return dx.reshape(nb * t, d), dy.reshape(nb * t, d), extra


# ---------------------------------------------------------------- CLIP blocks

def clip_block_lse(x: jax.Array, y: jax.Array, s: jax.Array, *,
                   block: int = DEFAULT_BLOCK) -> tuple[jax.Array, jax.Array]:
  """Row and column log-sum-exp of the logits s * x @ y.T, tile by tile.

  Args:
    x, y: [n, d] float (f32 or bf16).
    s: float32 scalar, the logit scale.
    block: largest tile side.

  Returns:
    (row_lse [n], col_lse [n]) float32.
  """
  n = x.shape[0]
  t, nb = tiling(n, block)
  padded = nb * t != n
  xb, yb = _blocks(x, t, nb), _blocks(y, t, nb)
  neg_inf = vary_like(jnp.full((nb, t), -jnp.inf, jnp.float32), x, y, s)
  zeros = vary_like(jnp.zeros((nb, t), jnp.float32), x, y, s)

  def row(i, carry):
    row_lse, m_col, l_col = carry
    x_i = xb[i]

    def col(j, carry):
      m_row, l_row, m_col, l_col = carry
      z = s * dot_nt(x_i, yb[j])
      if padded:
        z = jnp.where(tile_masks(i, j, t, n)[0], z, MASKED)
      m_row, l_row = lse_update(m_row, l_row, z, axis=1)             # [t, 1]
      mc, lc = lse_update(m_col[j][None], l_col[j][None], z, axis=0)  # [1, t]
      m_col = lax.dynamic_update_index_in_dim(m_col, mc[0], j, 0)
      l_col = lax.dynamic_update_index_in_dim(l_col, lc[0], j, 0)
      return m_row, l_row, m_col, l_col

    init = (neg_inf[0][:, None], zeros[0][:, None], m_col, l_col)
    m_row, l_row, m_col, l_col = lax.fori_loop(0, nb, col, init)
    row_lse = lax.dynamic_update_index_in_dim(row_lse, (m_row + jnp.log(l_row))[:, 0], i, 0)
    return row_lse, m_col, l_col

  row_lse, m_col, l_col = lax.fori_loop(0, nb, row, (zeros, neg_inf, zeros))
  col_lse = m_col + jnp.log(l_col)
  return row_lse.reshape(-1)[:n], col_lse.reshape(-1)[:n]


def clip_block_grads(x: jax.Array, y: jax.Array, s: jax.Array, row_lse: jax.Array,
                     col_lse: jax.Array, g: jax.Array, *, positive: bool,
                     block: int = DEFAULT_BLOCK):
  """Gradients wrt x, y, s of g * (sum(row_lse) + sum(col_lse) - 2 * trace(logits)),
  the trace only if `positive` (the block holds the positive pairs on its diagonal).

  Per tile G = g * (exp(z - row_lse) + exp(z - col_lse) - 2 I), z = s * x_i . y_j.

  Args:
    x, y: [n, d] float; s, g: float32 scalars.
    row_lse, col_lse: [n] float32, the log-sum-exps the softmaxes normalise by
      (for a ring step: of the whole global row / column, not just this block).

  Returns:
    (dx [n, d], dy [n, d], ds []) float32.
  """
  n = x.shape[0]
  t, nb = tiling(n, block)
  padded = nb * t != n
  rl, cl = _vec_blocks(row_lse, t, nb), _vec_blocks(col_lse, t, nb)

  def tile_grad(i, j, x_i, y_j):
    dots = dot_nt(x_i, y_j)
    p = clip_grad_tile(s * dots, rl[i][:, None], cl[j][None, :], g, tile_masks(i, j, t, n),
                       positive=positive, padded=padded)
    return p, jnp.sum(p * dots)

  dx, dy, ds = _accumulate_grads(tile_grad, _blocks(x, t, nb), _blocks(y, t, nb), t, nb,
                                 jnp.zeros((), jnp.float32), (x, y, s, row_lse, col_lse, g))
  return s * dx[:n], s * dy[:n], ds


# ---------------------------------------------------------------- SigLIP blocks

def siglip_block_sum(x: jax.Array, y: jax.Array, s: jax.Array, b: jax.Array, *,
                     positive: bool, block: int = DEFAULT_BLOCK) -> jax.Array:
  """sum_ij -log sigmoid(z_ij * (s * x_i . y_j + b)), z = +1 on the diagonal
  if `positive`, else -1 everywhere. x, y: [n, d] float; s, b: f32 scalars.
  Returns a float32 scalar."""
  n = x.shape[0]
  t, nb = tiling(n, block)
  padded = nb * t != n
  xb, yb = _blocks(x, t, nb), _blocks(y, t, nb)

  def row(i, total):
    x_i = xb[i]

    def col(j, total):
      z = s * dot_nt(x_i, yb[j]) + b
      valid, diag = tile_masks(i, j, t, n)
      loss, _ = siglip_terms(z, diag if positive else None, with_loss=True, with_grad=False)
      if padded:
        loss = jnp.where(valid, loss, 0.0)
      return total + jnp.sum(loss)

    return lax.fori_loop(0, nb, col, total)

  return lax.fori_loop(0, nb, row, vary_like(jnp.zeros((), jnp.float32), x, y, s, b))


def siglip_block_grads(x: jax.Array, y: jax.Array, s: jax.Array, b: jax.Array, g: jax.Array, *,
                       positive: bool, with_loss: bool = False, block: int = DEFAULT_BLOCK):
  """Gradients wrt x, y, s, b of g * siglip_block_sum(...), and (if `with_loss`)
  that value too, in the same pass.

  Returns:
    ([total [],] dx [n, d], dy [n, d], ds [], db []) float32, total = g * sum.
  """
  n = x.shape[0]
  t, nb = tiling(n, block)
  padded = nb * t != n

  def tile_grad(i, j, x_i, y_j):
    dots = dot_nt(x_i, y_j)
    valid, diag = tile_masks(i, j, t, n)
    loss, dz = siglip_terms(s * dots + b, diag if positive else None, with_loss=with_loss,
                            with_grad=True)
    if padded:
      dz = jnp.where(valid, dz, 0.0)
    dz = g * dz
    total = jnp.sum(jnp.where(valid, loss, 0.0) if padded else loss) if with_loss else 0.0
    return dz, (total, jnp.sum(dz * dots), jnp.sum(dz))

  zero = jnp.zeros((), jnp.float32)
  dx, dy, (total, ds, db) = _accumulate_grads(
      tile_grad, _blocks(x, t, nb), _blocks(y, t, nb), t, nb, (zero, zero, zero), (x, y, s, b, g))
  grads = s * dx[:n], s * dy[:n], ds, db
  return (g * total,) + grads if with_loss else grads
