"""An audio tower, ImageBind-style: a ViT over the log-mel spectrogram seen as a one-channel image.

waveform [b, T] -> log_mel [b, frames, n_mels] (mmjax.nn.spectrogram) -> (x - mean) / std ->
image [b, frames, n_mels, 1] -> overlapping patches (kernel patch_size, stride patch_stride,
VALID: ImageBind's 16x16 kernels at stride 10) -> + learned positions -> mmjax.nn.layers.Encoder
-> pooled as the ViT's pool_type. The output contract is the image towers' (mmjax.models.image):
(pooled [b, width], {'encoded': [b, n, width]}), n = num_patches(fields) (+1 with pool_type='tok').

The input has a fixed length, T = sample_rate * clip_seconds (ImageBind: 2 s clips at 16 kHz,
128 mels, 201 frames with hop 160 -> 19 x 12 = 228 patches). mean / std default to AudioSet's
statistics as AST publishes them (-4.27, 4.57); AST and ImageBind divide by 2 * std (ImageBind's
std is 9.14), and those statistics are of Kaldi fbanks, close to but not the same as this front
end's: set mean / std from your own data.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax.models import vit
from mmjax.nn.layers import Encoder, MAPHead
from mmjax.nn.partitioning import constrain
from mmjax.nn.spectrogram import log_mel, num_frames

POOL_TYPES = ("tok", "gap", "map")


class AudioViT(nn.Module):
  """waveform [b, T] float -> (pooled [b, width], {'encoded': [b, n, width]}).

  Build it with `Model(variant, **overrides)` (or the fields of `config`); T must be
  sample_rate * clip_seconds. Params: 'embedding' (nn.Conv: kernel [ph, pw, 1, width], bias),
  'pos_embedding' [1, n, width], 'encoder' (mmjax.nn.layers.Encoder), 'cls' or 'map_head' by
  pool_type.
  """
  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  patch_size: tuple[int, int] = (16, 16)    # (frames, mels)
  patch_stride: tuple[int, int] = (10, 10)  # < patch_size: overlapping patches (ImageBind)
  pool_type: str = "map"                    # POOL_TYPES
  sample_rate: int = 16000
  clip_seconds: float = 2.0
  n_mels: int = 128
  n_fft: int = 400
  hop: int = 160
  mean: float = -4.27   # AudioSet log-mel statistics as AST publishes them (see the module doc)
  std: float = 4.57
  dropout: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  remat: bool = False
  remat_policy: str | None = None
  scan: bool = False
  attention_impl: str = "xla"
  act: str = "gelu"
  ln_eps: float = 1e-6

  @nn.compact
  def __call__(self, waveform: jax.Array, *, train: bool = False):
    length = clip_samples(self.sample_rate, self.clip_seconds)
    if waveform.ndim != 2 or waveform.shape[1] != length:
      raise ValueError(f"waveform {waveform.shape} must be [batch, sample_rate * clip_seconds] = "
                       f"[b, {self.sample_rate} * {self.clip_seconds} = {length}]")
    spec = log_mel(waveform, sample_rate=self.sample_rate, n_fft=self.n_fft, hop=self.hop,
                   n_mels=self.n_mels)                                   # [b, frames, mels]
    image = ((spec - self.mean) / self.std)[..., None].astype(self.dtype)
    width, kw = self.width, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = nn.Conv(width, tuple(self.patch_size), strides=tuple(self.patch_stride), padding="VALID",
                name="embedding", **kw)(image)                           # [b, h, w, width]
    b, h, w, _ = x.shape
    x = constrain(x.reshape(b, h * w, width), "batch", "seq", "embed")
    pe = self.param("pos_embedding", nn.initializers.normal(0.02), (1, h * w, width),
                    self.param_dtype)
    x = x + pe.astype(x.dtype)
    if self.pool_type == "tok":
      cls = self.param("cls", nn.initializers.zeros, (1, 1, width), self.param_dtype)
      x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, width)).astype(x.dtype), x], axis=1)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    x = Encoder(depth=self.depth, num_heads=self.num_heads, mlp_dim=self.mlp_dim,
                dropout=self.dropout, attention_impl=self.attention_impl, remat=self.remat,
                remat_policy=self.remat_policy, scan=self.scan, act=self.act,
                ln_eps=self.ln_eps, name="encoder", **kw)(x, train=train)
    if self.pool_type == "tok":
      pooled = x[:, 0]
    elif self.pool_type == "gap":
      pooled = x.mean(axis=1)
    else:
      pooled = MAPHead(self.num_heads, self.mlp_dim, attention_impl=self.attention_impl,
                       act=self.act, ln_eps=self.ln_eps, name="map_head", **kw)(x)
    return constrain(pooled, "batch", "embed"), {"encoded": x}


def clip_samples(sample_rate: int, clip_seconds: float) -> int:
  """T = sample_rate * clip_seconds, the fixed input length (ValueError if not whole)."""
  samples = sample_rate * clip_seconds
  if samples != round(samples) or samples <= 0:
    raise ValueError(f"clip_seconds: sample_rate * clip_seconds = {sample_rate} * {clip_seconds} "
                     "must be a positive whole number of samples")
  return int(round(samples))


def patch_grid(fields: dict) -> tuple[int, int]:
  """(h, w): patches along frames and mels, (size - patch) // stride + 1 each (VALID)."""
  f = {**_defaults(), **fields}
  frames = num_frames(clip_samples(f["sample_rate"], f["clip_seconds"]), n_fft=f["n_fft"],
                      hop=f["hop"])
  (ph, pw), (sh, sw) = f["patch_size"], f["patch_stride"]
  return (frames - ph) // sh + 1, (f["n_mels"] - pw) // sw + 1


