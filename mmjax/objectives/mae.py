"""MAE: a masked autoencoder on images (the text field is not read)."""

from __future__ import annotations

import jax
import ml_collections

from mmjax.models import factory, image as image_lib, mae
from mmjax.objectives.base import Context, Objective, register


@register("mae")
class MAE(Objective):
  batch_keys = ("image",)
  settings_path = "model.mae"

  @staticmethod
  def default_settings():
    return dict(mask_ratio=0.75, decoder_width=128, decoder_depth=2, decoder_heads=4,
                decoder_mlp_dim=512, norm_pix_loss=True)

  def __init__(self, config: ml_collections.ConfigDict, context: Context):
    image = factory.tower_config(config, "image")
    if image_lib.is_resnet(image):
      raise ValueError(f"config.model.image.variant={config.model.image.variant!r}: MAE masks "
                       "and reconstructs a ViT's patches; use a ViT variant ('Ti/4', 'B/16')")
    self.model = mae.MAE(image=image, **config.model.mae, **factory.dtypes(config))

  def init_variables(self, rng, batch):
    r1, r2 = jax.random.split(rng)
    return self.model.init({"params": r1, "mask": r2}, batch["image"])

  def grad_fn(self, params, ema, batch, rng, batch_stats=None):
    del ema, batch_stats   # a ViT: no running statistics
    r1, r2 = jax.random.split(rng)

    def loss(p):
      value, _ = self.model.apply({"params": self._freeze(p)}, batch["image"], train=True,
                                  rngs={"mask": r1, "dropout": r2})
      return value, {}
    return jax.value_and_grad(loss, has_aux=True)(params)

  def features(self, variables, image):
    return self.model.apply(variables, image, method="image_features")
