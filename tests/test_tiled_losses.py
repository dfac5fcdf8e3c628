"""blocks='tiled' and blocks='pallas' against the dense loss and the float64 reference, values
and gradients; the Pallas kernels' TPU and GPU lowering; rings of tiled blocks on 8 CPU
devices; every impl x blocks combination either runs or names its argument."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax.sharding import PartitionSpec as P

from mmjax.losses import BLOCKS, IMPLS, blocks, clip_loss, distributed, siglip_loss, tiled
from tests.reference import (EXTREMES, LOSSES, REFS, assert_close, assert_one_bf16_rounding,
                             bf16_grid_inputs, dense, inputs, make_mesh, normed,
                             ref_bf16_loss_grads, term_sizes)


def _assert_close(got, want, rtol=1e-5, floor=0.0):
  """Values and gradients to rtol; embedding gradients with an atol of rtol times their
  largest entry, d_scale and d_bias (sums of n^2 largely cancelling terms) with an atol of
  rtol * 0.1 * loss. `floor` is added to every atol: with n = 1 CLIP's loss and gradients
  are 0, and the tiled ones round-off (the LSE and the gradient recompute the logit, the
  Pallas column LSE from y @ x.T)."""
  (gl, gg), (wl, wg) = got, want
  np.testing.assert_allclose(gl, wl, rtol=rtol, atol=1e-6)
  for name, a, b in zip(("d_img", "d_txt"), gg, wg):
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * float(np.abs(b).max()) + floor,
                               err_msg=name)
  for name, a, b in zip(("d_scale", "d_bias"), gg[2:], wg[2:]):
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * 0.1 * float(wl) + floor,
                               err_msg=name)


def _grad(name, kind, dtype=jnp.float32, **kw):
  def f(x, y, s, b):
    return LOSSES[name](x.astype(dtype), y.astype(dtype), s, b, blocks=kind, **kw)
  return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3)))


def _assert_matches_float64(name, got, args, dtype=jnp.float32):
  """Loss, d_scale, d_bias (float32) and the embedding gradients (`dtype`) against float64;
  with one CLIP pair (all 0) the errors relative to the scale."""
  x, y, s, b = (np.asarray(a, np.float64) for a in args)
  s, b = float(s), float(b)
  (loss, grads), (ref_loss, ref_grads) = got, REFS[name](x, y, s, b)
  zero = name == "clip" and x.shape[0] == 1
  k = len(ref_grads)
  assert_close(loss, ref_loss, dtype=jnp.float32, name="loss", scale=s if zero else 0.0)
  assert_close(grads[:2], ref_grads[:2], dtype=dtype, name=("d_img", "d_txt"),
               scale=s if zero else 0.0)
  assert_close(grads[2:k], ref_grads[2:], dtype=jnp.float32, name=("d_scale", "d_bias")[:k - 2],
               scale=s if zero else term_sizes(name, x, y, s, b)[2:])


@pytest.mark.parametrize("name", ["clip", "siglip"])
@pytest.mark.parametrize("n,d", [(1, 24), (37, 24), (130, 72)])
def test_tiled_matches_dense_and_float64(name, n, d, rng):
  """Batches that are not a multiple of the block (padded, masked), dims not of 128."""
  args = inputs(n, d, rng)
  got = _grad(name, "tiled", block=32)(*args)
  _assert_close(got, dense(name, *args), floor=1e-6 * float(args[2]) if n == 1 else 0.0)
  _assert_matches_float64(name, got, args)


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_tiled_saturated_logits_match_float64(name, rng):
  """Unrelated pairs at CLIP's learned scale (up to 100) and SigLIP's init bias range."""
  x, y = normed(rng, 130, 72), normed(rng, 130, 72)
  s = float(np.exp(rng.uniform(0, np.log(100 if name == "clip" else 20))))
  b = float(rng.uniform(-10, 2))
  args = (jnp.float32(x), jnp.float32(y), jnp.float32(s), jnp.float32(b))
  got = _grad(name, "tiled", block=32)(*args)
  _assert_matches_float64(name, got, args)


@pytest.mark.parametrize("name,scale,bias", EXTREMES)
def test_tiled_extreme_logits_match_dense_and_float64(name, scale, bias, rng):
  """CLIP's learned scale 100, SigLIP's init (10, -10) and SigLIP saturated at 100."""
  args = inputs(130, 72, rng, scale, bias)
  got = _grad(name, "tiled", block=32)(*args)
  _assert_close(got, dense(name, *args))
  _assert_matches_float64(name, got, args)


@pytest.mark.parametrize("name", ["clip", "siglip"])
@pytest.mark.parametrize("impl,n,block", [("tiled", 130, 32), ("pallas", 37, 16)])
def test_bfloat16_embeddings(name, impl, n, block, rng):
  """bf16 operands through the public loss (Pallas in interpret mode on CPU), in 5 x 5 and
  3 x 3 tiles: the loss, d_scale and d_bias (float32) within the float32 tolerance of float64,
  and the bf16 embedding gradients one bf16 rounding of float64, element by element
  (ref_bf16_loss_grads: G rounded to bf16 per tile, float32 sums across tiles; a bf16
  accumulator or partial sum, or the scale applied in bf16, fails it)."""
  x, y, s, b, x64, y64 = bf16_grid_inputs(n, 72, rng)
  got = _grad(name, impl, jnp.bfloat16, block=block)(x, y, s, b)
  models = ref_bf16_loss_grads(name, x64, y64, float(s), float(b), rounded=True)
  for g, (want, err), label in zip(got[1][:2], models, ("d_img", "d_txt")):
    assert_one_bf16_rounding(g, want, err, name=f"{name} {impl} {label}")
  _assert_matches_float64(name, got, (x64, y64, s, b), jnp.bfloat16)


def test_tiled_loss_without_grad_matches(rng):
  """The primal (no custom-VJP forward) path of both losses."""
  x, y, s, b = inputs(37, 24, rng)
  for name in ("clip", "siglip"):
    got = LOSSES[name](x, y, s, b, blocks="tiled", block=16)
    np.testing.assert_allclose(got, LOSSES[name](x, y, s, b), rtol=1e-5)


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_one_device_custom_vjp_with_dense_blocks_matches_dense(name, rng):
  """The shared one-device custom VJP (mmjax/losses/blocks.py) run on dense blocks,
  the SigLIP forward computing loss and gradients in one pass, equals autodiff of the
  dense loss."""
  args = inputs(37, 24, rng)

  def f(x, y, s, b):
    if name == "clip":
      return blocks.clip_loss(x, y, s, blocks=blocks.DENSE)
    return blocks.siglip_loss(x, y, s, b, blocks=blocks.DENSE)
  got = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3)))(*args)
  _assert_close(got, dense(name, *args))


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_tiled_memory_is_not_quadratic(name, rng):
  """Compiled temporaries of loss + grad at n = 2048: no [n, n] array, only tiles."""
  n, d, block = 2048, 16, 128
  args = inputs(n, d, rng)
  temp = {impl: _grad(name, impl, **kw).lower(*args).compile().memory_analysis().temp_size_in_bytes
          for impl, kw in (("dense", {}), ("tiled", {"block": block}))}
  assert temp["dense"] >= n * n * 4, temp
  assert temp["tiled"] < n * n * 4 / 8, temp


# ---------------------------------------------------------------- Pallas (interpret mode on CPU)

def _pallas_grad(name, dtype=jnp.float32, **kw):
  """Loss + grad by the Pallas kernels; kw: Blocks' block, platform, interpret."""
  pallas = blocks.Blocks("pallas", **kw)

  def f(x, y, s, b):
    x, y = x.astype(dtype), y.astype(dtype)
    if name == "clip":
      return blocks.clip_loss(x, y, s, blocks=pallas)
    return blocks.siglip_loss(x, y, s, b, blocks=pallas)
  return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3)))


