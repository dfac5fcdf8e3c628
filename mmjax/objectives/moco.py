"""MoCo v3: two views, a momentum encoder, symmetric InfoNCE."""

from __future__ import annotations

import jax
import ml_collections

from mmjax.losses import infonce_loss
from mmjax.models import factory, moco
from mmjax.numerics import l2_normalize
from mmjax.objectives.base import Context, Objective, register, train_apply, with_stats


@register("moco")
class MoCo(Objective):
  batch_keys = ("image", "image2")
  views = 2
  settings_path = "model.moco"

  @staticmethod
  def default_settings():
    return dict(hidden=512, out_dim=128, temperature=0.2,
                momentum=0.99)   # EMA momentum at step 0, rising to 1 (cosine)

  def __init__(self, config: ml_collections.ConfigDict, context: Context):
    heads = dict(config.model.moco)   # the rest: the projector's and predictor's sizes
    self.temperature, self.base_momentum = heads.pop("temperature"), heads.pop("momentum")
    self.total_steps = config.total_steps
    self.model = moco.MoCo(image=factory.tower_config(config, "image"), **heads,
                           **factory.dtypes(config))

  def init_variables(self, rng, batch):
    return self.model.init(rng, batch["image"])

  def ema_init(self, params):
    return {k: params[k] for k in moco.EMA_KEYS}

  def ema_update(self, ema, params, step):
    momentum = moco.momentum(step, self.total_steps, self.base_momentum)
    return jax.tree.map(lambda e, p: momentum * e + (1.0 - momentum) * p, ema,
                        {k: params[k] for k in moco.EMA_KEYS})

  def grad_fn(self, params, ema, batch, rng, batch_stats=None):
    r1, r2 = jax.random.split(rng)
    views = (batch["image"], batch["image2"])
    # The momentum encoder: the EMA params in place of the online ones (its
    # predictor is never used); no gradient flows into it.
    target = jax.lax.stop_gradient({**params, **ema})
    # (It normalises by each batch's statistics; the running ones it would move are dropped.)
    keys = [l2_normalize(train_apply(self.model, target, v, batch_stats=batch_stats,
                                     rngs={"dropout": r})[0][1])
            for v, r in zip(views, (r1, r2))]
    scale = 1.0 / self.temperature

    def loss(p):
      p = self._freeze(p)
      outs = [train_apply(self.model, p, v, batch_stats=batch_stats, rngs={"dropout": r})
              for v, r in zip(views, (r1, r2))]
      q = [l2_normalize(out[0]) for out, _ in outs]
      # MoCo v3 scales each InfoNCE by 2 * temperature.
      value = 2 * self.temperature * (infonce_loss(q[0], keys[1], scale)
                                      + infonce_loss(q[1], keys[0], scale))
      # Each view moves the running statistics from the same start: their mean is one move
      # by the two views' mean statistics.
      stats = jax.tree.map(lambda a, b: (a + b) / 2, outs[0][1], outs[1][1])
      return value, with_stats({}, stats)
    return jax.value_and_grad(loss, has_aux=True)(params)

  def features(self, variables, image):
    return self.model.apply(variables, image, method="image_features")
