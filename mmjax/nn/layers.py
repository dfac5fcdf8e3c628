"""MLP block, pre-LN encoder stack, position embeddings, attention pooling."""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax.nn import precision
from mmjax.nn.attention import MultiHeadAttention, Segments
from mmjax.nn.linear import Dense, LayerNorm
from mmjax.nn.partitioning import constrain


# MLP nonlinearities. 'gelu' is the tanh approximation (big_vision's default); open_clip uses
# the erf form ('gelu_exact': x/2 (1 + erf(x/sqrt 2)), torch's formula, faster in XLA than
# jax.nn.gelu's erfc) or, for OpenAI's weights, 'quick_gelu'.
ACTIVATIONS = {
    "gelu": nn.gelu,
    "gelu_exact": lambda x: x * 0.5 * (1.0 + jax.lax.erf(x * np.sqrt(0.5).astype(x.dtype))),
    "quick_gelu": lambda x: x * nn.sigmoid(1.702 * x),
}


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 2))
def _activate(act: str, h: jax.Array, dtype) -> jax.Array:
  return ACTIVATIONS[act](h.astype(jnp.float32)).astype(dtype)


def _activate_fwd(act, h, dtype):
  return _activate(act, h, dtype), h


def _activate_bwd(act, dtype, h, g):
  _, vjp = jax.vjp(ACTIVATIONS[act], h.astype(jnp.float32))
  return (vjp(g.astype(jnp.float32))[0].astype(h.dtype),)


_activate.defvjp(_activate_fwd, _activate_bwd)


def activate(act: str, h: jax.Array, dtype=None) -> jax.Array:
  """ACTIVATIONS[act](h) computed in float32, returned in dtype (default h's). The backward
  pass recomputes it from h (its only residual) in one fused pass: XLA:CPU runs bf16
  elementwise ops one by one through f32 with a rounding after each (the GELU's forward +
  backward on [32, 50, 3072] ran 2.6x faster in f32, jax 0.10.2), and left to autodiff the f32
  forward saves its intermediates in f32."""
  if act not in ACTIVATIONS:
    raise ValueError(f"act={act!r}; expected one of {sorted(ACTIVATIONS)}")
  return _activate(act, h, jnp.dtype(dtype or h.dtype))


def _dense(features: int, dtype, param_dtype) -> Dense:
  return Dense(features, dtype=dtype, param_dtype=param_dtype,
               kernel_init=nn.initializers.xavier_uniform(),
               bias_init=nn.initializers.normal(1e-6))


class MlpBlock(nn.Module):
  """Dense(mlp_dim) -> act -> Dense(width): [..., width] -> [..., width]."""
  mlp_dim: int
  dropout: float = 0.0
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  act: str = "gelu"   # a key of ACTIVATIONS

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    width = x.shape[-1]
    h = _dense(self.mlp_dim, self.dtype, self.param_dtype)(x, out_dtype=jnp.float32)
    if h.ndim == 3:
      h = constrain(h, "batch", "seq", "mlp")
    x = activate(self.act, h, self.dtype)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return _dense(width, self.dtype, self.param_dtype)(x)


class BlockSettings(nn.Module):
  """What every block of a transformer stack takes: EncoderBlock's fields, shared by Encoder."""
  num_heads: int
  mlp_dim: int
  dropout: float = 0.0
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  attention_impl: str = "xla"   # mmjax.nn.attention.IMPLS
  act: str = "gelu"             # a key of ACTIVATIONS
  ln_eps: float = 1e-6          # torch's LayerNorm (open_clip) uses 1e-5
  decode: bool = False          # self-attention keys/values cached for decoding (attention.py)

  def block_settings(self) -> dict:
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(BlockSettings)
            if f.name not in ("parent", "name")}


class EncoderBlock(BlockSettings):
  """Pre-LN transformer block: x + attn(LN(x)); x + mlp(LN(x))."""

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None, is_causal: bool = False,
               train: bool = False) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = constrain(x, "batch", "seq", "embed")
    y = LayerNorm(epsilon=self.ln_eps, name="ln1", **kw)(x)
    y = MultiHeadAttention(self.num_heads, impl=self.attention_impl, decode=self.decode,
                           name="attn", **kw)(y, mask=mask, is_causal=is_causal)
    x = x + nn.Dropout(self.dropout, deterministic=not train)(y)
    y = LayerNorm(epsilon=self.ln_eps, name="ln2", **kw)(x)
    y = MlpBlock(self.mlp_dim, self.dropout, act=self.act, name="mlp", **kw)(y, train=train)
    return constrain(x + nn.Dropout(self.dropout, deterministic=not train)(y),
                     "batch", "seq", "embed")


# config.model.remat_policy: jax.checkpoint_policies by name (what the backward pass keeps).
REMAT_POLICIES = ("nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable",
                  "everything_saveable")


def check_token_ids(tokens, vocab_size: int) -> None:
  """Raises ValueError naming the row and the id when concrete tokens [b, L] hold an id
  outside [0, vocab_size) (the embedding's gather would clamp it silently); traced tokens
  (under jit) pass unchecked: they come from the tokenizer the vocabulary was sized by."""
  if isinstance(tokens, jax.core.Tracer):
    return
  ids = np.asarray(tokens)
  bad = np.argwhere((ids < 0) | (ids >= vocab_size))
  if bad.size:
    row, col = bad[0]
    raise ValueError(f"tokens: id {ids[row, col]} is outside the vocabulary [0, {vocab_size}) "
                     f"(row {row}, position {col}; {len(bad)} such ids)")


