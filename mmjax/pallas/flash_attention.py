"""Flash attention: forward and backward Pallas kernels joined by a custom VJP.

softmax(q k^T * scale) v computed block by block with an online softmax
(running row max and sum), so the [q_len, kv_len] score matrix never exists;
the residual for the backward pass is one log-sum-exp per query row.

Two kernel layouts, one block algebra (`_scores`, `_fwd_update`, `_bwd_block`):
  "tpu" (Mosaic): the key/value block index is a grid axis ("arbitrary"), the
    running statistics live in VMEM scratch; one (q block, kv block) pair per
    grid step, as Mosaic pipelines DMAs over the grid.
  "gpu" (Triton): one grid step per q block (or kv block in the dk/dv kernel), a
    fori_loop over the other operand inside the kernel, as Triton wants.
On CPU both run in interpret mode (the tests check both against float64).
With platform=None (the default) the layout is chosen when the computation is
lowered, per lowering platform (mmjax/pallas/per_platform.py): Mosaic for TPU,
Triton for CUDA/ROCm, the Triton layout interpreted elsewhere (CPU), in the
forward and in the backward of the custom VJP, so one jitted function exports
for platforms=["tpu", "cuda"] from any host; platform="tpu"/"gpu" forces a layout.

Kernels see [batch, heads, seq, head_dim]; the wrapper transposes, pads the
sequences to whole blocks (padded keys are masked, padded queries dropped) and,
for Triton, pads head_dim to a power of two. Grouped-query attention: the
query heads are a multiple g of the key/value heads; query head h reads kv
head _div(h, g), and dk/dv sum over the g query heads of their group.

A query row that can see no key (segments, causality) returns 0 and gets
zero gradients, as in FlashAttention.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from mmjax.numerics import MASKED, attention_vjp, round_up
from mmjax.pallas.per_platform import per_platform

PLATFORMS = ("tpu", "gpu")   # kernel layouts: Mosaic TPU, Triton GPU


@dataclasses.dataclass(frozen=True)
class _Cfg:
  """Static facts of one call (hashable: custom_vjp's nondiff argument)."""
  platform: str   # 'tpu' (Mosaic layout) | 'gpu' (Triton layout)
  interpret: bool | pltpu.InterpretParams
  causal: bool
  scale: float
  q_len: int        # unpadded lengths
  kv_len: int
  block_q: int
  block_k: int
  groups: int       # query heads per kv head

  def params(self, semantics: tuple[str, ...]):
    if self.platform == "tpu":
      return pltpu.CompilerParams(dimension_semantics=semantics)
    return pltriton.CompilerParams(num_warps=4, num_stages=2)


# ------------------------------------------------------------ block algebra

def _scores(cfg: _Cfg, q, k, q_seg, kv_seg, i, j):
  """Scores [bq, bk] f32 of q block i against kv block j, and where they count."""
  s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
  s = s * cfg.scale
  shape = (cfg.block_q, cfg.block_k)
  k_pos = j * cfg.block_k + lax.broadcasted_iota(jnp.int32, shape, 1)
  valid = jnp.logical_and(k_pos < cfg.kv_len, q_seg == kv_seg)
  if cfg.causal:
    q_pos = i * cfg.block_q + lax.broadcasted_iota(jnp.int32, shape, 0)
    valid = jnp.logical_and(valid, k_pos <= q_pos)
  return s, valid


def _fwd_update(cfg, q, k, v, q_seg, kv_seg, i, j, m, l, acc):
  """One online-softmax step: running max m [bq,1], sum l [bq,1], acc [bq,d]."""
  s, valid = _scores(cfg, q, k, q_seg, kv_seg, i, j)
  m_new = jnp.maximum(m, jnp.max(jnp.where(valid, s, MASKED), axis=1, keepdims=True))
  p = jnp.where(valid, jnp.exp(s - m_new), 0.0)
  alpha = jnp.exp(m - m_new)
  l = alpha * l + jnp.sum(p, axis=1, keepdims=True)
  pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                       preferred_element_type=jnp.float32)
  return m_new, l, alpha * acc + pv


