"""CoCa (Yu et al. 2022) in open_clip's layout, with a BLIP-style image-text matching head.

  image [b, H, W, 3] -> ViT -> attentional pooler (n_queries learned queries) -> LN ->
      query 0 @ proj: the contrastive image embedding; queries 1.. : the image tokens
  tokens [b, L] (+ a cls token appended) -> causal text tower (unimodal) ->
      cls output -> LN @ proj: the contrastive text embedding; the other outputs (no LN) ->
  decoder: per layer causal self-attention block + cross-attention block (to the image
      tokens) -> LN -> vocabulary logits (captioning)

open_clip's quirks are kept so that its checkpoints convert exactly: the image tower has
no LN between its blocks and the pooler other than the pooler's own key LN (here the ViT
encoder's final LN), and the text tower's padding mask is open_clip's legacy one
(`correct_cls_mask=False`: key k is masked when token k-1 is padding, the cls key when the
last token is) unless correct_cls_mask=True.

Decoding (greedy and beam search under jit, one compile per batch shape) goes through
`generate`, on a clone with decode=True whose self-attention keys and values live in Flax's
'cache' collection (mmjax.nn.attention.MultiHeadAttention(decode=True)).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax.models import image as image_lib
from mmjax.models import vit
from mmjax.nn.attention import MultiHeadAttention
from mmjax.nn.layers import (BlockSettings, Encoder, EncoderBlock, MlpBlock, check_token_ids,
                              remat_policy)
from mmjax.nn.linear import Dense, LayerNorm
from mmjax.numerics import l2_normalize


class AttentionalPooler(nn.Module):
  """n_queries learned queries (LayerNormed) attend over the tokens:
  [b, n, width] -> [b, n_queries, features]. open_clip's AttentionalPooler without its key
  LayerNorm (the tower's final LayerNorm is that one)."""
  features: int
  n_queries: int
  num_heads: int
  ln_eps: float = 1e-5
  attention_impl: str = "xla"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    query = self.param("query", nn.initializers.normal(1.0), (self.n_queries, self.features),
                       self.param_dtype)
    q = LayerNorm(epsilon=self.ln_eps, name="ln_q", **kw)(query)
    q = jnp.broadcast_to(q[None], (x.shape[0], *q.shape)).astype(x.dtype)
    return MultiHeadAttention(self.num_heads, impl=self.attention_impl, name="attn", **kw)(q, x)


class CrossBlock(BlockSettings):
  """x + attn(LN(x), LN_kv(context)); x + mlp(LN(x)): [b, L, w], context [b, n, c] -> [b, L, w].
  key_mask [b, n] bool (None: every context token): the context tokens attended to (a NaFlex
  tower's padding, segment id 0, left out)."""

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array, train: bool = False,
               key_mask: jax.Array | None = None) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    drop = nn.Dropout(self.dropout, deterministic=not train)
    y = LayerNorm(epsilon=self.ln_eps, name="ln1", **kw)(x)
    c = LayerNorm(epsilon=self.ln_eps, name="ln1_kv", **kw)(context)
    if key_mask is not None and key_mask.shape != context.shape[:2]:
      raise ValueError(f"key_mask {key_mask.shape} must be [batch, context tokens] = "
                       f"{context.shape[:2]}")
    mask = None if key_mask is None else key_mask[:, None, None, :]
    x = x + drop(MultiHeadAttention(self.num_heads, impl=self.attention_impl, name="attn",
                                    **kw)(y, c, mask=mask))
    y = LayerNorm(epsilon=self.ln_eps, name="ln2", **kw)(x)
    return x + drop(MlpBlock(self.mlp_dim, self.dropout, act=self.act, name="mlp", **kw)(
        y, train=train))


