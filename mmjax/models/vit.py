"""Vision Transformer encoder (pre-LN), variants named as in big_vision ('B/16')."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.nn.layers import Encoder, MAPHead, posemb_sincos_2d

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


def resolve(variant: str | None, **overrides) -> dict[str, Any]:
  """The variant's numbers with every non-None override applied."""
  out = decode_variant(variant) if variant else {}
  out.update({k: v for k, v in overrides.items() if v is not None})
  missing = [k for k in ("width", "depth", "mlp_dim", "num_heads") if k not in out]
  if missing:
    raise ValueError(f"variant is None and {missing} are not given")
  return out


def random_keep(rng: jax.Array, b: int, n: int, n_keep: int) -> jax.Array:
  """[b, n_keep] int32: a random subset of the n token positions per example, sorted."""
  noise = jax.random.uniform(rng, (b, n))
  return jnp.sort(jnp.argsort(noise, axis=1)[:, :n_keep], axis=1).astype(jnp.int32)


class Model(nn.Module):
  """ViT: image [b, H, W, C] -> (pooled [b, width], {'encoded': [b, n, width], ...}).

  The encoder's final LayerNorm comes before pooling; with pool_type='tok' it
  is open_clip's ln_post.
  """
  variant: str | None = None
  width: int | None = None
  depth: int | None = None
  mlp_dim: int | None = None
  num_heads: int | None = None
  patch_size: tuple[int, int] | None = None
  pool_type: str = "map"     # 'tok' | 'gap' | 'map' | 'none'
  posemb: str = "sincos2d"   # 'learn' | 'sincos2d'
  dropout: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  remat: bool = False
  attn_impl: str = "xla"
  # open_clip / OpenAI CLIP layout (the defaults are big_vision's):
  patch_bias: bool = True    # open_clip's patch embedding has no bias
  posemb_cls: bool = False   # 'learn' + 'tok': the class token gets a position too
  ln_pre: bool = False       # LayerNorm on the tokens before the encoder
  act: str = "gelu"          # mmjax.nn.layers.ACTIVATIONS
  ln_eps: float = 1e-6
  patch_dropout: float = 0.0  # FLIP: at train time drop this share of patch tokens per example

  @nn.compact
  def __call__(self, image: jax.Array, *, train: bool = False, keep: jax.Array | None = None):
    """keep: int [b, k] patch indices (row-major) to encode, the rest dropped (MAE);
    None keeps all, except that patch_dropout > 0 draws them at train time."""
    v = resolve(self.variant, width=self.width, depth=self.depth, mlp_dim=self.mlp_dim,
                num_heads=self.num_heads, patch_size=self.patch_size)
    if "patch_size" not in v:
      raise ValueError(f"no patch size: give variant 'X/<patch>' or patch_size (variant={self.variant!r})")
    if self.pool_type not in ("tok", "gap", "map", "none"):
      raise ValueError(f"pool_type={self.pool_type!r}; expected 'tok', 'gap', 'map' or 'none'")
    if image.ndim != 4:
      raise ValueError(f"image must be [b, H, W, C]; got shape {image.shape}")
    ph, pw = v["patch_size"]
    if image.shape[1] % ph or image.shape[2] % pw:
      raise ValueError(f"image size {image.shape[1:3]} is not divisible by patch size {(ph, pw)}")
    width, kw = v["width"], dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if self.posemb_cls and (self.posemb, self.pool_type) != ("learn", "tok"):
      raise ValueError(f"posemb_cls=True needs posemb='learn' and pool_type='tok'; got "
                       f"posemb={self.posemb!r}, pool_type={self.pool_type!r}")
    x = nn.Conv(width, (ph, pw), strides=(ph, pw), padding="VALID", use_bias=self.patch_bias,
                name="embedding", **kw)(image.astype(self.dtype))
    b, h, w, _ = x.shape
    x = x.reshape(b, h * w, width)

    def add_cls(x):
      cls = self.param("cls", nn.initializers.zeros, (1, 1, width), self.param_dtype)
      return jnp.concatenate([jnp.broadcast_to(cls, (b, 1, width)).astype(x.dtype), x], axis=1)

    if self.posemb_cls:
      x = add_cls(x)
    if self.posemb == "learn":
      pe = self.param("pos_embedding", nn.initializers.normal(width ** -0.5),
                      (1, x.shape[1], width), self.param_dtype)
    elif self.posemb == "sincos2d":
      pe = posemb_sincos_2d(h, w, width)
    else:
      raise ValueError(f"posemb={self.posemb!r}; expected 'learn' or 'sincos2d'")
    x = x + pe.astype(x.dtype)
    if not 0.0 <= self.patch_dropout < 1.0:
      raise ValueError(f"patch_dropout={self.patch_dropout} must be in [0, 1)")
    if keep is None and train and self.patch_dropout > 0:
      keep = random_keep(self.make_rng("dropout"), b, h * w,
                         max(1, round(h * w * (1.0 - self.patch_dropout))))
    if keep is not None:   # the class token (first, with posemb_cls) always stays
      first = 1 if self.posemb_cls else 0
      # A one-hot matmul, not a gather: its backward is a matmul too, where a
      # gather's is a scatter, slow enough on CPU to eat FLIP's saving.
      pick = jax.nn.one_hot(keep, h * w, dtype=x.dtype)             # [b, k, n]
      kept = jnp.einsum("bkn,bnd->bkd", pick, x[:, first:])
      x = jnp.concatenate([x[:, :first], kept], axis=1)
    if self.pool_type == "tok" and not self.posemb_cls:
      x = add_cls(x)
    if self.ln_pre:
      x = nn.LayerNorm(epsilon=self.ln_eps, name="ln_pre", **kw)(x)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    x = Encoder(v["depth"], v["num_heads"], v["mlp_dim"], self.dropout, attn_impl=self.attn_impl,
                remat=self.remat, act=self.act, ln_eps=self.ln_eps, name="encoder", **kw)(
                    x, train=train)
    out = {"encoded": x}
    if self.pool_type == "tok":
      pooled = x[:, 0]
    elif self.pool_type == "gap":
      pooled = x.mean(axis=1)
    elif self.pool_type == "map":
      pooled = MAPHead(v["num_heads"], v["mlp_dim"], attn_impl=self.attn_impl, name="map_head",
                       **kw)(x)
    else:
      pooled = x
    return pooled, out
