"""Losses against a float64 NumPy reference: values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.losses import clip_loss, siglip_loss
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
