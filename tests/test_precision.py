"""bf16 matmuls on the fast path: mmjax.nn.precision's dot_general, einsum and dense against
float64 NumPy on the same bf16 operands (values and both gradients: one rounding of a float32
accumulation, element by element), and the compiled backward pass of a bf16 ViT: every dot takes
bf16 operands (XLA:CPU runs a bf16-output dot, or one with an f32 operand, as f32 dots)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.nn import precision


@pytest.fixture(autouse=True)
def _bf16_dots(monkeypatch):
  """The bf16 path on, whatever this host's CPU (off by default without bf16 instructions)."""
  monkeypatch.setenv("MMJAX_BF16_DOTS", "1")

CASES = [  # (dimension numbers, lhs shape, rhs shape): Dense, multi-contraction, batched heads,
    # and square ones (a transposed or swapped operand in the backward pass keeps the shapes)
    ((((2,), (0,)), ((), ())), (3, 5, 7), (7, 6)),
    ((((1, 2), (0, 1)), ((), ())), (4, 3, 5), (3, 5, 6)),
    ((((3,), (3,)), ((0, 2), (0, 2))), (2, 7, 3, 4), (2, 5, 3, 4)),
    ((((1,), (0,)), ((), ())), (24, 24), (24, 24)),
    ((((2,), (1,)), ((0,), (0,))), (3, 16, 16), (3, 16, 16)),
]
_U = {jnp.dtype(jnp.bfloat16): 2.0 ** -8, jnp.dtype(jnp.float32): 2.0 ** -24}   # unit round-off


def _rounded(rng, shape, dtype):
  """Normal numbers exactly representable in `dtype`, as float64 (the reference's inputs)."""
  return np.asarray(jnp.asarray(rng.normal(size=shape), dtype).astype(jnp.float32), np.float64)


def _check_rounding(name, got, spec, a, b, dtype):
  """got (computed in `dtype`, from float32 accumulation) vs float64 einsum(spec, a, b) on the
  same (exactly representable) operands: per element, |got - want| <= u(dtype) |want| (the one
  rounding of the result to its dtype) + 2 k 2^-24 (|a| . |b|) (float32 accumulation of k
  terms; the textbook bound is k u |a| . |b|). A second rounding to bf16, bf16 accumulation or
  a bf16 operand where float32 was due breaks it (errors ~2^-9 |want|, not 2^-24)."""
  assert got.dtype == jnp.dtype(dtype), (name, got.dtype, dtype)
  ins, out = spec.split("->")
  sizes = {c: n for s_, x in zip(ins.split(","), (a, b)) for c, n in zip(s_, x.shape)}
  k = int(np.prod([n for c, n in sizes.items() if c not in out]))
  want, mag = np.einsum(spec, a, b), np.einsum(spec, np.abs(a), np.abs(b))
  err = np.abs(np.asarray(got.astype(jnp.float32), np.float64) - want)
  bound = _U[jnp.dtype(dtype)] * np.abs(want) + 2 * k * 2.0 ** -24 * mag
  worst = np.unravel_index(np.argmax(err / bound), err.shape)
  assert np.all(err <= bound), (f"{name} ({jnp.dtype(dtype).name}): |error| {err[worst]:.3g} > "
                                f"bound {bound[worst]:.3g} at {worst} (want {want[worst]:.6g})")


def test_rounding_check_accepts_one_rounding_and_rejects_two(rng):
  """_check_rounding's bound: a float32 product of bf16 operands rounded once to bf16 passes,
  and in float32 too; the product rounded to bf16 where float32 was due fails, and so does
  the product accumulated in bf16 (each partial sum rounded)."""
  a, b = _rounded(rng, (16, 32), jnp.bfloat16), _rounded(rng, (32, 8), jnp.bfloat16)
  z = jnp.asarray(a, jnp.float32) @ jnp.asarray(b, jnp.float32)
  _check_rounding("ok bf16", z.astype(jnp.bfloat16), "mk,kn->mn", a, b, jnp.bfloat16)
  _check_rounding("ok f32", z, "mk,kn->mn", a, b, jnp.float32)
  with pytest.raises(AssertionError, match="bound"):
    _check_rounding("f32 via bf16", z.astype(jnp.bfloat16).astype(jnp.float32), "mk,kn->mn",
                    a, b, jnp.float32)
  with pytest.raises(AssertionError, match="bound"):   # each partial sum rounded to bf16
    acc = jnp.zeros((16, 8), jnp.bfloat16)
    for i in range(32):
      acc = acc + (jnp.asarray(a[:, i:i + 1], jnp.bfloat16) * jnp.asarray(b[i:i + 1], jnp.bfloat16))
    _check_rounding("bf16 accumulation", acc, "mk,kn->mn", a, b, jnp.bfloat16)


