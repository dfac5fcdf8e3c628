"""Blockwise attention in pure JAX: online softmax over key/value blocks, custom VJP.

The same algorithm as mmjax.pallas.flash_attention, written with XLA loops so it
runs fast on any backend (the default long-sequence choice on CPU): an outer
loop over query blocks, an inner loop over key/value blocks that keeps a running
row max and sum, and a backward pass that recomputes every block from the saved
per-row log-sum-exp. Memory is O(seq * head_dim + block_q * block_k * heads),
never O(seq^2). Semantics match flash_attention: segment ids, causal (top-left
aligned), grouped-query heads, rows that see no key give 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from mmjax.numerics import MASKED, attention_vjp, check_array, round_up

AXES = ("batch", "seq", "heads", "head_dim")   # of q, k and v


def _pad(x, axis: int, size: int):
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, pad)


def _slice(x, axis: int, start, size: int):
  return lax.dynamic_slice_in_dim(x, start, size, axis)


# (causal, scale, q_len, kv_len, block_q, block_k): static facts of one call
def _scores(static, q, k, q_seg, kv_seg, i, j):
  """q [b,bq,hk,g,d], k [b,bk,hk,d] -> scores [b,hk,g,bq,bk] f32 and validity mask."""
  causal, scale, _, kv_len, bq, bk = static
  s = jnp.einsum("bqhgd,bkhd->bhgqk", q, k, preferred_element_type=jnp.float32) * scale
  k_pos = j * bk + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
  valid = (k_pos < kv_len)[None] & (q_seg[:, :, None] == kv_seg[:, None, :])   # [b, bq, bk]
  if causal:
    valid = valid & (k_pos <= i * bq + lax.broadcasted_iota(jnp.int32, (bq, bk), 0))[None]
  return s, valid[:, None, None]


def _kv_blocks_seen(static, i):
  """Number of kv blocks q block i can see (a traced bound when causal)."""
  causal, _, _, kv_len, bq, bk = static
  n_k = -(-kv_len // bk)
  return jnp.minimum(((i + 1) * bq - 1) // bk + 1, n_k) if causal else n_k


def _forward(static, q, k, v, q_seg, kv_seg):
  """Padded q [b,Sq,hk,g,d], k/v [b,Sk,hk,d] -> o like q, lse [b,hk,g,Sq] f32."""
  _, _, _, _, bq, bk = static
  b, sq, hk, g, d = q.shape

  def q_block(i):
    q_i, qs_i = _slice(q, 1, i * bq, bq), _slice(q_seg, 1, i * bq, bq)

    def kv_step(j, carry):
      m, l, acc = carry
      k_j, v_j = _slice(k, 1, j * bk, bk), _slice(v, 1, j * bk, bk)
      s, valid = _scores(static, q_i, k_j, qs_i, _slice(kv_seg, 1, j * bk, bk), i, j)
      m_new = jnp.maximum(m, jnp.max(jnp.where(valid, s, MASKED), axis=-1))
      p = jnp.where(valid, jnp.exp(s - m_new[..., None]), 0.0)
      alpha = jnp.exp(m - m_new)
      pv = jnp.einsum("bhgqk,bkhd->bhgqd", p.astype(v.dtype), v_j,
                      preferred_element_type=jnp.float32)
      return m_new, alpha * l + jnp.sum(p, axis=-1), alpha[..., None] * acc + pv

    init = (jnp.full((b, hk, g, bq), MASKED, jnp.float32), jnp.zeros((b, hk, g, bq), jnp.float32),
            jnp.zeros((b, hk, g, bq, d), jnp.float32))
    m, l, acc = lax.fori_loop(0, _kv_blocks_seen(static, i), kv_step, init)
    seen = l > 0.0
    safe_l = jnp.where(seen, l, 1.0)
    o = (acc / safe_l[..., None]).astype(q.dtype)
    return jnp.moveaxis(o, 3, 1), jnp.where(seen, m + jnp.log(safe_l), 0.0)

  o, lse = lax.map(q_block, jnp.arange(sq // bq))       # [nq, b, bq, hk, g, d], [nq, b, hk, g, bq]
  o = jnp.moveaxis(o, 0, 1).reshape(q.shape)
  lse = jnp.moveaxis(lse, 0, 3).reshape(b, hk, g, sq)
  return o, lse


def _backward(static, q, k, v, q_seg, kv_seg, o, lse, do):
  causal, scale, _, _, bq, bk = static
  sq, sk = q.shape[1], k.shape[1]
  n_q = sq // bq
  delta = jnp.einsum("bqhgd,bqhgd->bhgq", o.astype(jnp.float32), do.astype(jnp.float32))

  def kv_block(j, carry):
    dq, dk, dv = carry
    k_j, v_j, ks_j = _slice(k, 1, j * bk, bk), _slice(v, 1, j * bk, bk), _slice(kv_seg, 1, j * bk, bk)

    def q_step(i, inner):
      dq, dk_j, dv_j = inner
      q_i, do_i = _slice(q, 1, i * bq, bq), _slice(do, 1, i * bq, bq)
      s, valid = _scores(static, q_i, k_j, _slice(q_seg, 1, i * bq, bq), ks_j, i, j)
      p = jnp.where(valid, jnp.exp(s - _slice(lse, 3, i * bq, bq)[..., None]), 0.0)
      dv_j = dv_j + jnp.einsum("bhgqk,bqhgd->bkhd", p.astype(do.dtype), do_i,
                               preferred_element_type=jnp.float32)
      dp = jnp.einsum("bqhgd,bkhd->bhgqk", do_i, v_j, preferred_element_type=jnp.float32)
      ds = p * (dp - _slice(delta, 3, i * bq, bq)[..., None])
      dk_j = dk_j + jnp.einsum("bhgqk,bqhgd->bkhd", ds.astype(q.dtype), q_i,
                               preferred_element_type=jnp.float32)
      dq_i = jnp.einsum("bhgqk,bkhd->bqhgd", ds.astype(k.dtype), k_j,
                        preferred_element_type=jnp.float32)
      dq = lax.dynamic_update_slice_in_dim(dq, _slice(dq, 1, i * bq, bq) + dq_i, i * bq, 1)
      return dq, dk_j, dv_j

    first = (j * bk) // bq if causal else 0
    zeros = jnp.zeros(k_j.shape, jnp.float32)
    dq, dk_j, dv_j = lax.fori_loop(first, n_q, q_step, (dq, zeros, zeros))
    return (dq, lax.dynamic_update_slice_in_dim(dk, dk_j, j * bk, 1),
            lax.dynamic_update_slice_in_dim(dv, dv_j, j * bk, 1))

  init = (jnp.zeros(q.shape, jnp.float32), jnp.zeros(k.shape, jnp.float32),
          jnp.zeros(v.shape, jnp.float32))
  dq, dk, dv = lax.fori_loop(0, sk // bk, kv_block, init)
  return ((dq * scale).astype(q.dtype), (dk * scale).astype(k.dtype), dv.astype(v.dtype))


_blockwise = attention_vjp(_forward, _backward)


def blockwise_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, is_causal: bool = False,
                        q_segment_ids: jax.Array | None = None,
                        kv_segment_ids: jax.Array | None = None, scale: float | None = None,
                        block_q: int = 256, block_k: int = 512) -> jax.Array:
  """softmax(q k^T * scale) v without the [q_len, kv_len] scores in memory.

  Args:
    q: [batch, q_len, q_heads, head_dim], floating point (no axis of size 0).
    k, v: [batch, kv_len, kv_heads, head_dim] likewise; q_heads a multiple of kv_heads.
    is_causal: query i sees keys j <= i.
    q_segment_ids, kv_segment_ids: int [batch, q_len] / [batch, kv_len] or None;
      query i sees key j only where their segment ids are equal.
    scale: score multiplier, default head_dim ** -0.5.
    block_q, block_k: tile sizes (any lengths: padded inside, padding masked).

  Returns:
    [batch, q_len, q_heads, head_dim] in q's dtype.
  """
  for name, x in (("q", q), ("k", k), ("v", v)):
    check_array(name, x, AXES)
  if block_q < 1 or block_k < 1:
    raise ValueError(f"block_q={block_q} and block_k={block_k} must be positive")
  b, q_len, hq, d = q.shape
  hk = k.shape[2]
  if hq % hk:
    raise ValueError(f"q heads ({hq}) must be a multiple of k/v heads ({hk}); "
                     f"q {q.shape}, k {k.shape}")
  if q_segment_ids is None:
    q_segment_ids = jnp.zeros((b, q_len), jnp.int32)
    kv_segment_ids = jnp.zeros((b, k.shape[1]), jnp.int32)
  static, qg, k, v, q_seg, kv_seg = _prepare(q, k, v, q_segment_ids, kv_segment_ids, is_causal,
                                             scale, block_q, block_k)
  o = _blockwise(static, qg, k, v, q_seg, kv_seg)
  return o.reshape(b, -1, hq, d)[:, :q_len]


def _prepare(q, k, v, q_seg, kv_seg, is_causal, scale, block_q: int, block_k: int):
  """Unpadded [b, n, h, d] arrays and int [b, n] segment ids -> (static, q as [b, Sq, hk, g, d],
  k, v as [b, Sk, hk, d], segment ids [b, S]), zero-padded to whole blocks."""
  b, q_len, hq, d = q.shape
  kv_len, hk = k.shape[1], k.shape[2]
  bq, bk = min(block_q, q_len), min(block_k, kv_len)
  sq, sk = round_up(q_len, bq), round_up(kv_len, bk)
  static = (bool(is_causal), float(d ** -0.5 if scale is None else scale), q_len, kv_len, bq, bk)
  return (static, _pad(q, 1, sq).reshape(b, sq, hk, hq // hk, d), _pad(k, 1, sk), _pad(v, 1, sk),
          _pad(q_seg.astype(jnp.int32), 1, sq), _pad(kv_seg.astype(jnp.int32), 1, sk))


def blockwise_forward(q, k, v, q_seg, kv_seg, *, is_causal: bool, block_q: int = 256,
                      block_k: int = 512):
  """The forward pass on unpadded arrays, for a custom VJP built elsewhere (attention's "auto").

  q [b, q_len, hq, d], k/v [b, kv_len, hk, d], int32 segment ids [b, q_len] / [b, kv_len]
  -> (o [b, q_len, hq, d] in q's dtype, lse [b, hq, q_len] float32).
  """
  b, q_len, hq, d = q.shape
  static, *padded = _prepare(q, k, v, q_seg, kv_seg, is_causal, None, block_q, block_k)
  o, lse = _forward(static, *padded)
  return o.reshape(b, -1, hq, d)[:, :q_len], lse.reshape(b, hq, -1)[:, :, :q_len]


def blockwise_backward(q, k, v, q_seg, kv_seg, o, lse, do, *, is_causal: bool,
                       block_q: int = 256, block_k: int = 512):
  """dq, dk, dv (unpadded, like q, k, v) from blockwise_forward's o and lse and the cotangent do."""
  b, q_len, hq, d = q.shape
  kv_len, hk = k.shape[1], k.shape[2]
  static, qg, kp, vp, q_seg, kv_seg = _prepare(q, k, v, q_seg, kv_seg, is_causal, None,
                                               block_q, block_k)
  sq, g = qg.shape[1], hq // hk
  grouped = lambda x: _pad(x, 1, sq).reshape(b, sq, hk, g, d)
  lse = _pad(lse, 2, sq).reshape(b, hk, g, sq)   # padded rows: o = do = 0, so they add nothing
  dq, dk, dv = _backward(static, qg, kp, vp, q_seg, kv_seg, grouped(o), lse, grouped(do))
  return dq.reshape(b, sq, hq, d)[:, :q_len], dk[:, :kv_len], dv[:, :kv_len]