class CocaText(nn.Module):
  """The unimodal text tower: tokens [b, L] int32 (+ a learned cls token appended) ->
  (pooled [b, width]: the cls output after ln_final, states [b, L, width]: the other outputs,
  no LayerNorm). Causal; keys masked by padding as `correct_cls_mask` says (module docstring).

  With decode=True and `index` given, one step: tokens [b, 1] at position index (int32 []),
  `seq` [b, S] the sequence so far (for the padding mask; S + 1 = the cache's length) ->
  states [b, 1, width].
  """
  vocab_size: int
  max_len: int          # tokens per text (bos included); position embeddings: max_len + 1 (cls)
  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  pad_id: int = 0
  correct_cls_mask: bool = False
  dropout: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  remat: bool = False
  remat_policy: str | None = None
  scan: bool = False
  attention_impl: str = "xla"
  act: str = "gelu_exact"
  ln_eps: float = 1e-5
  decode: bool = False

  def _keys(self, seq: jax.Array) -> jax.Array:
    """[b, S] tokens -> [b, S + 1] bool: which keys (the S tokens, then cls) may be seen."""
    real = seq != self.pad_id
    ones = jnp.ones_like(real[:, :1])
    return jnp.concatenate([real, ones] if self.correct_cls_mask else [ones, real], axis=1)

  @nn.compact
  def __call__(self, tokens: jax.Array, *, train: bool = False, index: jax.Array | None = None,
               seq: jax.Array | None = None):
    b, length = tokens.shape
    if index is None and length > self.max_len:
      raise ValueError(f"tokens must be [b, L] with L <= max_len={self.max_len}; got {tokens.shape}")
    check_token_ids(tokens, self.vocab_size)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = nn.Embed(self.vocab_size, self.width, embedding_init=nn.initializers.normal(0.02),
                 name="token_embedding", **kw)(tokens)
    cls = self.param("cls", nn.initializers.normal(0.01), (1, 1, self.width), self.param_dtype)
    pe = self.param("pos_embedding", nn.initializers.normal(0.01),
                    (1, self.max_len + 1, self.width), self.param_dtype)
    encoder = Encoder(depth=self.depth, num_heads=self.num_heads, mlp_dim=self.mlp_dim,
                      dropout=self.dropout, attention_impl=self.attention_impl, remat=self.remat,
                      remat_policy=self.remat_policy, scan=self.scan, act=self.act,
                      ln_eps=self.ln_eps, decode=self.decode, final_ln=False, name="encoder",
                      **kw)
    ln_final = LayerNorm(epsilon=self.ln_eps, name="ln_final", **kw)
    if index is not None:   # one decoding step
      x = x + jax.lax.dynamic_slice_in_dim(pe, index, 1, axis=1).astype(x.dtype)
      return encoder(x, mask=self._keys(seq)[:, None, None, :], train=train)
    x = jnp.concatenate([x, jnp.broadcast_to(cls, (b, 1, self.width)).astype(x.dtype)], axis=1)
    x = x + pe[:, :length + 1].astype(x.dtype)
    x = encoder(x, mask=self._keys(tokens)[:, None, None, :], is_causal=True, train=train)
    return ln_final(x[:, -1]), x[:, :-1]


class Decoder(nn.Module):
  """The multimodal decoder: `depth` x (causal self-attention block, cross-attention block
  to the image tokens), then LayerNorm and the vocabulary projection (no bias).
  x [b, L, width], image_tokens [b, n, e] -> (logits [b, L, vocab] float32, hidden [b, L, width]
  after the LayerNorm); key_mask [b, n] bool (None: all): the image tokens cross-attended to.
  With decode=True (after the cache is made) L is 1: one step."""
  vocab_size: int
  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  dropout: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  remat: bool = False
  remat_policy: str | None = None
  attention_impl: str = "xla"
  act: str = "gelu_exact"
  ln_eps: float = 1e-5
  decode: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, image_tokens: jax.Array, *, train: bool = False,
               key_mask: jax.Array | None = None):
    if x.shape[-1] != self.width:
      raise ValueError(f"decoder width {self.width} != the text tower's width {x.shape[-1]}")
    settings = dict(num_heads=self.num_heads, mlp_dim=self.mlp_dim, dropout=self.dropout,
                    dtype=self.dtype, param_dtype=self.param_dtype,
                    attention_impl=self.attention_impl, act=self.act, ln_eps=self.ln_eps)
    block, cross = EncoderBlock, CrossBlock
    if self.remat or self.remat_policy is not None:
      policy = remat_policy(self.remat_policy)
      block = nn.remat(block, static_argnums=(3, 4), policy=policy)
      cross = nn.remat(cross, static_argnums=(3,), policy=policy)
    for i in range(self.depth):
      x = block(**settings, decode=self.decode, name=f"block{i}")(x, None, True, train)
      x = cross(**settings, name=f"cross{i}")(x, image_tokens, train, key_mask)
    h = LayerNorm(epsilon=self.ln_eps, name="ln_final", dtype=self.dtype,
                  param_dtype=self.param_dtype)(x)
    logits = Dense(self.vocab_size, use_bias=False, dtype=self.dtype,
                   param_dtype=self.param_dtype, name="head")(h, out_dtype=jnp.float32)
    return logits, h


