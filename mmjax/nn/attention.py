"""The single dispatch point for every attention implementation in mmjax.

Layout is [batch, seq, heads, head_dim], as in `jax.nn.dot_product_attention`.
  "xla": the scores in memory; the reference, fastest for short sequences.
  "blockwise": pure-JAX online softmax over key/value blocks with a custom VJP
    (mmjax/nn/blockwise.py); memory linear in the sequence; long sequences on CPU.
  "pallas": mmjax.pallas.flash_attention (Mosaic on TPU, Triton on GPU,
    interpret mode on CPU: correct but slow there). The Triton layout is only
    ever an explicit choice: JAX 0.11 deprecated the Pallas Triton backend.
  "auto": chosen when the computation is lowered, per platform (see _auto
    below): the Mosaic flash kernels on TPU, cuDNN's fused attention on GPU
    where jax accepts it, and otherwise "blockwise" for sequences of at least
    BLOCKWISE_MIN_SEQ, "xla" below.
"blockwise" and "pallas" take key-padding masks ([b, 1, 1, kv_len]) only: the
point of them is that no [q_len, kv_len] array exists; "auto" takes any mask
("xla" on every platform for a mask that is not key padding). Every impl takes
`Segments` (query i sees key j where their segment ids are equal): several
sequences packed into one row (NaViT's patch n' pack), or per-segment pooling.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.nn import precision
from mmjax.nn.blockwise import AXES, blockwise_attention, blockwise_backward, blockwise_forward
from mmjax.nn.linear import Dense
from mmjax.nn.partitioning import constrain
from mmjax.numerics import MASKED, attention_vjp, check_array

IMPLS = ("xla", "blockwise", "pallas", "auto")


class Segments(NamedTuple):
  """Segment ids: query i sees key j only where q[b, i] == kv[b, j]. A pytree, so it
  travels where a mask does (MultiHeadAttention's, an Encoder's, through scan and remat)."""
  q: jax.Array    # int [b, q_len]
  kv: jax.Array   # int [b, kv_len]


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
                          mask: jax.Array | Segments | None = None, is_causal: bool = False,
                          impl: str = "xla") -> jax.Array:
  """softmax(q k^T / sqrt(head_dim)) v, per head.

  Args:
    q: [b, q_len, h, d], floating point (jax or NumPy; no axis of size 0).
    k, v: [b, kv_len, h_kv, d] likewise; h a multiple of h_kv (grouped-query heads).
    mask: bool, broadcastable to [b, h, q_len, kv_len]; True = attend.
      "blockwise" and "pallas" take key padding, [b or 1, 1, 1, kv_len], only.
      Or Segments(q [b, q_len], kv [b, kv_len]) int: attend where the ids are equal
      (every impl).
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
  if isinstance(mask, Segments):
    return _segmented(q, k, v, mask, is_causal, impl)
  _check(q, k, v, mask)
  if impl == "auto":
    if mask is not None and (mask.ndim != 4 or mask.shape[1] != 1 or mask.shape[2] != 1):
      return _xla(q, k, v, mask, is_causal)   # a general mask: only "xla" takes one
    seg = _key_padding_segments(mask, q, k, impl) or dict(
        q_segment_ids=jnp.zeros(q.shape[:2], jnp.int32),
        kv_segment_ids=jnp.zeros(k.shape[:2], jnp.int32))
    return _auto((bool(is_causal), mask is not None), q, k, v, seg["q_segment_ids"],
                 seg["kv_segment_ids"])
  if impl in ("blockwise", "pallas"):
    seg = _key_padding_segments(mask, q, k, impl)
    if impl == "blockwise":
      return blockwise_attention(q, k, v, is_causal=is_causal, **seg)
    from mmjax.pallas.flash_attention import flash_attention   # Pallas loads only when chosen
    return flash_attention(q, k, v, is_causal=is_causal, **seg)
  return _xla(q, k, v, mask, is_causal)


def _segmented(q, k, v, seg: Segments, is_causal: bool, impl: str):
  """dot_product_attention with segment ids, in every impl."""
  _check(q, k, v, None)
  want = {"q": q.shape[:2], "kv": k.shape[:2]}
  for name, ids in zip(Segments._fields, seg):
    check_array(f"Segments.{name}", ids, floating=False)
    if ids.shape != want[name]:
      raise ValueError(f"Segments.{name} {ids.shape} must be [batch, {name}_len] = {want[name]}")
  qs, ks = (jnp.asarray(x, jnp.int32) for x in seg)
  if impl == "xla":
    return _xla(q, k, v, _segment_mask(qs, ks), is_causal)
  if impl == "blockwise":
    return blockwise_attention(q, k, v, is_causal=is_causal, q_segment_ids=qs, kv_segment_ids=ks)
  if impl == "pallas":
    from mmjax.pallas.flash_attention import flash_attention   # Pallas loads only when chosen
    return flash_attention(q, k, v, is_causal=is_causal, q_segment_ids=qs, kv_segment_ids=ks)
  return _auto((bool(is_causal), True), q, k, v, qs, ks)


def _xla(q, k, v, mask, is_causal: bool, *, with_lse: bool = False):
  """The scores in memory: o [b, q_len, h, d] (and lse [b, h, q_len] f32 with_lse)."""
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
  o = precision.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v, out_dtype=q.dtype)
  return (o, jax.nn.logsumexp(scores, axis=-1)) if with_lse else o


