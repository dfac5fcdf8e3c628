"""ViT, text transformer and two-tower model: variants, shapes, masks, remat, dtypes."""

import math

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
import pytest

from mmjax.models import text, two_tower, vit
from mmjax.nn.layers import Encoder, MAPHead, posemb_sincos_2d
from tests import reference as ref

TINY = dict(width=32, depth=2, mlp_dim=64, num_heads=2)


@pytest.mark.parametrize("name,want", [
    ("mu", (32, 1, 128, 2)), ("Ti", (192, 12, 768, 3)), ("S", (384, 12, 1536, 6)),
    ("M", (512, 12, 2048, 8)), ("B", (768, 12, 3072, 12)), ("L", (1024, 24, 4096, 16)),
    ("So400m", (1152, 27, 4304, 16)), ("H", (1280, 32, 5120, 16)), ("g", (1408, 40, 6144, 16)),
    ("G", (1664, 48, 8192, 16))])
def test_decode_variant(name, want):
  v = vit.decode_variant(f"{name}/14")
  assert (v["width"], v["depth"], v["mlp_dim"], v["num_heads"]) == want
  assert v["patch_size"] == (14, 14)
  assert "patch_size" not in text.decode_variant(name)


@pytest.mark.parametrize("bad", ["Q/16", "B/x", "b/16", ""])
def test_unknown_variant_is_named(bad):
  with pytest.raises(ValueError, match="Unknown ViT variant"):
    vit.decode_variant(bad)
  with pytest.raises(ValueError, match="no '/<patch>'"):
    text.decode_variant("B/16")


def _init_apply(model, x, **kw):
  params = jax.jit(model.init)(jax.random.PRNGKey(0), x)
  return params, jax.jit(lambda p, x: model.apply(p, x, **kw))(params, x)


@pytest.mark.parametrize("pool", ["tok", "gap", "map", "none"])
@pytest.mark.parametrize("posemb", ["learn", "sincos2d"])
def test_vit_shapes(pool, posemb, rng):
  img = jnp.asarray(rng.normal(size=(3, 20, 12, 3)), jnp.float32)
  model = vit.Model(**TINY, patch_size=(4, 4), pool_type=pool, posemb=posemb)
  _, (pooled, out) = _init_apply(model, img)
  n = 5 * 3 + (pool == "tok")
  assert out["encoded"].shape == (3, n, 32)
  assert pooled.shape == ((3, n, 32) if pool == "none" else (3, 32))
  assert np.isfinite(pooled).all()


def test_vit_rejects_bad_image_size():
  with pytest.raises(ValueError, match="not divisible by patch size"):
    vit.Model(variant="mu/8").init(jax.random.PRNGKey(0), jnp.zeros((1, 20, 20, 3)))


def test_vit_remat_same_values_and_grads(rng):
  img = jnp.asarray(rng.normal(size=(2, 16, 16, 3)), jnp.float32)
  plain, ckpt = vit.Model(**TINY, patch_size=(4, 4)), vit.Model(**TINY, patch_size=(4, 4), remat=True)
  params = plain.init(jax.random.PRNGKey(0), img)
  loss = lambda m: lambda p: jnp.sum(m.apply(p, img)[0] ** 2)
  l1, g1 = jax.jit(jax.value_and_grad(loss(plain)))(params)
  l2, g2 = jax.jit(jax.value_and_grad(loss(ckpt)))(params)  # same param tree
  np.testing.assert_allclose(l1, l2, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), g1, g2)


def test_vit_bf16_compute_close_to_f32(rng):
  img = jnp.asarray(rng.normal(size=(2, 16, 16, 3)), jnp.float32)
  f32 = vit.Model(**TINY, patch_size=(4, 4))
  params = f32.init(jax.random.PRNGKey(0), img)
  ref = f32.apply(params, img)[0]
  out = vit.Model(**TINY, patch_size=(4, 4), dtype=jnp.bfloat16).apply(params, img)[0]
  assert out.dtype == jnp.bfloat16
  rel = np.linalg.norm(out.astype(np.float32) - ref) / np.linalg.norm(ref)
  assert rel < 0.05


# ---------------------------------------------------------------- ViT pooling / sincos2d vs float64 NumPy


