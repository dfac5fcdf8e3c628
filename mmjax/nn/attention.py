"""The single dispatch point for every attention implementation in mmjax.

Layout is [batch, seq, heads, head_dim], as in `jax.nn.dot_product_attention`.
Later issues add impl='blockwise' and impl='pallas' here, nowhere else.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

IMPLS = ("xla",)
_MASKED = -1e30  # finite: a fully masked row gives a uniform softmax, not NaN


def _check(q, k, v, mask):
  for name, x in (("q", q), ("k", k), ("v", v)):
    if x.ndim != 4:
      raise ValueError(f"{name} must be [batch, seq, heads, head_dim]; got shape {x.shape}")
  if k.shape != v.shape:
    raise ValueError(f"k {k.shape} and v {v.shape} must have the same shape")
  if (q.shape[0], q.shape[2], q.shape[3]) != (k.shape[0], k.shape[2], k.shape[3]):
    raise ValueError(f"q {q.shape} and k {k.shape} must agree on batch, heads and head_dim")
  if mask is not None:
    want = (q.shape[0], q.shape[2], q.shape[1], k.shape[1])
    try:
      jnp.broadcast_shapes(mask.shape, want)
    except ValueError:
      raise ValueError(f"mask {mask.shape} must broadcast to [batch, heads, q_len, kv_len] "
                       f"= {want}") from None


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                          mask: jax.Array | None = None, is_causal: bool = False,
                          impl: str = "xla") -> jax.Array:
  """softmax(q k^T / sqrt(head_dim)) v, per head.

  Args:
    q: [b, q_len, h, d].
    k, v: [b, kv_len, h, d].
    mask: bool, broadcastable to [b, h, q_len, kv_len]; True = attend.
    is_causal: also mask key positions after the query position.
    impl: "xla": scores in float32 (operands in their own dtype, f32
      accumulation), softmax in float32.

  Returns:
    [b, q_len, h, d] in q's dtype.
  """
  if impl not in IMPLS:
    raise ValueError(f"impl={impl!r} is not one of {IMPLS}")
  _check(q, k, v, mask)
  scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
  scores = scores * (q.shape[-1] ** -0.5)
  if is_causal:
    causal = jnp.tril(jnp.ones((q.shape[1], k.shape[1]), bool))
    mask = causal if mask is None else jnp.logical_and(mask, causal)
  if mask is not None:
    scores = jnp.where(mask, scores, _MASKED)
  probs = jax.nn.softmax(scores, axis=-1)
  out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v,
                   preferred_element_type=jnp.float32)
  return out.astype(q.dtype)


class MultiHeadAttention(nn.Module):
  """Self- or cross-attention with q/k/v/out projections; inputs [b, n, width]."""
  num_heads: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  attn_impl: str = "xla"
  kernel_init: Callable = nn.initializers.xavier_uniform()

  @nn.compact
  def __call__(self, x_q: jax.Array, x_kv: jax.Array | None = None, *,
               mask: jax.Array | None = None, is_causal: bool = False) -> jax.Array:
    x_kv = x_q if x_kv is None else x_kv
    width = x_q.shape[-1]
    if width % self.num_heads:
      raise ValueError(f"width {width} is not divisible by num_heads {self.num_heads}")
    proj = lambda name: nn.DenseGeneral(
        (self.num_heads, width // self.num_heads), dtype=self.dtype,
        param_dtype=self.param_dtype, kernel_init=self.kernel_init, name=name)
    q, k, v = proj("query")(x_q), proj("key")(x_kv), proj("value")(x_kv)
    out = dot_product_attention(q, k, v, mask=mask, is_causal=is_causal, impl=self.attn_impl)
    return nn.DenseGeneral(width, axis=(-2, -1), dtype=self.dtype, param_dtype=self.param_dtype,
                           kernel_init=self.kernel_init, name="out")(out)