@pytest.mark.parametrize("platform", ["tpu", "gpu"])
@pytest.mark.parametrize("name", ["clip", "siglip"])
@pytest.mark.parametrize("n", [1, 37])
def test_pallas_interpret_matches_dense_and_float64(platform, name, n, rng):
  """Both kernel shapes (TPU grid, Triton loop) in interpret mode; 37 rows in tiles of 16."""
  args = inputs(n, 24, rng)
  got = _pallas_grad(name, block=16, platform=platform, interpret=True)(*args)
  _assert_close(got, dense(name, *args), floor=1e-6 * float(args[2]) if n == 1 else 0.0)
  _assert_matches_float64(name, got, args)


def test_pallas_interpret_saturated_siglip_matches_float64(rng):
  """One extreme case for the kernels: SigLIP at scale 100, bias -10."""
  args = inputs(37, 24, rng, 100.0, -10.0)
  got = _pallas_grad("siglip", block=16, platform="tpu", interpret=True)(*args)
  _assert_matches_float64("siglip", got, args)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("name", ["clip", "siglip"])
@pytest.mark.parametrize("platform,target,call", [
    ("tpu", "tpu", "tpu_custom_call"), ("gpu", "cuda", "__gpu$xla.gpu.triton")])
@pytest.mark.parametrize("n", [300, 40])
def test_pallas_lowers_for_accelerators(platform, target, call, name, dtype, n):
  """Mosaic (TPU) and Triton (GPU) lowering of loss + grad, checked by jax.export on CPU:
  300 rows in padded tiles of 128 (TPU) / 64 (GPU), and 40 rows in one tile; dim 72."""
  structs = ((jax.ShapeDtypeStruct((n, 72), dtype),) * 2
             + (jax.ShapeDtypeStruct((), jnp.float32),) * 2)
  step = _pallas_grad(name, block=128 if platform == "tpu" else 64, platform=platform,
                      interpret=False)
  exp = export.export(step, platforms=[target], disabled_checks=[
      export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*structs)
  # Forward and backward kernels: clip 2 + 2 calls, siglip 2 (the forward keeps the gradients).
  assert exp.mlir_module().count(call) == (4 if name == "clip" else 2)


_BOTH = dict(platforms=["tpu", "cuda"],
             disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])