@functools.lru_cache(maxsize=None)   # one object per name: remat's static argument
def remat_policy(name: str | None):
  """A REMAT_POLICIES name -> the jax.checkpoint policy; None -> None (jax's default: nothing
  saved)."""
  if name is None:
    return None
  if name not in REMAT_POLICIES:
    raise ValueError(f"remat_policy={name!r} is not one of {REMAT_POLICIES}")
  cp = jax.checkpoint_policies
  names = {"dots_saveable": (precision.DOT, precision.BATCHED_DOT),
           "dots_with_no_batch_dims_saveable": (precision.DOT,)}.get(name)
  if names:   # the bf16 path's dots are custom-VJP calls: they are saved by name
    return cp.save_from_both_policies(getattr(cp, name), cp.save_only_these_names(*names))
  return getattr(cp, name)


class _ScannedBlock(EncoderBlock):
  """An EncoderBlock in nn.scan's form: (carry x, broadcast args) -> (x, None)."""

  @nn.compact
  def __call__(self, x, mask=None, is_causal=False, train=False):
    return super().__call__(x, mask, is_causal, train), None


class Encoder(BlockSettings):
  """`depth` EncoderBlocks then a final LayerNorm; [b, n, width] -> [b, n, width].

  remat=True recomputes each block's activations in the backward pass
  (memory of one block instead of all of them, ~1.3x the compute); remat_policy (a
  REMAT_POLICIES name, implies remat) says which of them are kept instead, e.g.
  'dots_saveable' keeps the matmul outputs and recomputes the rest.

  scan=False: the blocks are params['block{i}'], one subtree each. scan=True: one block under
  nn.scan, params['blocks'] with every leaf stacked on a leading [depth] axis (traced and
  compiled once, not depth times); mmjax.models.scan converts between the two trees.
  """
  depth: int = 1
  remat: bool = False
  remat_policy: str | None = None   # REMAT_POLICIES; None with remat=True: nothing saved
  scan: bool = False
  final_ln: bool = True   # False: the last block's output as it is (CoCa's text tower)

  @nn.compact
  def __call__(self, x: jax.Array, *, mask: jax.Array | None = None, is_causal: bool = False,
               train: bool = False) -> jax.Array:
    if self.decode and self.scan:
      raise ValueError("decode=True is not supported with scan=True (per-layer caches)")
    policy = remat_policy(self.remat_policy)
    remat = self.remat or self.remat_policy is not None
    block = _ScannedBlock if self.scan else EncoderBlock
    if remat:   # static: is_causal, train (self is argument 0). Under scan no CSE can merge
      # the recomputation into the forward pass, so jax's barrier against it is not needed.
      block = nn.remat(block, static_argnums=(3, 4), policy=policy, prevent_cse=not self.scan)
    if self.scan:
      block = nn.scan(block, variable_axes={True: 0}, split_rngs={"params": True, "dropout": True},
                      in_axes=(nn.broadcast, nn.broadcast, nn.broadcast), length=self.depth)
      x, _ = block(**self.block_settings(), name="blocks")(x, mask, is_causal, train)
    else:
      for i in range(self.depth):
        x = block(**self.block_settings(), name=f"block{i}")(x, mask, is_causal, train)
    if not self.final_ln:
      return x
    return LayerNorm(epsilon=self.ln_eps, name="ln_final", dtype=self.dtype,
                        param_dtype=self.param_dtype)(x)


def posemb_sincos_2d(h: int, w: int, width: int, temperature: float = 10_000.0,
                     dtype=jnp.float32) -> jax.Array:
  """Fixed 2-D sine-cosine position embeddings, [1, h*w, width] (width % 4 == 0)."""
  if width % 4:
    raise ValueError(f"width {width} must be a multiple of 4 for sincos2d position embeddings")
  y, x = np.mgrid[:h, :w]
  omega = 1.0 / temperature ** (np.arange(width // 4) / (width // 4 - 1 or 1))
  y = y.reshape(-1)[:, None] * omega[None]
  x = x.reshape(-1)[:, None] * omega[None]
  pe = np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)
  return jnp.asarray(pe[None], dtype)


class MAPHead(nn.Module):
  """Multihead attention pooling: a learned probe attends over the tokens.

  [b, n, width] (+ optional key mask [b, n], True = real token) -> [b, width]; with
  mask=Segments(q [b, k], kv [b, n]) (mmjax.nn.attention), one probe per segment id of q,
  each attending to the tokens of that id: -> [b, k, width] (several images packed into
  one sequence, pooled one by one).
  """
  num_heads: int
  mlp_dim: int | None = None
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  attention_impl: str = "xla"
  act: str = "gelu"      # of the MLP, a key of ACTIVATIONS (the tower's)
  ln_eps: float = 1e-6

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | Segments | None = None) -> jax.Array:
    b, _, width = x.shape
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    probe = self.param("probe", nn.initializers.xavier_uniform(), (1, 1, width), self.param_dtype)
    per_segment = isinstance(mask, Segments)
    queries = mask.q.shape[1] if per_segment else 1
    probe = jnp.broadcast_to(probe, (b, queries, width)).astype(x.dtype)
    if mask is not None and not per_segment:
      mask = mask[:, None, None, :]
    x = MultiHeadAttention(self.num_heads, impl=self.attention_impl, name="attn", **kw)(
        probe, x, mask=mask)
    y = LayerNorm(epsilon=self.ln_eps, name="ln", **kw)(x)
    x = x + MlpBlock(self.mlp_dim or 4 * width, act=self.act, name="mlp", **kw)(y)
    return x if per_segment else x[:, 0]
