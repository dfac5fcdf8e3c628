"""The single dispatch point for every attention implementation in mmjax.

Layout is [batch, seq, heads, head_dim], as in `jax.nn.dot_product_attention`.
  "xla": the scores in memory; the reference, fastest for short sequences.
  "blockwise": pure-JAX online softmax over key/value blocks with a custom VJP
    (mmjax/nn/blockwise.py); memory linear in the sequence; long sequences on CPU.
  "pallas": mmjax.pallas.flash_attention (Mosaic on TPU, Triton on GPU,
    interpret mode on CPU: correct but slow there).
  "auto": "pallas" on TPU and GPU, "xla" otherwise.
"blockwise" and "pallas" take key-padding masks ([b, 1, 1, kv_len]) only: the
point of them is that no [q_len, kv_len] array exists.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.nn import precision
from mmjax.nn.blockwise import AXES, blockwise_attention
from mmjax.nn.linear import Dense
from mmjax.nn.partitioning import constrain
from mmjax.numerics import MASKED, check_array

IMPLS = ("xla", "blockwise", "pallas", "auto")


def _check(q, k, v, mask):
  for name, x in (("q", q), ("k", k), ("v", v)):
    check_array(name, x, AXES)
  if k.shape != v.shape:
    raise ValueError(f"k {k.shape} and v {v.shape} must have the same shape")
  if (q.shape[0], q.shape[3]) != (k.shape[0], k.shape[3]) or q.shape[2] % k.shape[2]:
    raise ValueError(f"q {q.shape} and k {k.shape} must agree on batch and head_dim, and "
                     "q's heads must be a multiple of k's (grouped-query attention)")
  if mask is not None:
    check_array("mask", mask, floating=False)
    want = (q.shape[0], q.shape[2], q.shape[1], k.shape[1])
    try:
      jnp.broadcast_shapes(mask.shape, want)
    except ValueError:
      raise ValueError(f"mask {mask.shape} must broadcast to [batch, heads, q_len, kv_len] "
                       f"= {want}") from None


def _key_padding_segments(mask, q, k, impl: str) -> dict:
  """A key-padding mask -> segment ids (real keys 0, padded 1, queries 0)."""
  if mask is None:
    return {}
  if mask.ndim != 4 or mask.shape[1] != 1 or mask.shape[2] != 1:
    raise ValueError(f"impl={impl!r} takes a key-padding mask [batch, 1, 1, kv_len]; got mask "
                     f"{mask.shape} (use impl='xla' for general masks)")
  real = jnp.broadcast_to(mask[:, 0, 0, :], (k.shape[0], k.shape[1]))
  return dict(q_segment_ids=jnp.zeros(q.shape[:2], jnp.int32),
              kv_segment_ids=jnp.where(real, 0, 1).astype(jnp.int32))


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                          mask: jax.Array | None = None, is_causal: bool = False,
                          impl: str = "xla") -> jax.Array:
  """softmax(q k^T / sqrt(head_dim)) v, per head.

  Args:
    q: [b, q_len, h, d], floating point (jax or NumPy; no axis of size 0).
    k, v: [b, kv_len, h_kv, d] likewise; h a multiple of h_kv (grouped-query heads).
    mask: bool, broadcastable to [b, h, q_len, kv_len]; True = attend.
      "blockwise" and "pallas" take key padding, [b or 1, 1, 1, kv_len], only.
    is_causal: also mask key positions after the query position.
    impl: "xla" | "blockwise" | "pallas" | "auto" (module docstring). All
      compute scores and softmax in float32 (operands in their own dtype).
      A query row that sees no key: "xla" averages all values uniformly,
      "blockwise" and "pallas" return 0.

  Returns:
    [b, q_len, h, d] in q's dtype.
  """
  if impl not in IMPLS:
    raise ValueError(f"impl={impl!r} is not one of {IMPLS}")
  _check(q, k, v, mask)
  if impl == "auto":
    impl = "pallas" if jax.default_backend() in ("tpu", "gpu") else "xla"
  if impl in ("blockwise", "pallas"):
    seg = _key_padding_segments(mask, q, k, impl)
    if impl == "blockwise":
      return blockwise_attention(q, k, v, is_causal=is_causal, **seg)
    from mmjax.pallas.flash_attention import flash_attention   # Pallas loads only when chosen
    return flash_attention(q, k, v, is_causal=is_causal, **seg)
  if k.shape[2] != q.shape[2]:
    k, v = (jnp.repeat(x, q.shape[2] // k.shape[2], axis=2) for x in (k, v))
  scores = precision.einsum("bqhd,bkhd->bhqk", q, k, out_dtype=jnp.float32)
  scores = scores * (q.shape[-1] ** -0.5)
  if is_causal:
    causal = jnp.tril(jnp.ones((q.shape[1], k.shape[1]), bool))
    mask = causal if mask is None else jnp.logical_and(mask, causal)
  if mask is not None:
    scores = jnp.where(mask, scores, MASKED)
  probs = jax.nn.softmax(scores, axis=-1)
  return precision.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v, out_dtype=q.dtype)


class MultiHeadAttention(nn.Module):
  """Self- or cross-attention with q/k/v/out projections; inputs [b, n, width]."""
  num_heads: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  impl: str = "xla"          # dot_product_attention's impl
  kernel_init: Callable = nn.initializers.xavier_uniform()
  # Autoregressive decoding with a cache of keys and values in Flax's 'cache' collection:
  # the first call, on the full-length input, makes it (zeros, index 0: see _cached);
  # every later call takes one query position and attends to the keys cached so far.
  decode: bool = False

  @nn.compact
  def __call__(self, x_q: jax.Array, x_kv: jax.Array | None = None, *,
               mask: jax.Array | None = None, is_causal: bool = False) -> jax.Array:
    x_kv = x_q if x_kv is None else x_kv
    width = x_q.shape[-1]
    if width % self.num_heads:
      raise ValueError(f"width {width} is not divisible by num_heads {self.num_heads}")
    proj = lambda name: Dense((self.num_heads, width // self.num_heads), dtype=self.dtype,
                              param_dtype=self.param_dtype, kernel_init=self.kernel_init,
                              name=name)
    q, k, v = (constrain(proj(name)(x), "batch", "seq", "heads", "kv")
               for name, x in (("query", x_q), ("key", x_kv), ("value", x_kv)))
    if self.decode:
      k, v, mask, is_causal = self._cached(k, v, mask, is_causal)
    out = dot_product_attention(q, k, v, mask=mask, is_causal=is_causal, impl=self.impl)
    return Dense(width, axis=(-2, -1), dtype=self.dtype, param_dtype=self.param_dtype,
                 kernel_init=self.kernel_init, name="out")(out)

  def _cached(self, k, v, mask, is_causal):
    """decode=True: cached_key / cached_value [b, max_len, h_kv, d] and index (int32 []) in
    the 'cache' collection. Made on the first call (their shape is that call's k, v; the
    call itself attends as usual); a later call's k, v [b, 1, h_kv, d] are written at index,
    the query attends to cache positions <= index (and to those `mask` [b, 1, 1, max_len]
    allows), and index advances by one."""
    ready = self.has_variable("cache", "cached_key")
    ck = self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
    cv = self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
    index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
    if not ready:
      return k, v, mask, is_causal
    if k.shape[1] != 1:
      raise ValueError(f"decode=True takes one position per call after the cache is made; "
                       f"got a key/value of length {k.shape[1]}")
    i = index.value
    ck.value = jax.lax.dynamic_update_slice(ck.value, k.astype(ck.value.dtype), (0, i, 0, 0))
    cv.value = jax.lax.dynamic_update_slice(cv.value, v.astype(cv.value.dtype), (0, i, 0, 0))
    index.value = i + 1
    seen = (jnp.arange(ck.value.shape[1]) <= i)[None, None, None, :]
    mask = seen if mask is None else jnp.logical_and(mask, seen)
    return ck.value, cv.value, mask, False   # causality is `seen`