# "auto": the implementation is chosen when the computation is lowered, per lowering platform
# (mmjax/pallas/per_platform.py), in the forward and in the backward of one custom VJP whose
# residuals (o and a per-row lse [b, h, q_len] f32) every branch returns:
#   TPU: the Pallas Mosaic flash kernels (mmjax.pallas.flash_attention, layout "tpu"); where the
#     TPU computation is partitioned over several devices outside shard_map, the CPU rule below
#     (Mosaic kernels cannot be partitioned automatically).
#   CUDA/ROCm: cuDNN's fused attention (jax.nn.dot_product_attention(implementation="cudnn"))
#     where jax accepts the call for this host's GPU (bf16/fp16, head_dim a multiple of 8 up to
#     128 or 256, ...); its backward recomputes cuDNN's forward under jax.vjp (jax exposes no
#     separate cuDNN backward). Where cuDNN does not apply (f32, a host without a GPU: an export
#     for CUDA from a CPU machine), the CPU rule.
#   elsewhere (CPU): "blockwise" where q_len * kv_len >= BLOCKWISE_MIN_SEQ ** 2, "xla" below.
# The Pallas Triton kernels (impl="pallas" on GPU) stay an explicit choice: JAX 0.11 deprecated
# the Pallas Triton backend.
BLOCKWISE_MIN_SEQ = 6144   # where blockwise overtakes xla on CPU: benchmarks/attention.py (README)


def _segment_mask(q_seg, kv_seg):
  return (q_seg[:, :, None] == kv_seg[:, None, :])[:, None]   # [b, 1, q_len, kv_len]


def _cpu_rule(static, q, k, v, q_seg, kv_seg):
  """(o, lse) and a backward, by length: blockwise for long sequences, xla for short."""
  causal, masked = static
  if q.shape[1] * k.shape[1] >= BLOCKWISE_MIN_SEQ ** 2:
    fwd = functools.partial(blockwise_forward, is_causal=causal)
    bwd = functools.partial(blockwise_backward, is_causal=causal)
    return fwd, bwd
  mask_of = (lambda qs, ks: _segment_mask(qs, ks)) if masked else (lambda qs, ks: None)

  def fwd(q, k, v, q_seg, kv_seg):
    return _xla(q, k, v, mask_of(q_seg, kv_seg), causal, with_lse=True)

  def bwd(q, k, v, q_seg, kv_seg, o, lse, do):   # recompute: the scores are not residuals
    f = lambda q, k, v: _xla(q, k, v, mask_of(q_seg, kv_seg), causal)
    return jax.vjp(f, q, k, v)[1](do)
  return fwd, bwd


def _cudnn_fn(static, q_seg, kv_seg):
  causal, masked = static

  def f(q, k, v):
    mask = _segment_mask(q_seg, kv_seg) if masked else None
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal,
                                        implementation="cudnn")
  return f


def _cudnn_applies(static, q, k, v, q_seg, kv_seg) -> bool:
  """Whether jax traces cuDNN attention, forward and backward, for these shapes on this host."""
  if q.dtype not in (jnp.bfloat16, jnp.float16) or not (q.dtype == k.dtype == v.dtype):
    return False
  structs = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v, q_seg, kv_seg))
  return _cudnn_traces(static, structs)


@functools.lru_cache(maxsize=256)
def _cudnn_traces(static, structs) -> bool:
  def grad(q, k, v, q_seg, kv_seg):
    f = _cudnn_fn(static, q_seg, kv_seg)
    return jax.vjp(f, q, k, v)[1](f(q, k, v))
  try:
    jax.eval_shape(grad, *structs)
  except Exception:   # noqa: BLE001: jax raises RuntimeError / NotImplementedError / ValueError
    return False
  return True


def _gpu_rule(static, q, k, v, q_seg, kv_seg):
  if not _cudnn_applies(static, q, k, v, q_seg, kv_seg):
    return _cpu_rule(static, q, k, v, q_seg, kv_seg)

  def fwd(q, k, v, q_seg, kv_seg):
    o = _cudnn_fn(static, q_seg, kv_seg)(q, k, v)
    return o, jnp.zeros((q.shape[0], q.shape[2], q.shape[1]), jnp.float32)   # lse unused

  def bwd(q, k, v, q_seg, kv_seg, o, lse, do):
    return jax.vjp(_cudnn_fn(static, q_seg, kv_seg), q, k, v)[1](do)
  return fwd, bwd


def _tpu_rule(static, q, k, v, q_seg, kv_seg):
  from mmjax.pallas.flash_attention import flash_backward, flash_forward   # Pallas loads lazily
  causal, _ = static
  return (functools.partial(flash_forward, platform="tpu", is_causal=causal),
          functools.partial(flash_backward, platform="tpu", is_causal=causal))


def _auto_forward(static, q, k, v, q_seg, kv_seg):
  from mmjax.pallas.per_platform import per_platform   # the package loads Pallas: lazily
  args = (q, k, v, q_seg, kv_seg)
  return per_platform(*args, tpu=_tpu_rule(static, *args)[0], gpu=_gpu_rule(static, *args)[0],
                      default=_cpu_rule(static, *args)[0], tpu_partitioned="default")


def _auto_backward(static, q, k, v, q_seg, kv_seg, o, lse, do):
  from mmjax.pallas.per_platform import per_platform   # the package loads Pallas: lazily
  args = (q, k, v, q_seg, kv_seg)
  return per_platform(*args, o, lse, do, tpu=_tpu_rule(static, *args)[1],
                      gpu=_gpu_rule(static, *args)[1], default=_cpu_rule(static, *args)[1],
                      tpu_partitioned="default")


_auto = attention_vjp(_auto_forward, _auto_backward)


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
  out_features: int | None = None   # the output projection's width; None: x_q's

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
    return Dense(self.out_features or width, axis=(-2, -1), dtype=self.dtype, param_dtype=self.param_dtype,
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
