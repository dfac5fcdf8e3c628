"""impl="auto": the attention implementation chosen when lowered, per platform.

On this CPU: exactly "xla" below BLOCKWISE_MIN_SEQ and exactly "blockwise" above it (values and
gradients), both against float64. For accelerators, proven by jax.export from this host: the
Mosaic flash kernels for TPU (forward, dq, dk/dv), none where the TPU computation is partitioned
over several devices outside shard_map (Mosaic kernels cannot be), and for CUDA the CPU rule,
since this host has no cuDNN (tests/test_accelerator.py checks cuDNN on a GPU).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax.sharding import NamedSharding, PartitionSpec as P

from mmjax.nn import attention
from mmjax.nn.attention import dot_product_attention
from tests.reference import assert_close, ref_attention

_TPU, _TRITON = "tpu_custom_call", "__gpu$xla.gpu.triton"


def _case(rng, b=2, lq=19, lk=23, hq=4, hk=2, d=16, dtype=jnp.float32):
  q, k, v, w = (rng.normal(size=s) for s in [(b, lq, hq, d), (b, lk, hk, d), (b, lk, hk, d),
                                              (b, lq, hq, d)])
  lengths = rng.integers(1, lk + 1, size=b)
  mask = (np.arange(lk)[None, :] < lengths[:, None])[:, None, None, :]
  return [jnp.asarray(x, dtype) for x in (q, k, v, w)], mask


def _run(impl, args, mask, causal):
  q, k, v, w = args
  f = jax.jit(lambda q, k, v: dot_product_attention(
      q, k, v, mask=None if mask is None else jnp.asarray(mask), is_causal=causal, impl=impl))
  out, vjp = jax.vjp(f, q, k, v)
  return out, vjp(w)


def _reference(args, mask, causal):
  q, k, v, w = (np.asarray(x, np.float64) for x in args)
  lq, lk = q.shape[1], k.shape[1]
  full = np.ones((q.shape[0], lq, lk), bool)
  if mask is not None:
    full = full & mask[:, 0]
  if causal:
    full = full & np.tril(np.ones((lq, lk), bool))
  return ref_attention(q, k, v, w, full)


@pytest.mark.parametrize("causal,masked", [(False, False), (True, True), (False, True)])
@pytest.mark.parametrize("long", [False, True], ids=["short:xla", "long:blockwise"])
def test_cpu_is_xla_below_the_threshold_and_blockwise_above(long, causal, masked, rng,
                                                            monkeypatch):
  """The same values and gradients as the implementation the rule names (to float rounding:
  auto recomputes the xla forward in its backward), and float64's; GQA, key padding, causal,
  ragged lengths. The threshold is lowered so "long" stays small."""
  if long:
    monkeypatch.setattr(attention, "BLOCKWISE_MIN_SEQ", 16)
  args, mask = _case(rng)
  mask = mask if masked else None
  got, got_grads = _run("auto", args, mask, causal)
  want, want_grads = _run("blockwise" if long else "xla", args, mask, causal)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  for name, g, r in zip("qkv", got_grads, want_grads):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6, err_msg=f"d{name}")
  ref, ref_grads = _reference(args, mask, causal)
  assert_close(got, ref, dtype=jnp.float32, name="out")
  assert_close(got_grads, ref_grads, dtype=jnp.float32, name=["dq", "dk", "dv"])


@pytest.mark.parametrize("bf16_dots", ["0", "1"])
@pytest.mark.parametrize("causal,masked", [(True, True), (False, False)])
@pytest.mark.parametrize("long", [False, True], ids=["short:xla", "long:blockwise"])
def test_bf16_auto_is_bitwise_the_impl_it_picks(long, causal, masked, bf16_dots, rng,
                                                monkeypatch):
  """bf16 on CPU: auto's output and gradients are bit for bit those of "xla" (below the
  threshold: the same dots, the backward recomputing the same forward) or "blockwise" (above:
  the same functions), with either matmul path of mmjax.nn.precision. (How close those are to
  float64: tests/test_bf16.py.)"""
  monkeypatch.setenv("MMJAX_BF16_DOTS", bf16_dots)
  if long:
    monkeypatch.setattr(attention, "BLOCKWISE_MIN_SEQ", 16)
  args, mask = _case(rng, dtype=jnp.bfloat16)
  mask = mask if masked else None
  got, got_grads = _run("auto", args, mask, causal)
  want, want_grads = _run("blockwise" if long else "xla", args, mask, causal)
  assert got.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in got_grads)
  for name, g, r in zip(["out", "dq", "dk", "dv"], (got, *got_grads), (want, *want_grads)):
    np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(r, np.float32),
                                  err_msg=name)


def test_a_general_mask_takes_xla(rng):
  """Only "xla" takes a mask that is not key padding; auto uses it on every platform."""
  args, _ = _case(rng, lq=7, lk=7)
  mask = rng.random((2, 1, 7, 7)) < 0.7
  mask[..., 0] = True
  got, got_grads = _run("auto", args, mask, False)
  want, want_grads = _run("xla", args, mask, False)
  np.testing.assert_array_equal(got, want)
  for g, r in zip(got_grads, want_grads):
    np.testing.assert_array_equal(g, r)


def _grad_fn(causal=True, masked=True):
  def loss(q, k, v, kv_mask):
    o = dot_product_attention(q, k, v, mask=kv_mask[:, None, None, :] if masked else None,
                              is_causal=causal, impl="auto")
    return jnp.sum(o.astype(jnp.float32))
  return jax.grad(loss, (0, 1, 2))


def _structs(b=2, lq=40, lk=40, hq=4, hk=2, d=64, dtype=jnp.bfloat16):
  return ([jax.ShapeDtypeStruct(s, dtype) for s in [(b, lq, hq, d), (b, lk, hk, d),
                                                      (b, lk, hk, d)]]
          + [jax.ShapeDtypeStruct((b, lk), jnp.bool_)])


def test_exports_mosaic_for_tpu_and_no_kernel_for_cuda_or_cpu_from_one_function():
  """One jitted gradient exported for tpu, cuda and cpu together: the Mosaic forward, dq and
  dk/dv kernels for TPU; no Triton kernel for CUDA (auto never picks Triton; without cuDNN on
  this host the CUDA branch is the CPU rule)."""
  module = export.export(jax.jit(_grad_fn()), platforms=["tpu", "cuda", "cpu"])(
      *_structs()).mlir_module()
  assert module.count(_TPU) == 3
  for name in ("mmjax_flash_fwd", "mmjax_flash_dq", "mmjax_flash_dkv"):
    assert name in module, name
  assert _TRITON not in module and "cudnn" not in module
  cpu = export.export(jax.jit(_grad_fn()), platforms=["cpu"])(*_structs()).mlir_module()
  assert _TPU not in cpu and "custom_call" not in cpu


def test_partitioned_tpu_computation_falls_back_to_the_cpu_rule():
  """A TPU computation sharded over 8 devices (no shard_map) cannot hold a Mosaic kernel:
  auto lowers the CPU rule there instead of failing; on one device it has the kernels."""
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  batch = NamedSharding(mesh, P("data"))
  fn = jax.jit(_grad_fn(), in_shardings=(batch,) * 4, out_shardings=(batch,) * 3)
  module = export.export(fn, platforms=["tpu"])(*_structs(b=8)).mlir_module()
  assert _TPU not in module
  one = export.export(jax.jit(_grad_fn()), platforms=["tpu"])(*_structs(b=8)).mlir_module()
  assert one.count(_TPU) == 3


def test_explicit_pallas_still_lowers_triton_for_cuda():
  """The Triton layout stays an explicit choice (impl="pallas")."""
  def loss(q, k, v):
    return jnp.sum(dot_product_attention(q, k, v, impl="pallas").astype(jnp.float32))
  module = export.export(
      jax.jit(jax.grad(loss, (0, 1, 2))), platforms=["cuda"],
      disabled_checks=[export.DisabledSafetyCheck.custom_call(_TRITON)])(
      *_structs()[:3]).mlir_module()
  assert module.count(_TRITON) == 3


def test_under_vmap_and_scan_matches_xla(rng):
  """The per-platform primitive under vmap (its batching rule) and inside lax.scan."""
  x = jnp.asarray(rng.normal(size=(3, 2, 11, 2, 8)), jnp.float32)

  def loss(impl):
    attend = lambda q: dot_product_attention(q, q, q, is_causal=True, impl=impl)

    def f(x):
      y, _ = jax.lax.scan(lambda c, q: (c + jnp.sum(jax.vmap(attend)(q) ** 2), None), 0.0,
                          x[None])
      return y
    return f

  got, want = (jax.jit(jax.value_and_grad(loss(impl)))(x) for impl in ("auto", "xla"))
  np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
  np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-6)
