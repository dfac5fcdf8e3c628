"""Contrastive gradient accumulation (GradCache) gives the full-batch gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from mmjax.models import two_tower
from mmjax.objectives.contrastive import loss_of, two_tower_grad_fn
from mmjax.objectives.gradcache import make_grad_fn

TINY = dict(width=32, depth=1, mlp_dim=64, num_heads=2)


def _setup(loss, b, rng):
  model = two_tower.Model(image=dict(**TINY, patch_size=(8, 8)),
                          text=dict(**TINY, vocab_size=50, max_len=6, pool_type="eos"),
                          embed_dim=16, loss=loss)
  image = jnp.asarray(rng.normal(size=(b, 16, 16, 3)), jnp.float32)
  text = rng.integers(4, 50, size=(b, 6)).astype(np.int32)
  text[:, -1] = 3
  batch = {"image": image, "text": jnp.asarray(text)}
  params = model.init(jax.random.PRNGKey(int(rng.integers(1 << 30))), image[:1], batch["text"][:1])
  return model, params["params"], batch


def _assert_tree_close(a, b, rtol=1e-5):
  # atol from the largest gradient anywhere: some leaves are exactly zero in
  # exact arithmetic (a key bias cannot change a softmax) and hold only round-off.
  scale = max(float(np.abs(y).max()) for y in jax.tree.leaves(b))
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, rtol=rtol, atol=rtol * scale,
                               err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("loss", ["clip", "siglip"])
@pytest.mark.parametrize("k", [2, 3])
def test_accumulated_equals_full_batch(loss, k, rng):
  model, params, batch = _setup(loss, 12, rng)
  loss = loss_of(loss)
  key = jax.random.PRNGKey(0)
  (want, _), want_g = jax.jit(two_tower_grad_fn(model, loss))(params, batch, key)
  (got, _), got_g = jax.jit(two_tower_grad_fn(model, loss, accum_steps=k))(params, batch, key)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  _assert_tree_close(got_g, want_g)
  assert float(np.abs(got_g["t"])) > 0   # the temperature's gradient is there too


def test_accumulated_sharded_ring_equals_single_device(rng):
  model, params, batch = _setup("siglip", 32, rng)
  key = jax.random.PRNGKey(0)
  (want, _), want_g = jax.jit(two_tower_grad_fn(model, loss_of("siglip")))(params, batch, key)
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  sharded = jax.device_put(batch, NamedSharding(mesh, P("data")))
  fn = two_tower_grad_fn(model, loss_of("siglip", "ring", mesh=mesh, axes=("data",)),
                    accum_steps=2)
  (got, _), got_g = jax.jit(fn)(params, sharded, key)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  _assert_tree_close(got_g, want_g)


def test_bad_accum_steps():
  with pytest.raises(ValueError, match="accum_steps"):
    make_grad_fn(None, None, accum_steps=0)


@pytest.mark.parametrize("loss", ["siglip", "clip"])
def test_gradcache_of_tiled_blocks_in_the_train_step_equals_dense_full_batch(loss, rng,
                                                                              monkeypatch):
  """The launcher's path at a tiny size: config.accum_steps=3 with config.loss_blocks='tiled'
  (tiles of 8: 3 x 3 of them over the batch of 24) gives the objective's loss and gradients (and,
  for SigLIP, the train step's loss and gradient norm) of dense blocks without accumulation."""
  from mmjax.losses import tiled
  from mmjax import objectives
  from mmjax.train import optimizer, state as state_lib
  from tests.configs import tiny_config
  monkeypatch.setattr(tiled, "DEFAULT_BLOCK", 8)
  b, n_vocab = 24, 64
  batch = {"image": jnp.asarray(rng.uniform(-1, 1, size=(b, 32, 32, 3)), jnp.float32),
           "text": jnp.asarray(rng.integers(1, n_vocab, size=(b, 16)), jnp.int32)}
  key = jax.random.PRNGKey(int(rng.integers(1 << 30)))
  runs = {}
  for name, over in (("dense", dict(accum_steps=1, loss_blocks="dense")),
                     ("tiled_gradcache", dict(accum_steps=3, loss_blocks="tiled"))):
    config = tiny_config("unused", loss=loss, batch_size=b, **over)
    objective = objectives.make(config, vocab_size=n_vocab)
    params = objective.init(jax.random.PRNGKey(0), batch)
    (value, _), grads = jax.jit(objective.grad_fn)(params, None, batch, key)
    metrics = {}
    if loss == "siglip":   # the digits job's train step too (a compile costs ~8 s)
      tx, schedule = optimizer.make_optimizer(config.optim, config.total_steps)
      state = state_lib.init_state(objective, tx, jax.random.PRNGKey(0), batch)
      step = jax.jit(state_lib.make_train_step(objective, tx, schedule=schedule))
      metrics = step(state, batch)[1]
      assert bool(metrics["finite"])
    runs[name] = value, grads, metrics
  (want, want_g, want_m), (got, got_g, got_m) = runs["dense"], runs["tiled_gradcache"]
  np.testing.assert_allclose(got, want, rtol=1e-5)
  _assert_tree_close(got_g, want_g)
  assert float(np.abs(got_g["t"])) > 0
  for k in set(want_m) & {"loss", "grad_norm"}:
    np.testing.assert_allclose(got_m[k], want_m[k], rtol=1e-5, err_msg=k)
