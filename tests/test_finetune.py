"""Fine-tuning tools: layer-wise lr decay (config.optim.layer_decay) against a float64 NumPy
AdamW step times factors derived from the parameter paths; weight EMA (config.ema_decay)
against a float64 NumPy walk."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import tiny_config
from mmjax.models import factory
from mmjax.train import optimizer

DEPTH = {"img": 3, "txt": 2}
DECAY = 0.7
# A small CLIP ResNet image tower: stages of 2, 11, 1, 1 bottleneck blocks (stage 2 past 10, so
# 'stage2_10' must follow 'stage2_9', not 'stage2_1'); its depths written out by hand: the stem
# 0, block k of the flattened stages k + 1, the attention pool None (factor 1).
RESNET_LAYERS = (2, 11, 1, 1)
RESNET_DEPTH = {
    "stem_conv1": 0, "stem_conv2": 0, "stem_conv3": 0,
    "stem_norm1": 0, "stem_norm2": 0, "stem_norm3": 0,
    "stage1_0": 1, "stage1_1": 2,
    "stage2_0": 3, "stage2_1": 4, "stage2_2": 5, "stage2_3": 6, "stage2_4": 7, "stage2_5": 8,
    "stage2_6": 9, "stage2_7": 10, "stage2_8": 11, "stage2_9": 12, "stage2_10": 13,
    "stage3_0": 14, "stage4_0": 15,
    "attnpool": None,
}
RESNET_BLOCKS = 15


@functools.lru_cache(maxsize=None)   # one init per tower for the tests that share it
def _params(tower: str):
  """tower: 'vit', 'vit_scan' (DEPTH blocks) or 'resnet' (RESNET_LAYERS) image tower."""
  over = {"model.scan": tower == "vit_scan", "model.image.depth": DEPTH["img"],
          "model.text.depth": DEPTH["txt"]}
  if tower == "resnet":
    over.update({"model.image.variant": None, "model.image.depth": None,
                 "model.image.layers": RESNET_LAYERS, "model.image.width": 8,
                 "model.image.num_heads": 2})
  c = tiny_config("/unused", **over)
  model = factory.two_tower_model(c, 100, loss="siglip")
  v = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)),
                          jnp.zeros((1, 16), jnp.int32))
  return c, v["params"]


def _resnet_factor(path: str) -> np.ndarray:
  """decay ** (L + 1 - d) from the hand-written RESNET_DEPTH."""
  d = RESNET_DEPTH[path.split("/")[1]]   # a KeyError: a parameter the map does not know
  return np.asarray(1.0 if d is None else DECAY ** (RESNET_BLOCKS + 1 - d))


def _expected_factor(path: str, shape, resnet: bool = False) -> np.ndarray:
  """decay ** (L + 1 - d), worked out from the path alone."""
  if resnet and path.startswith("img/"):
    return _resnet_factor(path)
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


def _random_like(params, seed: int):
  keys = jax.random.split(jax.random.PRNGKey(seed), len(jax.tree.leaves(params)))
  return jax.tree.unflatten(jax.tree.structure(params), [
      jax.random.normal(k, p.shape, p.dtype) for k, p in zip(keys, jax.tree.leaves(params))])


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


@pytest.mark.parametrize("tower", ["vit", "vit_scan", "resnet"])
def test_layer_decay_scales_each_leaf_by_its_depth(tower):
  c, params = _params(tower)
  c.optim.warmup_steps, c.optim.grad_clip, c.optim.weight_decay = 0, 0.05, 0.1
  c.optim.layer_decay = DECAY
  tx, schedule = optimizer.make_optimizer(c.optim, 10, params=params)
  grads = _random_like(params, 1)
  updates, _ = tx.update(grads, tx.init(params), params)
  plain = _adamw_step1(c.optim, float(schedule(0)), params, grads, optimizer.decay_mask(params))
  seen = set()
  for (path, u), p in zip(jax.tree_util.tree_leaves_with_path(updates),
                          jax.tree.leaves(plain)):
    name = optimizer.param_path(path)
    want = p * _expected_factor(name, p.shape, tower == "resnet")
    np.testing.assert_allclose(np.asarray(u, np.float64), want, rtol=2e-5, atol=1e-9,
                               err_msg=name)
    seen.update(np.round(np.unique(_expected_factor(name, p.shape, tower == "resnet")),
                         8).tolist())
  # Every depth of both towers occurs: img 0.7**0..L+1 (L = 3, or 15 ResNet blocks), txt 0..3.
  img = RESNET_BLOCKS if tower == "resnet" else DEPTH["img"]
  assert sorted(seen) == sorted(round(DECAY ** k, 8) for k in range(img + 2))


def test_resnet_layer_decay_sgd_step_is_lr_times_factor_times_grad():
  """One SGD step through the factors: new - old == -lr * factor * grad, leaf by leaf."""
  _, params = _params("resnet")
  lr = 0.3
  factors = optimizer.layer_decay_factors(params, DECAY)
  tx = optax.chain(optax.sgd(lr), optimizer.scale_by_tree(factors))
  grads = _random_like(params, 2)
  updates, _ = tx.update(grads, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  for (path, n), p, g in zip(jax.tree_util.tree_leaves_with_path(new), jax.tree.leaves(params),
                             jax.tree.leaves(grads)):
    name = optimizer.param_path(path)
    want = -lr * _expected_factor(name, p.shape, resnet=True) * np.asarray(g, np.float64)
    np.testing.assert_allclose(np.asarray(n, np.float64) - np.asarray(p, np.float64), want,
                               rtol=1e-5, atol=1e-6, err_msg=name)
  assert set(params["img"]) == set(RESNET_DEPTH)   # the hand-written map covers the tower


def test_layer_decay_with_frozen_tower():
  c, params = _params("vit")
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
  c, params = _params("vit")
  c.optim.layer_decay = 1.5
  with pytest.raises(ValueError, match="config.optim.layer_decay"):
    optimizer.make_optimizer(c.optim, 10, params=params)
  c.optim.layer_decay = 0.5
  with pytest.raises(ValueError, match="config.optim.layer_decay"):
    optimizer.make_optimizer(c.optim, 10)
  neither = {"img": {"stem_conv": {"kernel": jnp.zeros((3, 3))}}, "t": jnp.zeros(())}
  with pytest.raises(ValueError, match="config.optim.layer_decay.*params\\['img'\\]"):
    optimizer.layer_decay_factors(neither, 0.5)


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
  state = state_lib.init_state(_Residual(), optax.sgd(0.1), jax.random.PRNGKey(0),
                               {"x": np.zeros((2, 3), np.float32), "y": np.zeros(2, np.float32)})
  assert state.params_ema is None
  for key, bad in (("ema_decay", 1.0), ("ema_decay", -0.1), ("optim.layer_decay", 0.0)):
    c = tiny_config(data_dir, **{key: bad})
    with pytest.raises(ValueError, match=f"config.{key}"):
      config_lib.validate(c)
