"""Vision Transformer encoder (pre-LN), variants named as in big_vision ('B/16')."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax.nn import precision
from mmjax.nn.layers import Encoder, MAPHead, posemb_sincos_2d
from mmjax.nn.linear import LayerNorm, add_bias
from mmjax.nn.partitioning import constrain

# name: (width, depth, mlp_dim, num_heads), the big_vision table.
VARIANTS = {
    "mu": (32, 1, 128, 2),
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "M": (512, 12, 2048, 8),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
    "So400m": (1152, 27, 4304, 16),
    "H": (1280, 32, 5120, 16),
    "g": (1408, 40, 6144, 16),
    "G": (1664, 48, 8192, 16),
}


def decode_variant(variant: str) -> dict[str, Any]:
  """'B/16' -> dict(width=768, depth=12, mlp_dim=3072, num_heads=12, patch_size=(16, 16)).

  The '/<patch>' suffix is optional (text towers have none).
  """
  name, _, patch = str(variant).partition("/")
  if name not in VARIANTS or (patch and not patch.isdigit()):
    raise ValueError(f"Unknown ViT variant {variant!r}; known: {sorted(VARIANTS)} "
                     "with an optional '/<patch>' suffix, e.g. 'B/16'")
  width, depth, mlp_dim, num_heads = VARIANTS[name]
  out = dict(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=num_heads)
  if patch:
    out["patch_size"] = (int(patch), int(patch))
  return out


POOL_TYPES = ("tok", "gap", "map", "none")
POSEMBS = ("learn", "sincos2d")


def _check_choice(field: str, value, choices) -> None:
  if value not in choices:
    raise ValueError(f"{field}={value!r} is not one of {choices}")


def dims(variant: str | None, *, decode=None, **overrides) -> dict[str, Any]:
  """The variant's numbers (width, depth, mlp_dim, num_heads[, patch_size]) with
  every non-None override applied; ValueError (starting with the field) if one
  is missing. decode: the variant decoder (default decode_variant)."""
  try:
    out = (decode or decode_variant)(variant) if variant else {}
  except ValueError as e:
    raise ValueError(f"variant: {e}") from None
  out.update({k: v for k, v in overrides.items() if v is not None})
  missing = [k for k in ("width", "depth", "mlp_dim", "num_heads") if k not in out]
  if missing:
    raise ValueError(f"variant: None and {missing} are not given")
  return out


def config(variant: str | None = None, **fields) -> dict[str, Any]:
  """The complete, checked fields of a `ViT`: the variant decoded once, overrides
  applied (None = the variant's), patch_size an int or a pair. Every ValueError
  starts with the field it is about."""
  width, depth, mlp_dim, num_heads, patch = (fields.pop(k, None) for k in (
      "width", "depth", "mlp_dim", "num_heads", "patch_size"))
  if patch is not None:
    patch = tuple(int(p) for p in np.broadcast_to(patch, 2))
  out = dims(variant, width=width, depth=depth, mlp_dim=mlp_dim, num_heads=num_heads,
             patch_size=patch)
  if "patch_size" not in out:
    raise ValueError(f"patch_size: none given; use a variant 'X/<patch>' or patch_size "
                     f"(variant={variant!r})")
  unknown = set(fields) - {f.name for f in dataclasses.fields(ViT)}
  if unknown:
    raise ValueError(f"{sorted(unknown)[0]}: not a ViT field")
  out.update(fields)
  settings = {**{f.name: f.default for f in dataclasses.fields(ViT)
                 if f.default is not dataclasses.MISSING}, **out}
  _check_choice("pool_type", settings["pool_type"], POOL_TYPES)
  _check_choice("posemb", settings["posemb"], POSEMBS)
  if settings["posemb_cls"] and (settings["posemb"], settings["pool_type"]) != ("learn", "tok"):
    raise ValueError(f"posemb_cls=True needs posemb='learn' and pool_type='tok'; got "
                     f"posemb={settings['posemb']!r}, pool_type={settings['pool_type']!r}")
  if not 0.0 <= settings["patch_dropout"] < 1.0:
    raise ValueError(f"patch_dropout={settings['patch_dropout']} must be in [0, 1)")
  return out


def around(cls, image: dict, **fields):
  """cls(image=config(**image), **fields): a model built around a ViT (MAE, MoCo),
  its tower given as `Model` arguments (variant and overrides) and decoded once here."""
  return cls(image=config(**image), **fields)


def Model(variant: str | None = None, **fields) -> "ViT":  # noqa: N802  (big_vision's factory)
  """ViT from a variant name ('B/16') and overrides, decoded and checked once:
  `vit.Model("B/16", pool_type="tok")` is `ViT(**config("B/16", pool_type="tok"))`."""
  name, parent = fields.pop("name", None), fields.pop("parent", None)
  kw = {} if parent is None else {"parent": parent}
  return ViT(**config(variant, **fields), name=name, **kw)


def random_keep(rng: jax.Array, b: int, n: int, n_keep: int) -> jax.Array:
  """[b, n_keep] int32: a random subset of the n token positions per example, sorted."""
  noise = jax.random.uniform(rng, (b, n))
  return jnp.sort(jnp.argsort(noise, axis=1)[:, :n_keep], axis=1).astype(jnp.int32)


class PatchEmbed(nn.Module):
  """Non-overlapping patches times a kernel: [b, H, W, c] -> [b, H / ph, W / pw, width]. The
  params are nn.Conv's (kernel [ph, pw, c, width], bias [width], the same initialisers); in bf16
  where mmjax.nn.precision applies, one matmul over the patchified image (XLA:CPU upcasts a
  bf16 convolution to f32), else nn.Conv's convolution."""
  width: int
  patch_size: tuple[int, int]
  use_bias: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, image: jax.Array) -> jax.Array:
    (ph, pw), (b, hh, ww, c) = self.patch_size, image.shape
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (ph, pw, c, self.width),
                        self.param_dtype)
    x, kernel = image.astype(self.dtype), kernel.astype(self.dtype)
    if jnp.dtype(self.dtype) in precision.LOW and precision.enabled():
      x = x.reshape(b, hh // ph, ph, ww // pw, pw, c).transpose(0, 1, 3, 2, 4, 5)
      y = precision.dot_general(x, kernel, (((3, 4, 5), (0, 1, 2)), ((), ())))
    else:   # nn.Conv's computation
      y = jax.lax.conv_general_dilated(x, kernel, (ph, pw), "VALID",
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
    if self.use_bias:
      y = add_bias(y, self.param("bias", nn.initializers.zeros, (self.width,),
                                 self.param_dtype))
    return y


class ViT(nn.Module):
  """ViT: image [b, H, W, C] -> (pooled [b, width], {'encoded': [b, n, width], ...}).

  Build it with `Model(variant, **overrides)` (or the fields of `config`). The
  encoder's final LayerNorm comes before pooling; with pool_type='tok' it is
  open_clip's ln_post.
  """
  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  patch_size: tuple[int, int]
  pool_type: str = "map"     # POOL_TYPES
  posemb: str = "sincos2d"   # POSEMBS
  dropout: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  remat: bool = False
  remat_policy: str | None = None   # mmjax.nn.layers.REMAT_POLICIES; implies remat
  scan: bool = False         # the encoder blocks under nn.scan (params encoder/blocks, [depth])
  attention_impl: str = "xla"
  # open_clip / OpenAI CLIP layout (the defaults are big_vision's):
  patch_bias: bool = True    # open_clip's patch embedding has no bias
  posemb_cls: bool = False   # 'learn' + 'tok': the class token gets a position too
  ln_pre: bool = False       # LayerNorm on the tokens before the encoder
  act: str = "gelu"          # mmjax.nn.layers.ACTIVATIONS
  ln_eps: float = 1e-6
  patch_dropout: float = 0.0  # FLIP: at train time drop this share of patch tokens per example
  mask_token: bool = False   # a learned 'mask_token' for masked patches (iBOT/TIPS: `mask=`)

  @nn.compact
  def __call__(self, image: jax.Array, *, train: bool = False, keep: jax.Array | None = None,
               mask: jax.Array | None = None):
    """keep: int [b, k] patch indices (row-major) to encode, the rest dropped (MAE);
    None keeps all, except that patch_dropout > 0 draws them at train time.
    mask: bool [b, h * w], True where a patch's embedding is replaced by the learned mask
    token before the position embedding is added (iBOT / TIPS masked prediction); needs
    mask_token=True."""
    if image.ndim != 4:
      raise ValueError(f"image must be [b, H, W, C]; got shape {image.shape}")
    ph, pw = self.patch_size
    if image.shape[1] % ph or image.shape[2] % pw:
      raise ValueError(f"image size {image.shape[1:3]} is not divisible by patch size {(ph, pw)}")
    width, kw = self.width, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = PatchEmbed(width, (ph, pw), use_bias=self.patch_bias, name="embedding", **kw)(image)
    b, h, w, _ = x.shape
    x = constrain(x.reshape(b, h * w, width), "batch", "seq", "embed")
    if self.mask_token:
      token = self.param("mask_token", nn.initializers.normal(0.02), (width,), self.param_dtype)
      if mask is not None:
        if mask.shape != (b, h * w):
          raise ValueError(f"mask {mask.shape} must be [batch, patches] = {(b, h * w)}")
        x = jnp.where(mask[..., None], token.astype(x.dtype), x)
    elif mask is not None:
      raise ValueError("mask= needs a ViT with mask_token=True (its learned mask token)")

    def add_cls(x):
      cls = self.param("cls", nn.initializers.zeros, (1, 1, width), self.param_dtype)
      return jnp.concatenate([jnp.broadcast_to(cls, (b, 1, width)).astype(x.dtype), x], axis=1)

    if self.posemb_cls:
      x = add_cls(x)
    if self.posemb == "learn":
      pe = self.param("pos_embedding", nn.initializers.normal(width ** -0.5),
                      (1, x.shape[1], width), self.param_dtype)
    else:
      pe = posemb_sincos_2d(h, w, width)
    x = x + pe.astype(x.dtype)
    if keep is None and train and self.patch_dropout > 0:
      keep = random_keep(self.make_rng("dropout"), b, h * w,
                         max(1, round(h * w * (1.0 - self.patch_dropout))))
    if keep is not None:   # the class token (first, with posemb_cls) always stays
      first = 1 if self.posemb_cls else 0
      # A one-hot matmul, not a gather: its backward is a matmul too, where a
      # gather's is a scatter, slow enough on CPU to eat FLIP's saving.
      pick = jax.nn.one_hot(keep, h * w, dtype=x.dtype)             # [b, k, n]
      kept = precision.einsum("bkn,bnd->bkd", pick, x[:, first:])
      x = jnp.concatenate([x[:, :first], kept], axis=1)
    if self.pool_type == "tok" and not self.posemb_cls:
      x = add_cls(x)
    if self.ln_pre:
      x = LayerNorm(epsilon=self.ln_eps, name="ln_pre", **kw)(x)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    x = Encoder(depth=self.depth, num_heads=self.num_heads, mlp_dim=self.mlp_dim,
                dropout=self.dropout, attention_impl=self.attention_impl, remat=self.remat,
                remat_policy=self.remat_policy, scan=self.scan, act=self.act,
                ln_eps=self.ln_eps, name="encoder", **kw)(x, train=train)
    out = {"encoded": x}
    if self.pool_type == "tok":
      pooled = x[:, 0]
    elif self.pool_type == "gap":
      pooled = x.mean(axis=1)
    elif self.pool_type == "map":
      pooled = MAPHead(self.num_heads, self.mlp_dim, attention_impl=self.attention_impl,
                       act=self.act, ln_eps=self.ln_eps, name="map_head", **kw)(x)
    else:
      pooled = x
    if pooled.ndim == 2:
      pooled = constrain(pooled, "batch", "embed")
    return pooled, out
