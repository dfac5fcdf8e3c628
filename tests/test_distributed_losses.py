"""Sharded losses (gather, ring) against the dense loss on the gathered batch, 8 CPU devices."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from mmjax.losses import clip_loss, siglip_loss
from tests.reference import EXTREMES, LOSSES, REFS, assert_close, dense, inputs, make_mesh, term_sizes


def _sharded(name, impl, mesh, axis):
  def local(x, y, s, b):
    return LOSSES[name](x, y, s, b, impl=impl, axis_name=axis)
  f = jax.shard_map(local, mesh=mesh, in_specs=(P(axis), P(axis), P(), P()), out_specs=P())
  return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3)))


def _assert_close(got, want, rtol=1e-5):
  (gl, gg), (wl, wg) = got, want
  np.testing.assert_allclose(gl, wl, rtol=rtol, atol=1e-6)
  for name, a, b in zip(("d_img", "d_txt"), gg, wg):
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * float(np.abs(b).max()), err_msg=name)
  # d_scale and d_bias sum N^2 terms that largely cancel: compare them to the
  # size of the loss, not to their own (near-zero) size.
  for name, a, b in zip(("d_scale", "d_bias"), gg[2:], wg[2:]):
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * 0.1 * float(wl), err_msg=name)


CASES = [("clip", "gather"), ("clip", "ring"), ("siglip", "gather"), ("siglip", "ring"),
         ("siglip", "ring_bidir")]


@pytest.mark.parametrize("name,impl", CASES)
@pytest.mark.parametrize("n", [8, 24, 56])
def test_shard_map_matches_dense(name, impl, n, rng):
  args = inputs(n, 12, rng)
  got = _sharded(name, impl, make_mesh((8,), ("data",)), "data")(*args)
  _assert_close(got, dense(name, *args))


@pytest.mark.parametrize("name,impl,scale,bias",
                         [(n, i, s, b) for n, i in CASES for m, s, b in EXTREMES if m == n])
def test_shard_map_extreme_logits_match_float64(name, impl, scale, bias, rng):
  """8 devices x 3 rows at CLIP's scale 100, SigLIP's init (10, -10) and SigLIP at 100."""
  args = inputs(24, 12, rng, scale, bias)
  loss, grads = _sharded(name, impl, make_mesh((8,), ("data",)), "data")(*args)
  x, y = (np.asarray(a, np.float64) for a in args[:2])
  ref_loss, ref_grads = REFS[name](x, y, scale, bias)
  k = len(ref_grads)
  assert_close(loss, ref_loss, dtype=jnp.float32, name="loss")
  assert_close(grads[:k], ref_grads, dtype=jnp.float32,
               name=("d_img", "d_txt", "d_scale", "d_bias")[:k],
               scale=term_sizes(name, x, y, scale, bias))


@pytest.mark.parametrize("name,impl", [c for c in CASES if "ring" in c[1]])
@pytest.mark.parametrize("devices", [7, 2, 1])
def test_rings_on_odd_and_small_meshes(name, impl, devices, rng):
  args = inputs(3 * devices, 8, rng)
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:devices]), ("data",),
                           axis_types=(jax.sharding.AxisType.Auto,))
  _assert_close(_sharded(name, impl, mesh, "data")(*args), dense(name, *args))


@pytest.mark.parametrize("name,impl", CASES)
def test_two_batch_axes(name, impl, rng):
  """The batch split over a ('data', 'fsdp') tuple of mesh axes."""
  args = inputs(40, 8, rng)
  got = _sharded(name, impl, make_mesh((2, 4), ("data", "fsdp")), ("data", "fsdp"))(*args)
  _assert_close(got, dense(name, *args))


@pytest.mark.parametrize("name,impl", CASES)
def test_pmap_gradients_follow_psum_convention(name, impl, rng):
  """Under pmap, as for any psum'd loss, each device's gradient of its copy of the
  loss is 8x its share: embeddings' gradients are 8x the dense ones, and a user's
  pmap step that pmeans replicated parameters' gradients gets the dense gradients."""
  x, y, s, b = inputs(32, 8, rng)

  @functools.partial(jax.pmap, axis_name="batch", in_axes=(0, 0, None, None))
  def step(x, y, s, b):
    loss, grads = jax.value_and_grad(
        lambda *a: LOSSES[name](*a, impl=impl, axis_name="batch"), argnums=(0, 1, 2, 3))(x, y, s, b)
    dx, dy, ds, db = grads
    return loss, dx, dy, jax.lax.pmean(ds, "batch"), jax.lax.pmean(db, "batch")

  loss, dx, dy, ds, db = step(x.reshape(8, 4, -1), y.reshape(8, 4, -1), s, b)
  want_loss, (wx, wy, ws, wb) = dense(name, x, y, s, b)
  np.testing.assert_allclose(loss, np.full(8, want_loss), rtol=1e-5)
  np.testing.assert_allclose(dx.reshape(32, -1) / 8, wx, rtol=1e-5, atol=1e-5 * np.abs(wx).max())
  np.testing.assert_allclose(dy.reshape(32, -1) / 8, wy, rtol=1e-5, atol=1e-5 * np.abs(wy).max())
  # Replicated parameters (here scale, bias): pmean over devices gives the dense gradient.
  np.testing.assert_allclose(ds[0], ws, rtol=1e-5, atol=1e-6 * float(want_loss))
  np.testing.assert_allclose(db[0], wb, rtol=1e-5, atol=1e-6 * float(want_loss))


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_ring_memory_is_a_fraction_of_gather(name, rng):
  """Compiled per-device temporaries of loss + grad: the ring keeps n x n blocks, never n x N."""
  n_local, d = 256, 16
  args = inputs(8 * n_local, d, rng)
  mesh = make_mesh((8,), ("data",))
  temp = {impl: _sharded(name, impl, mesh, "data").lower(*args).compile()
          .memory_analysis().temp_size_in_bytes for impl in ("gather", "ring")}
  logits_bytes = n_local * 8 * n_local * 4
  assert temp["gather"] >= logits_bytes, temp
  assert temp["ring"] < temp["gather"] / 4, temp


