"""Dense and LayerNorm for mixed precision. Their param trees, shapes and initialisers are
Flax's (`nn.Dense` / `nn.DenseGeneral`, `nn.LayerNorm`), so checkpoints and converters see no
difference; what differs is where the arithmetic happens.

- Every matmul is `mmjax.nn.precision.dense` (bf16 operands, f32 accumulation, forward and
  backward, where that module applies; the kernel's gradient in its own dtype).
- The gradient of a bias or LayerNorm param (a sum over every token of the batch) accumulates
  in float32. Through Flax's modules in bf16, JAX transposes the bias broadcast into a bf16
  reduce_sum, which XLA:CPU runs as a chain of bf16-rounded partial sums (reduce-windows): in
  the ViT-B-32 bf16 train step those sums took 17% of the backward pass (jax 0.10.2, an Intel
  AMX CPU), and every rounding loses bits of the gradient.
- LayerNorm normalises in float32, as Flax's does, and returns the compute dtype.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax.nn import precision


@jax.custom_vjp
def _add_bias(y: jax.Array, bias: jax.Array) -> jax.Array:
  return y + bias.astype(y.dtype)


def _add_bias_fwd(y, bias):
  return _add_bias(y, bias), bias


def _add_bias_bwd(bias, g):
  lead = tuple(range(g.ndim - bias.ndim))
  return g, jnp.sum(g.astype(jnp.float32), axis=lead).astype(bias.dtype)


_add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


def add_bias(y: jax.Array, bias: jax.Array) -> jax.Array:
  """y + bias over y's trailing axes (y [..., *bias.shape]), in y's dtype; when the dtypes
  differ, bias's gradient is summed over the leading axes in float32."""
  if y.dtype == bias.dtype:
    return y + bias
  return _add_bias(y, bias)


def _tuple(x) -> tuple:
  return tuple(x) if isinstance(x, (tuple, list)) else (x,)


class Dense(nn.Module):
  """x [..., *in] -> [..., *features], contracting x's `axis` (trailing axes, default the
  last). kernel [*in, *features] and bias [*features] are nn.DenseGeneral's (initialisers
  applied to the flattened [prod(in), prod(features)] shape); with one axis and an int
  `features` they are nn.Dense's."""
  features: int | tuple[int, ...]
  axis: int | tuple[int, ...] = -1
  use_bias: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros

  @nn.compact
  def __call__(self, x: jax.Array, *, out_dtype=None) -> jax.Array:
    """out_dtype: the result's (default `dtype`); float32 hands the accumulator on unrounded,
    e.g. to an activation computed in float32."""
    features = _tuple(self.features)
    axis = tuple(sorted(a % x.ndim for a in _tuple(self.axis)))
    if axis != tuple(range(x.ndim - len(axis), x.ndim)):
      raise ValueError(f"axis={self.axis} must name x's trailing axes (x {x.shape})")
    shape_in = tuple(x.shape[a] for a in axis)
    flat = (int(np.prod(shape_in)), int(np.prod(features)))
    kernel = self.param("kernel", lambda k, s, d: self.kernel_init(k, flat, d).reshape(s),
                        shape_in + features, self.param_dtype)
    dtype = self.dtype or jnp.result_type(x, kernel)
    y = precision.dense(x.astype(dtype), kernel, len(axis), out_dtype)
    if self.use_bias:
      bias = self.param("bias", lambda k, s, d: self.bias_init(k, flat[1:], d).reshape(s),
                        features, self.param_dtype)
      y = add_bias(y, bias)
    return y


class LayerNorm(nn.Module):
  """Layer normalisation over the last axis: [..., d] -> [..., d] in `dtype`; statistics and
  the affine map in float32; params scale and bias [d] (nn.LayerNorm's)."""
  epsilon: float = 1e-6
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (d,), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (d,), self.param_dtype)
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    centred = x32 - mean
    var = jnp.mean(jnp.square(centred), -1, keepdims=True)
    y = centred * jax.lax.rsqrt(var + self.epsilon)
    y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return y.astype(self.dtype or x.dtype)
