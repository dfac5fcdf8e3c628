"""dot_product_attention against a float64 NumPy reference (tests/reference.py): values and
gradients, f32 and bf16."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.nn.attention import MultiHeadAttention, dot_product_attention
from mmjax.nn.blockwise import blockwise_attention
from tests.reference import as_dtype, assert_close, ref_attention


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
  assert_close(out, ref_out, dtype=jnp.float32, name="out")
  assert_close(grads, ref_grads, dtype=jnp.float32, name=["dq", "dk", "dv"])


def test_bf16_operands_match_float64_reference(rng):
  """bf16 q, k, v (and cotangent): values and gradients in bf16, within the bf16 tolerance of
  float64 on the same (rounded) inputs."""
  (q, qx), (k, kx), (v, vx), (w, wx) = (as_dtype(rng.normal(size=(2, 11, 2, 16)), jnp.bfloat16)
                                        for _ in range(4))
  want, want_grads = ref_attention(qx, kx, vx, wx, np.ones((2, 11, 11), bool))
  out, vjp = jax.vjp(dot_product_attention, q, k, v)
  assert out.dtype == jnp.bfloat16
  assert_close(out, want, dtype=jnp.bfloat16, name="out")
  assert_close(vjp(w), want_grads, dtype=jnp.bfloat16, name=["dq", "dk", "dv"])


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


_ATTENTIONS = {**{impl: lambda q, k, v, impl=impl: dot_product_attention(q, k, v, impl=impl)
                  for impl in ("xla", "blockwise", "pallas")},
               "blockwise_attention": blockwise_attention}


@pytest.mark.parametrize("entry", sorted(_ATTENTIONS))
@pytest.mark.parametrize("jit", [False, True])
def test_bad_qkv_name_the_argument(entry, jit):
  """Checked before any implementation (Pallas included) runs; static facts only, so under jit too."""
  fn = jax.jit(_ATTENTIONS[entry]) if jit else _ATTENTIONS[entry]
  x = jnp.zeros((2, 5, 2, 8))
  with pytest.raises(ValueError, match="^q must be a floating-point array; got int32"):
    fn(x.astype(jnp.int32), x, x)
  with pytest.raises(ValueError, match="^v must be a floating-point array; got bool"):
    fn(x, x, np.zeros((2, 5, 2, 8), bool))
  with pytest.raises(ValueError, match=r"^q has seq size 0; got shape \(2, 0, 2, 8\)"):
    fn(jnp.zeros((2, 0, 2, 8)), x, x)
  with pytest.raises(ValueError, match="^k has seq size 0"):
    fn(x, jnp.zeros((2, 0, 2, 8)), jnp.zeros((2, 0, 2, 8)))
  with pytest.raises(ValueError, match="^q has batch size 0"):
    fn(*(jnp.zeros((0, 5, 2, 8)),) * 3)
  if not jit:   # jit itself rejects a list argument
    with pytest.raises(ValueError, match="^k must be a jax or numpy array; got list"):
      fn(x, np.zeros((2, 5, 2, 8)).tolist(), x)


@pytest.mark.parametrize("impl", ["xla", "blockwise"])
def test_numpy_qkv_match_jax(impl, rng):
  q, k, v = (rng.normal(size=(1, 6, 2, 4)).astype(np.float32) for _ in range(3))
  want = dot_product_attention(*map(jnp.asarray, (q, k, v)), impl=impl)
  np.testing.assert_allclose(dot_product_attention(q, k, v, impl=impl), want, rtol=1e-6)


def test_module_matches_function_on_its_projections(rng):
  x = jnp.asarray(rng.normal(size=(2, 9, 12)), jnp.float32)
  mha = MultiHeadAttention(num_heads=3)
  params = mha.init(jax.random.PRNGKey(0), x)["params"]
  out = mha.apply({"params": params}, x, is_causal=True)
  proj = lambda n: jnp.einsum("bnw,whd->bnhd", x, params[n]["kernel"]) + params[n]["bias"]
  o = dot_product_attention(proj("query"), proj("key"), proj("value"), is_causal=True)
  want = jnp.einsum("bnhd,hdw->bnw", o, params["out"]["kernel"]) + params["out"]["bias"]
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
