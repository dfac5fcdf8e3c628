"""ResNet image towers: CLIP's modified ResNet (RN50 ... RN50x64) and BiT (GroupNorm + WS).

  'clip' (Radford et al. 2021, open_clip's ModifiedResNet): a stem of three 3x3 convolutions
      and a 2x2 average pool; bottleneck blocks whose stride is a 2x2 average pool after the
      3x3 convolution (and before the shortcut's 1x1 one: anti-aliased downsampling); the
      final grid pooled by attention, the grid's mean as the query, to `output_dim`.
  'bit' (Kolesnikov et al. 2020, as big_vision's bit.py): weight-standardised convolutions
      with GroupNorm, a 7x7 stride-2 stem and a 3x3 max pool, strided 3x3 convolutions, global
      average pooling.

Norms: 'group' GroupNorm; 'batch' BatchNorm as torch trains it (at train time the batch's
statistics, over the global batch under jit on a mesh, and running averages kept for
evaluation); 'frozen_bn' BatchNorm on fixed statistics (open_clip's checkpoints convert to it,
as open_clip's `lock(freeze_bn_stats=True)`). BatchNorm's running mean and var are the
'batch_stats' collection (Flax's convention: the train state keeps it beside the params, the
optimizer never sees it); in 'batch' mode a train-time forward pass applied with
mutable=['batch_stats'] returns them moved.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.nn import precision
from mmjax.nn.attention import MultiHeadAttention
from mmjax.nn.layers import remat_policy
from mmjax.nn.partitioning import constrain

# name: (blocks per stage, stem width): open_clip's model_configs/RN*.json.
CLIP_VARIANTS = {
    "RN50": ((3, 4, 6, 3), 64),
    "RN101": ((3, 4, 23, 3), 64),
    "RN50x4": ((4, 6, 10, 6), 80),
    "RN50x16": ((6, 8, 18, 8), 96),
    "RN50x64": ((3, 15, 36, 10), 128),
}
BIT_DEPTHS = {26: (2, 2, 2, 2), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
STYLES = ("clip", "bit")
NORMS = ("group", "batch", "frozen_bn")
BN_MOMENTUM = 0.1   # torch's: running = (1 - m) * running + m * batch statistic
POOL_TYPES = ("attn", "gap", "none")
_BIT = re.compile(r"BiT-R(\d+)x(\d+)$")


def is_variant(variant) -> bool:
  """True for a name of the ResNet family ('RN50', 'BiT-R50x1', also unknown ones like 'RN51',
  whose decoding then names the known ones); False for anything else."""
  return isinstance(variant, str) and variant.startswith(("RN", "BiT-"))


def decode_variant(variant: str) -> dict[str, Any]:
  """'RN50' -> dict(style='clip', layers=(3, 4, 6, 3), width=64, num_heads=32);
  'BiT-R50x3' -> dict(style='bit', layers=(3, 4, 6, 3), width=192). width: the stem's; the
  features are width * 32 wide. CLIP's attention pool has one head per 64 channels."""
  if variant in CLIP_VARIANTS:
    layers, width = CLIP_VARIANTS[variant]
    return dict(style="clip", layers=layers, width=width, num_heads=width * 32 // 64)
  m = _BIT.match(str(variant))
  if m and int(m.group(1)) in BIT_DEPTHS and int(m.group(2)) >= 1:
    return dict(style="bit", layers=BIT_DEPTHS[int(m.group(1))], width=64 * int(m.group(2)))
  raise ValueError(f"Unknown ResNet variant {variant!r}; known: {sorted(CLIP_VARIANTS)} and "
                   f"'BiT-R<depth>x<k>' with depth in {sorted(BIT_DEPTHS)}, e.g. 'BiT-R50x1'")


def config(variant: str | None = None, **fields) -> dict[str, Any]:
  """The complete, checked fields of a `ResNet`: the variant decoded, non-None overrides
  applied. `scan` (a ViT's and text tower's option) is accepted and does nothing here;
  `patch_dropout` (FLIP's) must be 0. Every ValueError starts with the field it is about."""
  fields.pop("scan", None)   # config.model.scan stacks transformer blocks: a ResNet has none
  patch_dropout = fields.pop("patch_dropout", 0.0)
  if patch_dropout:
    raise ValueError(f"patch_dropout={patch_dropout}: FLIP drops a ViT's patch tokens; a "
                     "ResNet has none (use 0)")
  try:
    out = decode_variant(variant) if variant else {}
  except ValueError as e:
    raise ValueError(f"variant: {e}") from None
  known = {f.name for f in dataclasses.fields(ResNet)} - {"parent", "name"}
  unknown = sorted(k for k, v in fields.items() if k not in known and v is not None)
  if unknown:
    raise ValueError(f"{unknown[0]}: not a ResNet field (a ViT's?)")
  out.update({k: v for k, v in fields.items() if v is not None})
  missing = [k for k in ("layers", "width") if k not in out]
  if missing:
    raise ValueError(f"{missing[0]}: not given; name a variant ('RN50', 'BiT-R50x1') or give "
                     "layers and width")
  out["layers"] = tuple(int(n) for n in out["layers"])
  if len(out["layers"]) != 4 or min(out["layers"]) < 1:
    raise ValueError(f"layers={out['layers']} must be 4 stage depths >= 1")
  s = _with_defaults(out)
  for field, choices in (("style", STYLES), ("norm", NORMS), ("pool_type", POOL_TYPES)):
    if s[field] is not None and s[field] not in choices:
      raise ValueError(f"{field}={s[field]!r} is not one of {choices}")
  if s["style"] == "bit" and s["pool_type"] == "attn":
    raise ValueError("pool_type='attn': BiT pools by its global average ('gap'); 'attn' is "
                     "CLIP's ResNet's")
  if s["style"] == "clip" and s["width"] % 2:
    raise ValueError(f"width={s['width']} must be even (the stem's first convolutions are "
                     "width / 2 wide)")
  heads = s["num_heads"]
  if pool_type(s) == "attn" and (not heads or (s["width"] * 32) % heads):
    raise ValueError(f"num_heads={s['num_heads']} must divide the features ({s['width'] * 32})")
  return out


def _with_defaults(fields: dict) -> dict:
  return {**{f.name: f.default for f in dataclasses.fields(ResNet)
             if f.default is not dataclasses.MISSING and f.name not in ("parent", "name")},
          **fields}


def settings(**fields) -> dict[str, Any]:
  """Every field of a ResNet: `config(**fields)` (decoded, checked), the rest the defaults."""
  return _with_defaults(config(**fields))


def pool_type(fields: dict) -> str:
  """The pooling a ResNet with these fields uses (None: 'attn' for CLIP's, 'gap' for BiT)."""
  given = fields.get("pool_type")
  return given or ("attn" if fields.get("style", "clip") == "clip" else "gap")


def features(fields: dict) -> int:
  """The pooled output's width: output_dim for the attention pool, else width * 32."""
  if pool_type(fields) == "attn" and fields.get("output_dim"):
    return fields["output_dim"]
  return fields["width"] * 32


class Conv(nn.Module):
  """A bias-free 2-D convolution, NHWC; kernel [k, k, in, out] (torch's OIHW transposed),
  symmetric zero padding k // 2; a 1x1 one is computed as the matmul it is. standardize:
  BiT's weight standardisation (each output channel's kernel to zero mean, unit variance)."""
  features: int
  kernel: int
  stride: int = 1
  standardize: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k = self.kernel
    w = self.param("kernel", nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
                   (k, k, x.shape[-1], self.features), self.param_dtype)
    if self.standardize:
      w32 = w.astype(jnp.float32)
      mean = w32.mean(axis=(0, 1, 2), keepdims=True)
      var = ((w32 - mean) ** 2).mean(axis=(0, 1, 2), keepdims=True)
      w = (w32 - mean) * jax.lax.rsqrt(var + 1e-6)
    if k == 1:   # a 2-D matmul over the channels (XLA:CPU runs it much faster than a conv)
      x = x[:, ::self.stride, ::self.stride] if self.stride > 1 else x
      return precision.dense(x.astype(self.dtype), w[0, 0], 1)
    p = k // 2
    return jax.lax.conv_general_dilated(
        x.astype(self.dtype), w.astype(self.dtype), (self.stride, self.stride),
        ((p, p), (p, p)), dimension_numbers=("NHWC", "HWIO", "NHWC"))


class Norm(nn.Module):
  """A per-channel norm of [b, H, W, c]: 'frozen_bn' (x - mean) / sqrt(var + 1e-5) * scale +
  bias on fixed statistics (torch's BatchNorm2d in eval mode); 'batch' the same at evaluation
  and, at train time, the batch's mean and (biased) variance over (b, H, W) in their place,
  the running mean and var moved towards the batch's mean and unbiased variance (torch's
  BatchNorm2d in train mode, momentum BN_MOMENTUM); 'group' GroupNorm over gcd(32, c) groups
  (BiT's 32, fewer for narrow towers). The statistics are the 'batch_stats' collection:
  apply with mutable=['batch_stats'] at train time to get the moved ones."""
  kind: str = "group"
  zero_init: bool = False      # scale starts at 0 (a block's last norm)
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    c = x.shape[-1]
    p = lambda name, init: self.param(name, init, (c,), self.param_dtype).astype(jnp.float32)
    scale = p("scale", nn.initializers.zeros if self.zero_init else nn.initializers.ones)
    bias = p("bias", nn.initializers.zeros)
    x32 = x.astype(jnp.float32)
    if self.kind in ("frozen_bn", "batch"):
      stat = lambda name, init: self.variable("batch_stats", name, init, (c,), jnp.float32)
      running_mean, running_var = stat("mean", jnp.zeros), stat("var", jnp.ones)
      mean, var = running_mean.value, running_var.value
      if self.kind == "batch" and train:
        # One pass over x for both moments (XLA fuses the two reductions), shifted by the
        # first example's mean so that E[d^2] - E[d]^2 does not cancel (the batch's mean may
        # sit many standard deviations from 0 or from the running mean).
        ref = jax.lax.stop_gradient(x32[0].mean(axis=(0, 1)))
        d = x32 - ref
        shift, sq = d.mean(axis=(0, 1, 2)), (d * d).mean(axis=(0, 1, 2))
        mean, var = ref + shift, jnp.maximum(sq - shift * shift, 0.0)
        if not self.is_initializing():
          n, m = x.size // c, BN_MOMENTUM
          unbiased = jax.lax.stop_gradient(var) * (n / max(n - 1, 1))
          running_mean.value = (1 - m) * running_mean.value + m * jax.lax.stop_gradient(mean)
          running_var.value = (1 - m) * running_var.value + m * unbiased
      mul = scale * jax.lax.rsqrt(var + 1e-5)
      # (x - mean) first: x * mul - mean * mul would cancel where mean >> std.
      return ((x32 - mean) * mul + bias).astype(self.dtype)
    g = math.gcd(32, c)
    xg = x32.reshape(*x.shape[:-1], g, c // g)
    mean = xg.mean(axis=(1, 2, 4), keepdims=True)
    var = ((xg - mean) ** 2).mean(axis=(1, 2, 4), keepdims=True)
    y = ((xg - mean) * jax.lax.rsqrt(var + 1e-5)).reshape(x.shape)
    return (y * scale + bias).astype(self.dtype)


class Bottleneck(nn.Module):
  """1x1 -> 3x3 -> 1x1 (x4 wide) with a shortcut; [b, H, W, c] -> [b, H/s, W/s, 4 planes].
  The last norm starts at zero, so every block starts as its shortcut."""
  planes: int
  stride: int = 1
  style: str = "clip"
  norm: str = "group"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    bit, s, out = self.style == "bit", self.stride, self.planes * 4
    conv = lambda f, k, name, stride=1: Conv(f, k, stride, standardize=bit, name=name, **kw)
    norm = lambda name, zero=False: lambda y: Norm(self.norm, zero, name=name, **kw)(y, train)
    y = nn.relu(norm("norm1")(conv(self.planes, 1, "conv1")(x)))
    y = nn.relu(norm("norm2")(conv(self.planes, 3, "conv2", s if bit else 1)(y)))
    if s > 1 and not bit:
      y = nn.avg_pool(y, (s, s), (s, s))
    y = norm("norm3", zero=True)(conv(out, 1, "conv3")(y))
    shortcut = x
    if s > 1 or x.shape[-1] != out:
      if s > 1 and not bit:
        shortcut = nn.avg_pool(shortcut, (s, s), (s, s))
      shortcut = norm("down_norm")(conv(out, 1, "down_conv", s if bit else 1)(shortcut))
    return nn.relu(y + shortcut)


class ResNet(nn.Module):
  """ResNet: image [b, H, W, 3] -> (pooled [b, features], {'encoded': [b, h*w, width*32]}).

  The final grid is (H/32, W/32); 'encoded' is it flattened row-major (CoCa reads it as the
  image tokens). Build it with `Model(variant, **overrides)` or the fields of `config`.
  pooled: 'attn' -> [b, output_dim or width*32]; 'gap' -> [b, width*32]; 'none' -> the
  tokens [b, h*w, width*32].
  """
  layers: tuple[int, ...]
  width: int = 64              # the stem's; stage i has width * 2**i planes, 4x that out
  style: str = "clip"          # STYLES
  norm: str = "group"          # NORMS (open_clip's checkpoints: 'frozen_bn')
  pool_type: str | None = None  # POOL_TYPES; None: 'attn' for 'clip', 'gap' for 'bit'
  num_heads: int | None = None  # the attention pool's
  output_dim: int | None = None  # the attention pool's output (CLIP: embed_dim); None: features
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  remat: bool = False
  remat_policy: str | None = None   # mmjax.nn.layers.REMAT_POLICIES; implies remat
  attention_impl: str = "xla"

  @nn.compact
  def __call__(self, image: jax.Array, *, train: bool = False, keep=None):
    """train: BatchNorm ('batch') on the batch's statistics, sown into 'batch_stats';
    keep: must be None (MAE's)."""
    if keep is not None:
      raise ValueError("keep: MAE's patch subset applies to a ViT, not a ResNet")
    if image.ndim != 4 or min(image.shape[1:3]) < 32:
      raise ValueError(f"image must be [b, H, W, C] with H, W >= 32; got shape {image.shape}")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    bit, w = self.style == "bit", self.width
    norm = lambda name: lambda y: Norm(self.norm, name=name, **kw)(y, train)
    x = image.astype(self.dtype)
    if bit:
      x = nn.relu(norm("stem_norm")(Conv(w, 7, 2, standardize=True, name="stem_conv", **kw)(x)))
      x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
    else:
      for i, (f, s) in enumerate(((w // 2, 2), (w // 2, 1), (w, 1)), start=1):
        x = nn.relu(norm(f"stem_norm{i}")(Conv(f, 3, s, name=f"stem_conv{i}", **kw)(x)))
      x = nn.avg_pool(x, (2, 2), (2, 2))
    block = Bottleneck
    if self.remat or self.remat_policy:
      block = nn.remat(Bottleneck, policy=remat_policy(self.remat_policy), static_argnums=(2,))
    for stage, depth in enumerate(self.layers):
      for i in range(depth):
        stride = 2 if stage > 0 and i == 0 else 1
        x = block(w * 2 ** stage, stride, self.style, self.norm, name=f"stage{stage + 1}_{i}",
                  **kw)(x, train)
    b, h, ww, c = x.shape
    tokens = x.reshape(b, h * ww, c)
    out = {"encoded": tokens}
    kind = pool_type(dict(pool_type=self.pool_type, style=self.style))
    if kind == "gap":
      pooled = tokens.mean(axis=1)
    elif kind == "attn":
      pooled = AttentionPool(self.num_heads, self.output_dim, impl=self.attention_impl,
                             name="attnpool", **kw)(tokens)
    else:
      return tokens, out
    return constrain(pooled, "batch", "embed"), out


class AttentionPool(nn.Module):
  """CLIP's attention pooling: the tokens' mean, prepended, is the one query; a learnt
  position embedding [n + 1, c] on all. tokens [b, n, c] -> [b, output_dim or c]."""
  num_heads: int
  output_dim: int | None = None
  impl: str = "xla"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    _, n, c = tokens.shape
    pe = self.param("pos_embedding", nn.initializers.normal(c ** -0.5), (n + 1, c),
                    self.param_dtype)
    x = jnp.concatenate([tokens.mean(axis=1, keepdims=True), tokens], axis=1)
    x = x + pe.astype(x.dtype)[None]
    y = MultiHeadAttention(self.num_heads, dtype=self.dtype, param_dtype=self.param_dtype,
                           impl=self.impl, kernel_init=nn.initializers.normal(c ** -0.5),
                           out_features=self.output_dim, name="attn")(x[:, :1], x)
    return y[:, 0]


def Model(variant: str | None = None, **fields) -> ResNet:  # noqa: N802  (big_vision's factory)
  """ResNet from a variant name ('RN50', 'BiT-R50x1') and overrides, decoded and checked."""
  name = fields.pop("name", None)
  return ResNet(**config(variant, **fields), name=name)