def Model(image: dict, text: dict, decoder: dict, embed_dim: int, **fields) -> "CoCa":  # noqa: N802
  """A CoCa whose image tower is given as variant and overrides (a ViT, or a ResNet whose
  final grid is the tokens: mmjax.models.image) and
  decoded once here; text and decoder are CocaText / Decoder fields (text's variant, if
  given, decoded like a text tower's; the decoder's width and vocabulary are the text's)."""
  image = image_lib.config(**image)
  text = dict(text)
  if "variant" in text:
    text.update(vit.dims(text.pop("variant"), **{k: text.pop(k, None) for k in
                                                 ("width", "depth", "mlp_dim", "num_heads")}))
  decoder = dict(decoder)
  if "variant" in decoder:
    decoder.update(vit.dims(decoder.pop("variant"), **{k: decoder.pop(k, None) for k in
                                                       ("width", "depth", "mlp_dim",
                                                        "num_heads")}))
  for name, fields_, cls in (("text", text, CocaText), ("decoder", decoder, Decoder)):
    known = {f.name for f in dataclasses.fields(cls)} - {"parent", "name", "decode"}
    unknown = sorted(set(fields_) - known - ({"vocab_size"} if name == "decoder" else set()))
    if unknown:
      raise ValueError(f"{name}.{unknown[0]}: not a {cls.__name__} field")
  if decoder.get("width", text["width"]) != text["width"]:
    raise ValueError(f"decoder.width={decoder['width']} must equal text.width={text['width']} "
                     "(the decoder reads the text tower's outputs)")
  decoder.pop("width", None)
  if fields.get("n_queries", 256) < 2:
    raise ValueError(f"n_queries={fields['n_queries']} must be >= 2 (one contrastive query, "
                     "the rest image tokens)")
  return CoCa(image=image, text=text, decoder=decoder, embed_dim=embed_dim, **fields)