def test_impl_and_axis_name_must_agree():
  x = jnp.zeros((4, 8))
  with pytest.raises(ValueError, match="needs an axis_name"):
    clip_loss(x, x, 1.0, impl="ring")
  with pytest.raises(ValueError, match="takes no axis_name"):
    siglip_loss(x, x, 1.0, 0.0, axis_name="data")
  with pytest.raises(ValueError, match="siglip_loss only"):
    clip_loss(x, x, 1.0, impl="ring_bidir", axis_name="data")
  # A sharded impl outside shard_map: one line saying so, not JAX's unbound-axis message.
  for loss, args, impl in ((siglip_loss, (x, x, 1.0, 0.0), "ring_bidir"),
                           (clip_loss, (x, x, 1.0), "gather"), (clip_loss, (x, x, 1.0), "ring")):
    with pytest.raises(ValueError, match=rf"impl='{impl}': axis_name='data' is not a mapped "
                                         r"axis here; call the loss inside shard_map"):
      loss(*args, impl=impl, axis_name="data")


@pytest.mark.parametrize("name,impl", CASES)
def test_bad_shards_name_the_argument(name, impl):
  """The checks see each device's shard: an empty local batch is one too."""
  local = lambda x, y: LOSSES[name](x, y, 1.0, 0.0, impl=impl, axis_name="data")
  f = jax.jit(jax.shard_map(local, mesh=make_mesh((8,), ("data",)), in_specs=(P("data"),) * 2,
                            out_specs=P()))
  with pytest.raises(ValueError, match="^img_emb must be a floating-point array; got int32"):
    f(jnp.zeros((16, 4), jnp.int32), jnp.zeros((16, 4)))
  with pytest.raises(ValueError, match=r"^img_emb has batch size 0; got shape \(0, 4\)"):
    f(jnp.ones((0, 4)), jnp.ones((0, 4)))
