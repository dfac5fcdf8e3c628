"""Losses against a float64 NumPy reference: values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.losses import clip_loss, siglip_loss


def _normed(rng, n, d):
  x = rng.normal(size=(n, d))
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def _logsumexp(x, axis):
  m = x.max(axis=axis, keepdims=True)
  return (m + np.log(np.exp(x - m).sum(axis=axis, keepdims=True))).squeeze(axis)


def _softmax(x, axis):
  e = np.exp(x - x.max(axis=axis, keepdims=True))
  return e / e.sum(axis=axis, keepdims=True)


def ref_clip(x, y, s):
  """float64 loss and (dx, dy, ds) with hand-derived gradients."""
  n = x.shape[0]
  dots = x @ y.T
  z = s * dots
  d = np.diag(z)
  loss = 0.5 * (np.mean(_logsumexp(z, 1) - d) + np.mean(_logsumexp(z, 0) - d))
  g = 0.5 / n * (_softmax(z, 1) + _softmax(z, 0) - 2 * np.eye(n))  # dL/dz
  return loss, (s * g @ y, s * g.T @ x, np.sum(g * dots))


def _log_sigmoid(x):
  return -np.logaddexp(0.0, -x)


def ref_siglip(x, y, s, b):
  n = x.shape[0]
  dots = x @ y.T
  z = s * dots + b
  sign = 2 * np.eye(n) - 1
  loss = -np.sum(_log_sigmoid(sign * z)) / n
  g = -sign / n / (1 + np.exp(sign * z))  # d/dz of -log sigmoid(sign*z) / n
  return loss, (s * g @ y, s * g.T @ x, np.sum(g * dots), np.sum(g))


def _as(x, dtype):
  """The array in `dtype`, and its exact float64 value (what the reference sees)."""
  a = jnp.asarray(x, dtype)
  return a, np.asarray(a.astype(jnp.float32), np.float64)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-5), (jnp.bfloat16, 2e-5)])
@pytest.mark.parametrize("n,d", [(1, 4), (7, 16), (33, 24)])
def test_clip_loss_matches_float64(n, d, dtype, tol):
  rng = np.random.default_rng()
  x, x64 = _as(_normed(rng, n, d), dtype)
  y, y64 = _as(_normed(rng, n, d), dtype)
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
def test_siglip_loss_matches_float64(n, d, dtype, tol):
  rng = np.random.default_rng()
  x, x64 = _as(_normed(rng, n, d), dtype)
  y, y64 = _as(_normed(rng, n, d), dtype)
  s = float(np.exp(rng.uniform(0, np.log(20))))
  b = float(rng.uniform(-10, 2))
  loss, grads = jax.value_and_grad(siglip_loss, argnums=(0, 1, 2, 3))(x, y, s, b)
  ref_loss, ref_grads = ref_siglip(x64, y64, s, b)
  np.testing.assert_allclose(loss, ref_loss, rtol=tol, atol=tol)
  gtol = 1e-4 if dtype == jnp.float32 else 1e-2
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(np.asarray(g, np.float64), r, rtol=gtol,
                               atol=gtol * max(1.0, np.abs(r).max()))


def test_siglip_init_loss_is_small_and_finite():
  # At SigLIP's init (t'=log 10, b=-10) the negatives contribute ~0: the loss
  # is dominated by the n positives, about log(1 + e^10) each, / n.
  rng = np.random.default_rng()
  x, y = _normed(rng, 64, 8), _normed(rng, 64, 8)
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