class CoCa(nn.Module):
  """(image [b, H, W, 3], tokens [b, L]) -> (zimg [b, e], ztxt [b, e], out).

  zimg, ztxt: float32, unit norm. out: 'scale' = exp(t); 'logits' [b, L', vocab] float32, the
  teacher-forced next-token logits, and 'labels' [b, L'] their targets (pad_id = no target),
  where with bos_id set the model reads [bos, tokens] (L' = L) and else tokens as they are
  (open_clip: they start with SOT; L' = L - 1); 'hidden' [b, L', width] the decoder's states.

  Build it with `Model(image=..., text=..., decoder=..., embed_dim=...)`.
  """
  image: dict
  text: dict
  decoder: dict
  embed_dim: int
  n_queries: int = 256        # the pooler's queries: 1 contrastive + n_queries - 1 image tokens
  pool_heads: int = 8
  bos_id: int | None = None   # prepended to every text (None: the tokens carry their own)
  itm: bool = False           # the image-text matching head (BLIP): 'itm' Dense(2)
  temperature_init: float | None = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  decode: bool = False        # a decoding clone (generate makes it)

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    eps = self.image.get("ln_eps", 1e-6)
    self.img = image_lib.Tower(self.image)
    self.img_pool = AttentionalPooler(self.embed_dim, self.n_queries, self.pool_heads, eps,
                                      self.image.get("attention_impl", "xla"), **kw)
    self.img_ln = LayerNorm(epsilon=eps, **kw)
    self.img_proj = Dense(self.embed_dim, use_bias=False, **kw)
    self.txt = CocaText(**self.text, decode=self.decode)
    self.txt_proj = Dense(self.embed_dim, use_bias=False, **kw)
    t = self.text
    runtime = {k: t[k] for k in ("dtype", "param_dtype", "attention_impl", "act", "ln_eps",
                                 "dropout", "remat", "remat_policy") if k in t}
    self.dec = Decoder(**{**runtime, **self.decoder}, vocab_size=t["vocab_size"],
                       width=t["width"], decode=self.decode)
    if self.itm:
      self.itm_head = Dense(2, **kw)
    scale = self.temperature_init or 1 / 0.07
    self.t = self.param("t", nn.initializers.constant(math.log(scale)), (), jnp.float32)

  # ------------------------------------------------------------ towers

  def encode_image_tokens(self, image: jax.Array, *, train: bool = False):
    """[b, H, W, 3] -> (zimg [b, e] float32 unit norm, image tokens [b, n_queries - 1, e])."""
    _, out = self.img(image, train=train)
    x = self.img_ln(self.img_pool(out["encoded"]))
    return l2_normalize(self.img_proj(x[:, 0])), x[:, 1:]

  def encode_image(self, image: jax.Array, *, train: bool = False) -> jax.Array:
    return self.encode_image_tokens(image, train=train)[0]

  def with_bos(self, tokens: jax.Array) -> jax.Array:
    """[b, L] -> [b, L + 1] with bos_id first (bos_id None: unchanged)."""
    if self.bos_id is None:
      return tokens
    return jnp.concatenate([jnp.full_like(tokens[:, :1], self.bos_id), tokens], axis=1)

  def encode_text_states(self, tokens: jax.Array, *, train: bool = False):
    """[b, L] -> (ztxt [b, e] float32 unit norm, states [b, L', width]: the decoder's input,
    L' = (L with bos) - 1, and labels [b, L'])."""
    seq = self.with_bos(tokens)
    pooled, states = self.txt(seq, train=train)
    return l2_normalize(self.txt_proj(pooled)), states[:, :-1], seq[:, 1:]

  def encode_text(self, tokens: jax.Array, *, train: bool = False) -> jax.Array:
    """[b, L] int32 -> [b, embed_dim] float32, unit norm."""
    return self.encode_text_states(tokens, train=train)[0]

  def decode_states(self, states: jax.Array, image_tokens: jax.Array, *, train: bool = False):
    """The decoder: (logits [b, L', vocab] float32, hidden [b, L', width])."""
    return self.dec(states, image_tokens, train=train)

  def itm_logits(self, hidden: jax.Array, labels: jax.Array) -> jax.Array:
    """The matching head on the decoder's state at the last real input position (causal: it
    has read the whole text, EOS included unless the text fills the length, and the image):
    hidden [b, L', width], labels [b, L'] -> [b, 2] float32 (index 1 = match)."""
    n_real = (labels != self.text.get("pad_id", 0)).sum(axis=1)   # targets = inputs shifted
    last = jnp.clip(n_real, 0, hidden.shape[1] - 1)   # the EOS position among the inputs
    pooled = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
    return self.itm_head(pooled, out_dtype=jnp.float32)

  def itm_score(self, image_tokens: jax.Array, tokens: jax.Array) -> jax.Array:
    """image tokens [b, n, e], tokens [b, L] -> [b] float32: logit(match) - logit(no match)."""
    _, states, labels = self.encode_text_states(tokens)
    _, hidden = self.dec(states, image_tokens)
    z = self.itm_logits(hidden, labels)
    return z[:, 1] - z[:, 0]

  def __call__(self, image: jax.Array | None, text: jax.Array | None, *, train: bool = False):
    zimg = ztxt = None
    out = {"scale": jnp.exp(self.t)}
    if image is not None:
      zimg, image_tokens = self.encode_image_tokens(image, train=train)
      out["image_tokens"] = image_tokens
    if text is not None:
      ztxt, states, labels = self.encode_text_states(text, train=train)
      out.update(states=states, labels=labels)
    if image is not None and text is not None:
      out["logits"], out["hidden"] = self.dec(states, image_tokens, train=train)
    if self.itm and self.is_initializing():   # make the head's params
      self.itm_head(jnp.zeros((1, self.text["width"]), self.dtype))
    return zimg, ztxt, out

  # ------------------------------------------------------------ decoding

  def init_cache(self, seq: jax.Array, image_tokens: jax.Array):
    """Makes the 'cache' collection (decode=True, apply with mutable=['cache']) for
    sequences [b, S] (bos and generated tokens): text tower S + 1 positions, decoder S."""
    _, states = self.txt(seq)
    self.dec(states, image_tokens)

  def decode_step(self, token: jax.Array, index: jax.Array, seq: jax.Array,
                  image_tokens: jax.Array) -> jax.Array:
    """token [b] int32 at position index (int32 []) of seq [b, S] -> next-token logits
    [b, vocab] float32 (decode=True, apply with mutable=['cache'])."""
    states = self.txt(token[:, None], index=index, seq=seq)
    logits, _ = self.dec(states, image_tokens)
    return logits[:, 0]


