"""Text transformer: causal (CLIP) or bidirectional (SigLIP), variants as in vit ('B')."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models import vit
from mmjax.nn.layers import Encoder, MAPHead, check_token_ids
from mmjax.nn.partitioning import constrain


def decode_variant(variant: str) -> dict[str, Any]:
  """'B' -> dict(width=768, depth=12, mlp_dim=3072, num_heads=12); no patch suffix."""
  if "/" in str(variant):
    raise ValueError(f"text variant {variant!r} takes no '/<patch>' suffix")
  return vit.decode_variant(variant)


POOL_TYPES = ("eos", "last", "first", "map", "argmax")


def config(variant: str | None = None, **fields) -> dict[str, Any]:
  """The complete, checked fields of a `TextTransformer`: the variant decoded
  once, overrides applied (None = the variant's). Every ValueError starts with
  the field it is about."""
  out = vit.dims(variant, decode=decode_variant,
                 **{k: fields.pop(k, None) for k in ("width", "depth", "mlp_dim", "num_heads")})
  known = {f.name for f in dataclasses.fields(TextTransformer)}
  unknown = set(fields) - known
  if unknown:
    raise ValueError(f"{sorted(unknown)[0]}: not a TextTransformer field")
  out.update(fields)
  settings = {**{f.name: f.default for f in dataclasses.fields(TextTransformer)
                 if f.default is not dataclasses.MISSING}, **out}
  if settings["pool_type"] not in POOL_TYPES:
    raise ValueError(f"pool_type={settings['pool_type']!r} is not one of {POOL_TYPES}")
  if settings["pad_id"] is None and settings["pool_type"] == "eos":
    raise ValueError("pad_id=None is not allowed with pool_type='eos', which finds the last "
                     "real token by pad_id (CLIP's EOT: pool_type='argmax')")
  return out


def Model(variant: str | None = None, **fields) -> "TextTransformer":  # noqa: N802
  """TextTransformer from a variant name ('B') and overrides, decoded and checked once."""
  name, parent = fields.pop("name", None), fields.pop("parent", None)
  kw = {} if parent is None else {"parent": parent}
  return TextTransformer(**config(variant, **fields), name=name, **kw)


class TextTransformer(nn.Module):
  """tokens [b, L] int32 (pad_id after the EOS) -> (pooled [b, width], {'encoded': [b, L, width]}).

  Build it with `Model(variant, **overrides)`. pad_id=None: no key-padding
  mask (CLIP: id 0 is a real token, '!'; causal attention already keeps the
  EOT from seeing the padding after it). pool_type='argmax': the token with
  the largest id (CLIP's EOT is the last id).
  """
  vocab_size: int
  max_len: int
  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  causal: bool = False
  pool_type: str = "last"   # POOL_TYPES
  pad_id: int | None = 0
  dropout: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  remat: bool = False
  remat_policy: str | None = None   # mmjax.nn.layers.REMAT_POLICIES; implies remat
  scan: bool = False         # the encoder blocks under nn.scan (params encoder/blocks, [depth])
  attention_impl: str = "xla"
  act: str = "gelu"         # mmjax.nn.layers.ACTIVATIONS
  ln_eps: float = 1e-6

  @nn.compact
  def __call__(self, tokens: jax.Array, *, train: bool = False):
    if tokens.ndim != 2 or tokens.shape[1] > self.max_len:
      raise ValueError(f"tokens must be [b, L] with L <= max_len={self.max_len}; got {tokens.shape}")
    check_token_ids(tokens, self.vocab_size)
    width, kw = self.width, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, length = tokens.shape
    x = nn.Embed(self.vocab_size, width, embedding_init=nn.initializers.normal(0.02),
                 name="token_embedding", **kw)(tokens)
    pe = self.param("pos_embedding", nn.initializers.normal(0.01), (1, self.max_len, width),
                    self.param_dtype)
    x = constrain(x + pe[:, :length].astype(x.dtype), "batch", "seq", "embed")
    real = None if self.pad_id is None else tokens != self.pad_id   # [b, L]
    mask = None if real is None else real[:, None, None, :]        # keys: never attend to padding
    x = Encoder(depth=self.depth, num_heads=self.num_heads, mlp_dim=self.mlp_dim,
                dropout=self.dropout, attention_impl=self.attention_impl, remat=self.remat,
                remat_policy=self.remat_policy, scan=self.scan, act=self.act,
                ln_eps=self.ln_eps, name="encoder", **kw)(
                    x, mask=mask, is_causal=self.causal, train=train)
    if self.pool_type == "eos":
      # The tokenizer ends every text with EOS: the last real token.
      last = jnp.maximum(real.sum(axis=1) - 1, 0)
      pooled = jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]
    elif self.pool_type == "last":
      pooled = x[:, -1]
    elif self.pool_type == "first":
      pooled = x[:, 0]
    elif self.pool_type == "argmax":
      pooled = jnp.take_along_axis(x, jnp.argmax(tokens, axis=1)[:, None, None], axis=1)[:, 0]
    else:
      pooled = MAPHead(self.num_heads, self.mlp_dim, attention_impl=self.attention_impl,
                       act=self.act, ln_eps=self.ln_eps, name="map_head", **kw)(x, real)
    return constrain(pooled, "batch", "embed"), {"encoded": x}
