"""Masked autoencoder (He et al. 2021): encode the visible patches, reconstruct the rest.

The encoder is an ordinary `vit.Model` named 'img' (the same parameter tree as
a two-tower model's image tower, so a LiT run can start from it: see
config.init_from). It sees only the kept 1 - mask_ratio share of patch tokens;
a light decoder puts mask tokens in the other places and predicts every
patch's pixels. The loss is the mean squared error on the masked patches, of
per-patch normalised pixels by default.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models import vit
from mmjax.nn.layers import Encoder, posemb_sincos_2d
from mmjax.nn.linear import Dense


def patchify(image: jax.Array, patch: tuple[int, int]) -> jax.Array:
  """[b, H, W, C] -> [b, (H/ph)*(W/pw), ph*pw*C], patches in row-major order."""
  b, h, w, c = image.shape
  ph, pw = patch
  x = image.reshape(b, h // ph, ph, w // pw, pw, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // ph) * (w // pw), ph * pw * c)


class MAE(nn.Module):
  """image [b, H, W, 3] -> (loss scalar, {'pred': [b, n, p*p*3], 'mask': [b, n] 1 = masked}).

  `Model(image=dict(variant=...), ...)` builds it; `image` here holds the encoder's
  complete vit.ViT fields.
  """
  image: dict
  mask_ratio: float = 0.75
  decoder_width: int = 128
  decoder_depth: int = 2
  decoder_heads: int = 4
  decoder_mlp_dim: int = 512
  norm_pix_loss: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    if not 0.0 <= self.mask_ratio < 1.0:
      raise ValueError(f"mask_ratio={self.mask_ratio} must be in [0, 1)")
    self.img = vit.ViT(**{k: v for k, v in self.image.items() if k != "tower"}, name="img")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.decoder_embed = Dense(self.decoder_width, name="decoder_embed", **kw)
    self.mask_token = self.param("mask_token", nn.initializers.normal(0.02),
                                 (1, 1, self.decoder_width), self.param_dtype)
    # The decoder is scanned / rematerialised as the encoder is (config.model.scan, remat).
    runtime = {k: self.image[k] for k in ("scan", "remat", "remat_policy") if k in self.image}
    self.decoder = Encoder(depth=self.decoder_depth, num_heads=self.decoder_heads,
                           mlp_dim=self.decoder_mlp_dim, name="decoder", **runtime, **kw)
    self.patch = self.image["patch_size"]
    self.decoder_pred = Dense(self.patch[0] * self.patch[1] * 3, name="decoder_pred", **kw)

  def image_features(self, image: jax.Array) -> jax.Array:
    """[b, H, W, 3] -> [b, width]: the encoder on all patches, pooled (for probes)."""
    return self.img(image)[0]

  def __call__(self, image: jax.Array, *, train: bool = False):
    if image.shape[-1] != 3:
      raise ValueError(f"image must be [b, H, W, 3]; got shape {image.shape}")
    ph, pw = self.patch
    gh, gw = image.shape[1] // ph, image.shape[2] // pw
    n = gh * gw
    n_keep = max(1, round(n * (1.0 - self.mask_ratio)))
    b = image.shape[0]
    keep = vit.random_keep(self.make_rng("mask"), b, n, n_keep)
    _, out = self.img(image, keep=keep, train=train)
    x = out["encoded"]                                        # [b, n_keep, width]
    x = self.decoder_embed(x)
    # Scatter the visible tokens into a grid of mask tokens.
    full = jnp.broadcast_to(self.mask_token.astype(x.dtype), (b, n, self.decoder_width))
    full = full.at[jnp.arange(b)[:, None], keep].set(x)
    full = full + posemb_sincos_2d(gh, gw, self.decoder_width).astype(x.dtype)
    y = self.decoder(full, train=train)
    pred = self.decoder_pred(y).astype(jnp.float32)

    target = patchify(image.astype(jnp.float32), (ph, pw))
    if self.norm_pix_loss:
      mean = target.mean(-1, keepdims=True)
      var = target.var(-1, keepdims=True)
      target = (target - mean) * jax.lax.rsqrt(var + 1e-6)
    mask = jnp.ones((b, n), jnp.float32).at[jnp.arange(b)[:, None], keep].set(0.0)
    per_patch = jnp.mean((pred - target) ** 2, axis=-1)
    loss = jnp.sum(per_patch * mask) / jnp.sum(mask)
    return loss, {"pred": pred, "mask": mask}


def Model(image: dict, **fields) -> MAE:  # noqa: N802
  """MAE from its encoder as vit.Model arguments (decoded once) and MAE's fields."""
  return vit.around(MAE, image, **fields)
