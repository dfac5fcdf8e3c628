"""CoCa: contrastive + captioning (+ BLIP's image-text matching on hard negatives drawn from
the contrastive similarities); the evaluator gets captions and ITM re-ranking from it."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections

from mmjax.losses import clip_loss
from mmjax.losses.captioning import caption_loss, hard_negatives, itm_loss
from mmjax.models import coca, factory
from mmjax.objectives.base import (Context, Objective, encoders, register, train_apply,
                                   with_stats)


@register("coca")
class CoCa(Objective):
  """config.coca.contrastive_weight x CLIP loss + caption_weight x teacher-forced caption
  cross-entropy (+ itm_weight x image-text matching). Zero-shot and retrieval use the
  contrastive embeddings."""
  settings_path = "coca"

  @staticmethod
  def default_settings():
    return dict(
        contrastive_weight=1.0,   # open_clip's defaults: 1 x CLIP loss + 2 x caption loss
        caption_weight=2.0,
        label_smoothing=0.0,
        itm_weight=0.0,           # > 0: the matching head on hard negatives (and eval re-ranking)
        decoder_depth=2,
        decoder_heads=ml_collections.config_dict.placeholder(int),  # None: the text tower's
        n_queries=256,            # the image pooler's queries: 1 contrastive + n - 1 image tokens
        pool_heads=8,             # the image pooler's heads (open_clip: 8); must divide embed_dim
        correct_cls_mask=True,    # False: open_clip's legacy text padding mask (its checkpoints)
        bos_id=2,                 # prepended to every text (the trained sentencepiece's BOS);
                                  # None: the tokenizer's texts start with one (CLIP's SOT)
        eos_id=3,                 # ends a generated caption (sentencepiece's EOS; CLIP: 49407)
        eval_beams=1,             # captions at evaluation: 1 greedy, > 1 beam search
        eval_length_penalty=0.0,
        rerank_k=8,               # ITM re-ranks the top k of the contrastive similarities
    )

  @classmethod
  def check_config(cls, config):
    settings = config.coca
    for key in ("contrastive_weight", "caption_weight", "itm_weight"):
      if not settings[key] >= 0:
        raise ValueError(f"config.coca.{key} must be >= 0; got {settings[key]!r}")
    if not 0.0 <= settings.label_smoothing < 1.0:
      raise ValueError(f"config.coca.label_smoothing must be in [0, 1); got "
                       f"{settings.label_smoothing!r}")
    penalty = settings.eval_length_penalty
    if not isinstance(penalty, (int, float)) or not math.isfinite(penalty):
      raise ValueError(f"config.coca.eval_length_penalty must be a finite number; got {penalty!r}")
    for key, least in (("decoder_depth", 1), ("n_queries", 2), ("eval_beams", 1),
                       ("rerank_k", 1)):
      value = settings[key]
      if not isinstance(value, int) or isinstance(value, bool) or value < least:
        raise ValueError(f"config.coca.{key} must be an int >= {least}; got {value!r}")

  def __init__(self, config: ml_collections.ConfigDict, context: Context):
    self.model = factory.coca_model(config, context.vocab_size)
    self.settings = config.coca
    self.text_len = config.data.text_len

  def init_variables(self, rng, batch):
    return self.model.init(rng, batch["image"], batch["text"])

  def losses(self, params, batch, rng, batch_stats=None) -> tuple[jax.Array, dict]:
    """(the weighted total, {'contrastive_loss', 'caption_loss'[, 'itm_loss'], 'scale'})."""
    settings, model = self.settings, self.model
    r_drop, r_txt, r_img = jax.random.split(rng, 3)
    kw = dict(train=True, rngs={"dropout": r_drop})
    (zimg, ztxt, out), stats = train_apply(model, params, batch["image"], batch["text"],
                                           batch_stats=batch_stats, rngs={"dropout": r_drop})
    parts = {"contrastive_loss": clip_loss(zimg, ztxt, out["scale"]),
             "caption_loss": caption_loss(out["logits"], out["labels"],
                                          pad_id=model.text["pad_id"],
                                          label_smoothing=settings.label_smoothing)}
    total = (settings.contrastive_weight * parts["contrastive_loss"]
             + settings.caption_weight * parts["caption_loss"])
    if settings.itm_weight > 0:
      text = batch["text"]
      # Never a negative: the pair itself, or an identical caption (digits repeat them).
      exclude = (text[:, None, :] == text[None, :, :]).all(-1)
      sim = out["scale"] * zimg @ ztxt.T
      neg_txt = hard_negatives(r_txt, sim, exclude)        # per image, a text
      neg_img = hard_negatives(r_img, sim.T, exclude.T)    # per text, an image
      states, labels, tokens = out["states"], out["labels"], out["image_tokens"]
      _, h_txt = model.apply({"params": params}, states[neg_txt], tokens, method="decode_states",
                             **kw)
      _, h_img = model.apply({"params": params}, states, tokens[neg_img], method="decode_states",
                             **kw)
      hidden = jnp.concatenate([out["hidden"], h_txt, h_img])
      logits = model.apply({"params": params}, hidden,
                           jnp.concatenate([labels, labels[neg_txt], labels]),
                           method="itm_logits")
      n = text.shape[0]
      parts["itm_loss"] = itm_loss(logits, jnp.arange(3 * n) < n)
      total = total + settings.itm_weight * parts["itm_loss"]
    return total, with_stats({**parts, "scale": out["scale"]}, stats)

  def grad_fn(self, params, ema, batch, rng, batch_stats=None):
    del ema
    return jax.value_and_grad(lambda p: self.losses(self._freeze(p), batch, rng, batch_stats),
                              has_aux=True)(params)

  def features(self, variables, image):
    return self.towers()[0](variables, image)

  def towers(self):
    return encoders(self.model)

  def captioner(self, first=None):
    """The best beam, start token dropped, padding after EOS, jitted; first: the start token
    when the model prepends none (config.coca.bos_id=None: the texts' own, CLIP's SOT)."""
    settings = self.settings
    gen = coca.make_generate(self.model, max_len=self.model.text["max_len"],
                             eos_id=settings.eos_id, beams=settings.eval_beams,
                             length_penalty=settings.eval_length_penalty,
                             first=first if settings.bos_id is None else settings.bos_id)

    def captions(variables, image):
      seqs = gen(variables["params"], image, variables.get("batch_stats"))[0][:, 0, 1:]
      return seqs[:, :self.text_len] if settings.bos_id is not None else seqs
    return captions

  def reranker(self):
    """Re-ranking by the matching head (config.coca.itm_weight > 0), top rerank_k."""
    if not self.model.itm:
      return None
    model = self.model
    return (lambda v, x: model.apply(v, x, method="encode_image_tokens")[1],
            lambda v, tok, t: model.apply(v, tok, t, method="itm_score"),
            self.settings.rerank_k)
