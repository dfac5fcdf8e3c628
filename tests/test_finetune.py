"""Fine-tuning tools: layer-wise lr decay (config.optim.layer_decay) against a float64 NumPy
AdamW step times factors derived from the parameter paths; weight EMA (config.ema_decay)
against a float64 NumPy walk."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny_config
from mmjax.models import factory
from mmjax.train import optimizer

DEPTH = {"img": 3, "txt": 2}
DECAY = 0.7


def _params(scan: bool):
  c = tiny_config("/unused", **{"model.scan": scan, "model.image.depth": DEPTH["img"],
                                "model.text.depth": DEPTH["txt"]})
  model = factory.two_tower_model(c, 100, loss="siglip")
  v = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), jnp.zeros((1, 16), jnp.int32))
  return c, v["params"]


def _expected_factor(path: str, shape) -> np.ndarray:
  """decay ** (L + 1 - d), worked out from the path alone."""
  m = re.match(r"(img|txt)/", path)
  if not m:
    return np.ones(())
  n = DEPTH[m.group(1)]
  if re.match(r"(img|txt)/(embedding|token_embedding|pos_embedding|cls|ln_pre)/", path + "/"):
    return np.asarray(DECAY ** (n + 1))
  if b := re.match(r"(img|txt)/encoder/block(\d+)/", path):
    return np.asarray(DECAY ** (n + 1 - (int(b.group(2)) + 1)))
  if re.match(r"(img|txt)/encoder/blocks/", path):
    assert shape[0] == n
    rows = np.array([DECAY ** (n + 1 - (i + 1)) for i in range(n)])
    return rows.reshape((n,) + (1,) * (len(shape) - 1))
  return np.ones(())


def _adamw_step1(optim, lr, params, grads, mask):
  """One float64 AdamW step (global-norm clipping first) from zero moments: the update."""
  leaves = [np.asarray(g, np.float64) for g in jax.tree.leaves(grads)]
  norm = np.sqrt(sum((g ** 2).sum() for g in leaves))
  clip = min(1.0, optim.grad_clip / norm)
  def one(p, g, decays):
    g = np.asarray(g, np.float64) * clip
    m_hat = (1 - optim.b1) * g / (1 - optim.b1)
    v_hat = (1 - optim.b2) * g ** 2 / (1 - optim.b2)
    u = m_hat / (np.sqrt(v_hat) + 1e-8)
    if decays:
      u = u + optim.weight_decay * np.asarray(p, np.float64)
    return -lr * u
  return jax.tree.map(one, params, grads, mask)


@pytest.mark.parametrize("scan", [False, True])
def test_layer_decay_scales_each_leaf_by_its_depth(scan):
  c, params = _params(scan)
  c.optim.warmup_steps, c.optim.grad_clip, c.optim.weight_decay = 0, 0.05, 0.1
  c.optim.layer_decay = DECAY
  tx, schedule = optimizer.make_optimizer(c.optim, 10, params=params)
  keys = jax.random.split(jax.random.PRNGKey(1), len(jax.tree.leaves(params)))
  grads = jax.tree.unflatten(jax.tree.structure(params), [
      jax.random.normal(k, p.shape, p.dtype) for k, p in zip(keys, jax.tree.leaves(params))])
  updates, _ = tx.update(grads, tx.init(params), params)
  plain = _adamw_step1(c.optim, float(schedule(0)), params, grads, optimizer.decay_mask(params))
  seen = set()
  for (path, u), p in zip(jax.tree_util.tree_leaves_with_path(updates),
                          jax.tree.leaves(plain)):
    name = optimizer.param_path(path)
    want = p * _expected_factor(name, p.shape)
    np.testing.assert_allclose(np.asarray(u, np.float64), want, rtol=2e-5, atol=1e-9,
                               err_msg=name)
    seen.update(np.round(np.unique(_expected_factor(name, p.shape)), 8).tolist())
  # Every depth of both towers occurs: img 0.7**0..4, txt 0.7**0..3.
  assert sorted(seen) == sorted(round(DECAY ** k, 8) for k in range(5))


def test_layer_decay_with_frozen_tower():
  c, params = _params(False)
  c.optim.warmup_steps, c.optim.layer_decay, c.optim.weight_decay = 0, DECAY, 0.0
  frozen = optimizer.frozen_labels(params, ("txt/.*",))
  tx, _ = optimizer.make_optimizer(c.optim, 10, frozen=frozen, params=params)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  u = {optimizer.param_path(k): np.asarray(v)
       for k, v in jax.tree_util.tree_leaves_with_path(updates)}
  assert not u["txt/encoder/block0/ln1/scale"].any()
  np.testing.assert_allclose(u["img/encoder/block0/ln1/scale"] / u["img_proj/kernel"][0, 0],
                             DECAY ** 3, rtol=1e-5)


def test_layer_decay_refusals():
  c, params = _params(False)
  c.optim.layer_decay = 1.5
  with pytest.raises(ValueError, match="config.optim.layer_decay"):
    optimizer.make_optimizer(c.optim, 10, params=params)
  c.optim.layer_decay = 0.5
  with pytest.raises(ValueError, match="config.optim.layer_decay"):
    optimizer.make_optimizer(c.optim, 10)
  resnet = {"img": {"stem_conv": {"kernel": jnp.zeros((3, 3))}}, "t": jnp.zeros(())}
  with pytest.raises(ValueError, match="config.optim.layer_decay.*ResNet"):
    optimizer.layer_decay_factors(resnet, 0.5)


class _Residual:
  """loss = ||x w + sum(u) - 4 - y|| (a NaN x: a non-finite step)."""
  batch_keys = ("x", "y")
  frozen = None

  def init_variables(self, rng, batch):
    return {"params": {"w": jnp.zeros(batch["x"].shape[1]), "u": jnp.ones((2, 2))}}

  def grad_fn(self, params, ema, batch, rng, batch_stats=None):
    def loss(p):
      r = batch["x"] @ p["w"] - batch["y"] + p["u"].sum() - 4.0
      return jnp.sqrt(jnp.sum(r * r)), {}
    return jax.value_and_grad(loss, has_aux=True)(params)

  def ema_init(self, params):
    return None

  def ema_update(self, ema, params, step):
    return None


def test_weight_ema_walks_the_params_and_skips_non_finite_steps(rng):
  """params_ema after each of 4 steps (the third non-finite) equals a float64 walk
  ema = d * ema + (1 - d) * params over the params the step produced."""
  import optax
  from mmjax.train import state as state_lib
  d, n = 0.8, 5
  x = rng.normal(size=(n, 3)).astype(np.float32)
  y = rng.normal(size=n).astype(np.float32)
  tx = optax.adam(0.1)
  obj = _Residual()
  state = state_lib.init_state(obj, tx, jax.random.PRNGKey(0), {"x": x, "y": y}, ema_decay=d)
  step = jax.jit(state_lib.make_train_step(obj, tx, schedule=lambda c: 0.1, ema_decay=d))
  walk = jax.tree.map(lambda p: np.asarray(p, np.float64), state.params)
  for i, bad in enumerate([False, False, True, False]):
    batch = {"x": np.full_like(x, np.nan) if bad else x, "y": y}
    before = state.params
    state, metrics = step(state, batch)
    assert bool(metrics["finite"]) is not bad
    if bad:
      jax.tree.map(np.testing.assert_array_equal, state.params, before)
    else:
      walk = jax.tree.map(lambda e, p: d * e + (1 - d) * np.asarray(p, np.float64),
                          walk, state.params)
    jax.tree.map(lambda got, want: np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7),
                 state.params_ema, walk)
  assert not np.allclose(state.params_ema["w"], state.params["w"])   # an average, not a copy


def test_ema_decay_off_keeps_no_copy_and_bad_values_are_refused(data_dir):
  from mmjax.train import config as config_lib
  from mmjax.train import state as state_lib
  state = state_lib.init_state(_Residual(), __import__("optax").sgd(0.1), jax.random.PRNGKey(0),
                               {"x": np.zeros((2, 3), np.float32), "y": np.zeros(2, np.float32)})
  assert state.params_ema is None
  for key, bad in (("ema_decay", 1.0), ("ema_decay", -0.1), ("optim.layer_decay", 0.0)):
    c = tiny_config(data_dir, **{key: bad})
    with pytest.raises(ValueError, match=f"config.{key}"):
      config_lib.validate(c)