def _ref_specs(a, b, dims):
  sa, sb, so = precision._specs(a.ndim, b.ndim, dims)
  return f"{sa},{sb}->{so}", f"{so},{sb}->{sa}", f"{sa},{so}->{sb}"


@pytest.mark.parametrize("case", range(len(CASES)))
def test_dot_general_is_one_rounding_of_float64(rng, case):
  """dot_general's value and both gradients (f = sum(g * dot(a, b)): da = g . b^T,
  db = a^T . g) in bf16 and f32, against float64 on the same operands: one rounding to the
  result's dtype after float32 accumulation (_check_rounding)."""
  dims, sa, sb = CASES[case]
  fwd, da, db = _ref_specs(np.zeros(sa), np.zeros(sb), dims)
  for dtype in (jnp.float32, jnp.bfloat16):
    a, b = _rounded(rng, sa, dtype), _rounded(rng, sb, dtype)
    g = _rounded(rng, np.einsum(fwd, a, b).shape, dtype)
    x, y, gg = (jnp.asarray(v, dtype) for v in (a, b, g))
    out = precision.dot_general(x, y, dims)
    grads = jax.grad(lambda x, y: (precision.dot_general(x, y, dims).astype(jnp.float32)
                                   * gg.astype(jnp.float32)).sum(), (0, 1))(x, y)
    _check_rounding(f"dot{case}", out, fwd, a, b, dtype)
    _check_rounding(f"dot{case} d_lhs", grads[0], da, g, b, dtype)
    _check_rounding(f"dot{case} d_rhs", grads[1], db, a, g, dtype)


@pytest.mark.parametrize("spec", ["bqhd,bkhd->bhqk", "bhqd,bhkd->bhqk", "bhqk,bkhd->bqhd"])
@pytest.mark.parametrize("out_dtype", [jnp.float32, jnp.bfloat16])
def test_einsum_is_one_rounding_of_float64(rng, spec, out_dtype):
  """einsum on bf16 operands (attention's scores and values; a spec that is one batched dot and
  ones that are not) with an f32 result (no rounding to bf16 at all) and a bf16 one: value and
  bf16 gradients against float64 on the same operands (_check_rounding)."""
  sa, sb = spec.split("->")[0].split(",")
  so = spec.split("->")[1]
  sizes = dict(b=2, q=5, k=6, h=3, d=8)
  a = _rounded(rng, [sizes[c] for c in sa], jnp.bfloat16)
  b = _rounded(rng, [sizes[c] for c in sb], jnp.bfloat16)
  g = _rounded(rng, [sizes[c] for c in so], jnp.bfloat16)
  x, y = jnp.asarray(a, jnp.bfloat16), jnp.asarray(b, jnp.bfloat16)
  f = lambda x, y: precision.einsum(spec, x, y, out_dtype=out_dtype)
  grads = jax.grad(lambda x, y: (f(x, y).astype(jnp.float32) * jnp.asarray(g, jnp.float32)).sum(),
                   (0, 1))(x, y)
  _check_rounding(spec, f(x, y), spec, a, b, out_dtype)
  _check_rounding(f"{spec} d_a", grads[0], f"{so},{sb}->{sa}", g, b, jnp.bfloat16)
  _check_rounding(f"{spec} d_b", grads[1], f"{sa},{so}->{sb}", a, g, jnp.bfloat16)


@pytest.mark.parametrize("out_dtype", [jnp.float32, jnp.bfloat16])
def test_dense_kernel_gradient_keeps_float32(rng, out_dtype):
  """dense(x bf16 [2, 7, 3, 8], kernel f32 [3, 8, 4, 5], contract=2): the kernel is rounded to
  bf16 for the matmuls (the reference uses it rounded); y and dx come out of float32
  accumulation rounded once to their dtypes, and the kernel gradient in float32, never rounded
  to bf16 (the docstring's promise)."""
  x = _rounded(rng, (2, 7, 3, 8), jnp.bfloat16)
  w = rng.normal(size=(3, 8, 4, 5))
  w_low = np.asarray(jnp.asarray(w, jnp.bfloat16).astype(jnp.float32), np.float64)
  g = _rounded(rng, (2, 7, 4, 5), jnp.bfloat16)
  xx, ww = jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.float32)
  f = lambda xx, ww: precision.dense(xx, ww, 2, out_dtype=out_dtype)
  grads = jax.grad(lambda xx, ww: (f(xx, ww).astype(jnp.float32)
                                   * jnp.asarray(g, jnp.float32)).sum(), (0, 1))(xx, ww)
  _check_rounding("dense", f(xx, ww), "abcd,cdef->abef", x, w_low, out_dtype)
  _check_rounding("dense dx", grads[0], "abef,cdef->abcd", g, w_low, jnp.bfloat16)
  _check_rounding("dense dkernel", grads[1], "abcd,abef->cdef", x, g, jnp.float32)


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