# ---------------------------------------------------------------- search

def _gather_beams(tree, idx: jax.Array, batch: int, beams: int):
  """Every [batch * beams, ...] leaf of tree reordered by idx [batch, beams] (parent beams);
  scalars (cache indices) stay."""
  flat = (idx + jnp.arange(batch)[:, None] * beams).reshape(-1)
  return jax.tree.map(lambda x: x if x.ndim == 0 else x[flat], tree)


def beam_search(step, cache, first: jax.Array, *, batch: int, beams: int, max_len: int,
                eos_id: int, pad_id: int, length_penalty: float = 0.0):
  """Beam search with fixed shapes (beams = 1 is greedy search).

  step(cache, token [batch*beams], index, seq [batch*beams, max_len]) -> (log-probs
  [batch*beams, vocab], cache). first: the start token (int). A live beam never emits
  pad_id; one that emits eos_id is finished: it continues with pad_id at no cost, so its
  score stays. Finished and live beams
  compete for the `beams` places by their summed log-probabilities; the result is ranked by
  score / length ** length_penalty (length: tokens after the start, eos included).

  Returns (seqs [batch, beams, max_len] int32, best first, each starting with `first`;
  scores [batch, beams] float32, the ranking scores; log-probs [batch, beams], the unpenalised
  sums).
  """
  n = batch * beams
  seq = jnp.full((n, max_len), pad_id, jnp.int32).at[:, 0].set(first)
  # Only the first beam of each batch row is live at the start (the others would repeat it).
  logp = jnp.tile(jnp.where(jnp.arange(beams) == 0, 0.0, -jnp.inf), (batch, 1))
  done = jnp.zeros((batch, beams), bool)
  length = jnp.zeros((batch, beams), jnp.int32)

  def body(t, carry):
    seq, logp, done, length, cache = carry
    lp, cache = step(cache, seq[:, t], t, seq)
    lp = lp.astype(jnp.float32).reshape(batch, beams, -1)
    vocab = lp.shape[-1]
    stay = jnp.full((vocab,), -jnp.inf).at[pad_id].set(0.0)   # a finished beam's one way on
    lp = jnp.where(done[..., None], stay, lp.at[..., pad_id].set(-jnp.inf))   # live: no pad
    cand = (logp[..., None] + lp).reshape(batch, beams * vocab)
    logp, flat = jax.lax.top_k(cand, beams)
    parent, token = flat // vocab, (flat % vocab).astype(jnp.int32)
    pick = lambda x: jnp.take_along_axis(x, parent, axis=1)
    was_done = pick(done)
    done = was_done | (token == eos_id)
    length = pick(length) + (~was_done).astype(jnp.int32)
    seq, cache = _gather_beams((seq, cache), parent, batch, beams)
    seq = seq.at[:, t + 1].set(token.reshape(-1))
    return seq, logp, done, length, cache

  seq, logp, done, length, _ = jax.lax.fori_loop(0, max_len - 1, body,
                                                  (seq, logp, done, length, cache))
  score = logp / jnp.maximum(length, 1).astype(jnp.float32) ** length_penalty
  order = jnp.argsort(-score, axis=1)
  seq = seq.reshape(batch, beams, max_len)
  take = lambda x: jnp.take_along_axis(x, order, axis=1)
  return (jnp.take_along_axis(seq, order[..., None], axis=1), take(score), take(logp))


