"""What a run optimises (config.loss): CLIP / SigLIP two towers, MAE, MoCo v3.

One train step and one loop serve them all; an objective supplies what
differs, from the config:
  model, batch_keys         the Flax model and the batch fields it reads
  init(rng, batch)          -> params (batch: dummy arrays, shapes only)
  grad_fn(params, ema, batch, rng) -> ((loss, metrics), grads)
  ema_init(params), ema_update(ema, params, step) -> the momentum encoder (MoCo; else None)
  features(params, image)   -> [b, d] image features for the linear probe and kNN
LiT is a contrastive run with config.frozen and config.init_from; FLIP one with
config.model.image.patch_dropout.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mmjax.losses import infonce_loss
from mmjax.models import mae, moco, two_tower, vit
from mmjax.models import text as text_model
from mmjax.train import state as state_lib
from mmjax.train.config import CONTRASTIVE, LOSSES


def _tower_config(config: ml_collections.ConfigDict, tower: str) -> dict:
  m = config.model
  common = dict(dtype=getattr(jnp, m.dtype), param_dtype=getattr(jnp, m.param_dtype),
                remat=m.remat, attn_impl=m.attention_impl)
  fields = {k: v for k, v in m[tower].items() if v is not None}
  decode = vit.decode_variant if tower == "image" else text_model.decode_variant
  try:
    decode(fields["variant"])
  except ValueError as e:
    raise ValueError(f"config.model.{tower}.variant: {e}") from None
  if "patch_size" in fields:
    fields["patch_size"] = tuple(np.broadcast_to(fields["patch_size"], 2).tolist())
  if tower == "text":
    fields.pop("patch_dropout", None)
  return {**fields, **common}


def build_two_tower(config: ml_collections.ConfigDict, vocab_size: int) -> two_tower.Model:
  """The two-tower model of config.model; variants are decoded here, so a bad one fails early."""
  m = config.model
  return two_tower.Model(
      image=_tower_config(config, "image"),
      text={**_tower_config(config, "text"), "vocab_size": vocab_size,
            "max_len": config.data.text_len},
      embed_dim=m.embed_dim, loss=config.loss,
      temperature_init=m.temperature_init, bias_init=m.bias_init,
      dtype=getattr(jnp, m.dtype), param_dtype=getattr(jnp, m.param_dtype))


class Contrastive:
  """CLIP / SigLIP on image-text pairs (also LiT and FLIP)."""
  batch_keys = ("image", "text")

  def __init__(self, config, vocab_size: int, *, mesh=None, batch_axes=(), freeze=None):
    self.model = build_two_tower(config, vocab_size)
    loss_of = state_lib.contrastive_loss(config.loss, config.loss_impl, mesh=mesh,
                                         axes=batch_axes)
    self._grad = state_lib.make_grad_fn(self.model, loss_of, accum_steps=config.accum_steps,
                                        freeze=freeze)

  def init(self, rng, batch):
    return self.model.init(rng, batch["image"], batch["text"])["params"]

  def grad_fn(self, params, ema, batch, rng):
    del ema
    (value, out), grads = self._grad(params, batch, rng)
    return (value, dict(out)), grads

  def features(self, params, image):
    return self.model.apply({"params": params}, image, method="encode_image")


class MAE:
  """Masked autoencoder on images (the text field is not read)."""
  batch_keys = ("image",)

  def __init__(self, config, vocab_size: int = 0, *, freeze=None, **_):
    m = config.model
    self.model = mae.Model(image=_tower_config(config, "image"), **m.mae,
                           dtype=getattr(jnp, m.dtype), param_dtype=getattr(jnp, m.param_dtype))
    self._freeze = freeze or (lambda p: p)

  def init(self, rng, batch):
    r1, r2 = jax.random.split(rng)
    return self.model.init({"params": r1, "mask": r2}, batch["image"])["params"]

  def grad_fn(self, params, ema, batch, rng):
    del ema
    r1, r2 = jax.random.split(rng)

    def loss(p):
      value, _ = self.model.apply({"params": self._freeze(p)}, batch["image"], train=True,
                                  rngs={"mask": r1, "dropout": r2})
      return value, {}
    return jax.value_and_grad(loss, has_aux=True)(params)

  def features(self, params, image):
    return self.model.apply({"params": params}, image, method="image_features")


class MoCo:
  """MoCo v3: two views, a momentum encoder, symmetric InfoNCE."""
  batch_keys = ("image", "image2")

  def __init__(self, config, vocab_size: int = 0, *, freeze=None, **_):
    m = config.model
    c = dict(m.moco)
    self.temperature, self.base_momentum = c.pop("temperature"), c.pop("momentum")
    self.total_steps = config.total_steps
    self.model = moco.Model(image=_tower_config(config, "image"), **c,
                            dtype=getattr(jnp, m.dtype), param_dtype=getattr(jnp, m.param_dtype))
    self._freeze = freeze or (lambda p: p)

  def init(self, rng, batch):
    return self.model.init(rng, batch["image"])["params"]

  def ema_init(self, params):
    return {k: params[k] for k in moco.EMA_KEYS}

  def ema_update(self, ema, params, step):
    m = moco.momentum(step, self.total_steps, self.base_momentum)
    return jax.tree.map(lambda e, p: m * e + (1.0 - m) * p, ema,
                        {k: params[k] for k in moco.EMA_KEYS})

  def grad_fn(self, params, ema, batch, rng):
    r1, r2 = jax.random.split(rng)
    views = (batch["image"], batch["image2"])
    # The momentum encoder: the EMA params in place of the online ones (its
    # predictor is never used); no gradient flows into it.
    target = jax.lax.stop_gradient({**params, **ema})
    keys = [self.model.apply({"params": target}, v, train=True, rngs={"dropout": r})[1]
            for v, r in zip(views, (r1, r2))]
    scale = 1.0 / self.temperature

    def loss(p):
      p = self._freeze(p)
      q = [self.model.apply({"params": p}, v, train=True, rngs={"dropout": r})[0]
           for v, r in zip(views, (r1, r2))]
      unit = lambda x: x * jax.lax.rsqrt(jnp.sum(x * x, -1, keepdims=True) + 1e-12)
      # MoCo v3 scales each InfoNCE by 2 * temperature.
      value = 2 * self.temperature * (infonce_loss(unit(q[0]), unit(keys[1]), scale)
                                      + infonce_loss(unit(q[1]), unit(keys[0]), scale))
      return value, {}
    (value, aux), grads = jax.value_and_grad(loss, has_aux=True)(params)
    return (value, aux), grads

  def features(self, params, image):
    return self.model.apply({"params": params}, image, method="image_features")


def make(config: ml_collections.ConfigDict, vocab_size: int, *, mesh=None, batch_axes=(),
         freeze: Callable[[Any], Any] | None = None):
  """The objective of config.loss."""
  if config.loss in CONTRASTIVE:
    return Contrastive(config, vocab_size, mesh=mesh, batch_axes=batch_axes, freeze=freeze)
  if config.loss == "mae":
    return MAE(config, freeze=freeze)
  if config.loss == "moco":
    return MoCo(config, freeze=freeze)
  raise ValueError(f"config.loss must be one of {LOSSES}; got {config.loss!r}")
