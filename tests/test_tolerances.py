"""The float64 comparison (tests/reference.py: assert_close, TOL) rejects a 2% error: for each
dtype's tolerance, and on real float32 gradients of both losses."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.reference import (EXTREMES, LOSSES, REFS, TOL, as_dtype, assert_close, dense, inputs,
                             normed, ref_clip, term_sizes)


def _wrong(a):
  """`a` scaled by 1.02, and `a` shifted by a constant of 2% of its root-mean-square."""
  a = np.asarray(a, np.float64)
  return 1.02 * a, a + 0.02 * np.sqrt(np.mean(a ** 2))


@pytest.mark.parametrize("dtype", sorted(TOL))
def test_each_tolerance_rejects_two_percent(dtype, rng):
  x, y = normed(rng, 33, 24), normed(rng, 33, 24)
  _, grads = ref_clip(x, y, 10.0)
  for want in grads[:2]:
    got = np.asarray(jnp.asarray(want, dtype).astype(jnp.float32))   # rounded to dtype
    assert_close(got, want, dtype=dtype)
    for bad in _wrong(want):
      with pytest.raises(AssertionError, match="relative error"):
        assert_close(np.asarray(jnp.asarray(bad, dtype).astype(jnp.float32)), want, dtype=dtype)
  assert TOL[dtype] < 0.02 * 0.75   # room for the dtype's own rounding of a 2% error


def test_trees_scalars_and_the_message():
  want = {"a": np.ones(3), "b": 2.0}
  assert_close(want, want, dtype=jnp.float32, name="g")
  with pytest.raises(AssertionError, match=r"^g\['b'\]: relative error 0.02 > tol 1e-05"):
    assert_close({"a": np.ones(3), "b": 2.04}, want, dtype=jnp.float32, name="g")
  with pytest.raises(AssertionError, match="shape"):
    assert_close(np.ones(2), np.ones(3), dtype=jnp.float32)
  # A want of 0: errors relative to `scale`, else any error fails.
  assert_close(1e-7, 0.0, dtype=jnp.float32, scale=1.0)
  with pytest.raises(AssertionError, match="relative error inf"):
    assert_close(1e-7, 0.0, dtype=jnp.float32)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("name,scale,bias", [("clip", 5.0, 0.0), ("siglip", 5.0, -2.0)] + EXTREMES)
def test_real_gradients_pass_and_two_percent_off_fails(name, scale, bias, dtype, rng):
  """The checks of the loss tests: the dense loss's own gradients pass; each one, or dx and
  dy together, scaled by 1.02 or shifted by 2% fails."""
  x, y, s, b = inputs(33, 24, rng, scale, bias)
  x, x64 = as_dtype(x, dtype)
  y, y64 = as_dtype(y, dtype)
  loss, grads = jax.value_and_grad(lambda *a: LOSSES[name](*a), argnums=(0, 1, 2, 3))(x, y, s, b)
  ref_loss, ref_grads = REFS[name](x64, y64, scale, bias)
  sizes = term_sizes(name, x64, y64, scale, bias)
  got = [np.asarray(g, np.float32) for g in grads[:len(ref_grads)]]
  dtypes = [dtype, dtype] + [jnp.float32] * (len(ref_grads) - 2)
  for g, r, dt, sc in zip(got, ref_grads, dtypes, sizes):
    assert_close(g, r, dtype=dt, scale=sc)
    for bad in _wrong(g):
      with pytest.raises(AssertionError):
        assert_close(bad, r, dtype=dt, scale=sc)
  assert_close(loss, ref_loss, dtype=jnp.float32)
  with pytest.raises(AssertionError):
    assert_close(1.02 * float(loss), ref_loss, dtype=jnp.float32)
  with pytest.raises(AssertionError):
    assert_close([1.02 * got[0], 1.02 * got[1]], ref_grads[:2], dtype=dtype)


def test_dense_helper_is_what_the_tests_compare(rng):
  """dense() (the sharded and tiled tests' baseline) is within float32 TOL of float64."""
  args = inputs(16, 8, rng)
  loss, grads = dense("siglip", *args)
  x, y = (np.asarray(a, np.float64) for a in args[:2])
  want = REFS["siglip"](x, y, float(args[2]), float(args[3]))
  assert_close((loss, grads), want, dtype=jnp.float32,
               scale=(0.0,) + term_sizes("siglip", x, y, float(args[2]), float(args[3])))