def _np_sincos2d(h, w, width, denom):
  """float64 2-D sin-cos table [h*w, width], written from the definition: tokens row-major
  (t = row * w + col); columns [sin(col*omega), cos(col*omega), sin(row*omega), cos(row*omega)],
  width/4 each, omega_i = 1 / 10000**(i / denom). big_vision (and mmjax) use
  denom = width/4 - 1, so the last frequency is exactly 1/10000; MAE uses denom = width/4."""
  out = np.zeros((h * w, width))
  q = width // 4
  for t in range(h * w):
    row, col = divmod(t, w)
    for i in range(q):
      omega = 1.0 / 10000.0 ** (i / denom)
      out[t, [i, q + i, 2 * q + i, 3 * q + i]] = (
          math.sin(col * omega), math.cos(col * omega), math.sin(row * omega), math.cos(row * omega))
  return out


def _np_ln(x, p, eps=1e-6):
  x = np.asarray(x, np.float64)
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * np.asarray(p["scale"], np.float64) + np.asarray(p["bias"], np.float64)


def _run_vit(model, params, img):
  """pooled, out, intermediates, and the encoder's input (caught by a method interceptor)."""
  seen = {}

  def catch(next_fun, args, kwargs, context):
    if isinstance(context.module, Encoder) and context.method_name == "__call__":
      seen["encoder_in"] = args[0]
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(catch):
    (pooled, out), state = model.apply(params, img, capture_intermediates=True,
                                       mutable=["intermediates"])
  return np.asarray(pooled), out, state["intermediates"], np.asarray(seen["encoder_in"])


def _final_tokens(params, inter, depth):
  """float64 NumPy ln_final of the last encoder block's output: the encoder's final tokens."""
  last = inter["encoder"][f"block{depth - 1}"]["__call__"][0]
  return _np_ln(last, params["params"]["encoder"]["ln_final"])


@pytest.mark.parametrize("h,w,width", [(3, 5, 24), (4, 4, 20), (2, 7, 12)])
def test_posemb_sincos2d_matches_numpy(h, w, width):
  got = np.asarray(posemb_sincos_2d(h, w, width))
  assert got.shape == (1, h * w, width)
  ref.assert_close(got[0], _np_sincos2d(h, w, width, width / 4 - 1), dtype="float32",
                   name=f"sincos2d {h}x{w}x{width}")
  # The convention is big_vision's (denominator width/4 - 1), not MAE's (width/4).
  assert ref.rel_err(got[0], _np_sincos2d(h, w, width, width / 4)) > 1e-3


def test_vit_sincos2d_table_is_the_one_added(rng):
  """The table the ViT adds to its patch tokens (encoder input - patch embedding), non-square
  3x5 grid, width 24: the float64 reference, in row-major token order."""
  img = jnp.asarray(rng.normal(size=(2, 12, 20, 3)), jnp.float32)
  model = vit.Model(width=24, depth=1, mlp_dim=32, num_heads=2, patch_size=4, pool_type="gap",
                    posemb="sincos2d")
  params = model.init(jax.random.PRNGKey(0), img)
  _, _, inter, enc_in = _run_vit(model, params, img)
  emb = np.asarray(inter["embedding"]["__call__"][0], np.float64).reshape(2, 15, 24)
  want = _np_sincos2d(3, 5, 24, 24 / 4 - 1)
  for i in range(2):
    ref.assert_close(enc_in[i] - emb[i], want, dtype="float32", name=f"posemb added, example {i}")


def test_vit_gap_is_mean_of_final_tokens(rng):
  img = jnp.asarray(rng.normal(size=(2, 16, 16, 3)), jnp.float32)
  model = vit.Model(width=16, depth=2, mlp_dim=32, num_heads=2, patch_size=4, pool_type="gap")
  params = model.init(jax.random.PRNGKey(0), img)
  pooled, out, inter, _ = _run_vit(model, params, img)
  tokens = _final_tokens(params, inter, 2)                       # [2, 16, 16] float64
  ref.assert_close(np.asarray(out["encoded"]), tokens, dtype="float32", name="encoded")
  ref.assert_close(pooled, tokens.mean(axis=1), dtype="float32", name="gap pooled")
  # One patch of example 0 changes: its pooled output changes, example 1's does not.
  changed = img.at[0, 4:8, 8:12].add(1.0)
  pooled2 = np.asarray(model.apply(params, changed)[0])
  assert ref.rel_err(pooled2[0], pooled[0]) > 1e-3
  np.testing.assert_allclose(pooled2[1], pooled[1], rtol=1e-5, atol=1e-6)