def num_patches(fields: dict) -> int:
  """The encoder's patch tokens (no class token): h * w of `patch_grid`."""
  h, w = patch_grid(fields)
  return h * w


def _defaults() -> dict:
  return {f.name: f.default for f in dataclasses.fields(AudioViT)
          if f.default is not dataclasses.MISSING}


def _pair(name, value) -> tuple[int, int]:
  pair = tuple(int(p) for p in np.broadcast_to(value, 2))
  if min(pair) < 1:
    raise ValueError(f"{name}={value!r} must be positive")
  return pair


def config(variant: str | None = None, **fields) -> dict[str, Any]:
  """The complete, checked fields of an `AudioViT`: the ViT variant ('B/16': width, depth,
  mlp_dim, num_heads, patch 16) decoded once by mmjax.models.vit, overrides applied (None = the
  variant's), patch_size / patch_stride an int or a pair. Every ValueError starts with the
  field it is about."""
  dims = {k: fields.pop(k, None) for k in ("width", "depth", "mlp_dim", "num_heads",
                                           "patch_size")}
  out = vit.dims(variant, **dims)
  unknown = set(fields) - {f.name for f in dataclasses.fields(AudioViT)}
  if unknown:
    raise ValueError(f"{sorted(unknown)[0]}: not an AudioViT field")
  out.update(fields)
  for name in ("patch_size", "patch_stride"):
    if name in out:
      out[name] = _pair(name, out[name])
  settings = {**_defaults(), **out}
  vit._check_choice("pool_type", settings["pool_type"], POOL_TYPES)
  clip_samples(settings["sample_rate"], settings["clip_seconds"])
  h, w = patch_grid(settings)
  if h < 1 or w < 1:
    raise ValueError(f"patch_size: {settings['patch_size']} is larger than the spectrogram "
                     f"[frames, n_mels] of {settings['clip_seconds']} s at hop {settings['hop']} "
                     f"with n_mels={settings['n_mels']}")
  return out


def Model(variant: str | None = None, **fields) -> AudioViT:  # noqa: N802  (vit.Model's shape)
  """AudioViT from a ViT variant name ('B/16') and overrides, decoded and checked once."""
  name, parent = fields.pop("name", None), fields.pop("parent", None)
  kw = {} if parent is None else {"parent": parent}
  return AudioViT(**config(variant, **fields), name=name, **kw)