@pytest.mark.parametrize("grad", [False, True], ids=["forward", "grad"])
@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_pallas_default_platform_picks_the_kernels_per_lowering_platform(name, grad):
  """blocks="pallas" with the default platform=None: ONE jitted loss (and loss + grad)
  exports for tpu and cuda together from this CPU host, with the Mosaic and the Triton
  kernels (before, the platform came from jax.default_backend())."""
  structs = ((jax.ShapeDtypeStruct((40, 72), jnp.float32),) * 2
             + (jax.ShapeDtypeStruct((), jnp.float32),) * 2)

  def f(x, y, s, b):
    return LOSSES[name](x, y, s, b, blocks="pallas")
  fn = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3)) if grad else f)
  module = export.export(fn, **_BOTH)(*structs).mlir_module()
  # clip: the row and column LSE (+ dx and dy under grad); siglip: the loss, or under grad
  # the loss with dx, and dy.
  calls = {"clip": 4 if grad else 2, "siglip": 2 if grad else 1}[name]
  assert module.count("tpu_custom_call") == calls
  assert module.count("__gpu$xla.gpu.triton") == calls


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_pallas_default_platform_on_cpu_is_the_interpreted_tpu_grid(name, rng):
  """On CPU platform=None lowers its default branch: exactly the loss and gradients of
  platform='tpu' in interpret mode (what the default was on CPU before)."""
  args = inputs(37, 24, rng)
  got = _pallas_grad(name, block=16)(*args)
  want = _pallas_grad(name, block=16, platform="tpu", interpret=True)(*args)
  for a, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(a, w)
  _assert_close(got, dense(name, *args))


# ---------------------------------------------------------------- the tiled ring

def _ring(name, impl, kind, mesh, check_vma=True, **kw):
  def local(x, y, s, b):
    return LOSSES[name](x, y, s, b, impl=impl, blocks=kind, axis_name="data", **kw)
  f = jax.shard_map(local, mesh=mesh, in_specs=(P("data"), P("data"), P(), P()),
                    out_specs=P(), check_vma=check_vma)
  return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3)))


@pytest.mark.parametrize("name,impl", [("clip", "ring"), ("siglip", "ring"),
                                       ("siglip", "ring_bidir")])
@pytest.mark.parametrize("kind", ["tiled", "pallas"])
def test_ring_of_tiled_blocks_matches_dense(name, impl, kind, rng):
  """8 devices x 13 rows, each ring step's block in tiles of 8. JAX's Pallas interpreter
  fails under check_vma=True (a dynamic_slice vma check), so the pallas ring runs without."""
  args = inputs(8 * 13, 12, rng)
  ring = _ring(name, impl, kind, make_mesh((8,), ("data",)), check_vma=kind == "tiled", block=8)
  _assert_close(ring(*args), dense(name, *args))


def _unsupported(name, impl, kind) -> bool:
  return (name, impl) == ("clip", "ring_bidir") or (impl == "gather" and kind != "dense")