def _finish(m, l, acc):
  """Output [bq, d] f32 and log-sum-exp [bq, 1]; rows that saw no key give 0."""
  seen = l > 0.0
  safe_l = jnp.where(seen, l, 1.0)
  return acc / safe_l, jnp.where(seen, m + jnp.log(safe_l), 0.0)


def _bwd_block(cfg, q, k, v, do, lse, delta, q_seg, kv_seg, i, j):
  """Recomputed probabilities' gradients for one block: (ds [bq,bk] f32, p [bq,bk] f32)."""
  s, valid = _scores(cfg, q, k, q_seg, kv_seg, i, j)
  p = jnp.where(valid, jnp.exp(s - lse), 0.0)
  dp = lax.dot_general(do, v, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
  return p * (dp - delta), p


def _mm(a, b, contract_a: int, dtype):
  """a^T b (contract_a=0) or a b (contract_a=1) in f32, operands cast to `dtype`."""
  return lax.dot_general(a.astype(dtype), b, (((contract_a,), (0,)), ((), ())),
                         preferred_element_type=jnp.float32)


def _div(a, b):
  # lax.div, not //: jnp's floor division lowers through sign, which Mosaic
  # only lowers for a known TPU generation (jax.export on a CPU host has none).
  return lax.div(a, jnp.int32(b))


def _last_kv_block(cfg, i):
  """Index of the last kv block a causal q block i can see (all blocks otherwise)."""
  n_k = pl.cdiv(cfg.kv_len, cfg.block_k)
  if not cfg.causal:
    return n_k - 1
  return jnp.minimum(_div((i + 1) * cfg.block_q - 1, cfg.block_k), n_k - 1)


def _first_q_block(cfg, j):
  """Index of the first q block that can see causal kv block j (0 otherwise)."""
  if not cfg.causal:
    return 0
  return _div(j * cfg.block_k, cfg.block_q)


# ------------------------------------------------------------ forward

def _fwd_kernel_tpu(cfg, q_ref, k_ref, v_ref, qs_ref, ks_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc):
  i, j = pl.program_id(2), pl.program_id(3)

  @pl.when(j == 0)
  def _():
    m_sc[...] = jnp.full(m_sc.shape, MASKED, jnp.float32)
    l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

  @pl.when(j <= _last_kv_block(cfg, i))
  def _():
    m, l, acc = _fwd_update(cfg, q_ref[...], k_ref[...], v_ref[...], qs_ref[...], ks_ref[...],
                            i, j, m_sc[...], l_sc[...], acc_sc[...])
    m_sc[...], l_sc[...], acc_sc[...] = m, l, acc

  @pl.when(j == pl.num_programs(3) - 1)
  def _():
    o, lse = _finish(m_sc[...], l_sc[...], acc_sc[...])
    o_ref[...] = o.astype(o_ref.dtype)
    lse_ref[...] = lse


def _fwd_kernel_triton(cfg, q_ref, k_ref, v_ref, qs_ref, ks_ref, o_ref, lse_ref):
  i = pl.program_id(2)
  q, q_seg = q_ref[...], qs_ref[...]
  bk, d = cfg.block_k, q.shape[-1]

  def body(j, carry):
    kv = pl.ds(j * bk, bk)
    return _fwd_update(cfg, q, k_ref[kv, :], v_ref[kv, :], q_seg, ks_ref[:, kv], i, j, *carry)

  init = (jnp.full((cfg.block_q, 1), MASKED, jnp.float32), jnp.zeros((cfg.block_q, 1), jnp.float32),
          jnp.zeros((cfg.block_q, d), jnp.float32))
  o, lse = _finish(*lax.fori_loop(0, _last_kv_block(cfg, i) + 1, body, init))
  o_ref[...] = o.astype(o_ref.dtype)
  lse_ref[...] = lse


def _call(kernel, cfg: _Cfg, name: str, *, grid, in_specs, out_specs, out_shape,
          semantics=(), scratch_shapes=()):
  """pallas_call of kernel(cfg, ...) with the layout's compiler params."""
  return pl.pallas_call(functools.partial(kernel, cfg), grid=grid, in_specs=in_specs,
                        out_specs=out_specs, out_shape=out_shape, scratch_shapes=scratch_shapes,
                        compiler_params=cfg.params(semantics), interpret=cfg.interpret,
                        name=name)


def _forward(cfg: _Cfg, q, k, v, q_seg, kv_seg):
  """q [b,hq,Sq,d], k/v [b,hk,Sk,d] (padded) -> o [b,hq,Sq,d], lse [b,hq,Sq,1] f32."""
  b, hq, sq, d = q.shape
  sk = k.shape[2]
  g, bq, bk = cfg.groups, cfg.block_q, cfg.block_k
  n_q, n_k = sq // bq, sk // bk
  out_shape = (jax.ShapeDtypeStruct(q.shape, q.dtype),
               jax.ShapeDtypeStruct((b, hq, sq, 1), jnp.float32))
  if cfg.platform == "tpu":
    def kv_map(bi, h, i, j):   # causal: repeat the last visible block, so its DMA is skipped
      return (bi, _div(h, g), jnp.minimum(j, _last_kv_block(cfg, i)), 0)

    def ks_map(bi, h, i, j):
      return (bi, 0, jnp.minimum(j, _last_kv_block(cfg, i)))

    return _call(
        _fwd_kernel_tpu, cfg, "mmjax_flash_fwd",
        grid=(b, hq, n_q, n_k),
        in_specs=[pl.BlockSpec((None, None, bq, d), lambda bi, h, i, j: (bi, h, i, 0)),
                  pl.BlockSpec((None, None, bk, d), kv_map),
                  pl.BlockSpec((None, None, bk, d), kv_map),
                  pl.BlockSpec((None, bq, 1), lambda bi, h, i, j: (bi, i, 0)),
                  pl.BlockSpec((None, 1, bk), ks_map)],
        out_specs=[pl.BlockSpec((None, None, bq, d), lambda bi, h, i, j: (bi, h, i, 0)),
                   pl.BlockSpec((None, None, bq, 1), lambda bi, h, i, j: (bi, h, i, 0))],
        scratch_shapes=[pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
                        pltpu.VMEM((bq, d), jnp.float32)],
        out_shape=out_shape, semantics=("parallel", "parallel", "parallel", "arbitrary"),
    )(q, k, v, q_seg, kv_seg)
  return _call(
      _fwd_kernel_triton, cfg, "mmjax_flash_fwd",
      grid=(b, hq, n_q),
      in_specs=[pl.BlockSpec((None, None, bq, d), lambda bi, h, i: (bi, h, i, 0)),
                pl.BlockSpec((None, None, sk, d), lambda bi, h, i: (bi, _div(h, g), 0, 0)),
                pl.BlockSpec((None, None, sk, d), lambda bi, h, i: (bi, _div(h, g), 0, 0)),
                pl.BlockSpec((None, bq, 1), lambda bi, h, i: (bi, i, 0)),
                pl.BlockSpec((None, 1, sk), lambda bi, h, i: (bi, 0, 0))],
      out_specs=[pl.BlockSpec((None, None, bq, d), lambda bi, h, i: (bi, h, i, 0)),
                 pl.BlockSpec((None, None, bq, 1), lambda bi, h, i: (bi, h, i, 0))],
      out_shape=out_shape,
  )(q, k, v, q_seg, kv_seg)


# ------------------------------------------------------------ backward

def _dq_kernel_tpu(cfg, q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, qs_ref, ks_ref,
                   dq_ref, dq_sc):
  i, j = pl.program_id(2), pl.program_id(3)

  @pl.when(j == 0)
  def _():
    dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

  @pl.when(j <= _last_kv_block(cfg, i))
  def _():
    k = k_ref[...]
    ds, _ = _bwd_block(cfg, q_ref[...], k, v_ref[...], do_ref[...], lse_ref[...], dl_ref[...],
                       qs_ref[...], ks_ref[...], i, j)
    dq_sc[...] += _mm(ds, k, 1, k.dtype)

  @pl.when(j == pl.num_programs(3) - 1)
  def _():
    dq_ref[...] = (dq_sc[...] * cfg.scale).astype(dq_ref.dtype)


def _dq_kernel_triton(cfg, q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, qs_ref, ks_ref, dq_ref):
  i = pl.program_id(2)
  q, do, lse, delta, q_seg = q_ref[...], do_ref[...], lse_ref[...], dl_ref[...], qs_ref[...]
  bk = cfg.block_k

  def body(j, dq):
    kv = pl.ds(j * bk, bk)
    k = k_ref[kv, :]
    ds, _ = _bwd_block(cfg, q, k, v_ref[kv, :], do, lse, delta, q_seg, ks_ref[:, kv], i, j)
    return dq + _mm(ds, k, 1, k.dtype)

  dq = lax.fori_loop(0, _last_kv_block(cfg, i) + 1, body, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def _dkv_kernel_tpu(cfg, q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, qs_ref, ks_ref,
                    dk_ref, dv_ref, dk_sc, dv_sc):
  j, gi, i = pl.program_id(2), pl.program_id(3), pl.program_id(4)

  @pl.when(jnp.logical_and(gi == 0, i == 0))
  def _():
    dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
    dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

  @pl.when(i >= _first_q_block(cfg, j))
  def _():
    q, do = q_ref[...], do_ref[...]
    ds, p = _bwd_block(cfg, q, k_ref[...], v_ref[...], do, lse_ref[...], dl_ref[...],
                       qs_ref[...], ks_ref[...], i, j)
    dv_sc[...] += _mm(p, do, 0, do.dtype)
    dk_sc[...] += _mm(ds, q, 0, q.dtype)

  @pl.when(jnp.logical_and(gi == pl.num_programs(3) - 1, i == pl.num_programs(4) - 1))
  def _():
    dk_ref[...] = (dk_sc[...] * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _dkv_kernel_triton(cfg, q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, qs_ref, ks_ref,
                       dk_ref, dv_ref):
  j = pl.program_id(2)
  k, v, kv_seg = k_ref[...], v_ref[...], ks_ref[...]
  bq = cfg.block_q
  first = _first_q_block(cfg, j)
  n_vis = q_ref.shape[1] // bq - first   # q blocks that see kv block j

  def body(t, carry):   # t runs over (query head in the group, visible q block)
    dk, dv = carry
    gi, i = lax.div(t, n_vis), first + lax.rem(t, n_vis)
    rows = pl.ds(i * bq, bq)
    q, do = q_ref[gi, rows, :], do_ref[gi, rows, :]
    ds, p = _bwd_block(cfg, q, k, v, do, lse_ref[gi, rows, :], dl_ref[gi, rows, :],
                       qs_ref[rows, :], kv_seg, i, j)
    return dk + _mm(ds, q, 0, q.dtype), dv + _mm(p, do, 0, do.dtype)

  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = lax.fori_loop(0, cfg.groups * n_vis, body, (zeros, zeros))
  dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _bwd_in_specs(q_block, kv_block, d, q_map, kv_map, q_seg_map, kv_seg_map):
  """BlockSpecs of a backward kernel's inputs (q, k, v, do, lse, delta, q_seg, kv_seg).

  q_block: the leading dims of a q-side block up to its rows, e.g. (None, None, bq);
  kv_block likewise for k and v. lse and delta are [rows, 1] per q block; the
  segment ids [rows, 1] (queries) and [1, rows] (keys).
  """
  q_spec, kv_spec = pl.BlockSpec(q_block + (d,), q_map), pl.BlockSpec(kv_block + (d,), kv_map)
  row_spec = pl.BlockSpec(q_block + (1,), q_map)
  return [q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec,
          pl.BlockSpec((None, q_block[-1], 1), q_seg_map),
          pl.BlockSpec((None, 1, kv_block[-1]), kv_seg_map)]


def _backward(cfg: _Cfg, q, k, v, q_seg, kv_seg, o, lse, do):
  b, hq, sq, d = q.shape
  hk, sk = k.shape[1], k.shape[2]
  g, bq, bk = cfg.groups, cfg.block_q, cfg.block_k
  n_q, n_k = sq // bq, sk // bk
  delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1, keepdims=True)
  args = (q, k, v, do, lse, delta, q_seg, kv_seg)
  dq_shape = jax.ShapeDtypeStruct(q.shape, q.dtype)
  dkv_shape = (jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype))
  if cfg.platform == "tpu":
    def q_map(bi, h, i, j):
      return (bi, h, i, 0)

    def kv_map(bi, h, i, j):
      return (bi, _div(h, g), jnp.minimum(j, _last_kv_block(cfg, i)), 0)

    dq = _call(_dq_kernel_tpu, cfg, "mmjax_flash_dq", grid=(b, hq, n_q, n_k),
               in_specs=_bwd_in_specs(
                   (None, None, bq), (None, None, bk), d, q_map, kv_map,
                   lambda bi, h, i, j: (bi, i, 0),
                   lambda bi, h, i, j: (bi, 0, jnp.minimum(j, _last_kv_block(cfg, i)))),
               out_specs=pl.BlockSpec((None, None, bq, d), q_map), out_shape=dq_shape,
               semantics=("parallel", "parallel", "parallel", "arbitrary"),
               scratch_shapes=[pltpu.VMEM((bq, d), jnp.float32)])(*args)

    def gq_map(bi, h, j, gi, i):   # causal: q blocks before the first visible one repeat it
      return (bi, h * g + gi, jnp.maximum(i, _first_q_block(cfg, j)), 0)

    def k_map(bi, h, j, gi, i):
      return (bi, h, j, 0)

    dk, dv = _call(_dkv_kernel_tpu, cfg, "mmjax_flash_dkv", grid=(b, hk, n_k, g, n_q),
                   in_specs=_bwd_in_specs(
                       (None, None, bq), (None, None, bk), d, gq_map, k_map,
                       lambda bi, h, j, gi, i: (bi, jnp.maximum(i, _first_q_block(cfg, j)), 0),
                       lambda bi, h, j, gi, i: (bi, 0, j)),
                   out_specs=[pl.BlockSpec((None, None, bk, d), k_map)] * 2, out_shape=dkv_shape,
                   semantics=("parallel", "parallel", "parallel", "arbitrary", "arbitrary"),
                   scratch_shapes=[pltpu.VMEM((bk, d), jnp.float32)] * 2)(*args)
    return dq, dk, dv

  def q_map(bi, h, i):
    return (bi, h, i, 0)

  def kv_full(bi, h, i):
    return (bi, _div(h, g), 0, 0)

  dq = _call(_dq_kernel_triton, cfg, "mmjax_flash_dq", grid=(b, hq, n_q),
             in_specs=_bwd_in_specs((None, None, bq), (None, None, sk), d, q_map, kv_full,
                                    lambda bi, h, i: (bi, i, 0), lambda bi, h, i: (bi, 0, 0)),
             out_specs=pl.BlockSpec((None, None, bq, d), q_map), out_shape=dq_shape)(*args)

  def group(bi, h, j):   # the g query heads of kv head h, whole sequence
    return (bi, h, 0, 0)

  def k_map(bi, h, j):
    return (bi, h, j, 0)

  dk, dv = _call(_dkv_kernel_triton, cfg, "mmjax_flash_dkv", grid=(b, hk, n_k),
                 in_specs=_bwd_in_specs((None, g, sq), (None, None, bk), d, group, k_map,
                                        lambda bi, h, j: (bi, 0, 0), lambda bi, h, j: (bi, 0, j)),
                 out_specs=[pl.BlockSpec((None, None, bk, d), k_map)] * 2,
                 out_shape=dkv_shape)(*args)
  return dq, dk, dv


# ------------------------------------------------------------ custom VJP

_flash = attention_vjp(_forward, _backward)


# ------------------------------------------------------------ public entry

def _pad_to(x, axis: int, size: int, value=0):
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, pad, constant_values=value)


