"""ViT, text transformer and two-tower model: variants, shapes, masks, remat, dtypes."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.models import text, two_tower, vit

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
