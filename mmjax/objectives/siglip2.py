"""SigLIP 2's recipe (issue 32, in progress): the sigmoid loss + LocCa's decoder trained on
captioning, and, for the last `distill_fraction` of training, SILC's local-to-global
self-distillation and TIPS' masked prediction against an EMA teacher.

Built so far: captioning (the decoder reads [CAPTION] + the caption, cross-attending to the
image tower's unpooled tokens) and both distillation losses with their teacher. Referring
expressions and grounded captioning (boxes as tokens: mmjax.losses.distill.box_tokens) need
the digit scenes' regions in the batch; they come next.

The teacher: the student's towers and prototype heads, averaged (teacher_momentum) from the
switch-on step; before it the teacher copies the student, so it starts from the trained model.
The local views: `local_crops` random square crops of `local_crop` of the image's side, resized
back (SILC's local crops); the masked view: `mask_ratio` of the student's patches replaced by
the tower's mask token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from mmjax.losses import distill
from mmjax.losses.captioning import caption_loss
from mmjax.models import factory, siglip2
from mmjax.objectives.base import Context, Objective, encoders, register, train_apply
from mmjax.objectives.contrastive import loss_of

TEACHER_KEYS = ("img", "proto_global", "proto_patch")   # what the teacher averages


@register("siglip2")
class Siglip2(Objective):
  """config.siglip2: sigmoid loss + caption_weight x the decoder's caption loss; from step
  distill_start = (1 - distill_fraction) * total_steps, + consistency_weight x SILC +
  masked_weight x TIPS. Zero-shot and retrieval use the two towers, as SigLIP's."""
  settings_path = "siglip2"
  takes_loss_impl = True
  takes_step = True   # the train step passes grad_fn its step (the switch-on)

  @staticmethod
  def default_settings():
    return dict(
        caption_weight=1.0,
        decoder_depth=2,
        decoder_max_len=ml_collections.config_dict.placeholder(int),   # None: text_len + 1
        distill_fraction=0.2,     # the last 20% of training (SigLIP 2's)
        consistency_weight=1.0,
        masked_weight=0.25,
        prototypes=256,
        teacher_momentum=0.996,
        center_momentum=0.9,
        student_temp=0.1,
        teacher_temp=0.04,
        local_crops=2,
        local_crop=0.5,           # a local view's side, as a share of the image's
        mask_ratio=0.5,
    )

  @classmethod
  def check_config(cls, config):
    s = config.siglip2
    for key in ("caption_weight", "consistency_weight", "masked_weight"):
      if not s[key] >= 0:
        raise ValueError(f"config.siglip2.{key} must be >= 0; got {s[key]!r}")
    for key in ("distill_fraction", "teacher_momentum", "center_momentum"):
      if not 0.0 <= s[key] <= 1.0:
        raise ValueError(f"config.siglip2.{key} must be in [0, 1]; got {s[key]!r}")
    for key in ("local_crop", "mask_ratio"):
      if not 0.0 < s[key] < 1.0:
        raise ValueError(f"config.siglip2.{key} must be in (0, 1); got {s[key]!r}")
    for key in ("decoder_depth", "prototypes", "local_crops"):
      if not isinstance(s[key], int) or isinstance(s[key], bool) or s[key] < 1:
        raise ValueError(f"config.siglip2.{key} must be a positive int; got {s[key]!r}")
    if config.model.image.tower == "naflex":
      raise ValueError("config.loss='siglip2' takes square images for now (its local crops); "
                       "config.model.image.tower='naflex' is not supported yet")

  def __init__(self, config: ml_collections.ConfigDict, context: Context):
    s = self.settings = config.siglip2
    base = factory.two_tower_model(config, context.vocab_size, loss="siglip")
    text = dict(base.text)
    # The decoder's vocabulary: the text's and a task token (CAPTION).
    self.caption_id = context.vocab_size
    decoder = dict(vocab_size=context.vocab_size + 1,
                   max_len=s.decoder_max_len or config.data.text_len + 1, width=text["width"],
                   depth=s.decoder_depth, mlp_dim=text["mlp_dim"], num_heads=text["num_heads"])
    self.model = siglip2.Siglip2(
        image=dict(base.image, mask_token=True), text=text, embed_dim=base.embed_dim,
        temperature_init=base.temperature_init, bias_init=base.bias_init,
        image_proj=base.image_proj, text_proj=base.text_proj, dtype=base.dtype,
        param_dtype=base.param_dtype, decoder=decoder, prototypes=s.prototypes)
    self.sigmoid = loss_of("siglip", config.loss_impl, config.loss_blocks, mesh=context.mesh,
                           axes=context.batch_axes)
    self.pad_id = text.get("pad_id", 0)
    self.start = int(round((1.0 - s.distill_fraction) * config.total_steps))

  def init_variables(self, rng, batch):
    return self.model.init(rng, batch["image"], batch["text"])

  def ema_init(self, params):
    k = self.settings.prototypes
    return {"teacher": {key: params[key] for key in TEACHER_KEYS},
            "center_global": jnp.zeros((k,), jnp.float32),
            "center_patch": jnp.zeros((k,), jnp.float32)}

  def ema_update(self, ema, params, step):
    # Before the switch-on the teacher copies the student; then it averages it.
    m = jnp.where(step >= self.start, self.settings.teacher_momentum, 0.0)
    teacher = jax.tree.map(lambda e, p: m * e + (1.0 - m) * p, ema["teacher"],
                           {key: params[key] for key in TEACHER_KEYS})
    return {**ema, "teacher": teacher}

  def caption_inputs(self, text: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(decoder input [b, L + 1]: CAPTION then the caption, labels [b, L + 1]: the caption
    then a pad): teacher forcing, each position predicting the next token."""
    b = text.shape[0]
    task = jnp.full((b, 1), self.caption_id, text.dtype)
    pad = jnp.full((b, 1), self.pad_id, text.dtype)
    return jnp.concatenate([task, text], 1), jnp.concatenate([text, pad], 1)

  def local_views(self, rng: jax.Array, image: jax.Array) -> jax.Array:
    """[v, b, H, W, 3]: v random square crops of local_crop of the side, resized to H x W."""
    s, (b, h, w, c) = self.settings, image.shape
    side = max(1, int(round(s.local_crop * min(h, w))))

    def one(r, im):
      ry, rx = jax.random.split(r)
      y = jax.random.randint(ry, (), 0, h - side + 1)
      x = jax.random.randint(rx, (), 0, w - side + 1)
      crop = jax.lax.dynamic_slice(im, (y, x, 0), (side, side, c))
      return jax.image.resize(crop, (h, w, c), "bilinear")

    keys = jax.random.split(rng, s.local_crops * b).reshape(s.local_crops, b, -1)
    return jax.vmap(jax.vmap(one))(keys, jnp.broadcast_to(image, (s.local_crops, *image.shape)))

  def distill_losses(self, params, ema, image, rng) -> dict:
    """{'consistency_loss', 'masked_loss', 'center_global', 'center_patch'} of a batch."""
    s, model = self.settings, self.model
    r_views, r_mask, r_drop = jax.random.split(rng, 3)
    teacher = jax.lax.stop_gradient({**params, **ema["teacher"]})
    t_pooled, t_tokens = model.apply({"params": teacher}, image, method="image_outputs")
    t_global, t_patch = model.apply({"params": teacher}, t_pooled, t_tokens,
                                    method="prototype_logits")
    views = self.local_views(r_views, image)
    v, b = views.shape[:2]
    pooled, _ = model.apply({"params": params}, views.reshape(v * b, *image.shape[1:]),
                            method="image_outputs")
    s_global, _ = model.apply({"params": params}, pooled, jnp.zeros((v * b, 1, pooled.shape[-1])),
                              method="prototype_logits")
    n = t_tokens.shape[1]
    mask = jax.random.uniform(r_mask, (b, n)) < s.mask_ratio
    _, m_tokens = model.apply({"params": params}, image, mask=mask, method="image_outputs")
    _, s_patch = model.apply({"params": params}, pooled[:b], m_tokens, method="prototype_logits")
    temps = dict(student_temp=s.student_temp, teacher_temp=s.teacher_temp)
    return {
        "consistency_loss": distill.consistency_loss(
            s_global.reshape(v, b, -1), t_global, ema["center_global"], **temps),
        "masked_loss": distill.masked_prediction_loss(s_patch, t_patch, mask, ema["center_patch"],
                                                      **temps),
        "center_global": distill.update_center(ema["center_global"], t_global, s.center_momentum),
        "center_patch": distill.update_center(ema["center_patch"], t_patch, s.center_momentum)}

  def losses(self, params, ema, batch, rng, step) -> tuple[jax.Array, dict]:
    """(the weighted total, its parts and the new teacher centers under 'ema')."""
    s, model = self.settings, self.model
    r_drop, r_distill = jax.random.split(rng)
    image, text = batch["image"], batch["text"]
    (zimg, ztxt, out), _ = train_apply(model, params, image, text, rngs={"dropout": r_drop})
    parts = {"sigmoid_loss": self.sigmoid(zimg, ztxt, out)}
    _, tokens = model.apply({"params": params}, image, method="image_outputs")
    inputs, labels = self.caption_inputs(text)
    logits = model.apply({"params": params}, inputs, tokens, method="decode")
    parts["caption_loss"] = caption_loss(logits, labels, pad_id=self.pad_id)
    d = self.distill_losses(params, ema, image, r_distill)
    on = (step >= self.start).astype(jnp.float32)
    parts.update(consistency_loss=d["consistency_loss"], masked_loss=d["masked_loss"],
                 distill_on=on)
    total = (parts["sigmoid_loss"] + s.caption_weight * parts["caption_loss"]
             + on * (s.consistency_weight * d["consistency_loss"]
                     + s.masked_weight * d["masked_loss"]))
    centers = {k: jnp.where(on > 0, d[k], ema[k]) for k in ("center_global", "center_patch")}
    return total, {**parts, "scale": out["scale"], "ema": centers}

  def grad_fn(self, params, ema, batch, rng, batch_stats=None, step=0):
    del batch_stats
    return jax.value_and_grad(
        lambda p: self.losses(self._freeze(p), ema, batch, rng, step), has_aux=True)(params)

  def features(self, variables, image):
    return self.towers()[0](variables, image)

  def towers(self):
    return encoders(self.model)