@dataclasses.dataclass(frozen=True)
class _Opts:
  """The layout-independent static arguments of one call."""
  causal: bool
  scale: float
  block_q: int
  block_k: int


def _config(opts: _Opts, platform: str, interpret, q_len: int, kv_len: int, d: int,
            groups: int, *, strict: bool = True) -> tuple[_Cfg, int]:
  """The layout's block sizes and padded head_dim. strict=False (platform=None: every
  layout is traced) rounds a TPU block_k up to a multiple of 128 instead of raising."""
  block_q, block_k = opts.block_q, opts.block_k
  if platform == "tpu":
    if block_k % 128:
      if strict:
        raise ValueError(f"block_k={block_k} must be a multiple of 128 on TPU")
      block_k = round_up(block_k, 128)
    bq, bk = min(block_q, round_up(q_len, 8)), block_k
    d_pad = d
  else:   # Triton: power-of-two shapes, at least 16 for tl.dot
    bq = min(block_q, max(16, pl.next_power_of_2(q_len)))
    bk = min(block_k, max(16, pl.next_power_of_2(kv_len)))
    d_pad = max(16, pl.next_power_of_2(d))
  cfg = _Cfg(platform=platform, interpret=interpret, causal=opts.causal, scale=opts.scale,
             q_len=q_len, kv_len=kv_len, block_q=bq, block_k=bk, groups=groups)
  return cfg, d_pad


