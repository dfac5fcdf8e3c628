"""Losses against a float64 NumPy reference: values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.losses import clip_loss, infonce_loss, siglip_loss
from tests.reference import (EXTREMES, LOSSES, REFS, as_dtype, assert_close, inputs, normed,
                             ref_clip, ref_siglip, term_sizes)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("n,d", [(1, 4), (7, 16), (33, 24)])
def test_clip_loss_matches_float64(n, d, dtype, rng):
  x, x64 = as_dtype(normed(rng, n, d), dtype)
  y, y64 = as_dtype(normed(rng, n, d), dtype)
  s = float(np.exp(rng.uniform(0, np.log(100))))
  loss, grads = jax.value_and_grad(clip_loss, argnums=(0, 1, 2))(x, y, s)
  ref_loss, ref_grads = ref_clip(x64, y64, s)
  # The loss is float32 whatever the embeddings; gradients are in the embedding dtype (d_scale
  # in float32). With one pair the loss and gradients are 0: errors relative to the scale.
  scale = s if n == 1 else term_sizes("clip", x64, y64, s)
  assert_close(loss, ref_loss, dtype=jnp.float32, name="loss", scale=s if n == 1 else 0.0)
  assert_close(grads[:2], ref_grads[:2], dtype=dtype, name=("d_img", "d_txt"), scale=s)
  assert_close(grads[2], ref_grads[2], dtype=jnp.float32, name="d_scale",
               scale=scale if n == 1 else scale[2])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("n,d", [(1, 4), (7, 16), (33, 24)])
def test_siglip_loss_matches_float64(n, d, dtype, rng):
  x, x64 = as_dtype(normed(rng, n, d), dtype)
  y, y64 = as_dtype(normed(rng, n, d), dtype)
  s = float(np.exp(rng.uniform(0, np.log(20))))
  b = float(rng.uniform(-10, 2))
  loss, grads = jax.value_and_grad(siglip_loss, argnums=(0, 1, 2, 3))(x, y, s, b)
  ref_loss, ref_grads = ref_siglip(x64, y64, s, b)
  assert_close(loss, ref_loss, dtype=jnp.float32, name="loss")
  assert_close(grads[:2], ref_grads[:2], dtype=dtype, name=("d_img", "d_txt"))
  assert_close(grads[2:], ref_grads[2:], dtype=jnp.float32, name=("d_scale", "d_bias"),
               scale=term_sizes("siglip", x64, y64, s, b)[2:])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("name,scale,bias", EXTREMES)
def test_extreme_logits_match_float64(name, scale, bias, dtype, rng):
  """CLIP's learned scale 100, SigLIP's init (10, -10) and SigLIP saturated at 100."""
  x, y, s, b = inputs(33, 24, rng, scale, bias)
  x, x64 = as_dtype(x, dtype)
  y, y64 = as_dtype(y, dtype)
  loss, grads = jax.value_and_grad(lambda *a: LOSSES[name](*a), argnums=(0, 1, 2, 3))(x, y, s, b)
  ref_loss, ref_grads = REFS[name](x64, y64, scale, bias)
  assert_close(loss, ref_loss, dtype=jnp.float32, name="loss")
  assert_close(grads[:2], ref_grads[:2], dtype=dtype, name=("d_img", "d_txt"))
  k = len(ref_grads)
  assert_close(grads[2:k], ref_grads[2:], dtype=jnp.float32, name=("d_scale", "d_bias")[:k - 2],
               scale=term_sizes(name, x64, y64, scale, bias)[2:])


def test_siglip_init_loss_is_small_and_finite(rng):
  # At SigLIP's init (t'=log 10, b=-10) the negatives contribute ~0: the loss
  # is dominated by the n positives, about log(1 + e^10) each, / n.
  x, y = normed(rng, 64, 8), normed(rng, 64, 8)
  loss = siglip_loss(x, y, 10.0, -10.0)
  assert np.isfinite(loss) and 5.0 < loss < 25.0


@pytest.mark.parametrize("fn,extra", [(clip_loss, ()), (siglip_loss, (0.0,))])
def test_mismatched_shapes_name_both(fn, extra):
  x, y = jnp.zeros((4, 8)), jnp.zeros((5, 8))
  with pytest.raises(ValueError, match=r"\(4, 8\).*\(5, 8\)"):
    fn(x, y, 1.0, *extra)
  with pytest.raises(ValueError, match="batch, dim"):
    fn(jnp.zeros((4,)), jnp.zeros((4,)), 1.0, *extra)
  with pytest.raises(ValueError, match="scale"):
    fn(x, x, jnp.ones(3), *extra)
  with pytest.raises(ValueError, match="impl"):
    fn(x, x, 1.0, *extra, impl="nope")


_ENTRIES = {  # name -> (loss of two embeddings, the names of its embedding arguments)
    **{f"clip_{b}": (lambda x, y, b=b: clip_loss(x, y, 1.0, blocks=b), ("img_emb", "txt_emb"))
       for b in ("dense", "tiled", "pallas")},
    **{f"siglip_{b}": (lambda x, y, b=b: siglip_loss(x, y, 10.0, -10.0, blocks=b),
                       ("img_emb", "txt_emb")) for b in ("dense", "tiled", "pallas")},
    "infonce": (lambda x, y: infonce_loss(x, y, 10.0), ("query", "key")),
}


@pytest.mark.parametrize("entry", sorted(_ENTRIES))
@pytest.mark.parametrize("jit", [False, True])
def test_bad_embeddings_name_the_argument(entry, jit):
  fn, (first, second) = _ENTRIES[entry]
  fn = jax.jit(fn) if jit else fn
  x = jnp.zeros((4, 8))
  with pytest.raises(ValueError, match=f"^{first} must be a floating-point array; got int32"):
    fn(jnp.zeros((4, 8), jnp.int32), x)
  with pytest.raises(ValueError, match=f"^{second} must be a floating-point array; got bool"):
    fn(x, np.zeros((4, 8), bool))
  with pytest.raises(ValueError, match=f"^{first} has batch size 0"):
    fn(jnp.zeros((0, 8)), jnp.zeros((0, 8)))
  with pytest.raises(ValueError, match=f"^{first} has dim size 0"):
    fn(jnp.zeros((4, 0)), jnp.zeros((4, 0)))
  if not jit:   # jit itself rejects a list argument
    with pytest.raises(ValueError, match=f"^{first} must be a jax or numpy array; got list"):
      fn([[1.0] * 8] * 4, x)


@pytest.mark.parametrize("entry", ["clip_dense", "siglip_tiled", "infonce"])
def test_numpy_and_jax_embeddings_give_the_same_loss(entry, rng):
  fn, _ = _ENTRIES[entry]
  x, y = normed(rng, 8, 4), normed(rng, 8, 4)
  want = fn(jnp.asarray(x), jnp.asarray(y))
  np.testing.assert_allclose(fn(x, y), want, rtol=1e-6)
  np.testing.assert_allclose(fn(x.astype(np.float64), y), want, rtol=1e-5)
