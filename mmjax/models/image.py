"""The image tower of any model: a ViT ('B/16') or a ResNet ('RN50', 'BiT-R50x1'), by variant.

Both map image [b, H, W, 3] -> (pooled [b, d], {'encoded': [b, n, c] tokens}) and live
under the model's 'img' params, so every objective takes either.
"""

from __future__ import annotations

from typing import Any

from mmjax.models import resnet, vit


def is_resnet(fields: dict) -> bool:
  """Whether complete tower fields (config's output) describe a ResNet."""
  return "layers" in fields


def uses_batch_stats(fields: dict) -> bool:
  """Whether complete tower fields describe a tower with BatchNorm on batch statistics at
  train time (resnet norm='batch'): its train-time forward sows 'batch_stats'."""
  return is_resnet(fields) and fields.get("norm") == "batch"


def config(variant: str | None = None, **fields) -> dict[str, Any]:
  """The complete, checked fields of the tower `variant` names (resnet.config for 'RN50',
  'BiT-R50x1', or when `layers` is given; else vit.config), decoded once."""
  if resnet.is_variant(variant) or fields.get("layers") is not None:
    return resnet.config(variant, **fields)
  return vit.config(variant, **fields)


def Tower(fields: dict, name: str = "img"):  # noqa: N802
  """The tower module of complete fields (as `config` returns them)."""
  return resnet.ResNet(**fields, name=name) if is_resnet(fields) else vit.ViT(**fields, name=name)


def width(fields: dict) -> int:
  """The pooled output's width of complete tower fields."""
  return resnet.features(fields) if is_resnet(fields) else fields["width"]


def around(cls, image: dict, **fields):
  """cls(image=config(**image), **fields): a model built around an image tower (MoCo,
  CatLIP), the tower given as variant and overrides and decoded once here."""
  return cls(image=config(**image), **fields)
