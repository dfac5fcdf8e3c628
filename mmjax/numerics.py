"""Small numeric helpers every layer of mmjax shares; imports only jax and numpy."""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# Masked scores and logits: finite, so a fully masked row keeps a finite max
# (no inf - inf = NaN) and its softmax is uniform rather than undefined.
MASKED = -1e30

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def dtype(name: str):
  """'float32' | 'bfloat16' -> the jnp dtype; ValueError naming the choices otherwise."""
  if name not in DTYPES:
    raise ValueError(f"dtype {name!r} is not one of {tuple(DTYPES)}")
  return DTYPES[name]


def check_array(name: str, x, axes: tuple[str, ...] | None = None, *,
                floating: bool = True) -> None:
  """ValueError naming `name` unless x is a jax or NumPy array (a tracer is one),
  of a floating-point dtype (when `floating`), of shape [*axes] with no axis of
  size 0 (when axes is given; axes names them, e.g. ("batch", "dim")).

  Looks at type, dtype and static shape only, so it works under jit and, on
  the per-device shapes, inside shard_map.
  """
  if not isinstance(x, (jax.Array, np.ndarray)):
    raise ValueError(f"{name} must be a jax or numpy array; got {type(x).__name__}")
  if floating and not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"{name} must be a floating-point array; got {x.dtype}")
  if axes is None:
    return
  if x.ndim != len(axes):
    raise ValueError(f"{name} must be [{', '.join(axes)}]; got shape {tuple(x.shape)}")
  for axis, size in zip(axes, x.shape):
    if size == 0:
      raise ValueError(f"{name} has {axis} size 0; got shape {tuple(x.shape)}")


def round_up(a: int, b: int) -> int:
  """The smallest multiple of b that is >= a."""
  return -(-a // b) * b


def l2_normalize(x, eps: float = 1e-12):
  """Rows of x [..., d] scaled to unit L2 norm (norm floored at sqrt(eps)), float32.

  NumPy in, NumPy out; anything else goes through jax.numpy.
  """
  if isinstance(x, np.ndarray):
    x = x.astype(np.float32)
    return x / np.sqrt(np.maximum(np.sum(x * x, axis=-1, keepdims=True), eps))
  x = jnp.asarray(x).astype(jnp.float32)
  return x * lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps))


def vary_like(tree, *refs):
  """tree's arrays cast to vary over every manual mesh axis that one of refs
  (default: tree's own arrays) varies over, so outputs and loop carries keep
  their type under shard_map(check_vma=True). Outside shard_map: unchanged."""
  refs = refs or tuple(jax.tree.leaves(tree))
  axes = frozenset().union(*(jax.typeof(r).manual_axis_type.varying for r in refs))
  return jax.tree.map(lambda v: vary_over(v, tuple(sorted(axes))), tree)


def vary_over(x: jax.Array, axes: tuple[str, ...]) -> jax.Array:
  """x cast to vary over the named manual axes (those it does not vary over yet)."""
  missing = tuple(a for a in axes if a not in jax.typeof(x).manual_axis_type.varying)
  return lax.pcast(x, missing, to="varying") if missing else x


def attention_vjp(forward: Callable, backward: Callable) -> Callable:
  """f(static, q, k, v, q_seg, kv_seg) -> o with the custom VJP every flash-style
  attention shares (blockwise in XLA, the Pallas kernels): forward(...) -> (o,
  lse [per query row]) keeps its inputs, o and lse; backward(static, q, k, v,
  q_seg, kv_seg, o, lse, do) -> (dq, dk, dv) recomputes the blocks. `static`
  (hashable) is not differentiated; segment ids get no gradient."""
  @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
  def f(static, q, k, v, q_seg, kv_seg):
    return forward(static, q, k, v, q_seg, kv_seg)[0]

  def fwd(static, q, k, v, q_seg, kv_seg):
    o, lse = forward(static, q, k, v, q_seg, kv_seg)
    return o, (q, k, v, q_seg, kv_seg, o, lse)

  def bwd(static, res, do):
    return (*backward(static, *res, do), None, None)

  f.defvjp(fwd, bwd)
  return f
