"""Image tower + text tower + projections: CLIP and SigLIP two-tower models."""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.losses import registry as loss_registry
from mmjax.models import image as image_lib
from mmjax.models import text as text_lib
from mmjax.nn.linear import Dense
from mmjax.numerics import l2_normalize

# A tower's projection to the shared embedding: 'dense' (CLIP, no bias), 'dense_bias'
# (SigLIP's text head) or 'none' (SigLIP's image tower: its width is embed_dim).
PROJECTIONS = ("dense", "dense_bias", "none")


def inits(loss: str, temperature_init: float | None = None,
          bias_init: float | None = None) -> dict:
  """{'temperature_init', 'bias_init'} of a two-tower model trained by the contrastive loss
  `loss` (mmjax.losses.registry): the given values, else the loss's; bias_init None when the
  loss takes no bias."""
  entry = loss_registry.get_contrastive(loss)
  return dict(temperature_init=temperature_init or entry.temperature_init,
              bias_init=None if entry.bias_init is None else (
                  entry.bias_init if bias_init is None else bias_init))


def Model(image: dict, text: dict, embed_dim: int, **fields) -> "TwoTower":  # noqa: N802
  """A TwoTower whose towers are given as image / text tower arguments (variant and
  overrides: 'B/16' or 'RN50' for the image, mmjax.models.image), decoded and checked once.
  loss: a contrastive loss's name in place of temperature_init / bias_init (its inits, as
  converters describe a checkpoint's family); default 'siglip'."""
  if "loss" in fields or "temperature_init" not in fields:
    loss = fields.pop("loss", "siglip")
    fields.update(inits(loss, fields.get("temperature_init"), fields.get("bias_init")))
  image, text = image_lib.config(**image), text_lib.config(**text)
  for field, tower in (("image_proj", image), ("text_proj", text)):
    proj = fields.get(field, "dense")
    if proj not in PROJECTIONS:
      raise ValueError(f"{field}={proj!r} is not one of {PROJECTIONS}")
    out_width = image_lib.width(tower) if field == "image_proj" else tower["width"]
    if proj == "none" and out_width != embed_dim:
      raise ValueError(f"{field}='none' needs the tower's width ({out_width}) to equal "
                       f"embed_dim ({embed_dim})")
  return TwoTower(image=image, text=text, embed_dim=embed_dim, **fields)


class TwoTower(nn.Module):
  """(image [b, H, W, 3], tokens [b, L]) -> (zimg [b, e], ztxt [b, e], out).

  Build it with `Model(image=..., text=..., embed_dim=...)`: image and text
  here are the complete fields of the image tower (vit.ViT or resnet.ResNet) and
  text.TextTransformer.

  zimg, ztxt are float32 and unit-norm (either is None when its input is).
  out['scale'] = exp(t), the positive logit multiplier; out['bias'] = b when the model has
  a learned bias (bias_init not None). The loss decides the inits (`inits`): CLIP
  t = log(1/0.07) and no bias; SigLIP t = log 10, b = -10.
  """
  image: dict
  text: dict
  embed_dim: int
  temperature_init: float = 10.0   # the initial scale exp(t)
  bias_init: float | None = -10.0  # the learned logit bias's init; None: no bias
  image_proj: str = "dense"  # PROJECTIONS
  text_proj: str = "dense"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    self.img = image_lib.Tower(self.image)
    self.txt = text_lib.TextTransformer(**self.text, name="txt")

    def proj(kind: str, name: str):
      if kind == "none":
        return lambda x: x
      return Dense(self.embed_dim, use_bias=kind == "dense_bias", dtype=self.dtype,
                   param_dtype=self.param_dtype, name=name)

    self.img_proj = proj(self.image_proj, "img_proj")
    self.txt_proj = proj(self.text_proj, "txt_proj")
    self.t = self.param("t", nn.initializers.constant(math.log(self.temperature_init)), (),
                        jnp.float32)
    if self.bias_init is not None:
      self.b = self.param("b", nn.initializers.constant(self.bias_init), (), jnp.float32)

  def encode_image(self, image: jax.Array, *, train: bool = False) -> jax.Array:
    """[b, H, W, 3] float -> [b, embed_dim] float32, unit norm."""
    pooled, _ = self.img(image, train=train)
    return l2_normalize(self.img_proj(pooled))

  def image_outputs(self, image, *, mask: jax.Array | None = None, train: bool = False):
    """(pooled [b, w], tokens [b, n, c]) of the image tower ('encoded'); mask [b, n] bool:
    patches replaced by a ViT's mask token (its mask_token=True)."""
    kwargs = {} if mask is None else {"mask": mask}
    pooled, out = self.img(image, train=train, **kwargs)
    return pooled, out["encoded"]

  def patch_tokens(self, image: jax.Array) -> jax.Array:
    """A ViT tower's patch tokens [b, g * g, w] (row-major, the class token left out) of image
    [b, H, W, 3] (the dense probe's features)."""
    tokens = self.image_outputs(image)[1]
    return tokens[:, 1:] if self.image.get("pool_type") == "tok" else tokens

  def encode_text(self, tokens: jax.Array, *, train: bool = False) -> jax.Array:
    """[b, L] int32 -> [b, embed_dim] float32, unit norm."""
    pooled, _ = self.txt(tokens, train=train)
    return l2_normalize(self.txt_proj(pooled))

  def __call__(self, image: jax.Array | None, text: jax.Array | None, *, train: bool = False):
    zimg = None if image is None else self.encode_image(image, train=train)
    ztxt = None if text is None else self.encode_text(text, train=train)
    out = {"scale": jnp.exp(self.t)}
    if self.bias_init is not None:
      out["bias"] = self.b
    return zimg, ztxt, out
