"""CLIP (softmax) and SigLIP (sigmoid) loss blocks as Pallas kernels.

mmjax/losses/blocks.py joins them into losses with custom VJPs:
`mmjax.losses.clip_loss(..., impl="pallas")` and `siglip_loss(..., impl="pallas")`.

The same algorithm as mmjax/losses/tiled.py; both take their elementwise tile
math (masks, the sigmoid terms, the CLIP gradient tile) from
mmjax/logit_tiles.py: [t, t] tiles of the logits s * x @ y.T are made in the
kernel and never written out; residuals are O(n).

Every kernel is a row reduction: for each row tile A_i of one tower it runs
over the column tiles B_j of the other, z = s * A_i B_j^T, and accumulates
per-row values (a running max and sum; a row of the gradient). Column
quantities are the same kernel on the transposed problem (A = y, B = x):

  CLIP forward: row max & sum -> row log-sum-exp, twice (rows, then columns).
  CLIP backward: G = exp(z - lse_row) + exp(z - lse_col) - 2 I, dA = s G B,
    twice (dx, then dy on the transposed tiles).
  SigLIP: per-row sums of -log sigmoid(+-z), and under differentiation dA
    (with per-row sums for d scale, d bias) in the same kernel, twice.
So a tile is made twice per pass (no atomics, no cross-program accumulation).

Two kernel shapes for the two backends:
  "tpu" (Mosaic): a (row tiles, column tiles) grid, the column axis
    "arbitrary"; accumulators live in the output blocks, resident across it.
    Tiles are a multiple of 128 (the lane width) unless one tile covers the
    batch; the embedding dim is zero-padded to a multiple of 128.
  "gpu" (Triton): a grid of row tiles; each program loops over the column
    tiles of the other tower, read from the whole array. Tiles and the padded
    dim are powers of 2 (Triton's rule for loaded blocks); not tuned.
On CPU the kernels run in interpret mode with the "tpu" grid, and any tile
multiple of 8. With platform=None (the default) the shape is chosen when the
computation is lowered, per lowering platform (`config`), for the forward and
the backward kernels alike: one jitted loss exports for TPU and CUDA.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from mmjax.logit_tiles import clip_grad_tile, dot_nn, dot_nt, lse_update, siglip_terms, tile_masks
from mmjax.numerics import MASKED, round_up, vary_like
from mmjax.pallas.per_platform import per_platform

PLATFORMS = ("tpu", "gpu")
DEFAULT_BLOCK = {"tpu": 512, "gpu": 64}


def _next_pow2(a: int) -> int:
  return 1 << max(0, a - 1).bit_length()


@dataclasses.dataclass(frozen=True)
class Config:
  """Static kernel settings: the platform whose kernel shape is used, whether
  to interpret, and the largest tile side. platform=None: chosen per lowering
  platform (see `config`); interpret and block may then be None too (each
  branch's default)."""
  platform: str | None
  interpret: bool | None
  block: int | None

  def tiling(self, n: int, d: int) -> tuple[int, int, int]:
    """(t, nb, dp): tile side, tiles per side, padded embedding dim."""
    block = self.block
    if self.platform == "gpu":
      t = max(16, min(_next_pow2(n), 1 << (block.bit_length() - 1)))
      return t, -(-n // t), max(16, _next_pow2(d))
    dp = round_up(d, 128)
    if n <= block:
      return round_up(n, 8), 1, dp
    if self.interpret:
      t = max(8, block // 8 * 8)
    else:
      t = max(128, block // 128 * 128)
    return t, -(-n // t), dp

  def on(self, platform: str, interpret: bool) -> Config:
    """This config with the platform set: interpret and block default to the given
    `interpret` and the platform's default block where they are None."""
    return Config(platform, bool(interpret if self.interpret is None else self.interpret),
                  DEFAULT_BLOCK[platform] if self.block is None else self.block)


def config(block: int | None = None, *, platform: str | None = None,
           interpret: bool | None = None) -> Config:
  """Validates and fills in the defaults. platform=None (the default): the kernel
  shape is chosen when the computation is lowered, per lowering platform
  (mmjax/pallas/per_platform.py): "tpu" compiled for TPU, "gpu" compiled for
  CUDA/ROCm, and elsewhere (CPU) "tpu" in interpret mode; one jitted loss exports
  for platforms=["tpu", "cuda"] from any host. An explicit platform is used for
  every lowering platform, with interpret mode on a CPU host unless `interpret`
  says otherwise. block None: the platform's default."""
  if platform is not None and platform not in PLATFORMS:
    raise ValueError(f"platform must be one of {PLATFORMS} (or None); got platform={platform!r}")
  if block is not None and (not isinstance(block, int) or isinstance(block, bool) or block < 1):
    raise ValueError(f"block must be a positive int; got block={block!r}")
  if platform is None:
    return Config(None, None if interpret is None else bool(interpret), block)
  if interpret is None:
    interpret = jax.default_backend() == "cpu"
  if block is None:
    block = DEFAULT_BLOCK[platform]
  return Config(platform, bool(interpret), block)


def _per_lowering_platform(fn):
  """fn(*arrays, cfg=..., **static), with cfg.platform None: the kernel shape picked per
  lowering platform by mmjax.pallas.per_platform (compiled "tpu" on TPU, compiled "gpu"
  on CUDA/ROCm, interpreted "tpu" elsewhere); an explicit platform calls fn directly."""
  @functools.wraps(fn)
  def wrapped(*args, cfg: Config, **static):
    if cfg.platform is not None:
      return fn(*args, cfg=cfg, **static)

    def on(platform, interpret):
      return functools.partial(fn, cfg=cfg.on(platform, interpret), **static)
    return per_platform(*args, tpu=on("tpu", False), gpu=on("gpu", False),
                        default=on("tpu", True))
  return wrapped


# ---------------------------------------------------------------- the row-reduction driver

# A tile update: (i, j, scalars, a [t, dp], b [t, dp], row_vecs [[t, 1]...],
# col_vecs [[1, t]...], carry) -> carry, carry a tuple of [t, w] float32.
TileUpdate = Callable


def _row_reduce(update: TileUpdate, inits: tuple[tuple[int, float], ...], scalars, a, b,
                row_vecs, col_vecs, *, t: int, nb: int, cfg: Config):
  """Runs `update` over all tiles (i, j), i over A's row tiles, j over B's.

  inits: (width w, initial value) per accumulator; the accumulators of row
  tile i after the last j are the outputs, [nb * t, w] each. scalars: [k]
  float32. a, b: [nb * t, dp]; row_vecs: [nb * t, 1] arrays read per row
  tile; col_vecs: [1, nb * t] arrays read per column tile.
  """
  dp = a.shape[1]
  k = scalars.shape[0]
  nr, nc = len(row_vecs), len(col_vecs)
  # Under shard_map(check_vma=True) the outputs vary over the mesh axes any input varies over.
  scalars, a, b, row_vecs, col_vecs = vary_like((scalars, a, b, row_vecs, col_vecs))
  mat = jax.typeof(a).manual_axis_type
  out_shape = [jax.ShapeDtypeStruct((nb * t, w), jnp.float32, manual_axis_type=mat)
               for w, _ in inits]

  def split(refs):
    return refs[:nr], refs[nr:nr + nc], refs[nr + nc:]

  if cfg.platform == "tpu":
    def kernel(p_ref, a_ref, b_ref, *refs):
      rv, cv, outs = split(refs)
      i, j = pl.program_id(0), pl.program_id(1)

      @pl.when(j == 0)
      def _():
        for o, (w, v) in zip(outs, inits):
          o[...] = jnp.full((t, w), v, jnp.float32)

      sc = [p_ref[q] for q in range(k)]
      carry = update(i, j, sc, a_ref[...], b_ref[...], [r[...] for r in rv],
                     [r[...] for r in cv], tuple(o[...] for o in outs))
      for o, c in zip(outs, carry):
        o[...] = c

    in_specs = ([pl.BlockSpec(memory_space=pltpu.SMEM),
                 pl.BlockSpec((t, dp), lambda i, j: (i, 0)),
                 pl.BlockSpec((t, dp), lambda i, j: (j, 0))]
                + [pl.BlockSpec((t, 1), lambda i, j: (i, 0))] * nr
                + [pl.BlockSpec((1, t), lambda i, j: (0, j))] * nc)
    out_specs = [pl.BlockSpec((t, w), lambda i, j: (i, 0)) for w, _ in inits]
    grid = (nb, nb)
    params = pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary"))
  else:
    def kernel(p_ref, a_ref, b_ref, *refs):
      rv, cv, outs = split(refs)
      i = pl.program_id(0)
      sc = [p_ref[q] for q in range(k)]
      a_i, rows = a_ref[...], [r[...] for r in rv]

      def step(j, carry):
        b_j = b_ref[pl.ds(j * t, t), :]
        cols = [r[:, pl.ds(j * t, t)] for r in cv]
        return update(i, j, sc, a_i, b_j, rows, cols, carry)

      init = tuple(jnp.full((t, w), v, jnp.float32) for w, v in inits)
      for o, c in zip(outs, lax.fori_loop(0, nb, step, init)):
        o[...] = c

    kp = _next_pow2(k)
    scalars = jnp.pad(scalars, (0, kp - k))
    in_specs = ([pl.BlockSpec((kp,), lambda i: (0,)),
                 pl.BlockSpec((t, dp), lambda i: (i, 0)),
                 pl.BlockSpec((nb * t, dp), lambda i: (0, 0))]
                + [pl.BlockSpec((t, 1), lambda i: (i, 0))] * nr
                + [pl.BlockSpec((1, nb * t), lambda i: (0, 0))] * nc)
    out_specs = [pl.BlockSpec((t, w), lambda i: (i, 0)) for w, _ in inits]
    grid = (nb,)
    params = pltriton.CompilerParams(num_warps=4, num_stages=2)

  return pl.pallas_call(kernel, out_shape=out_shape, grid=grid, in_specs=in_specs,
                        out_specs=out_specs, compiler_params=params,
                        interpret=cfg.interpret)(scalars, a, b, *row_vecs, *col_vecs)


def _pad(x, rows: int, cols: int):
  return jnp.pad(x, ((0, rows - x.shape[0]), (0, cols - x.shape[1])))


def _prepare(x, y, cfg: Config):
  n, d = x.shape
  t, nb, dp = cfg.tiling(n, d)
  return _pad(x, nb * t, dp), _pad(y, nb * t, dp), t, nb


def _row(v, size):
  """[n] -> [1, size] (zero-padded)."""
  return jnp.pad(v, (0, size - v.shape[0]))[None, :]


def _col(v, size):
  """[n] -> [size, 1] (zero-padded)."""
  return jnp.pad(v, (0, size - v.shape[0]))[:, None]


# ---------------------------------------------------------------- CLIP

def _lse_update(n, t, padded):
  def update(i, j, sc, a, b, rows, cols, carry):
    m, l = carry
    z = sc[0] * dot_nt(a, b)
    if padded:
      z = jnp.where(tile_masks(i, j, t, n)[0], z, MASKED)
    return lse_update(m, l, z, axis=1)
  return update


def _clip_grad_update(n, t, padded, positive, want_ds):
  def update(i, j, sc, a, b, rows, cols, carry):
    s, g = sc
    dots = dot_nt(a, b)
    p = clip_grad_tile(s * dots, rows[0], cols[0], g, tile_masks(i, j, t, n),
                       positive=positive, padded=padded)
    da = carry[0] + dot_nn(p, b)
    if not want_ds:
      return (da,)
    return da, carry[1] + jnp.sum(p * dots, axis=1, keepdims=True)
  return update


def _lse(a, b, s, n, t, nb, cfg):
  m, l = _row_reduce(_lse_update(n, t, nb * t != n), ((1, -jnp.inf), (1, 0.0)),
                     jnp.stack([s]), a, b, [], [], t=t, nb=nb, cfg=cfg)
  return (m + jnp.log(l))[:n, 0]


@_per_lowering_platform
def clip_block_lse(x, y, s, *, cfg: Config):
  """Row and column log-sum-exp of the logits s * x @ y.T.

  x, y: [n, d] float; s: float32 scalar. Returns (row_lse [n], col_lse [n]) float32.
  """
  n = x.shape[0]
  xp, yp, t, nb = _prepare(x, y, cfg)
  return _lse(xp, yp, s, n, t, nb, cfg), _lse(yp, xp, s, n, t, nb, cfg)


@_per_lowering_platform
def clip_block_grads(x, y, s, row_lse, col_lse, g, *, positive: bool, cfg: Config):
  """Gradients wrt x, y, s of g * (sum(row_lse) + sum(col_lse) - 2 * trace(logits)),
  the trace only if `positive`; see mmjax.losses.tiled.clip_block_grads.

  Returns (dx [n, d], dy [n, d], ds []) float32.
  """
  n, d = x.shape
  xp, yp, t, nb = _prepare(x, y, cfg)
  size, padded = nb * t, nb * t != n
  sc = jnp.stack([s, jnp.asarray(g, jnp.float32)])
  dp = xp.shape[1]
  dx, ds = _row_reduce(_clip_grad_update(n, t, padded, positive, True), ((dp, 0.0), (1, 0.0)),
                       sc, xp, yp, [_col(row_lse, size)], [_row(col_lse, size)],
                       t=t, nb=nb, cfg=cfg)
  (dy,) = _row_reduce(_clip_grad_update(n, t, padded, positive, False), ((dp, 0.0),),
                      sc, yp, xp, [_col(col_lse, size)], [_row(row_lse, size)],
                      t=t, nb=nb, cfg=cfg)
  return s * dx[:n, :d], s * dy[:n, :d], jnp.sum(ds)


# ---------------------------------------------------------------- SigLIP

def _siglip_update(n, t, padded, positive, want_loss, want_grads, want_sums):
  """Accumulators, in order: loss [t, 1] if want_loss; dA [t, dp] if want_grads;
  then (d scale, d bias) per row [t, 1] each if want_sums."""
  def update(i, j, sc, a, b, rows, cols, carry):
    s, bias, g = sc
    dots = dot_nt(a, b)
    z = s * dots + bias
    valid, diag = tile_masks(i, j, t, n)
    loss, dz = siglip_terms(z, diag if positive else None, with_loss=want_loss,
                            with_grad=want_grads)
    out, carry = [], list(carry)
    if want_loss:
      if padded:
        loss = jnp.where(valid, loss, 0.0)
      out.append(carry.pop(0) + jnp.sum(loss, axis=1, keepdims=True))
    if want_grads:
      if padded:
        dz = jnp.where(valid, dz, 0.0)
      dz = g * dz
      out.append(carry.pop(0) + dot_nn(dz, b))
      if want_sums:
        out.append(carry.pop(0) + jnp.sum(dz * dots, axis=1, keepdims=True))
        out.append(carry.pop(0) + jnp.sum(dz, axis=1, keepdims=True))
    return tuple(out)
  return update


@_per_lowering_platform
def siglip_block_sum(x, y, s, b, *, positive: bool, cfg: Config):
  """sum_ij -log sigmoid(z_ij * (s * x_i . y_j + b)), z = +1 on the diagonal if
  `positive`, else -1. x, y: [n, d] float; s, b: f32 scalars. Returns f32 []."""
  n = x.shape[0]
  xp, yp, t, nb = _prepare(x, y, cfg)
  (loss,) = _row_reduce(_siglip_update(n, t, nb * t != n, positive, True, False, False),
                        ((1, 0.0),), jnp.stack([s, b, jnp.float32(1.0)]), xp, yp, [], [],
                        t=t, nb=nb, cfg=cfg)
  return jnp.sum(loss)


@_per_lowering_platform
def siglip_block_grads(x, y, s, b, g, *, positive: bool, with_loss: bool, cfg: Config):
  """Gradients wrt x, y, s, b of g * siglip_block_sum(...), and that value if
  `with_loss`. Returns ([total,] dx [n, d], dy [n, d], ds [], db []) float32."""
  n, d = x.shape
  xp, yp, t, nb = _prepare(x, y, cfg)
  padded, dp = nb * t != n, xp.shape[1]
  sc = jnp.stack([s, b, jnp.asarray(g, jnp.float32)])
  inits = ((1, 0.0),) * with_loss + ((dp, 0.0), (1, 0.0), (1, 0.0))
  outs = _row_reduce(_siglip_update(n, t, padded, positive, with_loss, True, True),
                     inits, sc, xp, yp, [], [], t=t, nb=nb, cfg=cfg)
  (dy,) = _row_reduce(_siglip_update(n, t, padded, positive, False, True, False),
                      ((dp, 0.0),), sc, yp, xp, [], [], t=t, nb=nb, cfg=cfg)
  dx, ds, db = outs[-3:]
  grads = (s * dx[:n, :d], s * dy[:n, :d], jnp.sum(ds), jnp.sum(db))
  return ((g * jnp.sum(outs[0]),) + grads) if with_loss else grads
