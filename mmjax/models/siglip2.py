"""SigLIP 2's training model: SigLIP's two towers (the same params, so a trained model
exports as a SigLIP checkpoint once the training-only parts are dropped: `EXTRA_KEYS`) plus
LocCa's decoder, which cross-attends to the image tower's unpooled tokens, and the prototype
heads of the late-training self-distillation (mmjax.losses.distill).

  model = Siglip2(image=dict(image_fields, mask_token=True), text=..., embed_dim=...,
                  decoder=dict(vocab_size=..., max_len=..., width=..., depth=..., mlp_dim=...,
                               num_heads=...), prototypes=256)
  pooled, tokens = model.apply(v, image, mask=mask, method="image_outputs")  # [b, w], [b, n, w]
  logits = model.apply(v, dec_tokens, tokens, key_mask, method="decode")     # [b, L, vocab]
(image: [b, H, W, 3], or a NaFlex tower's dict, whose padding tokens key_mask leaves out of the
decoder's cross-attention: mmjax.models.naflex.valid_tokens; None for a ViT.)
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models import coca, two_tower
from mmjax.numerics import l2_normalize

# The params that only training uses: SigLIP's checkpoint is the rest (img/mask_token too).
EXTRA_KEYS = ("decoder", "proto_global", "proto_patch")


class LoccaDecoder(nn.Module):
  """Its own token and position embeddings, then CoCa's decoder blocks (causal self-attention,
  cross-attention to the image tokens) and vocabulary head: tokens [b, L] int, image_tokens
  [b, n, e], key_mask [b, n] bool or None (the image tokens attended to; None: all) -> logits
  [b, L, vocab_size] float32."""
  vocab_size: int
  max_len: int
  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  attention_impl: str = "xla"
  act: str = "gelu"
  ln_eps: float = 1e-6

  @nn.compact
  def __call__(self, tokens: jax.Array, image_tokens: jax.Array, *, train: bool = False,
               key_mask: jax.Array | None = None):
    if tokens.shape[1] > self.max_len:
      raise ValueError(f"decoder tokens {tokens.shape} longer than max_len={self.max_len}")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = nn.Embed(self.vocab_size, self.width, embedding_init=nn.initializers.normal(0.02),
                 name="token_embedding", **kw)(tokens)
    pe = self.param("pos_embedding", nn.initializers.normal(0.01),
                    (1, self.max_len, self.width), self.param_dtype)
    x = x + pe[:, :tokens.shape[1]].astype(x.dtype)
    logits, _ = coca.Decoder(self.vocab_size, self.width, self.depth, self.mlp_dim,
                             self.num_heads, attention_impl=self.attention_impl, act=self.act,
                             ln_eps=self.ln_eps, name="blocks", **kw)(x, image_tokens, train=train,
                                                                     key_mask=key_mask)
    return logits


class Prototypes(nn.Module):
  """DINO's prototype head: x [..., w] -> cosine similarities [..., count] float32 in [-1, 1]
  between x and `count` learned prototypes (both l2-normalised, as DINO's weight-normalised
  last layer on its normalised bottleneck), so logits / temperature stay bounded."""
  count: int
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", nn.initializers.normal(1.0), (x.shape[-1], self.count),
                        self.param_dtype)
    return l2_normalize(x) @ l2_normalize(kernel.T).T


class Siglip2(two_tower.TwoTower):
  """TwoTower plus the decoder (`decoder`: LoccaDecoder's fields) and the prototype heads
  (`prototypes` outputs, on the pooled image and on each image token)."""
  decoder: dict | None = None
  prototypes: int = 256

  def setup(self):
    super().setup()
    self.locca = LoccaDecoder(**self.decoder, dtype=self.dtype, param_dtype=self.param_dtype,
                              name="decoder")
    self.proto_global = Prototypes(self.prototypes, self.param_dtype, name="proto_global")
    self.proto_patch = Prototypes(self.prototypes, self.param_dtype, name="proto_patch")

  def embed_pooled(self, pooled: jax.Array) -> jax.Array:
    """The image embedding of pooled features, as encode_image makes it: [b, w] -> [b, e]."""
    return l2_normalize(self.img_proj(pooled))

  def train_outputs(self, image, text, *, train: bool = False):
    """(zimg, ztxt, out) as __call__ gives them, and the image tokens [b, n, w]: the image
    tower run once for the sigmoid loss and the decoder."""
    pooled, tokens = self.image_outputs(image, train=train)
    out = {"scale": jnp.exp(self.t)}
    if self.bias_init is not None:
      out["bias"] = self.b
    return self.embed_pooled(pooled), self.encode_text(text, train=train), out, tokens

  def decode(self, tokens: jax.Array, image_tokens: jax.Array,
             key_mask: jax.Array | None = None, *, train: bool = False):
    """tokens [b, L], image_tokens [b, n, w], key_mask [b, n] bool or None (a NaFlex tower's
    valid tokens) -> logits [b, L, vocab] float32."""
    return self.locca(tokens, image_tokens, train=train, key_mask=key_mask)

  def prototype_logits(self, pooled: jax.Array, tokens: jax.Array):
    """(global [b, K] float32, per patch [b, n, K] float32)."""
    return self.proto_global(pooled), self.proto_patch(tokens)

  def __call__(self, image, text, *, train: bool = False):
    zimg, ztxt, out = super().__call__(image, text, train=train)
    if image is not None and text is not None:   # init: every part is made
      pooled, tokens = self.image_outputs(image, train=train)
      self.prototype_logits(pooled, tokens)
      self.decode(text[:, :self.decoder["max_len"]] % self.decoder["vocab_size"], tokens,
                  train=train)
    return zimg, ztxt, out
