"""Text transformer: causal (CLIP) or bidirectional (SigLIP), variants as in vit ('B')."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models import vit
from mmjax.nn.layers import Encoder, MAPHead


def decode_variant(variant: str) -> dict[str, Any]:
  """'B' -> dict(width=768, depth=12, mlp_dim=3072, num_heads=12); no patch suffix."""
  if "/" in str(variant):
    raise ValueError(f"text variant {variant!r} takes no '/<patch>' suffix")
  return vit.decode_variant(variant)


class Model(nn.Module):
  """tokens [b, L] int32 (pad_id after the EOS) -> (pooled [b, width], {'encoded': [b, L, width]}).

  pad_id=None: no key-padding mask (CLIP: id 0 is a real token, '!'; causal
  attention already keeps the EOT from seeing the padding after it).
  pool_type='argmax': the token with the largest id (CLIP's EOT is the last id).
  """
  vocab_size: int
  max_len: int
  variant: str | None = None
  width: int | None = None
  depth: int | None = None
  mlp_dim: int | None = None
  num_heads: int | None = None
  causal: bool = False
  pool_type: str = "last"   # 'eos' | 'last' | 'first' | 'map' | 'argmax'
  pad_id: int | None = 0
  dropout: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  remat: bool = False
  attn_impl: str = "xla"
  act: str = "gelu"         # mmjax.nn.layers.ACTIVATIONS
  ln_eps: float = 1e-6

  @nn.compact
  def __call__(self, tokens: jax.Array, *, train: bool = False):
    if self.variant is not None:
      decode_variant(self.variant)
    v = vit.resolve(self.variant, width=self.width, depth=self.depth, mlp_dim=self.mlp_dim,
                    num_heads=self.num_heads)
    if self.pool_type not in ("eos", "last", "first", "map", "argmax"):
      raise ValueError(f"pool_type={self.pool_type!r}; expected 'eos', 'last', 'first', 'map' "
                       "or 'argmax'")
    if self.pad_id is None and self.pool_type == "eos":
      raise ValueError("pool_type='eos' finds the last real token by pad_id; pad_id=None "
                       "is not allowed with it (CLIP's EOT: pool_type='argmax')")
    if tokens.ndim != 2 or tokens.shape[1] > self.max_len:
      raise ValueError(f"tokens must be [b, L] with L <= max_len={self.max_len}; got {tokens.shape}")
    width, kw = v["width"], dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, length = tokens.shape
    x = nn.Embed(self.vocab_size, width, embedding_init=nn.initializers.normal(0.02),
                 name="token_embedding", **kw)(tokens)
    pe = self.param("pos_embedding", nn.initializers.normal(0.01), (1, self.max_len, width),
                    self.param_dtype)
    x = x + pe[:, :length].astype(x.dtype)
    real = None if self.pad_id is None else tokens != self.pad_id   # [b, L]
    mask = None if real is None else real[:, None, None, :]        # keys: never attend to padding
    x = Encoder(v["depth"], v["num_heads"], v["mlp_dim"], self.dropout, attn_impl=self.attn_impl,
                remat=self.remat, act=self.act, ln_eps=self.ln_eps, name="encoder", **kw)(
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
      pooled = MAPHead(v["num_heads"], v["mlp_dim"], attn_impl=self.attn_impl, name="map_head",
                       **kw)(x, real)
    return pooled, {"encoded": x}
