"""bf16 matmuls on the fast path: mmjax.nn.precision's dot_general and einsum against float64
NumPy (values and both gradients), and the compiled backward pass of a bf16 ViT: every dot takes
bf16 operands (XLA:CPU runs a bf16-output dot, or one with an f32 operand, as f32 dots)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.nn import precision
from tests.reference import assert_close


@pytest.fixture(autouse=True)
def _bf16_dots(monkeypatch):
  """The bf16 path on, whatever this host's CPU (off by default without bf16 instructions)."""
  monkeypatch.setenv("MMJAX_BF16_DOTS", "1")

CASES = [  # (dimension numbers, lhs shape, rhs shape): Dense, multi-contraction, batched heads
    ((((2,), (0,)), ((), ())), (3, 5, 7), (7, 6)),
    ((((1, 2), (0, 1)), ((), ())), (4, 3, 5), (3, 5, 6)),
    ((((3,), (3,)), ((0, 2), (0, 2))), (2, 7, 3, 4), (2, 5, 3, 4)),
]


def _ref_dot(a, b, dims):
  specs = precision._specs(a.ndim, b.ndim, dims)
  return np.einsum(f"{specs[0]},{specs[1]}->{specs[2]}", a, b)


@pytest.mark.parametrize("case", range(len(CASES)))
def test_dot_general_values_and_gradients_against_float64(rng, case):
  dims, sa, sb = CASES[case]
  a, b = rng.normal(size=sa), rng.normal(size=sb)
  g = rng.normal(size=_ref_dot(a, b, dims).shape)
  # f(a, b) = sum(g * dot(a, b)): df/da = g . b^T, df/db = a^T . g (einsum transposes)
  sa_, sb_, so = precision._specs(a.ndim, b.ndim, dims)
  want = (_ref_dot(a, b, dims), np.einsum(f"{so},{sb_}->{sa_}", g, b),
          np.einsum(f"{sa_},{so}->{sb_}", a, g))
  for dtype in (jnp.float32, jnp.bfloat16):
    x, y, gg = (jnp.asarray(v, dtype) for v in (a, b, g))
    out = precision.dot_general(x, y, dims)
    assert out.dtype == dtype
    grads = jax.grad(lambda x, y: (precision.dot_general(x, y, dims).astype(jnp.float32)
                                   * gg.astype(jnp.float32)).sum(), (0, 1))(x, y)
    assert [v.dtype for v in grads] == [dtype, dtype]
    assert_close((out, *grads), want, dtype=dtype, name=f"dot{case}")


def test_einsum_keeps_f32_output_and_gradients(rng):
  """einsum(out_dtype=f32) on bf16 operands (attention scores): f32 result, bf16 gradients."""
  q, k = rng.normal(size=(2, 5, 3, 8)), rng.normal(size=(2, 6, 3, 8))
  g = rng.normal(size=(2, 3, 5, 6))
  want = (np.einsum("bqhd,bkhd->bhqk", q, k), np.einsum("bhqk,bkhd->bqhd", g, k),
          np.einsum("bqhd,bhqk->bkhd", q, g))
  x, y = jnp.asarray(q, jnp.bfloat16), jnp.asarray(k, jnp.bfloat16)
  f = lambda x, y: precision.einsum("bqhd,bkhd->bhqk", x, y, out_dtype=jnp.float32)
  assert f(x, y).dtype == jnp.float32
  grads = jax.grad(lambda x, y: (f(x, y) * jnp.asarray(g, jnp.float32)).sum(), (0, 1))(x, y)
  assert_close((f(x, y), *grads), want, dtype=jnp.bfloat16, name="einsum")


def _dot_operand_dtypes(hlo: str) -> list[tuple[str, str]]:
  """(lhs dtype, rhs dtype) of every dot in compiled HLO text whose output has no size-1
  dimension (XLA rewrites a matrix-vector product, the MAP head's one query, in f32)."""
  shapes = dict(re.findall(r"%(\S+) = (\w+)\[", hlo))
  out = []
  for m in re.finditer(r"= \w+\[([\d,]*)\]\S* dot\(%([^,\s)]+), %([^,\s)]+)\)", hlo):
    if 1 not in [int(d) for d in m.group(1).split(",") if d]:
      out.append((shapes.get(m.group(2), "?"), shapes.get(m.group(3), "?")))
  return out


def test_bf16_vit_gradient_runs_every_dot_on_bf16_operands():
  """The compiled gradient of a bf16 ViT (patch embedding, attention, MLP, MAP head): no dot
  takes an f32 operand (with the path off, 285 of a ViT-S/16's 309 do: benchmarks/bf16_dots.py);
  the same model in f32 has only f32 dots (the check sees dtypes)."""
  from mmjax.models import vit
  counts = {}
  for dtype in (jnp.bfloat16, jnp.float32):
    # width 64: XLA:CPU runs the dots of a 32-wide tower in f32 whatever their operands
    model = vit.ViT(**vit.config("mu/8", width=64, mlp_dim=256, num_heads=2, depth=1),
                    dtype=dtype)
    x = jnp.zeros((4, 32, 32, 3), jnp.float32)
    params = model.init(jax.random.PRNGKey(0), x)["params"]
    loss = lambda p: model.apply({"params": p}, x)[0].astype(jnp.float32).sum()
    compiled = jax.jit(jax.grad(loss)).lower(params).compile()
    counts[dtype] = _dot_operand_dtypes(compiled.as_text())
    grads = compiled(params)   # runs: some bf16 dot layouts have no kernel at run time
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))
  bf16 = counts[jnp.bfloat16]
  assert len(bf16) >= 20, bf16
  assert all(d == ("bf16", "bf16") for d in bf16), bf16
  assert counts[jnp.float32] and all(d == ("f32", "f32") for d in counts[jnp.float32])


def test_bf16_path_is_on_only_where_the_cpu_has_bf16_matmuls(monkeypatch):
  """enabled(): the environment override, else the CPU backend and the CPU's flags; off, the
  functions are jax's own (the same jaxpr as lax.dot_general)."""
  monkeypatch.delenv("MMJAX_BF16_DOTS")
  for flags in (True, False):
    monkeypatch.setattr(precision, "cpu_has_bf16_matmul", lambda: flags)
    assert precision.enabled() == (flags and jax.default_backend() == "cpu")
  monkeypatch.setenv("MMJAX_BF16_DOTS", "0")
  monkeypatch.setattr(precision, "cpu_has_bf16_matmul", lambda: True)
  x = jnp.ones((3, 4), jnp.bfloat16)
  dims = (((1,), (0,)), ((), ()))
  assert str(jax.make_jaxpr(lambda a, b: precision.dot_general(a, b, dims))(x, x.T)) == str(
      jax.make_jaxpr(lambda a, b: jax.lax.dot_general(a, b, dims))(x, x.T))
