"""ImageBind-style binding: a two-tower model plus a tower per extra modality, each bound to an
anchor ('image' or 'text') by its own contrastive head.

The image and text towers, their projections and the image-text head (t, b) keep TwoTower's
param names ('img', 'txt', 'img_proj', 'txt_proj', 't', 'b'), so a CLIP / SigLIP run's params
load into them (config.init_from); modality m adds params m (its tower), f'{m}_proj' (to
embed_dim, no bias) and, per bound pair (anchor, m), t_{anchor}_{m} (and b_{anchor}_{m}),
initialised as the image-text head.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models import audio as audio_lib
from mmjax.models.two_tower import TwoTower
from mmjax.nn.linear import Dense
from mmjax.numerics import l2_normalize

ANCHORS = ("image", "text")   # what an extra modality is bound to: the two-tower's embeddings


def _audio_input(fields: dict) -> jax.Array:
  return jnp.zeros((1, audio_lib.clip_samples(fields.get("sample_rate", 16000),
                                              fields.get("clip_seconds", 2.0))), jnp.float32)


# name -> (its tower class, fields -> complete checked fields, fields -> a dummy input [1, ...]).
MODALITIES: dict[str, tuple[type[nn.Module], Callable, Callable]] = {
    "audio": (audio_lib.AudioViT, audio_lib.config, _audio_input),
}


class Bind(TwoTower):
  """TwoTower (image, text; same fields) + `modalities` {name: complete tower fields} bound by
  `pairs` ((anchor, modality), ...), anchor one of ANCHORS.

  encode(name, x) -> unit-norm float32 [b, embed_dim] for 'image', 'text' or a modality;
  pair_head(anchor, modality) -> {'scale' = exp(t_{anchor}_{modality})[, 'bias']}.
  """
  modalities: dict | None = None
  pairs: tuple = ()

  def setup(self):
    super().setup()
    for name, fields in (self.modalities or {}).items():
      # setattr in setup: the tower's param name is the modality's.
      setattr(self, name, MODALITIES[name][0](**fields))
      setattr(self, f"{name}_proj", Dense(self.embed_dim, use_bias=False, dtype=self.dtype,
                                         param_dtype=self.param_dtype))
    for anchor, modality in self.pairs:
      key = f"{anchor}_{modality}"
      setattr(self, f"t_{key}", self.param(
          f"t_{key}", nn.initializers.constant(math.log(self.temperature_init)), (), jnp.float32))
      if self.bias_init is not None:
        setattr(self, f"b_{key}", self.param(f"b_{key}", nn.initializers.constant(
            self.bias_init), (), jnp.float32))

  def encode(self, name: str, x: jax.Array, *, train: bool = False) -> jax.Array:
    """x: the input of `name`'s tower ([b, H, W, 3] image, [b, L] tokens, [b, T] waveform) ->
    [b, embed_dim] float32, unit norm."""
    if name == "image":
      return self.encode_image(x, train=train)
    if name == "text":
      return self.encode_text(x, train=train)
    pooled, _ = getattr(self, name)(x, train=train)
    return l2_normalize(getattr(self, f"{name}_proj")(pooled))

  def embed(self, inputs: dict, *, train: bool = False) -> dict:
    """{name: x} -> {name: encode(name, x)} (also the init: every tower and head at once)."""
    return {name: self.encode(name, x, train=train) for name, x in inputs.items()}

  def pair_head(self, anchor: str, modality: str) -> dict:
    """{'scale': exp(t_{anchor}_{modality}) []} (+ 'bias' when the model has biases)."""
    key = f"{anchor}_{modality}"
    out = {"scale": jnp.exp(getattr(self, f"t_{key}"))}
    if self.bias_init is not None:
      out["bias"] = getattr(self, f"b_{key}")
    return out


def dummy_inputs(model: Bind) -> dict:
  """{modality: a zero input [1, ...]} for each of the model's extra towers."""
  return {name: MODALITIES[name][2](fields) for name, fields in (model.modalities or {}).items()}


def Model(base: TwoTower, modalities: dict, pairs, **fields: Any) -> Bind:  # noqa: N802
  """A Bind with base's two towers and every other field of it, modalities' towers {name:
  fields} decoded and checked once (ValueError starting '<name>.<field>'), pairs checked."""
  towers = {}
  for name, tower in modalities.items():
    if name not in MODALITIES:
      raise ValueError(f"modalities: {name!r} is not one of {tuple(MODALITIES)}")
    try:
      towers[name] = MODALITIES[name][1](**tower)
    except ValueError as e:
      raise ValueError(f"{name}.{e}") from None
  pairs = tuple(tuple(p) for p in pairs)
  for anchor, modality in pairs:
    if anchor not in ANCHORS or modality not in towers:
      raise ValueError(f"pairs: {(anchor, modality)!r} must be (one of {ANCHORS}, one of "
                       f"{tuple(towers)})")
  kw = {f: getattr(base, f) for f in ("image", "text", "embed_dim", "temperature_init",
                                      "bias_init", "image_proj", "text_proj", "dtype",
                                      "param_dtype")}
  return Bind(**kw, modalities=towers, pairs=pairs, **fields)
