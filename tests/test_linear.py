"""mmjax.nn.linear (Dense, LayerNorm, add_bias) and layers.activate: Flax's param trees and
values, float64 references, and gradients that accumulate in float32 under bf16 compute."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.nn import layers, linear, precision
from tests.reference import assert_close, rel_err


@pytest.fixture(autouse=True)
def _bf16_dots(monkeypatch):
  monkeypatch.setenv("MMJAX_BF16_DOTS", "1")


def _bf16(x):
  """x rounded to bf16, back in float64 (what a bf16 operand holds)."""
  return np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32), np.float64)


@pytest.mark.parametrize("features,axis,shape", [(6, -1, (3, 5, 7)), ((3, 4), -1, (2, 5, 9)),
                                                 (5, (-2, -1), (2, 3, 4, 6))])
def test_dense_has_flax_params_and_values(rng, features, axis, shape):
  """Same tree, shapes and initial values as nn.DenseGeneral (nn.Dense for one axis and an
  int), the same output in f32; bf16 compute is within bf16 round-off of float64."""
  x = jnp.asarray(rng.normal(size=shape), jnp.float32)
  kw = dict(kernel_init=nn.initializers.xavier_uniform(), bias_init=nn.initializers.normal(0.5))
  ours = linear.Dense(features, axis=axis, **kw)
  flax = nn.DenseGeneral(features, axis=axis, **kw)
  key = jax.random.PRNGKey(int(rng.integers(1 << 30)))
  p, q = ours.init(key, x)["params"], flax.init(key, x)["params"]
  assert jax.tree.map(np.shape, p) == jax.tree.map(np.shape, q)
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(q)))
  if isinstance(features, int) and axis == -1:
    assert np.array_equal(p["kernel"], nn.Dense(features, **kw).init(key, x)["params"]["kernel"])
  want = flax.apply({"params": q}, x)
  assert_close(ours.apply({"params": p}, x), want, dtype=jnp.float32, name="f32")
  got = linear.Dense(features, axis=axis, dtype=jnp.bfloat16, **kw).apply({"params": p}, x)
  assert got.dtype == jnp.bfloat16
  assert_close(got, want, dtype=jnp.bfloat16, name="bf16")


def test_dense_kernel_and_bias_gradients_accumulate_in_float32(rng):
  """bf16 operands, f32 params: d kernel = x^T g and d bias = sum(g) over 600 tokens come out
  in f32 at f32 accuracy against float64 on the bf16-rounded operands (a bf16-rounded
  gradient or a bf16 running sum would be off by ~1e-3 to 1e-2)."""
  x, g = rng.normal(size=(4, 150, 32)), rng.normal(size=(4, 150, 16))
  model = linear.Dense(16, dtype=jnp.bfloat16)
  params = model.init(jax.random.PRNGKey(0), jnp.asarray(x, jnp.float32))["params"]
  params = {"kernel": params["kernel"], "bias": jnp.asarray(rng.normal(size=16), jnp.float32)}
  gb = jnp.asarray(g, jnp.bfloat16)
  grads = jax.grad(lambda p: (model.apply({"params": p}, jnp.asarray(x, jnp.float32))
                              .astype(jnp.float32) * gb.astype(jnp.float32)).sum())(params)
  xb, gg = _bf16(x).reshape(-1, 32), _bf16(g).reshape(-1, 16)
  assert grads["kernel"].dtype == grads["bias"].dtype == jnp.float32
  # f32 accumulation: ~1e-5 (3e-5 seen); a bf16-rounded result is ~1e-3 off
  for name, want in (("bias", gg.sum(0)), ("kernel", xb.T @ gg)):
    got = grads[name]
    assert rel_err(got, want) < 2e-4, (name, rel_err(got, want))


def test_add_bias_gradient_is_a_float32_sum(rng):
  y, b = rng.normal(size=(8, 300, 5)), rng.normal(size=5)
  g = rng.normal(size=y.shape)
  gb = jnp.asarray(g, jnp.bfloat16)
  f = lambda y, b: (linear.add_bias(y, b).astype(jnp.float32) * gb.astype(jnp.float32)).sum()
  dy, db = jax.grad(f, (0, 1))(jnp.asarray(y, jnp.bfloat16), jnp.asarray(b, jnp.float32))
  assert (dy.dtype, db.dtype) == (jnp.bfloat16, jnp.float32)
  assert_close(db, _bf16(g).sum((0, 1)), dtype=jnp.float32, name="d bias")
  assert_close(linear.add_bias(jnp.asarray(y, jnp.bfloat16), jnp.asarray(b, jnp.float32)),
               y + b, dtype=jnp.bfloat16, name="value")


def test_layernorm_matches_flax_and_float64(rng):
  x = rng.normal(size=(3, 7, 24)) * 3 + 1
  scale, bias = rng.normal(size=24), rng.normal(size=24)
  p = {"scale": jnp.asarray(scale, jnp.float32), "bias": jnp.asarray(bias, jnp.float32)}
  ln = linear.LayerNorm(epsilon=1e-5)
  ref = nn.LayerNorm(epsilon=1e-5).init(jax.random.PRNGKey(0), jnp.asarray(x, jnp.float32))
  assert jax.tree.map(np.shape, ref["params"]) == jax.tree.map(np.shape, p)
  mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  want = (x - mu) / np.sqrt(var + 1e-5) * scale + bias
  assert_close(ln.apply({"params": p}, jnp.asarray(x, jnp.float32)), want, dtype=jnp.float32)
  got = linear.LayerNorm(epsilon=1e-5, dtype=jnp.bfloat16).apply(
      {"params": p}, jnp.asarray(x, jnp.bfloat16))
  assert got.dtype == jnp.bfloat16
  assert_close(got, (_bf16(x) - _bf16(x).mean(-1, keepdims=True))
               / np.sqrt(_bf16(x).var(-1, keepdims=True) + 1e-5) * scale + bias,
               dtype=jnp.bfloat16)


def _erf(x):
  from math import erf
  return np.vectorize(erf)(x)


@pytest.mark.parametrize("act", sorted(layers.ACTIVATIONS))
def test_activate_values_and_gradient_against_float64(rng, act):
  """activate(): f32 arithmetic on an f32 (or bf16) input, the result in the dtype asked for;
  its custom backward (recomputed from the input) equals float64's derivative."""
  x = rng.normal(size=(6, 50)) * 2
  ref = {"gelu": lambda x: 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3))),
         "gelu_exact": lambda x: 0.5 * x * (1 + _erf(x / np.sqrt(2))),
         "quick_gelu": lambda x: x / (1 + np.exp(-1.702 * x))}[act]
  h = 1e-6
  dref = (ref(x + h) - ref(x - h)) / (2 * h)
  y, vjp = jax.vjp(lambda v: layers.activate(act, v), jnp.asarray(x, jnp.float32))
  assert_close((y, vjp(jnp.ones_like(y))[0]), (ref(x), dref), dtype=jnp.float32, name=act)
  yb = layers.activate(act, jnp.asarray(x, jnp.float32), jnp.bfloat16)
  assert yb.dtype == jnp.bfloat16
  assert_close(yb, ref(x), dtype=jnp.bfloat16, name=f"{act} bf16")
  with pytest.raises(ValueError, match="act='relu6'"):
    layers.activate("relu6", y)


def test_dense_off_the_bf16_path_is_a_plain_matmul(monkeypatch, rng):
  """With the path off, precision.dense is lax's f32-accumulating matmul (the same values)."""
  monkeypatch.setenv("MMJAX_BF16_DOTS", "0")
  x = jnp.asarray(rng.normal(size=(3, 4, 8)), jnp.bfloat16)
  w = jnp.asarray(rng.normal(size=(8, 2, 3)), jnp.float32)
  got = precision.dense(x, w, 1, jnp.float32)
  want = jnp.einsum("bnk,kho->bnho", x.astype(jnp.float32), w.astype(jnp.bfloat16)
                    .astype(jnp.float32))
  assert got.dtype == jnp.float32 and got.shape == (3, 4, 2, 3)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
