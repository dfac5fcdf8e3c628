"""Losses against a float64 NumPy reference: values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.losses import clip_loss, infonce_loss, siglip_loss
from tests.reference import as_dtype, normed, ref_clip, ref_siglip


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-5), (jnp.bfloat16, 2e-5)])
@pytest.mark.parametrize("n,d", [(1, 4), (7, 16), (33, 24)])
def test_clip_loss_matches_float64(n, d, dtype, tol, rng):
  x, x64 = as_dtype(normed(rng, n, d), dtype)
  y, y64 = as_dtype(normed(rng, n, d), dtype)
  s = float(np.exp(rng.uniform(0, np.log(100))))
  loss, grads = jax.value_and_grad(clip_loss, argnums=(0, 1, 2))(x, y, s)
  ref_loss, ref_grads = ref_clip(x64, y64, s)
  np.testing.assert_allclose(loss, ref_loss, rtol=tol, atol=tol)
  # Gradients are in the embedding dtype; bf16 rounds them to 3 digits.
  gtol = 1e-4 if dtype == jnp.float32 else 1e-2
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(np.asarray(g, np.float64), r, rtol=gtol,
                               atol=gtol * max(1.0, np.abs(r).max()))


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-5), (jnp.bfloat16, 2e-5)])
@pytest.mark.parametrize("n,d", [(1, 4), (7, 16), (33, 24)])
def test_siglip_loss_matches_float64(n, d, dtype, tol, rng):
  x, x64 = as_dtype(normed(rng, n, d), dtype)
  y, y64 = as_dtype(normed(rng, n, d), dtype)
  s = float(np.exp(rng.uniform(0, np.log(20))))
  b = float(rng.uniform(-10, 2))
  loss, grads = jax.value_and_grad(siglip_loss, argnums=(0, 1, 2, 3))(x, y, s, b)
  ref_loss, ref_grads = ref_siglip(x64, y64, s, b)
  np.testing.assert_allclose(loss, ref_loss, rtol=tol, atol=tol)
  gtol = 1e-4 if dtype == jnp.float32 else 1e-2
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(np.asarray(g, np.float64), r, rtol=gtol,
                               atol=gtol * max(1.0, np.abs(r).max()))


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
