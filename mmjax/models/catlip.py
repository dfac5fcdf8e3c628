"""CatLIP (Mehta et al. 2024): an image tower trained as a classifier over caption labels.

The tower is an ordinary image tower (a ViT or a ResNet) named 'img' (the same parameter tree as a
two-tower model's image tower, so a LiT run can start from it: config.init_from);
a linear head [width -> V] scores the V labels of mmjax.data.catlip_vocab, trained
by multi-label binary cross-entropy (mmjax.losses.multilabel_bce_loss). The head's
row of a label is CatLIP's transfer step: a classifier for named classes starts
from the rows of the class names.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models import image as image_lib
from mmjax.nn.linear import Dense


class CatLIP(nn.Module):
  """image [b, H, W, 3] -> logits [b, num_labels] float32.

  `Model(image=dict(variant=...), num_labels=V)` builds it; `image` here holds the
  tower's complete fields (a ViT's or a ResNet's). The head's kernel is [width, V], its
  bias [V].
  """
  image: dict
  num_labels: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    if not isinstance(self.num_labels, int) or self.num_labels < 1:
      raise ValueError(f"num_labels must be a positive int; got {self.num_labels!r}")
    self.img = image_lib.Tower(self.image)
    self.head = Dense(self.num_labels, name="head", dtype=self.dtype,
                      param_dtype=self.param_dtype)

  def image_features(self, image: jax.Array) -> jax.Array:
    """[b, H, W, 3] -> [b, width]: the tower's pooled output (the head's input; for probes)."""
    return self.img(image)[0]

  def __call__(self, image: jax.Array, *, train: bool = False) -> jax.Array:
    if image.ndim != 4 or image.shape[-1] != 3:
      raise ValueError(f"image must be [b, H, W, 3]; got shape {image.shape}")
    pooled = self.img(image, train=train)[0]
    return self.head(pooled, out_dtype=jnp.float32)


def Model(image: dict, **fields) -> CatLIP:  # noqa: N802
  """CatLIP from its tower's variant ('Ti/8', 'RN50') and overrides, decoded once, and
  CatLIP's fields."""
  return image_lib.around(CatLIP, image, **fields)
