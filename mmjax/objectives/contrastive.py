"""CLIP / SigLIP two towers on image-text pairs (also LiT: config.frozen + init_from, and
FLIP: config.model.image.patch_dropout). Any contrastive loss registered in
mmjax.losses.registry trains this way."""

from __future__ import annotations

from typing import Callable

import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from mmjax.losses import registry as loss_registry
from mmjax.models import factory, image as image_lib
from mmjax.objectives import gradcache
from mmjax.objectives.base import (Context, Objective, encoders, register, train_apply,
                                  vit_patch_tokens)


def loss_of(name: str, impl: str = "global", blocks: str = "dense", *,
            mesh: Mesh | None = None, axes: tuple[str, ...] = ()) -> Callable:
  """(zimg [B, e], ztxt [B, e], out) -> the global batch's loss `name` (a registered
  contrastive loss), distributed by impl, each block of logits computed by blocks; out: the
  two-tower model's {'scale'[, 'bias']}."""
  fn = loss_registry.contrastive(name, impl, blocks, mesh=mesh, axes=axes)
  return lambda zimg, ztxt, out: fn(zimg, ztxt, out["scale"], out.get("bias", jnp.zeros(())))


def two_tower_grad_fn(model, loss: Callable, *, accum_steps: int = 1,
                      freeze: Callable | None = None, batch_stats=None) -> Callable:
  """grad_fn(params, batch {'image', 'text'}, rng) -> ((loss, out), grads) of a two-tower
  model under loss(zimg, ztxt, out) (loss_of), through GradCache for accum_steps > 1
  (mmjax.objectives.gradcache). freeze: params -> params with the frozen ones stopped;
  batch_stats: the towers' running statistics (out['batch_stats'] holds the moved ones)."""
  freeze = freeze or (lambda p: p)

  def embed(p, image, text, r):
    (zimg, ztxt, _), stats = train_apply(model, freeze(p), image, text, batch_stats=batch_stats,
                                         rngs={"dropout": r})
    return (zimg, ztxt), stats

  def head_loss(zimg, ztxt, p):
    _, _, out = model.apply({"params": p}, None, None)   # scale, bias from t, b
    return loss(zimg, ztxt, out), dict(out)

  return gradcache.make_grad_fn(embed, head_loss, accum_steps=accum_steps)


@register("clip", "siglip")
class Contrastive(Objective):
  """The loss is config.loss_impl x config.loss_blocks, with GradCache for
  config.accum_steps > 1."""
  takes_loss_impl = True
  takes_checkpoint = True

  @classmethod
  def check_config(cls, config):
    entry = loss_registry.get_contrastive(config.loss)
    impls = entry.impls
    if entry.bias_init is None and config.model.bias_init is not None:
      raise ValueError(f"config.model.bias_init={config.model.bias_init!r}: config.loss="
                       f"{config.loss!r} learns no logit bias; leave it unset")
    if config.loss_impl not in impls:
      raise ValueError(f"config.loss_impl must be one of {impls} for config.loss="
                       f"{config.loss!r}; got {config.loss_impl!r}")

  def __init__(self, config: ml_collections.ConfigDict, context: Context):
    self.model = factory.two_tower_model(config, context.vocab_size, loss=config.loss,
                                         converted=context.converted)
    self.accum_steps = config.accum_steps
    if self.accum_steps > 1 and image_lib.uses_batch_stats(self.model.image):
      raise ValueError(f"config.accum_steps={self.accum_steps}: GradCache's micro-batches "
                       "would each normalise by their own BatchNorm statistics "
                       "(config.model.image.norm='batch'); use norm='group' or accum_steps=1")
    self.loss_of = loss_of(config.loss, config.loss_impl, config.loss_blocks,
                           mesh=context.mesh, axes=context.batch_axes)

  def init_variables(self, rng, batch):
    return self.model.init(rng, batch["image"], batch["text"])

  def grad_fn(self, params, ema, batch, rng, batch_stats=None):
    del ema
    return two_tower_grad_fn(self.model, self.loss_of, accum_steps=self.accum_steps,
                             freeze=self._freeze, batch_stats=batch_stats)(params, batch, rng)

  def features(self, variables, image):
    return self.towers()[0](variables, image)

  def towers(self):
    return encoders(self.model)

  def patch_features(self):
    return vit_patch_tokens(self.model)
