"""dot_product_attention against a float64 NumPy reference: values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.nn.attention import MultiHeadAttention, dot_product_attention
from tests.reference import ref_attention


_MASKS = [(False, False), (True, False), (False, True), (True, True)]  # (causal, key padding)


# Causal only for self-attention shapes (lq == lk).
@pytest.mark.parametrize("b,lq,lk,h,d,causal,use_mask", [
    (2, 13, 13, 3, 8, c, m) for c, m in _MASKS] + [
    (1, 7, 19, 2, 16, False, m) for m in (False, True)] + [
    (3, 1, 5, 1, 4, False, m) for m in (False, True)])
def test_matches_float64_reference(b, lq, lk, h, d, causal, use_mask, rng):
  q, k, v, w = (rng.normal(size=s) for s in [(b, lq, h, d), (b, lk, h, d), (b, lk, h, d),
                                              (b, lq, h, d)])
  mask = np.ones((b, 1, lq, lk), bool)
  if use_mask:  # key padding: the last few keys of each row are padding (at least one real key)
    lengths = rng.integers(1, lk + 1, size=b)
    mask = (np.arange(lk)[None, :] < lengths[:, None])[:, None, None, :]
    mask = np.broadcast_to(mask, (b, 1, lq, lk))
  full = mask & (np.tril(np.ones((lq, lk), bool)) if causal else True)
  ref_out, ref_grads = ref_attention(q, k, v, w, full[:, 0])

  f = lambda q, k, v: dot_product_attention(q, k, v, mask=jnp.asarray(mask) if use_mask else None,
                                            is_causal=causal)
  args = [jnp.asarray(x, jnp.float32) for x in (q, k, v)]
  out, vjp = jax.vjp(f, *args)
  grads = vjp(jnp.asarray(w, jnp.float32))
  np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4)


def test_bf16_operands_close_to_f32(rng):
  q, k, v = (jnp.asarray(rng.normal(size=(2, 11, 2, 16)), jnp.float32) for _ in range(3))
  ref = dot_product_attention(q, k, v)
  out = dot_product_attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)))
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(out.astype(jnp.float32), ref, atol=5e-2)


def test_fully_masked_rows_are_finite():
  q = k = v = jnp.ones((1, 4, 1, 8))
  mask = jnp.zeros((1, 1, 4, 4), bool)
  out, grads = jax.value_and_grad(lambda q: dot_product_attention(q, k, v, mask=mask).sum())(q)
  assert np.isfinite(out) and np.isfinite(grads).all()


def test_bad_inputs_name_the_argument():
  x = jnp.zeros((2, 5, 2, 8))
  with pytest.raises(ValueError, match="q must be"):
    dot_product_attention(jnp.zeros((2, 5, 16)), x, x)
  with pytest.raises(ValueError, match="k .* and v"):
    dot_product_attention(x, x, jnp.zeros((2, 6, 2, 8)))
  with pytest.raises(ValueError, match="head_dim"):
    dot_product_attention(x, jnp.zeros((2, 5, 2, 4)), jnp.zeros((2, 5, 2, 4)))
  with pytest.raises(ValueError, match="mask"):
    dot_product_attention(x, x, x, mask=jnp.ones((2, 1, 5, 4), bool))
  with pytest.raises(ValueError, match="impl"):
    dot_product_attention(x, x, x, impl="flash9")


def test_module_matches_function_on_its_projections(rng):
  x = jnp.asarray(rng.normal(size=(2, 9, 12)), jnp.float32)
  mha = MultiHeadAttention(num_heads=3)
  params = mha.init(jax.random.PRNGKey(0), x)["params"]
  out = mha.apply({"params": params}, x, is_causal=True)
  proj = lambda n: jnp.einsum("bnw,whd->bnhd", x, params[n]["kernel"]) + params[n]["bias"]
  o = dot_product_attention(proj("query"), proj("key"), proj("value"), is_causal=True)
  want = jnp.einsum("bnhd,hdw->bnw", o, params["out"]["kernel"]) + params["out"]["bias"]
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
