"""Config -> model: the towers of config.model, decoded and checked once, and the models
built around them (two towers, CoCa). Objectives call these; a bad field raises one
ValueError naming config.model.<tower>.<field>."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mmjax.models import coca, image as image_lib, resnet, text as text_lib, two_tower, vit
from mmjax.numerics import dtype

if TYPE_CHECKING:   # a config is any ConfigDict-like mapping; ml_collections is not core
  import ml_collections


RUNTIME_FIELDS = ("dtype", "param_dtype", "remat", "remat_policy", "scan", "attention_impl")


def runtime(config: ml_collections.ConfigDict) -> dict:
  """config.model's runtime settings (RUNTIME_FIELDS), the same for every tower: how a run
  computes, not which model it is."""
  model_cfg = config.model
  return dict(zip(RUNTIME_FIELDS, (dtype(model_cfg.dtype), dtype(model_cfg.param_dtype),
                                   model_cfg.remat, model_cfg.remat_policy, model_cfg.scan,
                                   model_cfg.attention_impl)))


def dtypes(config: ml_collections.ConfigDict) -> dict:
  """{'dtype', 'param_dtype'} of config.model: the heads' and wrappers' settings."""
  return {k: v for k, v in runtime(config).items() if k in ("dtype", "param_dtype")}


def tower_config(config: ml_collections.ConfigDict, tower: str, **extra) -> dict:
  """The complete fields of config.model.<tower> ('image': vit.ViT or resnet.ResNet by
  variant, mmjax.models.image; 'text': text.TextTransformer) with the runtime settings.
  extra: fields the config does not hold (vocab_size, max_len, pool_type, ...)."""
  fields = {k: v for k, v in config.model[tower].items() if v is not None}
  if tower == "text":
    fields.pop("patch_dropout", None)
  fields.update(runtime(config), **extra)
  resolve = image_lib.config if tower == "image" else text_lib.config
  try:
    return resolve(**fields)
  except ValueError as e:
    raise ValueError(f"config.model.{tower}.{e}") from None


def two_tower_model(config: ml_collections.ConfigDict, vocab_size: int, *, loss: str,
                    converted: dict | None = None) -> two_tower.TwoTower:
  """The two-tower model of config.model trained by `loss` ('clip' | 'siglip').

  converted: the `two_tower.Model` kwargs of a converted checkpoint (Converted.config), whose
  architecture replaces config.model's towers; config.model's runtime settings and
  image.patch_dropout still apply (the loop stacks the checkpoint's per-layer params for
  scan=True: mmjax.models.scan.match_blocks).
  """
  model_cfg, run = config.model, runtime(config)
  if converted is not None:
    image = dict(converted["image"], patch_dropout=model_cfg.image.patch_dropout, **run)
    if model_cfg.image.norm is not None:   # e.g. 'batch': fine-tune an open_clip RN's BatchNorm
      if not image_lib.is_resnet(image):
        raise ValueError(f"config.model.image.norm={model_cfg.image.norm!r}: the checkpoint's "
                         "image tower is a ViT, which has no such field")
      image["norm"] = model_cfg.image.norm
    return two_tower.Model(
        image=image, text=dict(converted["text"], **run),
        **{k: v for k, v in converted.items() if k not in ("image", "text")}, **dtypes(config))
  image = tower_config(config, "image")
  image_proj = "dense"
  if image_lib.is_resnet(image) and resnet.pool_type(image) == "attn":
    # CLIP's ResNet: the attention pool's output projection is the one to embed_dim.
    image, image_proj = dict(image, output_dim=model_cfg.embed_dim), "none"
  return two_tower.TwoTower(
      image=image, image_proj=image_proj,
      text=tower_config(config, "text", vocab_size=vocab_size, max_len=config.data.text_len),
      embed_dim=model_cfg.embed_dim,
      **two_tower.inits(loss, model_cfg.temperature_init, model_cfg.bias_init), **dtypes(config))


def _check_coca_ids(coca_cfg, vocab_size: int, *, pad_id: int) -> None:
  """config.coca.bos_id (unless None) and eos_id: token ids of the tokenizer's vocabulary
  (an embedding gather clamps any other silently), neither the pad id."""
  for key in ("bos_id", "eos_id"):
    value = coca_cfg[key]
    if value is None and key == "bos_id":
      continue
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < vocab_size:
      raise ValueError(f"config.coca.{key}={value!r} must be a token id of the tokenizer's "
                       f"vocabulary [0, {vocab_size})")
    if value == pad_id:
      raise ValueError(f"config.coca.{key}={value!r} is the pad id")


def coca_model(config: ml_collections.ConfigDict, vocab_size: int) -> coca.CoCa:
  """The CoCa model of config.model (towers) and config.coca (decoder, pooler, text ids)."""
  model_cfg, coca_cfg = config.model, config.coca
  _check_coca_ids(coca_cfg, vocab_size, pad_id=0)
  image = tower_config(config, "image", pool_type=model_cfg.image.pool_type or "none")
  try:
    dims = vit.dims(model_cfg.text.variant, decode=text_lib.decode_variant,
                    **{k: model_cfg.text[k] for k in ("width", "depth", "mlp_dim", "num_heads")})
  except ValueError as e:
    raise ValueError(f"config.model.text.{e}") from None
  text = dict(dims, vocab_size=vocab_size, pad_id=0, correct_cls_mask=coca_cfg.correct_cls_mask,
              max_len=config.data.text_len + (coca_cfg.bos_id is not None), **runtime(config))
  decoder = dict(depth=coca_cfg.decoder_depth,
                 num_heads=coca_cfg.decoder_heads or dims["num_heads"], mlp_dim=dims["mlp_dim"])
  return coca.Model(image=image, text=text, decoder=decoder, embed_dim=model_cfg.embed_dim,
                    n_queries=coca_cfg.n_queries, pool_heads=coca_cfg.pool_heads,
                    bos_id=coca_cfg.bos_id, itm=coca_cfg.itm_weight > 0,
                    temperature_init=model_cfg.temperature_init, **dtypes(config))
