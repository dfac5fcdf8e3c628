"""Matmuls for bf16 (and f16) compute: low-precision operands, float32 accumulation, in the
forward pass and in both transposes of the backward pass.

XLA:CPU lowers a dot whose output dtype is bf16 as converts to f32 around an f32 dot; bf16
operands reach the fast bf16 kernel only with `preferred_element_type=float32`. And a dot's
transposes take the dtypes of the cotangent and the other operand, so without a custom VJP the
backward pass of a bf16 model runs f32 (or mixed bf16 x f32) dots. `dot_general` here is
`lax.dot_general` with a custom VJP that keeps all three dots on bf16 operands with f32
accumulation, the cotangent rounded to the operands' dtype (what torch's autocast does); its
results have the operands' dtype, as lax.dot_general's. Operands of other or mixed dtypes go to
lax.dot_general unchanged. Pass it to Flax's `Dense(dot_general=...)` / `DenseGeneral`.

Where it applies (`enabled()`): on the CPU backend of a CPU with bf16 matmul instructions
(AVX-512 BF16 or AMX: /proc/cpuinfo's avx512_bf16 / amx_bf16). Elsewhere the functions are the
plain jax ones: a CPU without them runs bf16 kernels slower than f32 ones (2026-12, an
AVX2-only AMD EPYC: a 4096^3 matmul 39-46 GFLOP/s in bf16 against 61-69 in f32, and the ViT-B-32
bf16 train step 27% slower through this module than through XLA's own upcasting), and GPUs and
TPUs have their own bf16 dots. $MMJAX_BF16_DOTS=1 or 0 forces it on or off (read when a function
is traced).
"""

from __future__ import annotations

import functools
import os
import string

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.ad_checkpoint import checkpoint_name

LOW = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
# The bf16 path's matmul results carry these checkpoint names (jax.checkpoint policies see its
# custom-VJP calls as opaque, not as dots): DOT without batch dimensions, BATCHED_DOT with.
DOT, BATCHED_DOT = "mmjax_dot", "mmjax_batched_dot"


def _named(y, specs):
  sa, sb, out = specs
  batched = any(c in sb and c in out for c in sa)
  return checkpoint_name(y, BATCHED_DOT if batched else DOT)


@functools.lru_cache(maxsize=1)
def cpu_has_bf16_matmul() -> bool:
  """Whether this host's CPU has bf16 matmul instructions (avx512_bf16 or amx_bf16)."""
  try:
    with open("/proc/cpuinfo") as f:
      flags = set(f.read().split())
  except OSError:
    return False
  return bool(flags & {"avx512_bf16", "amx_bf16"})


def enabled() -> bool:
  """Whether dot_general / einsum take the bf16 path (module docstring)."""
  force = os.environ.get("MMJAX_BF16_DOTS")
  if force in ("0", "1"):
    return force == "1"
  return jax.default_backend() == "cpu" and cpu_has_bf16_matmul()


def _specs(lhs_ndim: int, rhs_ndim: int, dimension_numbers) -> tuple[str, str, str]:
  """dot_general's dimension numbers as einsum operand specs (lhs, rhs, out); the output
  is batch, lhs free, rhs free, as dot_general orders it."""
  (lc, rc), (lb, rb) = dimension_numbers
  letters = iter(string.ascii_letters)
  lhs = [next(letters) for _ in range(lhs_ndim)]
  rhs = [None] * rhs_ndim
  for i, j in zip(tuple(lc) + tuple(lb), tuple(rc) + tuple(rb)):
    rhs[j] = lhs[i]
  rhs = [c or next(letters) for c in rhs]
  out = ([lhs[i] for i in lb] + [c for i, c in enumerate(lhs) if i not in set(lc) | set(lb)]
         + [c for j, c in enumerate(rhs) if j not in set(rc) | set(rb)])
  return "".join(lhs), "".join(rhs), "".join(out)


def _group(spec: str, first: list[str], second: list[str]) -> bool | None:
  """True if spec is the letters of `first` then those of `second`, False if `second` then
  `first` (each run in its own order; either may be empty), None if they interleave (no
  reshape merges them)."""
  if spec == "".join(first + second):
    return True
  if spec == "".join(second + first):
    return False
  return None


def _transposed(x):
  """[..., k, m] -> [..., m, k] as a new array. XLA folds a plain transpose into the dot's
  operand layout (and then has no bf16 kernel); the barrier stops that only when a reshape
  separates it from the dot, hence the unit axis."""
  *lead, k, m = x.shape
  y = jnp.moveaxis(x.reshape(*lead, k, m, 1), -3, -1)         # [..., m, 1, k]
  return lax.optimization_barrier(y).reshape(*lead, m, k)


