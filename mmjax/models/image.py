"""The image tower of any model, chosen by variant through a registry: a ViT ('B/16'), a
ResNet ('RN50', 'BiT-R50x1'), a NaFlex ViT (tower='naflex': native aspect ratios, packed
sequences; its input is a dict, mmjax.models.naflex), or any kind registered with `register`.

Every tower maps image [b, H, W, 3] -> (pooled [b, d], {'encoded': [b, n, c] tokens}) and
lives under the model's 'img' params, so every objective takes any of them. `config` decodes
a variant and overrides once into complete fields, which name their kind under the key
'tower'; `Tower(fields)` builds the module.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp

from mmjax.models import naflex, resnet, vit

KIND = "tower"   # the complete fields' key naming their kind


@dataclasses.dataclass(frozen=True)
class ImageTower:
  """A kind of image tower.

  claims(variant, fields) -> whether a variant name / raw fields are this kind (the default
  kind, 'vit', takes whatever no other claims); config(variant, **fields) -> complete checked
  fields (a ValueError starting with the field it is about); module(**fields, name=) -> the
  Flax module; width(fields) -> the pooled output's width; uses_batch_stats(fields) -> whether
  it normalises by batch statistics at train time (BatchNorm); example(fields, image_size) ->
  an input of one image that initialises it (default: zeros [1, S, S, 3]).
  """
  name: str
  claims: Callable[[Any, dict], bool]
  config: Callable[..., dict]
  module: Callable[..., nn.Module]
  width: Callable[[dict], int] = lambda fields: fields["width"]
  uses_batch_stats: Callable[[dict], bool] = lambda fields: False
  example: Callable[[dict, int], Any] = lambda fields, size: jnp.zeros((1, size, size, 3))


TOWERS: dict[str, ImageTower] = {}
DEFAULT = "vit"


def register(tower: ImageTower) -> ImageTower:
  """Adds (or replaces) an image tower kind; config.model.image.variant then selects it."""
  TOWERS[tower.name] = tower
  return tower


register(ImageTower("vit", claims=lambda variant, fields: False, config=vit.config,
                    module=vit.ViT))
register(ImageTower("naflex", claims=lambda variant, fields: False, config=naflex.config,
                    module=naflex.NaFlexViT, example=naflex.example_input))
register(ImageTower(
    "resnet", claims=lambda variant, fields: (resnet.is_variant(variant)
                                              or fields.get("layers") is not None),
    config=resnet.config, module=resnet.ResNet, width=resnet.features,
    uses_batch_stats=lambda fields: fields.get("norm") == "batch"))


def kind(fields: dict, variant: Any = None) -> ImageTower:
  """The kind complete fields name (or raw fields and a variant claim)."""
  if KIND in fields:
    if fields[KIND] not in TOWERS:
      raise ValueError(f"{KIND}={fields[KIND]!r} is not a registered image tower "
                       f"({sorted(TOWERS)})")
    return TOWERS[fields[KIND]]
  claimed = [t for name, t in TOWERS.items() if name != DEFAULT and t.claims(variant, fields)]
  return claimed[-1] if claimed else TOWERS[DEFAULT]   # the latest registration wins


def config(variant: str | None = None, **fields) -> dict[str, Any]:
  """The complete, checked fields of the tower `variant` names (or the given kind's), with
  their kind under 'tower', decoded once."""
  tower = kind(fields, variant)
  fields.pop(KIND, None)
  return {**tower.config(variant, **fields), KIND: tower.name}


def _fields(fields: dict) -> dict:
  return {k: v for k, v in fields.items() if k != KIND}


def Tower(fields: dict, name: str = "img") -> nn.Module:  # noqa: N802
  """The tower module of complete fields (as `config` returns them)."""
  return kind(fields).module(**_fields(fields), name=name)


def is_resnet(fields: dict) -> bool:
  """Whether complete tower fields describe a ResNet."""
  return kind(fields).name == "resnet"


def uses_batch_stats(fields: dict) -> bool:
  """Whether complete tower fields describe a tower with BatchNorm on batch statistics at
  train time: its train-time forward sows 'batch_stats'."""
  return kind(fields).uses_batch_stats(_fields(fields))


def example_input(fields: dict, image_size: int):
  """One image as complete tower fields' module takes it (initialisation, shapes)."""
  return kind(fields).example(_fields(fields), image_size)


def width(fields: dict) -> int:
  """The pooled output's width of complete tower fields."""
  return kind(fields).width(_fields(fields))


def around(cls, image: dict, **fields):
  """cls(image=config(**image), **fields): a model built around an image tower (MoCo,
  CatLIP), the tower given as variant and overrides and decoded once here."""
  return cls(image=config(**image), **fields)
