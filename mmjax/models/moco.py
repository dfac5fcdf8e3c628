"""MoCo v3 (Chen, Xie, He 2021): a ViT, a projector and a predictor; the target is an EMA copy.

The online network maps a view to q = predictor(projector(img(view))); the
momentum network (the EMA of 'img' and 'projector', kept outside the model in
the train state) maps the other view to k = projector(img(view)). The loss,
mmjax.losses.infonce_loss, is symmetric over the two views.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models import image as image_lib
from mmjax.nn.linear import Dense

EMA_KEYS = ("img", "projector")   # the parameter subtrees the momentum encoder copies


class BatchStatNorm(nn.Module):
  """Normalises each feature over the batch ([b, d]), with the current batch's statistics
  always: the heads that use it exist only at train time, so no running averages are kept.
  Under jit on a mesh the mean is over the global batch (a synchronised BatchNorm)."""
  affine: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    mean = x32.mean(0, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(((x32 - mean) ** 2).mean(0, keepdims=True) + 1e-5)
    if self.affine:
      y = y * self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
      y = y + self.param("bias", nn.initializers.zeros, (x.shape[-1],), jnp.float32)
    return y.astype(x.dtype)


class MLP(nn.Module):
  """(Dense -> BatchStatNorm -> ReLU) x (layers - 1), then Dense(out_dim) [-> BatchStatNorm
  without affine when last_norm], as MoCo v3's projector and predictor."""
  hidden: int
  out_dim: int
  layers: int = 3
  last_norm: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    for i in range(self.layers - 1):
      x = nn.relu(BatchStatNorm(name=f"norm{i}")(Dense(self.hidden, name=f"dense{i}", **kw)(x)))
    x = Dense(self.out_dim, name=f"dense{self.layers - 1}", **kw)(x)
    return BatchStatNorm(affine=False, name="norm_out")(x) if self.last_norm else x


class MoCo(nn.Module):
  """image [b, H, W, 3] -> (q [b, out_dim] predictor output, z [b, out_dim] projector output)."""
  image: dict   # the backbone's complete fields (a ViT's or ResNet's): Model() decodes them
  hidden: int = 512
  out_dim: int = 128
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.img = image_lib.Tower(self.image)
    self.projector = MLP(self.hidden, self.out_dim, layers=3, last_norm=True, name="projector",
                         **kw)
    self.predictor = MLP(self.hidden, self.out_dim, layers=2, name="predictor", **kw)

  def image_features(self, image: jax.Array) -> jax.Array:
    """[b, H, W, 3] -> [b, width]: the backbone's pooled output (for probes)."""
    return self.img(image)[0]

  def __call__(self, image: jax.Array, *, train: bool = False):
    z = self.projector(self.img(image, train=train)[0])
    return self.predictor(z).astype(jnp.float32), z.astype(jnp.float32)


def momentum(step: jax.Array, total_steps: int, base: float = 0.99) -> jax.Array:
  """MoCo v3's schedule: base at step 0, rising to 1 along a half cosine."""
  frac = jnp.clip(step / max(total_steps, 1), 0.0, 1.0)
  return 1.0 - (1.0 - base) * (jnp.cos(jnp.pi * frac) + 1.0) / 2.0


def Model(image: dict, **fields) -> MoCo:  # noqa: N802
  """MoCo from its backbone's variant ('Ti/8', 'RN50') and overrides, decoded once, and
  MoCo's fields."""
  return image_lib.around(MoCo, image, **fields)
