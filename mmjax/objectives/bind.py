"""ImageBind-style binding (issue 33): extra modalities (now audio) bound to a two-tower model's
image embedding by a contrastive loss per (anchor, modality) pair, on (image, X) pairs only.

The image and text towers keep TwoTower's param names, so a CLIP / SigLIP run loads into them:
config.init_from.workdir with prefix ('img', 'img_proj', 'txt', 'txt_proj') and config.frozen
('img/.*', 'img_proj/.*', 'txt/.*', 'txt_proj/.*', 't', 'b') train the new towers alone, and
X -> text emerges through the frozen image-text space (ImageBind's point). Zero-shot and
retrieval evaluate that frozen space; `modality_encoders` is the hook of the 'audio' evaluator
(mmjax.evaluate.evaluators.Audio: audio -> image, emergent audio -> text).
"""

from __future__ import annotations

import jax
import ml_collections
from ml_collections.config_dict import placeholder

from mmjax.losses import registry as loss_registry
from mmjax.models import bind as bind_lib, factory
from mmjax.objectives.base import Context, Objective, encoders, register, train_apply
from mmjax.objectives.contrastive import loss_of

LOSSES = ("siglip", "clip")


def _audio_defaults() -> dict:
  """config.bind.audio: the AudioViT's fields (mmjax.models.audio; None: the variant's). Its
  sample rate and clip length are config.data.audio_rate / audio_seconds."""
  return dict(variant="Ti/16", width=placeholder(int), depth=placeholder(int),
              mlp_dim=placeholder(int), num_heads=placeholder(int), patch_size=16,
              patch_stride=10, pool_type="map", n_mels=128, mean=-4.27, std=4.57, dropout=0.0)


@register("bind")
class BindObjective(Objective):
  """config.bind: loss ('siglip' | 'clip', per pair, distributed by config.loss_impl x
  loss_blocks), pairs ((anchor, modality), ...), each modality's tower fields, and the batch
  key of each modality's input (audio_key). The loss is the sum over pairs; metrics
  '<anchor>_<modality>/loss' and '/scale' per pair."""
  settings_path = "bind"
  takes_loss_impl = True

  @staticmethod
  def default_settings():
    return dict(loss="siglip", pairs=(("image", "audio"),), audio=_audio_defaults(),
                audio_key="audio")

  @classmethod
  def check_config(cls, config):
    s = config.bind
    if s.loss not in LOSSES:
      raise ValueError(f"config.bind.loss must be one of {LOSSES}; got {s.loss!r}")
    entry = loss_registry.get_contrastive(s.loss)
    if entry.bias_init is None and config.model.bias_init is not None:
      raise ValueError(f"config.model.bias_init={config.model.bias_init!r}: config.bind.loss="
                       f"{s.loss!r} learns no logit bias; leave it unset")
    impls = entry.impls
    if config.loss_impl not in impls:
      raise ValueError(f"config.loss_impl must be one of {impls} for config.bind.loss="
                       f"{s.loss!r}; got {config.loss_impl!r}")
    pairs = tuple(s.pairs)
    if not pairs:
      raise ValueError("config.bind.pairs is empty; name at least one (anchor, modality)")
    for pair in pairs:
      if (len(pair) != 2 or pair[0] not in bind_lib.ANCHORS
          or pair[1] not in bind_lib.MODALITIES):
        raise ValueError(f"config.bind.pairs: {tuple(pair)!r} must be (one of "
                         f"{bind_lib.ANCHORS}, one of {tuple(bind_lib.MODALITIES)})")
    if any(p[1] == "audio" for p in pairs) and not config.data.audio_ext:
      raise ValueError(f"config.bind.pairs binds audio but config.data.audio_ext is unset "
                       f"(config.data.name={config.data.name!r}); audio is read from webdataset "
                       "shards: config.data.name='wds', audio_ext='wav'")

  def __init__(self, config: ml_collections.ConfigDict, context: Context):
    s = config.bind
    base = factory.two_tower_model(config, context.vocab_size, loss=s.loss)
    self.pairs = tuple(tuple(p) for p in s.pairs)
    audio = {k: v for k, v in s.audio.to_dict().items() if v is not None}
    audio.update(factory.runtime(config), sample_rate=config.data.audio_rate,
                 clip_seconds=config.data.audio_seconds)
    towers = {"audio": audio}
    used = {m for _, m in self.pairs}
    try:
      self.model = bind_lib.Model(base, {m: t for m, t in towers.items() if m in used},
                                  self.pairs)
    except ValueError as e:
      raise ValueError(f"config.bind.{e}") from None
    self.keys = {"image": "image", "text": "text", "audio": s.audio_key}
    self.loss_of = loss_of(s.loss, config.loss_impl, config.loss_blocks, mesh=context.mesh,
                           axes=context.batch_axes)

  @property
  def batch_keys(self):
    names = dict.fromkeys(n for pair in self.pairs for n in pair)
    return tuple(self.keys[n] for n in names)

  def init_variables(self, rng, batch):
    inputs = {"image": batch["image"], "text": batch["text"],
              **bind_lib.dummy_inputs(self.model)}
    return self.model.init(rng, inputs, method="embed")

  def pair_losses(self, params, z: dict) -> dict:
    """{(anchor, modality): its contrastive loss []} of the embeddings z {name: [B, e]}."""
    out = {}
    for anchor, modality in self.pairs:
      head = self.model.apply({"params": params}, anchor, modality, method="pair_head")
      out[anchor, modality] = (self.loss_of(z[anchor], z[modality], head), head["scale"])
    return out

  def grad_fn(self, params, ema, batch, rng, batch_stats=None):
    del ema

    def loss_fn(p):
      p = self._freeze(p)
      names = dict.fromkeys(n for pair in self.pairs for n in pair)
      z, stats = train_apply(self.model, p, {n: batch[self.keys[n]] for n in names},
                             batch_stats=batch_stats, method="embed", rngs={"dropout": rng})
      losses = self.pair_losses(p, z)
      metrics = {}
      for (anchor, modality), (loss, scale) in losses.items():
        metrics[f"{anchor}_{modality}/loss"] = loss
        metrics[f"{anchor}_{modality}/scale"] = scale
      total = sum(loss for loss, _ in losses.values())
      return total, ({**metrics, "batch_stats": stats} if stats else metrics)

    return jax.value_and_grad(loss_fn, has_aux=True)(params)

  def towers(self):
    return encoders(self.model)

  def features(self, variables, image):
    return self.towers()[0](variables, image)

  def modality_encoders(self) -> dict:
    """{modality: fn(variables, x) -> unit-norm [b, e]} of the extra towers (the hook for
    'audio' evaluator: audio -> image / text)."""
    return {m: (lambda v, x, m=m: self.model.apply(v, m, x, method="encode"))
            for m in (self.model.modalities or {})}