def _gelu_tanh(x):
  return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def _np_map_head(p, x, mask=None):
  """float64 big_vision MAP head: a learned probe cross-attends to the tokens (q/k/v/out
  projections, softmax over (unmasked) keys), then probe + MLP(LN(probe)); [b, n, w] -> [b, w]."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
  x = np.asarray(x, np.float64)
  a = p["attn"]
  probe = np.broadcast_to(p["probe"], (x.shape[0], 1, x.shape[2]))
  q = np.einsum("bqw,whd->bqhd", probe, a["query"]["kernel"]) + a["query"]["bias"]
  k = np.einsum("bkw,whd->bkhd", x, a["key"]["kernel"]) + a["key"]["bias"]
  v = np.einsum("bkw,whd->bkhd", x, a["value"]["kernel"]) + a["value"]["bias"]
  s = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
  if mask is not None:
    s = np.where(np.asarray(mask)[:, None, None, :], s, -np.inf)
  e = np.exp(s - s.max(-1, keepdims=True))
  att = e / e.sum(-1, keepdims=True)
  o = np.einsum("bhqk,bkhd->bqhd", att, v)
  y = np.einsum("bqhd,hdw->bqw", o, a["out"]["kernel"]) + a["out"]["bias"]
  m = p["mlp"]
  hid = _gelu_tanh(_np_ln(y, p["ln"]) @ m["Dense_0"]["kernel"] + m["Dense_0"]["bias"])
  return (y + hid @ m["Dense_1"]["kernel"] + m["Dense_1"]["bias"])[:, 0]


def _randomised(params, rng, scale=0.5):
  """The same tree with every leaf redrawn N(0, scale^2): biases, LN scale/bias and the probe
  then matter (their inits are ~0 or 1)."""
  return jax.tree.map(lambda a: jnp.asarray(scale * rng.normal(size=a.shape), a.dtype), params)


@pytest.mark.parametrize("masked", [False, True])
def test_map_head_matches_numpy(masked, rng):
  x = jnp.asarray(rng.normal(size=(3, 7, 16)), jnp.float32)
  mask = jnp.asarray([[True] * 7, [True] * 3 + [False] * 4, [False, True] * 3 + [False]]) if masked else None
  head = MAPHead(num_heads=2, mlp_dim=24)
  params = _randomised(head.init(jax.random.PRNGKey(0), x, mask), rng)
  apply = head.apply
  got = apply(params, x, mask)
  assert got.shape == (3, 16)
  ref.assert_close(np.asarray(got), _np_map_head(params["params"], x, mask), dtype="float32",
                   name=f"MAP head (masked={masked})")
  if masked:  # masked-out tokens do not matter
    noisy = x.at[1, 3:].add(5.0).at[2, 0].add(5.0)
    np.testing.assert_allclose(apply(params, noisy, mask), got, rtol=1e-5, atol=1e-5)


def test_vit_map_pools_final_tokens_with_its_head(rng):
  img = jnp.asarray(rng.normal(size=(2, 16, 16, 3)), jnp.float32)
  model = vit.Model(width=16, depth=1, mlp_dim=32, num_heads=2, patch_size=8, pool_type="map")
  params = model.init(jax.random.PRNGKey(0), img)
  params = {"params": {**params["params"], "map_head": _randomised(params["params"]["map_head"], rng)}}
  pooled, out, inter, _ = _run_vit(model, params, img)
  tokens = _final_tokens(params, inter, 1)
  ref.assert_close(pooled, _np_map_head(params["params"]["map_head"], tokens), dtype="float32",
                   name="ViT map pooled")


@pytest.mark.parametrize("posemb_cls", [False, True])
def test_vit_tok_is_class_token_final_state(posemb_cls, rng):
  img = jnp.asarray(rng.normal(size=(2, 16, 16, 3)), jnp.float32)
  model = vit.Model(width=16, depth=2, mlp_dim=32, num_heads=2, patch_size=8, pool_type="tok",
                    posemb="learn", posemb_cls=posemb_cls)
  params = model.init(jax.random.PRNGKey(0), img)
  cls = rng.normal(size=(1, 1, 16))   # init is zeros: make the class token distinguishable
  params = {"params": {**params["params"], "cls": jnp.asarray(cls, jnp.float32)}}
  pooled, out, inter, enc_in = _run_vit(model, params, img)
  # The encoder's input: [cls (+ its position), patches + positions].
  pe = np.asarray(params["params"]["pos_embedding"], np.float64)[0]
  emb = np.asarray(inter["embedding"]["__call__"][0], np.float64).reshape(2, 4, 16)
  want_in = np.concatenate([np.broadcast_to(cls, (2, 1, 16)), emb], axis=1)
  want_in = want_in + (pe if posemb_cls else np.concatenate([np.zeros((1, 16)), pe]))
  ref.assert_close(enc_in, want_in, dtype="float32", name="encoder input")
  tokens = _final_tokens(params, inter, 2)                       # [2, 5, 16]
  assert out["encoded"].shape == (2, 5, 16)
  ref.assert_close(pooled, tokens[:, 0], dtype="float32", name="tok pooled")


def _tokens(rng, b, length, vocab, lengths):
  t = rng.integers(4, vocab, size=(b, length)).astype(np.int32)
  for i, n in enumerate(lengths):
    t[i, n - 1] = 3          # EOS
    t[i, n:] = 0             # padding
  return jnp.asarray(t)


def test_text_causal_positions_ignore_later_tokens(rng):
  tok = _tokens(rng, 2, 11, 50, [11, 11])
  model = text.Model(vocab_size=50, max_len=11, causal=True, pool_type="eos", **TINY)
  params, (_, out) = _init_apply(model, tok)
  changed = tok.at[:, 7].set((tok[:, 7] + 1 - 4) % 46 + 4)
  out2 = model.apply(params, changed)[1]
  np.testing.assert_allclose(out["encoded"][:, :7], out2["encoded"][:, :7], rtol=1e-5, atol=1e-6)
  assert not np.allclose(out["encoded"][:, 7:], out2["encoded"][:, 7:])
  # Bidirectional: earlier positions do see the change.
  bi = text.Model(vocab_size=50, max_len=11, causal=False, **TINY)
  p = bi.init(jax.random.PRNGKey(0), tok)
  assert not np.allclose(bi.apply(p, tok)[1]["encoded"][:, 0], bi.apply(p, changed)[1]["encoded"][:, 0])


@pytest.mark.parametrize("pool", ["eos", "map"])
@pytest.mark.parametrize("causal", [True, False])
def test_text_padding_does_not_change_pooled(pool, causal, rng):
  short = _tokens(rng, 3, 9, 60, [3, 9, 5])
  longer = jnp.concatenate([short, jnp.zeros((3, 4), jnp.int32)], axis=1)  # more padding
  model = text.Model(vocab_size=60, max_len=13, causal=causal, pool_type=pool, **TINY)
  params = model.init(jax.random.PRNGKey(0), longer)
  a, b = model.apply(params, short)[0], model.apply(params, longer)[0]
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  # ... and the pooled output does depend on the real tokens.
  other = short.at[0, 0].set(short[0, 0] % 50 + 5)
  assert not np.allclose(model.apply(params, other)[0][0], a[0])


@pytest.mark.parametrize("pool", ["last", "first"])
def test_text_position_pooling(pool, rng):
  tok = _tokens(rng, 2, 7, 30, [4, 7])
  model = text.Model(vocab_size=30, max_len=7, pool_type=pool, **TINY)
  _, (pooled, out) = _init_apply(model, tok)
  np.testing.assert_allclose(pooled, out["encoded"][:, -1 if pool == "last" else 0])


def test_text_rejects_too_long():
  with pytest.raises(ValueError, match="max_len"):
    text.Model(vocab_size=30, max_len=4, **TINY).init(jax.random.PRNGKey(0), jnp.ones((1, 6), jnp.int32))


@pytest.mark.parametrize("loss,scale,bias", [("clip", 1 / 0.07, None), ("siglip", 10.0, -10.0)])
def test_two_tower_init_and_embeddings(loss, scale, bias, rng):
  img = jnp.asarray(rng.normal(size=(3, 16, 16, 3)), jnp.float32)
  tok = _tokens(rng, 3, 8, 40, [8, 2, 5])
  model = two_tower.Model(image=dict(**TINY, patch_size=(8, 8)),
                          text=dict(**TINY, vocab_size=40, max_len=8), embed_dim=24, loss=loss)
  params = model.init(jax.random.PRNGKey(0), img, tok)
  zimg, ztxt, out = model.apply(params, img, tok)
  assert zimg.shape == ztxt.shape == (3, 24) and zimg.dtype == jnp.float32
  np.testing.assert_allclose(np.linalg.norm(zimg, axis=1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(ztxt, axis=1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(out["scale"], scale, rtol=1e-5)
  np.testing.assert_allclose(params["params"]["t"], math.log(scale), rtol=1e-6)
  if bias is None:
    assert "bias" not in out and "b" not in params["params"]
  else:
    np.testing.assert_allclose(out["bias"], bias)
  only_img, none_txt, _ = model.apply(params, img, None)
  assert none_txt is None
  np.testing.assert_allclose(only_img, zimg, rtol=1e-6)
  np.testing.assert_allclose(model.apply(params, tok, method="encode_text"), ztxt, rtol=1e-6)