# Supported pallas combinations run in the tests above (the interpreter is slow); every
# other combination runs here.
COMBINATIONS = [(n, i, k) for n in LOSSES for i in IMPLS for k in BLOCKS
                if k != "pallas" or _unsupported(n, i, k)]


@pytest.mark.parametrize("name,impl,kind", COMBINATIONS)
def test_every_impl_and_blocks_combination_runs_or_names_its_argument(name, impl, kind, rng):
  """4 devices x 5 rows: the dense loss's value and gradients, or one ValueError naming
  impl or blocks."""
  args = inputs(4 * 5, 8, rng)
  kw = {"block": 8} if kind != "dense" else {}
  if impl == "global":
    f = _grad(name, kind, impl=impl, **kw)
  else:
    f = _ring(name, impl, kind, make_mesh((4,), ("data",)), check_vma=kind != "pallas", **kw)
  if _unsupported(name, impl, kind):
    with pytest.raises(ValueError, match="^(impl='ring_bidir'|blocks=)"):
      f(*args)
  else:
    _assert_close(f(*args), dense(name, *args))


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_ring_of_tiled_blocks_memory_is_not_quadratic_in_the_local_batch(name, rng):
  """Compiled per-device temporaries of loss + grad, 8 x 1024 rows: the dense ring keeps
  [1024, 1024] blocks, the tiled ring [128, 128] tiles."""
  n_local, block = 1024, 128
  args = inputs(8 * n_local, 16, rng)
  mesh = make_mesh((8,), ("data",))
  temp = {kind: _ring(name, "ring", kind, mesh, **kw).lower(*args).compile().memory_analysis()
          .temp_size_in_bytes for kind, kw in (("dense", {}), ("tiled", {"block": block}))}
  assert temp["dense"] >= n_local * n_local * 4, temp
  assert temp["tiled"] < n_local * n_local * 4 / 8, temp


@pytest.mark.parametrize("platform", ["tpu", None])
def test_ring_of_pallas_blocks_lowers_for_tpu_under_check_vma(platform):
  """The vma-typed outputs of the kernels: the pallas ring lowers under check_vma=True,
  with platform="tpu" for tpu and with the default platform=None for tpu and cuda."""
  mesh = jax.sharding.AbstractMesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  pallas = blocks.Blocks("pallas", 128, platform=platform, interpret=False if platform else None)

  def local(x, y, s, b):
    return distributed.siglip_ring(x, y, s, b, axis_name="data", blocks=pallas)

  f = jax.shard_map(local, mesh=mesh, in_specs=(P("data"), P("data"), P(), P()), out_specs=P())
  structs = ((jax.ShapeDtypeStruct((8 * 256, 72), jnp.float32),) * 2
             + (jax.ShapeDtypeStruct((), jnp.float32),) * 2)
  kw = dict(platforms=["tpu"]) if platform else _BOTH
  module = export.export(jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3))), **kw)(
      *structs).mlir_module()
  assert "tpu_custom_call" in module
  assert ("__gpu$xla.gpu.triton" in module) == (platform is None)


# ---------------------------------------------------------------- arguments

def test_block_errors_name_the_argument():
  x = jnp.zeros((4, 8))
  with pytest.raises(ValueError, match="block must be a positive int"):
    clip_loss(x, x, 1.0, blocks="tiled", block=0)
  with pytest.raises(ValueError, match="block must be a positive int"):
    siglip_loss(x, x, 1.0, 0.0, blocks="pallas", block=-8)
  with pytest.raises(ValueError, match="block=16 is for blocks='tiled' or 'pallas' only"):
    clip_loss(x, x, 1.0, block=16)
  with pytest.raises(ValueError, match="blocks='ring' is not one of"):
    clip_loss(x, x, 1.0, blocks="ring")
  with pytest.raises(ValueError, match="impl='tiled' is not one of"):
    clip_loss(x, x, 1.0, impl="tiled")
  with pytest.raises(ValueError, match="block must be a positive int"):
    blocks.Blocks("tiled", block=2.5)
  with pytest.raises(ValueError, match="platform must be one of"):
    blocks.Blocks("pallas", platform="cuda")
  with pytest.raises(ValueError, match="blocks='ring' is not one of"):
    blocks.Blocks("ring")


def test_tiling_covers_the_batch_with_little_padding():
  for n in (1, 7, 32, 33, 37, 130, 1000, 8192, 8193):
    for block in (8, 32, 1024):
      t, nb = tiled.tiling(n, block)
      assert t <= block and nb * t >= n > (nb - 1) * t