def _check_decoding_ids(vocab_size: int, pad_id: int | None, **ids) -> None:
  """Each of ids (name=token id) must be in [0, vocab_size) and not pad_id (a live beam never
  emits it, so an eos_id equal to it would never end a caption)."""
  for name, value in ids.items():
    if not isinstance(value, (int, np.integer)) or not 0 <= value < vocab_size:
      raise ValueError(f"{name}={value!r} must be a token id in [0, vocab_size={vocab_size})")
    if value == pad_id:
      raise ValueError(f"{name}={value!r} is the pad id (a beam never emits it)")


def make_generate(model: CoCa, *, max_len: int, eos_id: int, beams: int = 1,
                  length_penalty: float = 0.0, first: int | None = None):
  """A jitted captioner gen(params, images [b, H, W, 3][, batch_stats: an image tower's
  BatchNorm statistics]) -> (seqs [b, beams, max_len] int32,
  best first, each starting with the start token; scores [b, beams]; log-probs [b, beams]):
  beam search with `beams` beams (1: greedy) over a KV cache, one compile per batch shape.

  first: the start token (default model.bos_id; open_clip's models: SOT, 49406). The text
  tower's padding mask reads the sequence as generated, as the uncached forward would.
  """
  first = model.bos_id if first is None else first
  if first is None:
    raise ValueError("first: the model has no bos_id; give the start token (open_clip: SOT)")
  positions = model.text["max_len"]
  if not 2 <= max_len <= positions:
    raise ValueError(f"max_len={max_len} must be in [2, {positions}] (the text tower's "
                     "max_len: positions, bos included)")
  if not isinstance(beams, int) or isinstance(beams, bool) or beams < 1:
    raise ValueError(f"beams={beams!r} must be an int >= 1")
  pad_id = model.text.get("pad_id", 0)
  _check_decoding_ids(model.text["vocab_size"], pad_id, eos_id=eos_id, first=first)
  if not math.isfinite(length_penalty):
    raise ValueError(f"length_penalty={length_penalty!r} must be finite")
  dec = model.clone(decode=True)

  def gen(params, image, batch_stats=None):
    b = image.shape[0]
    variables = {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}
    _, image_tokens = model.apply(variables, image, method="encode_image_tokens")
    image_tokens = jnp.repeat(image_tokens, beams, axis=0)
    seq0 = jnp.zeros((b * beams, max_len), jnp.int32)
    shapes = jax.eval_shape(lambda: dec.apply({"params": params}, seq0, image_tokens,
                                              method="init_cache", mutable=["cache"])[1])
    cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)["cache"]

    def step(cache, token, index, seq):
      logits, new = dec.apply({"params": params, "cache": cache}, token, index, seq,
                              image_tokens, method="decode_step", mutable=["cache"])
      return jax.nn.log_softmax(logits), new["cache"]

    return beam_search(step, cache, first, batch=b, beams=beams, max_len=max_len,
                       eos_id=eos_id, pad_id=pad_id, length_penalty=length_penalty)

  return jax.jit(gen)