def _prep(x, s: int, d_pad: int):
  """[b, n, h, d] -> [b, h, s, d_pad], zero-padded."""
  return _pad_to(_pad_to(jnp.swapaxes(x, 1, 2), 2, s), 3, d_pad)


def _unprep(x, n: int, d: int):
  """[b, h, s, d_pad] -> [b, n, h, d]."""
  return jnp.swapaxes(x[:, :, :n, :d], 1, 2)


def _layout_args(opts, platform, interpret, q, k, v, q_seg, kv_seg):
  """cfg, d_pad and the padded kernel inputs of one layout, from unpadded [b, n, h, d] q, k, v
  and int32 [b, n] segment ids."""
  (_, q_len, hq, d), (kv_len, hk) = q.shape, k.shape[1:3]
  cfg, d_pad = _config(opts, platform, interpret, q_len, kv_len, d, hq // hk, strict=False)
  sq, sk = round_up(q_len, cfg.block_q), round_up(kv_len, cfg.block_k)
  return cfg, d_pad, (_prep(q, sq, d_pad), _prep(k, sk, d_pad), _prep(v, sk, d_pad),
                      _pad_to(q_seg, 1, sq)[:, :, None], _pad_to(kv_seg, 1, sk)[:, None, :])


def _layout_forward(opts, platform, interpret, q, k, v, q_seg, kv_seg):
  """One layout's forward on unpadded arrays: o [b, q_len, hq, d], lse [b, hq, q_len] f32."""
  cfg, _, padded = _layout_args(opts, platform, interpret, q, k, v, q_seg, kv_seg)
  o, lse = _forward(cfg, *padded)
  q_len, d = q.shape[1], q.shape[3]
  return _unprep(o, q_len, d), lse[:, :, :q_len, 0]


def _layout_backward(opts, platform, interpret, q, k, v, q_seg, kv_seg, o, lse, do):
  """One layout's dq, dk, dv on unpadded arrays. Padded query rows get o = do = 0 (so
  delta = 0 and they add nothing) and lse = 0 (finite: q is zero-padded too)."""
  cfg, d_pad, padded = _layout_args(opts, platform, interpret, q, k, v, q_seg, kv_seg)
  sq = padded[0].shape[2]
  lse = _pad_to(lse, 2, sq)[..., None]
  dq, dk, dv = _backward(cfg, *padded, _prep(o, sq, d_pad), lse, _prep(do, sq, d_pad))
  (q_len, d), kv_len = (q.shape[1], q.shape[3]), k.shape[1]
  return _unprep(dq, q_len, d), _unprep(dk, kv_len, d), _unprep(dv, kv_len, d)


def flash_forward(q, k, v, q_seg, kv_seg, *, platform: str, is_causal: bool,
                  interpret=False, block_q: int = 128, block_k: int = 128):
  """One layout's forward on unpadded arrays, for a custom VJP built elsewhere (attention's
  "auto"): q [b, q_len, hq, d], k/v [b, kv_len, hk, d], int32 segment ids [b, q_len] /
  [b, kv_len] -> (o like q, lse [b, hq, q_len] float32). Scale head_dim ** -0.5."""
  opts = _Opts(causal=bool(is_causal), scale=float(q.shape[-1] ** -0.5), block_q=block_q,
               block_k=block_k)
  return _layout_forward(opts, platform, interpret, q, k, v, q_seg, kv_seg)


def flash_backward(q, k, v, q_seg, kv_seg, o, lse, do, *, platform: str, is_causal: bool,
                   interpret=False, block_q: int = 128, block_k: int = 128):
  """dq, dk, dv (like q, k, v) from flash_forward's o and lse and the cotangent do."""
  opts = _Opts(causal=bool(is_causal), scale=float(q.shape[-1] ** -0.5), block_q=block_q,
               block_k=block_k)
  return _layout_backward(opts, platform, interpret, q, k, v, q_seg, kv_seg, o, lse, do)


def _branches(layout_fn, opts: _Opts, interpret):
  """The per_platform branches: Mosaic on TPU, Triton on CUDA/ROCm, and elsewhere (CPU) the
  Triton layout interpreted. interpret=None: compiled on TPU and GPU, interpreted elsewhere."""
  def on(platform, default_interpret):
    return functools.partial(layout_fn, opts, platform,
                             default_interpret if interpret is None else interpret)
  return dict(tpu=on("tpu", False), gpu=on("gpu", False), default=on("gpu", True))


def _auto_forward(static, q, k, v, q_seg, kv_seg):
  opts, interpret = static
  return per_platform(q, k, v, q_seg, kv_seg, **_branches(_layout_forward, opts, interpret))


def _auto_backward(static, q, k, v, q_seg, kv_seg, o, lse, do):
  opts, interpret = static
  return per_platform(q, k, v, q_seg, kv_seg, o, lse, do,
                      **_branches(_layout_backward, opts, interpret))


# platform=None: the custom VJP on unpadded arrays, the layout picked per lowering platform
# inside its forward and its backward (the residuals, o and the per-row lse, are the same
# for every layout).
_auto_flash = attention_vjp(_auto_forward, _auto_backward)


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, is_causal: bool = False,
                    q_segment_ids: jax.Array | None = None,
                    kv_segment_ids: jax.Array | None = None, scale: float | None = None,
                    block_q: int = 128, block_k: int = 128, platform: str | None = None,
                    interpret: bool | None = None) -> jax.Array:
  """Memory-efficient attention softmax(q k^T * scale) v, differentiable in q, k, v.

  Args:
    q: [batch, q_len, q_heads, head_dim], f32 or bf16.
    k, v: [batch, kv_len, kv_heads, head_dim]; q_heads must be a multiple of
      kv_heads (grouped-query attention; equal for plain multi-head).
    is_causal: query i sees keys j <= i (top-left aligned, as the xla impl).
    q_segment_ids: int [batch, q_len]; query i sees key j only where
      q_segment_ids[i] == kv_segment_ids[j] (key padding: give padded keys a
      segment no query has). Both or neither.
    kv_segment_ids: int [batch, kv_len].
    scale: score multiplier; default head_dim ** -0.5.
    block_q, block_k: tile sizes; lengths need not be multiples (padded inside).
      On TPU block_k must be a multiple of 128 and block_q of 8; Triton wants
      powers of two (the blocks shrink for short sequences). With platform=None
      a block_k below 128 is rounded up to 128 for the TPU layout.
    platform: 'tpu' (Mosaic layout) | 'gpu' (Triton layout): kernel layout and
      compiler params, for every platform the call is lowered for. None (the
      default): chosen per lowering platform, when the computation is lowered
      (mmjax.pallas.per_platform): the Mosaic layout for TPU, the Triton one for
      CUDA/ROCm, and elsewhere (CPU) the Triton layout in interpret mode; one
      jitted function exports for platforms=["tpu", "cuda"] from any host.
    interpret: run the kernels in the Pallas interpreter (True, or a
      `pltpu.InterpretParams` for the TPU simulator's race detection);
      default: with an explicit platform, on a CPU host; with platform=None,
      where the call is lowered for a platform other than TPU, CUDA, ROCm.
      Interpreted outputs start as NaN, so an element a kernel forgets to write
      shows up.

  Returns:
    [batch, q_len, q_heads, head_dim] in q's dtype (f32 accumulation).
  """
  if platform is not None and platform not in PLATFORMS:
    raise ValueError(f"platform={platform!r} is not one of {PLATFORMS} (or None)")
  for name, x in (("q", q), ("k", k), ("v", v)):
    if x.ndim != 4:
      raise ValueError(f"{name} must be [batch, seq, heads, head_dim]; got shape {x.shape}")
  if k.shape != v.shape:
    raise ValueError(f"k {k.shape} and v {v.shape} must have the same shape")
  b, q_len, hq, d = q.shape
  kv_len, hk = k.shape[1], k.shape[2]
  if k.shape[0] != b or k.shape[3] != d:
    raise ValueError(f"q {q.shape} and k {k.shape} must agree on batch and head_dim")
  if hq % hk:
    raise ValueError(f"q heads ({hq}) must be a multiple of k/v heads ({hk}); "
                     f"q {q.shape}, k {k.shape}")
  if (q_segment_ids is None) != (kv_segment_ids is None):
    raise ValueError("give both q_segment_ids and kv_segment_ids, or neither")
  if q_segment_ids is not None:
    if q_segment_ids.shape != (b, q_len) or kv_segment_ids.shape != (b, kv_len):
      raise ValueError(f"q_segment_ids {q_segment_ids.shape} and kv_segment_ids "
                       f"{kv_segment_ids.shape} must be [batch, q_len] = {(b, q_len)} and "
                       f"[batch, kv_len] = {(b, kv_len)}")
  for name, blk in (("block_q", block_q), ("block_k", block_k)):
    if blk < 8 or blk & (blk - 1):
      raise ValueError(f"{name}={blk} must be a power of two >= 8")
  opts = _Opts(causal=bool(is_causal), scale=float(d ** -0.5 if scale is None else scale),
               block_q=block_q, block_k=block_k)
  if q_segment_ids is None:
    q_seg, kv_seg = jnp.zeros((b, q_len), jnp.int32), jnp.zeros((b, kv_len), jnp.int32)
  else:
    q_seg, kv_seg = q_segment_ids.astype(jnp.int32), kv_segment_ids.astype(jnp.int32)

  if platform is None:
    return _auto_flash((opts, interpret), q, k, v, q_seg, kv_seg)

  # An explicit layout, for every lowering platform: the custom VJP on the padded arrays.
  if interpret is None:
    interpret = jax.default_backend() == "cpu"
  cfg, d_pad = _config(opts, platform, interpret, q_len, kv_len, d, hq // hk)
  sq, sk = round_up(q_len, cfg.block_q), round_up(kv_len, cfg.block_k)
  o = _flash(cfg, _prep(q, sq, d_pad), _prep(k, sk, d_pad), _prep(v, sk, d_pad),
             _pad_to(q_seg, 1, sq)[:, :, None], _pad_to(kv_seg, 1, sk)[:, None, :])
  return _unprep(o, q_len, d)