def _einsum(spec: str, a, b, dtype):
  """jnp.einsum(spec, a, b) with f32 accumulation. Where each operand's letters fall into
  contiguous runs (batch first; free and contracted letters each together), it is one 2-D (or
  batched 3-D) lax.dot_general over reshaped operands: the lhs as [m, k] (transposed into a
  new array when it is [k, m]), the rhs as [k, n] or [n, k] (a transposed-rhs dot). Those are
  the forms XLA:CPU (jax 0.10.2) runs on bf16 kernels; it upcasts a bf16 dot whose lhs
  contracts its first axis, or whose rhs is fed by a transpose, to f32 (tests/test_precision.py
  checks the compiled dots). Other specs go to jnp.einsum."""
  ins, out = spec.split("->")
  sa, sb = ins.split(",")
  size = {c: n for s_, x in ((sa, a), (sb, b)) for c, n in zip(s_, x.shape)}
  batch = [c for c in sa if c in sb and c in out]
  contract = [c for c in sa if c in sb and c not in out]
  free_a = [c for c in sa if c not in sb]
  free_b = [c for c in sb if c not in sa]
  prod = lambda cs: int(np.prod([size[c] for c in cs], dtype=np.int64))
  nb = len(batch)
  lay_a = _group(sa[nb:], free_a, contract) if sa[:nb] == "".join(batch) else None
  lay_b = _group(sb[nb:], contract, free_b) if sb[:nb] == "".join(batch) else None
  order = batch + free_a + free_b
  if lay_a is None or lay_b is None or sorted(out) != sorted(order):
    if sa[:nb] != "".join(batch) and sb[:nb] == "".join(batch):
      sa, sb, a, b = sb, sa, b, a   # batch-leading operand first: XLA:CPU's dot thunk has
      # no bf16 kernel for 'bqhd,bhqk->bkhd' (UNIMPLEMENTED at run time), one for the swap
    return jnp.einsum(f"{sa},{sb}->{out}", a, b,
                      preferred_element_type=jnp.float32).astype(dtype)
  lead = [prod(batch)] if batch else []
  m, k, n = prod(free_a), prod(contract), prod(free_b)
  x = a.reshape(lead + ([m, k] if lay_a else [k, m]))
  if not lay_a:   # [k, m] -> [m, k] in a new array (a transposed lhs upcasts to f32)
    x = _transposed(x)
  y = b.reshape(lead + ([k, n] if lay_b else [n, k]))
  o = len(lead)
  dims = (((o + 1,), (o + (0 if lay_b else 1),)), ((0,), (0,)) if batch else ((), ()))
  z = lax.dot_general(x, y, dims, preferred_element_type=jnp.float32)
  z = z.reshape([size[c] for c in order])
  if out != "".join(order):
    z = jnp.transpose(z, [order.index(c) for c in out])
  return z.astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _mixed_einsum(a, b, specs, out_dtype):
  sa, sb, out = specs
  return _einsum(f"{sa},{sb}->{out}", a, b.astype(a.dtype), out_dtype)


def _mixed_einsum_fwd(a, b, specs, out_dtype):
  b_low = b.astype(a.dtype)
  return _mixed_einsum(a, b, specs, out_dtype), (a, b_low, jnp.zeros((0,), b.dtype))


def _mixed_einsum_bwd(specs, out_dtype, res, g):
  a, b_low, b_dtype = res
  sa, sb, out = specs
  g = g.astype(a.dtype)
  return (_einsum(f"{out},{sb}->{sa}", g, b_low, a.dtype),
          _einsum(f"{sa},{out}->{sb}", a, g, b_dtype.dtype))


_mixed_einsum.defvjp(_mixed_einsum_fwd, _mixed_einsum_bwd)


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
                **kwargs):
  """lax.dot_general; bf16/f16 operands of one dtype accumulate in f32 forward and backward
  and the result keeps their dtype."""
  low = (lhs.dtype == rhs.dtype and lhs.dtype in LOW and not kwargs
         and preferred_element_type in (None, lhs.dtype) and enabled())
  if not low:
    return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                           preferred_element_type=preferred_element_type, **kwargs)
  specs = _specs(lhs.ndim, rhs.ndim, dimension_numbers)
  return _named(_mixed_einsum(lhs, rhs, specs, lhs.dtype), specs)


def einsum(spec: str, a, b, *, out_dtype=None):
  """Two-operand jnp.einsum with the same treatment: low-precision operands of one dtype are
  multiplied with f32 accumulation in the forward and backward pass; the result has out_dtype
  (default: the operands' dtype). Each index must appear in exactly two of the operands and
  the output."""
  out_dtype = out_dtype or a.dtype
  if not (a.dtype == b.dtype and a.dtype in LOW and enabled()):
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32).astype(out_dtype)
  ins, out = spec.replace(" ", "").split("->")
  sa, sb = ins.split(",")
  return _named(_mixed_einsum(a, b, (sa, sb, out), jnp.dtype(out_dtype)), (sa, sb, out))


def dense(x: jax.Array, kernel: jax.Array, contract: int, out_dtype=None) -> jax.Array:
  """x [..., *k] @ kernel [*k, *n] -> [..., *n] in out_dtype (default x's dtype), contracting
  x's last `contract` axes with kernel's first. The kernel (a param, e.g. float32) is cast
  to x's dtype inside; on the bf16 path its gradient comes out of the float32 accumulation in
  the kernel's dtype, never rounded to bf16 on the way (one pass less, and the bits torch's
  autocast drops)."""
  lead, k, n = x.shape[:x.ndim - contract], x.shape[x.ndim - contract:], kernel.shape[contract:]
  # As one 2-D matmul: XLA:CPU transposes 2-D operands for the backward's weight gradient
  # with its tiled emitter, and 3-D ones ([b, n, d] -> [d, b, n]) element by element, which
  # made the f32 ViT-B-32 train step 1.4x slower.
  x2 = x.reshape(-1, int(np.prod(k)))
  w2 = kernel.reshape(x2.shape[1], -1)
  out_dtype = jnp.dtype(out_dtype or x.dtype)
  if x.dtype in LOW and enabled():
    y = checkpoint_name(_mixed_einsum(x2, w2, ("mk", "kn", "mn"), out_dtype), DOT)
  else:
    y = lax.dot_general(x2, w2.astype(x.dtype), (((1,), (0,)), ((), ())),
                        preferred_element_type=jnp.float32 if x.dtype in LOW else None)
  return y.astype(out_dtype).reshape(*lead, *n)
