"""LiT (frozen params, init_from), FLIP (patch dropout), MAE, MoCo v3, linear probe and kNN."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from mmjax.evaluate import knn_accuracy, linear_probe_accuracy
from mmjax.losses import clip_loss, infonce_loss
from mmjax.models import mae, moco, vit
from mmjax.train import checkpoint, optimizer
from tests.reference import TOL, assert_close, ref_infonce, rel_err

TINY = dict(width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=(4, 4))


def _random_params(rng, init, *args, scale=0.2):
  """init(*args)'s parameter tree (its shapes only: compiling an init costs seconds) filled
  with float32 normal(0, scale) numbers from `rng`."""
  shapes = jax.eval_shape(init, *args)
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape) * scale, s.dtype), shapes)


def _o0(fn):
  """jax.jit(fn), each input signature compiled at XLA's backend optimisation level 0: the same
  program, compiled in about half the time (these tests compile far more than they run)."""
  jitted, compiled = jax.jit(fn), {}

  def call(*args):
    sig = (jax.tree.structure(args),
           tuple((np.shape(x), jnp.result_type(x)) for x in jax.tree.leaves(args)))
    if sig not in compiled:
      compiled[sig] = jitted.lower(*args).compile(
          compiler_options={"xla_backend_optimization_level": 0})
    return compiled[sig](*args)
  return call


# ------------------------------------------------------------ LiT

def _optim():
  return ml_collections.ConfigDict(dict(lr=1e-2, warmup_steps=0, end_lr_fraction=0.1,
                                        weight_decay=1e-2, b1=0.9, b2=0.95, grad_clip=1.0))


def test_frozen_params_keep_their_values_and_get_no_optimizer_state(rng):
  params = {"img": {"kernel": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
                    "bias": jnp.asarray(rng.normal(size=(3,)), jnp.float32)},
            "txt": {"kernel": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)},
            "t": jnp.float32(1.0)}
  tx, _ = optimizer.make_optimizer(_optim(), 10,
                                   frozen=optimizer.frozen_labels(params, ("img/.*",)))
  state = tx.init(params)
  # Adam's moments exist for txt/kernel and t only: 2 * (15 + 1) numbers, none for img.
  sizes = sum(x.size for x in jax.tree.leaves(state) if hasattr(x, "size") and x.ndim > 0)
  assert sizes == 2 * 15
  new = params
  for _ in range(3):
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
    updates, state = tx.update(grads, state, new)
    new = optax.apply_updates(new, updates)
  for k in ("kernel", "bias"):
    np.testing.assert_array_equal(new["img"][k], params["img"][k])
  assert not np.array_equal(new["txt"]["kernel"], params["txt"]["kernel"])
  assert float(new["t"]) != 1.0


def test_frozen_pattern_that_matches_nothing_is_an_error():
  params = {"img": {"kernel": jnp.zeros((2, 2))}}
  with pytest.raises(ValueError, match="config.frozen.*match no parameter"):
    optimizer.frozen_labels(params, ("image/.*",))
  with pytest.raises(ValueError, match="config.frozen.*not a regex"):
    optimizer.frozen_labels(params, ["img/(["])


def test_lit_from_an_mae_run_end_to_end(data_dir, tmp_path):
  """A tiny MAE run, then LiT initialised from its 'img' and locking it: the
  LiT run's final image tower is bitwise the MAE run's."""
  from mmjax.train import loop
  from tests.configs import tiny_config

  image = {"model.image.pool_type": "gap", "model.image.variant": "mu/8", "model.image.depth": 2}
  mae_dir, lit_dir = str(tmp_path / "mae"), str(tmp_path / "lit")
  loop.train(tiny_config(data_dir, loss="mae", total_steps=4, **image), mae_dir)
  cfg = tiny_config(data_dir, total_steps=4, frozen=("img/.*",), **image,
                    **{"init_from.workdir": mae_dir, "evaluate.probes": True})
  results = loop.train(cfg, lit_dir)
  pre, _ = checkpoint.load_params(mae_dir)
  post, _ = checkpoint.load_params(lit_dir)
  jax.tree.map(np.testing.assert_array_equal, post["img"], pre["img"])
  assert set(post) > {"img", "txt", "img_proj"}
  assert "zeroshot_top1" in results and "linear_probe_top1" in results

  bad = tiny_config(data_dir, total_steps=4, **{"init_from.workdir": mae_dir})  # 'map' head
  bad.model.image.variant = "mu/4"
  with pytest.raises(ValueError, match="config.init_from: img.* the towers must have"):
    loop.train(bad, str(tmp_path / "bad"))
  shallower = tiny_config(data_dir, total_steps=4, **{**image, "model.image.depth": 1,
                                                      "init_from.workdir": mae_dir})
  with pytest.raises(ValueError, match="has img parameters this run lacks.*block1"):
    loop.train(shallower, str(tmp_path / "shallower"))


# ------------------------------------------------------------ FLIP

def _encoder_inputs(model):
  """fn(params, x, key=None) -> (the patch embedding [b, n, width] + its position embedding,
  in float64; the tokens the ViT's Encoder was given; the ViT's (pooled, out)), at train time
  with dropout key `key` when one is given."""
  from mmjax.nn.layers import Encoder, posemb_sincos_2d

  @jax.jit
  def run(params, x, key):
    seen = {}

    def spy(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      if context.method_name == "__call__" and isinstance(context.module, Encoder):
        seen["encoder"] = args[0]
      elif context.method_name == "__call__" and context.module.name == "embedding":
        seen["embedding"] = out
      return out

    with nn.intercept_methods(spy):
      kw = {} if key is None else dict(train=True, rngs={"dropout": key})
      result = model.apply(params, x, **kw)
    return seen["embedding"], seen["encoder"], result

  def fn(params, x, key=None):
    emb, seen, result = run(params, x, key)
    b, h, w, width = emb.shape
    tokens = (np.asarray(emb, np.float64).reshape(b, h * w, width)
              + np.asarray(posemb_sincos_2d(h, w, width), np.float64))
    return tokens, np.asarray(seen, np.float64), result
  return fn


def _which_tokens(tokens, picked):
  """[b, k] int: for each picked token, the index of the token of `tokens` it is (nearest)."""
  d = ((picked[:, :, None] - tokens[:, None]) ** 2).sum(-1)        # [b, k, n]
  return d.argmin(-1)


def test_patch_dropout_keeps_a_random_subset_per_image_at_train_time_only(rng):
  """FLIP: at train time each image's encoder sees round((1 - p) n) of its n patch tokens (with
  their own position embeddings), a different subset per image and per dropout key; the output
  is the model run with keep= those tokens; at evaluation all n tokens are seen."""
  p, n = 0.3, 64                     # 44.8 tokens kept: round gives 45 (floor would give 44)
  model = vit.Model(**TINY, pool_type="gap", patch_dropout=p)
  x = jnp.asarray(rng.normal(size=(4, 32, 32, 3)), jnp.float32)
  params = _random_params(rng, model.init, jax.random.PRNGKey(0), x)

  encoder_inputs = _encoder_inputs(model)
  tokens, seen, (_, out) = encoder_inputs(params, x)
  assert out["encoded"].shape == (4, n, 32)
  assert_close(seen, tokens, dtype=jnp.float32, name="eval: the encoder's input, all tokens")

  key = jax.random.PRNGKey(int(rng.integers(2**31)))
  tokens, seen, (pooled, out) = encoder_inputs(params, x, key)
  assert out["encoded"].shape == seen.shape == (4, 45, 32)
  idx = _which_tokens(tokens, seen)
  assert_close(seen, np.take_along_axis(tokens, idx[..., None], 1), dtype=jnp.float32,
               name="train: the encoder's input is patch tokens")
  sets = [frozenset(row.tolist()) for row in idx]
  assert all(len(s) == 45 for s in sets), "a token kept twice"
  assert len(set(sets)) == 4, "two images kept the same tokens"
  kept = jnp.asarray(np.sort(idx, 1), jnp.int32)
  want_pooled, want_out = jax.jit(lambda p, x, k: model.apply(p, x, keep=k))(params, x, kept)
  assert_close((pooled, out["encoded"]), (want_pooled, want_out["encoded"]), dtype=jnp.float32,
               name="train == keep the recovered tokens")
  other = jax.random.fold_in(key, 1)
  _, seen2, _ = encoder_inputs(params, x, other)
  assert {frozenset(r.tolist()) for r in _which_tokens(tokens, seen2)}.isdisjoint(sets)

  tok = vit.Model(**TINY, pool_type="tok", patch_dropout=0.25)
  pt = jax.eval_shape(tok.init, jax.random.PRNGKey(0), x)
  _, out = jax.eval_shape(lambda p, x: tok.apply(p, x, train=True,
                                                 rngs={"dropout": jax.random.PRNGKey(1)}), pt, x)
  assert out["encoded"].shape == (4, 1 + 48, 32)   # the class token always stays


def test_random_keep_is_a_sorted_subset():
  keep = np.asarray(vit.random_keep(jax.random.PRNGKey(3), 5, 20, 7))
  assert keep.shape == (5, 7)
  for row in keep:
    assert len(set(row)) == 7 and (np.diff(row) > 0).all() and row.max() < 20


# ------------------------------------------------------------ MAE

def test_patchify_orders_patches_row_major():
  img = np.arange(2 * 4 * 6 * 3).reshape(2, 4, 6, 3).astype(np.float32)
  p = np.asarray(mae.patchify(jnp.asarray(img), (2, 3)))
  assert p.shape == (2, 4, 18)
  np.testing.assert_array_equal(p[1, 3].reshape(2, 3, 3), img[1, 2:4, 3:6])


def _np_patchify(img, ph, pw):
  """float64 [b, H, W, C] -> [b, (H/ph)*(W/pw), ph*pw*C] by explicit loops: patch (r, c) of
  the grid is number r * (W/pw) + c, its pixels in (row, column, channel) order."""
  b, h, w, _ = img.shape
  return np.stack([np.stack([img[i, r * ph:(r + 1) * ph, c * pw:(c + 1) * pw].reshape(-1)
                             for r in range(h // ph) for c in range(w // pw)])
                   for i in range(b)]).astype(np.float64)


@functools.cache
def _tiny_mae():
  """A one-block MAE and its jitted fn(params, x, mask_key) -> (loss, aux, the encoder's
  (pooled, out)), built once for the tests that share it (one compilation)."""
  model = mae.Model(image=TINY, mask_ratio=0.75, decoder_width=16, decoder_depth=1,
                    decoder_heads=2, decoder_mlp_dim=32)

  @jax.jit
  def run(params, x, key):
    (loss, aux), state = model.apply(
        params, x, rngs={"mask": key}, mutable=["intermediates"],
        capture_intermediates=lambda m, method: m.name == "img" and method == "__call__")
    return loss, aux, state["intermediates"]["img"]["__call__"][0]
  return model, run


def _mae_params(rng, model, x):
  return _random_params(rng, model.init, {"params": jax.random.PRNGKey(0),
                                          "mask": jax.random.PRNGKey(1)}, x)


def test_mae_loss_is_the_masked_patches_mse_of_normalised_pixels(rng):
  """The loss is the mean over masked patches (75% of 16) of the per-patch MSE between the
  prediction and the patch's pixels normalised by its own mean and variance (eps 1e-6),
  against a float64 NumPy patchify and normalisation of the image."""
  x = rng.normal(size=(2, 16, 16, 3)) * 2 + 1
  model, run = _tiny_mae()
  params = _mae_params(rng, model, x)
  loss, aux, _ = run(params, jnp.asarray(x, jnp.float32), jax.random.PRNGKey(2))
  mask = np.asarray(aux["mask"])
  assert mask.shape == (2, 16) and (mask.sum(1) == 12).all() and set(np.unique(mask)) == {0, 1}
  t = _np_patchify(np.asarray(jnp.asarray(x, jnp.float32), np.float64), 4, 4)
  t = (t - t.mean(-1, keepdims=True)) / np.sqrt(t.var(-1, keepdims=True) + 1e-6)
  err = ((np.asarray(aux["pred"], np.float64) - t) ** 2).mean(-1)
  assert_close(loss, (err * mask).sum() / mask.sum(), dtype=jnp.float32, name="mae loss")


def test_mae_encoder_sees_only_the_visible_patches(rng):
  """With the mask key fixed, new pixels in every masked patch leave the encoder's output and
  the prediction bitwise unchanged (only the loss's targets move); new pixels in one visible
  patch of image 0 change image 0's encoding and nothing of image 1's."""
  x = rng.normal(size=(2, 16, 16, 3))
  model, run = _tiny_mae()
  params = _mae_params(rng, model, x)
  key = jax.random.PRNGKey(int(rng.integers(2**31)))
  loss, aux, (pooled, out) = run(params, jnp.asarray(x, jnp.float32), key)
  mask = np.asarray(aux["mask"])
  assert out["encoded"].shape == (2, 4, 32)

  def repaint(img, i, j):
    r, c = divmod(int(j), 4)
    img[i, 4 * r:4 * r + 4, 4 * c:4 * c + 4] = rng.normal(size=(4, 4, 3)) * 3

  hidden = x.copy()
  for i, j in zip(*np.nonzero(mask)):
    repaint(hidden, i, j)
  assert np.abs(hidden - x).max() > 1.0
  loss2, aux2, (pooled2, out2) = run(params, jnp.asarray(hidden, jnp.float32), key)
  np.testing.assert_array_equal(aux2["mask"], mask)
  np.testing.assert_array_equal(out2["encoded"], out["encoded"])
  np.testing.assert_array_equal(pooled2, pooled)
  np.testing.assert_array_equal(aux2["pred"], aux["pred"])
  assert abs(float(loss2) - float(loss)) > 1e-5 * abs(float(loss))   # the targets changed

  seen = x.copy()
  repaint(seen, 0, np.flatnonzero(mask[0] == 0)[0])
  _, aux3, (_, out3) = run(params, jnp.asarray(seen, jnp.float32), key)
  assert rel_err(out3["encoded"][0], out["encoded"][0]) > 1e-2
  assert rel_err(aux3["pred"][0], aux["pred"][0]) > 1e-2
  np.testing.assert_array_equal(out3["encoded"][1], out["encoded"][1])


# ------------------------------------------------------------ MoCo v3

def test_infonce_matches_float64_reference_and_is_half_of_clip(rng):
  q, k = (rng.normal(size=(9, 6)) for _ in range(2))
  q, k = (x / np.linalg.norm(x, axis=1, keepdims=True) for x in (q, k))
  s = 5.0
  want, (want_dq, want_dk) = ref_infonce(q, k, s)
  got, (dq, dk) = jax.value_and_grad(infonce_loss, (0, 1))(jnp.asarray(q, jnp.float32),
                                                           jnp.asarray(k, jnp.float32), s)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  np.testing.assert_allclose(dq, want_dq, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(dk, want_dk, rtol=1e-4, atol=1e-6)
  both = 0.5 * (infonce_loss(q, k, s) + infonce_loss(k, q, s))
  np.testing.assert_allclose(both, clip_loss(q, k, s), rtol=1e-5)


def test_momentum_schedule_and_ema_update():
  assert float(moco.momentum(0, 100, 0.99)) == pytest.approx(0.99)
  assert float(moco.momentum(50, 100, 0.99)) == pytest.approx(0.995)
  assert float(moco.momentum(100, 100, 0.99)) == pytest.approx(1.0)
  from mmjax.objectives.moco import MoCo
  obj = MoCo.__new__(MoCo)
  obj.total_steps, obj.base_momentum = 100, 0.99
  params = {"img": jnp.ones(3), "projector": jnp.zeros(2), "predictor": jnp.ones(1)}
  ema = {"img": jnp.zeros(3), "projector": jnp.ones(2)}
  new = obj.ema_update(ema, params, 0)
  np.testing.assert_allclose(new["img"], 0.01, rtol=1e-5)
  np.testing.assert_allclose(new["projector"], 0.99, rtol=1e-5)
  assert set(new) == set(moco.EMA_KEYS)


def _stash_grads():
  """An optax transformation that passes the updates on and keeps a copy as its state, so a
  train step's opt_state shows the gradients it was given."""
  return optax.GradientTransformation(lambda params: params,
                                      lambda updates, state, params=None: (updates, updates))


@functools.cache
def _moco_step():
  """objectives.MoCo of a tiny config (mu/8 backbone, 'gap', 16-wide heads, momentum base 0.5,
  8 steps), its optimizer (the gradients stashed, then AdamW at lr 1e-2) and its real train step,
  jitted, compiled once for the tests that share it."""
  from mmjax import objectives
  from mmjax.train import state as train_state
  from tests.configs import tiny_config
  cfg = tiny_config("unused", loss="moco", total_steps=8, **{
      "model.image.pool_type": "gap", "model.moco.hidden": 16, "model.moco.out_dim": 8,
      "model.moco.momentum": 0.5, "optim.warmup_steps": 0, "optim.lr": 1e-2})
  obj = objectives.moco.MoCo(cfg, objectives.Context())
  adamw, schedule = optimizer.make_optimizer(cfg.optim, cfg.total_steps)
  tx = optax.chain(_stash_grads(), adamw)
  return obj, tx, _o0(train_state.make_train_step(obj, tx, schedule=schedule))


def _moco_state(rng, obj, tx, batch, ema=None):
  """A TrainState at step 0 with random params and `ema` (default: the params' copy)."""
  from mmjax.train import state as train_state
  params = _random_params(rng, obj.init, jax.random.PRNGKey(0), batch)
  return train_state.TrainState(
      step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
      rng=jax.random.PRNGKey(int(rng.integers(2**31))),
      ema=obj.ema_init(params) if ema is None else ema)


def _two_views(rng):
  return {k: jnp.asarray(rng.normal(size=(8, 16, 16, 3)), jnp.float32)
          for k in ("image", "image2")}


def _np_l2n(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_moco_loss_and_grads_match_symmetric_infonce_against_the_momentum_encoder(rng):
  """The train step's loss is 2 T (InfoNCE(q1, k2) + InfoNCE(q2, k1)) at scale 1 / T, q the
  online predictor's output, k the projector's output with the EMA's img and projector, both
  l2-normalised (float64 reference); its gradients are over the online params only and equal
  the model's backward pass of the reference's gradient wrt q (the keys are constants)."""
  obj, tx, step = _moco_step()
  batch = _two_views(rng)
  other = _random_params(rng, obj.init, jax.random.PRNGKey(0), batch)
  ema = {k: other[k] for k in moco.EMA_KEYS}
  s = _moco_state(rng, obj, tx, batch, ema)
  new, metrics = step(s, batch)
  loss, grads = metrics["loss"], new.opt_state[0]
  assert bool(metrics["finite"])

  t = obj.temperature
  r = jax.random.split(jax.random.fold_in(s.rng, s.step))    # the step's key, as grad_fn splits it
  v = (batch["image"], batch["image2"])

  def online(p):
    return tuple(obj.model.apply({"params": p}, v[i], train=True, rngs={"dropout": r[i]})[0]
                 for i in range(2))

  def outputs(p, ema, cot):   # the raw q of each view, the target's z, the backward of cot
    q, vjp = jax.vjp(online, p)
    z = tuple(obj.model.apply({"params": {**p, **ema}}, v[i], train=True,
                              rngs={"dropout": r[i]})[1] for i in range(2))
    return q, z, vjp(cot)[0]

  outputs = _o0(outputs)
  zeros = tuple(jnp.zeros((8, 8), jnp.float32) for _ in range(2))
  q, z, _ = jax.tree.map(lambda a: np.asarray(a, np.float64), outputs(s.params, ema, zeros))
  k = [_np_l2n(x) for x in z]
  (l12, (dq1, _)), (l21, (dq2, _)) = (ref_infonce(_np_l2n(q[0]), k[1], 1.0 / t),
                                      ref_infonce(_np_l2n(q[1]), k[0], 1.0 / t))
  assert_close(loss, 2 * t * (l12 + l21), dtype=jnp.float32, name="moco loss")

  def through_norm(q, g):   # dL/dq from dL/du = g, u = q / |q|
    n = np.linalg.norm(q, axis=-1, keepdims=True)
    u = q / n
    return jnp.asarray((g - u * (u * g).sum(-1, keepdims=True)) / n, jnp.float32)

  cot = tuple(through_norm(q[i], 2 * t * g) for i, g in enumerate((dq1, dq2)))
  want = outputs(s.params, ema, cot)[2]
  assert jax.tree.structure(grads) == jax.tree.structure(s.params)
  # Some biases have gradient 0 in exact arithmetic (attention's key bias: softmax ignores a
  # shift of every key; a bias before a BatchStatNorm, which removes it): a bias gradient's
  # round-off is measured against its layer's kernel (or LayerNorm scale) gradient.
  flat = jax.tree_util.tree_flatten_with_path(want)[0]
  paths = [jax.tree_util.keystr(p) for p, _ in flat]
  sizes = {p: float(np.linalg.norm(np.asarray(w))) for p, (_, w) in zip(paths, flat)}
  sibling = lambda p: next((sizes[p[:-len("['bias']")] + f"['{s}']"] for s in ("kernel", "scale")
                            if p[:-len("['bias']")] + f"['{s}']" in sizes), 0.0)
  scale = [sibling(p) if p.endswith("['bias']") else 0.0 for p in paths]
  assert_close(grads, want, dtype=jnp.float32, name="grads", scale=scale)
  assert min(sizes[p] for p in paths if "predictor" in p) > 0

  # The target is the EMA: online keys give another loss, and so does another EMA, each far
  # enough from this one that the float64 check above would reject it (seed 3 of the suite
  # runs: 1.4e-4 relative, 14x the tolerance).
  for target in ({k: s.params[k] for k in moco.EMA_KEYS}, jax.tree.map(lambda e: e * 1.1, ema)):
    _, m = step(s.replace(ema=target), batch)
    assert rel_err(m["loss"], loss) > 3 * TOL["float32"]


def _tree_vector(tree):
  return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)])


def test_train_step_moves_the_momentum_encoder_towards_the_new_params(rng):
  """Through the real jitted train step (MoCo, momentum base 0.5, 8 steps), the third step
  sets ema = m * ema + (1 - m) * params, with the params after that step's update and
  m = 1 - (1 - 0.5) (cos(pi 2 / 8) + 1) / 2 of the step count before it (float64); the
  predictor has no EMA copy. The check tells the new params from the old and step 2 from 3."""
  obj, tx, step = _moco_step()
  batch = _two_views(rng)
  s, _ = step(_moco_state(rng, obj, tx, batch), batch)
  s2, _ = step(s, batch)
  s3, metrics = step(s2, batch)
  assert bool(metrics["finite"]) and int(s2.step) == 2 and int(s3.step) == 3
  assert set(s3.ema) == set(moco.EMA_KEYS) == {"img", "projector"} and "predictor" in s3.params

  def m(step):
    return 1.0 - (1.0 - 0.5) * (np.cos(np.pi * step / 8) + 1.0) / 2.0

  def mix(m, ema, params):
    return jax.tree.map(lambda e, p: m * np.asarray(e, np.float64)
                        + (1 - m) * np.asarray(p, np.float64),
                        ema, {k: params[k] for k in moco.EMA_KEYS})

  assert_close(s3.ema, mix(m(2), s2.ema, s3.params), dtype=jnp.float32, name="ema")
  got = _tree_vector(s3.ema)
  for wrong in (mix(m(2), s2.ema, s2.params), mix(m(3), s2.ema, s3.params)):
    assert rel_err(got, _tree_vector(wrong)) > 100 * TOL["float32"]


def _np_batch_norm(x, scale=None, bias=None):
  """float64 normalisation of each column over the rows, eps 1e-5 (BatchStatNorm's)."""
  x = np.asarray(x, np.float64)
  y = (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-5)
  return y if scale is None else y * np.asarray(scale, np.float64) + np.asarray(bias, np.float64)


def _np_mlp(p, x, layers=3, last_norm=True):
  """float64 moco.MLP: (Dense, BatchStatNorm, ReLU) x (layers - 1), Dense[, BatchStatNorm]."""
  f = lambda a: np.asarray(a, np.float64)
  x = np.asarray(x, np.float64)
  for i in range(layers - 1):
    d, n = p[f"dense{i}"], p[f"norm{i}"]
    x = np.maximum(_np_batch_norm(x @ f(d["kernel"]) + f(d["bias"]), n["scale"], n["bias"]), 0)
  d = p[f"dense{layers - 1}"]
  x = x @ f(d["kernel"]) + f(d["bias"])
  return _np_batch_norm(x) if last_norm else x


def test_batch_stat_norm_on_8_devices_uses_the_global_batch_statistics(rng):
  """BatchStatNorm and the MoCo projector, jitted with the 24-row batch split over a mesh of 8
  devices (3 rows each; the program all-reduces), equal the one-device output and a float64
  NumPy batch norm over all 24 rows; normalising each 3-row shard alone is far from it."""
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  assert len(jax.devices()) >= 8
  mesh = Mesh(np.asarray(jax.devices()[:8]), ("data",))
  rows, repl = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
  x = rng.normal(size=(24, 6)) * 2 + rng.normal(size=6) * 3
  x32 = jnp.asarray(x, jnp.float32)
  x = np.asarray(x32, np.float64)
  cases = [
      (moco.BatchStatNorm(), lambda p, x: _np_batch_norm(x, p["scale"], p["bias"])),
      (moco.MLP(hidden=16, out_dim=8, layers=3, last_norm=True), _np_mlp)]
  for module, ref in cases:
    name = type(module).__name__
    params = _random_params(rng, module.init, jax.random.PRNGKey(0), x32, scale=0.5)
    fn = jax.jit(module.apply)
    sharded = fn.lower(jax.device_put(params, repl), jax.device_put(x32, rows)).compile()
    assert "all-reduce" in sharded.as_text(), name
    got8 = sharded(jax.device_put(params, repl), jax.device_put(x32, rows))
    assert len(got8.sharding.device_set) == 8
    got1 = fn(params, x32)
    want = ref(params["params"], x)
    assert_close(got8, got1, dtype=jnp.float32, name=f"{name}: 8 devices vs 1")
    assert_close(got8, want, dtype=jnp.float32, name=f"{name}: 8 devices vs float64")
    local = np.concatenate([ref(params["params"], s) for s in x.reshape(8, 3, 6)])
    assert rel_err(local, want) > 100 * TOL["float32"], name


def test_two_views_differ_but_share_the_example(data_dir):
  from mmjax.data import pipeline, tokenizers
  src = pipeline.get_source("mmjax_digits", "train", data_dir=data_dir)
  tok = tokenizers.get_tokenizer(tokenizers.trained_spec(data_dir, "mmjax_digits", 512),
                                 train_texts=lambda: pipeline.iter_texts(src))
  from mmjax.train.config import defaults
  data = defaults().data
  data.update(dict(image_size=32, text_len=16, crop_scale_min=0.3))
  it = pipeline.make_train_iterator(src, data, tokenizer=tok, global_batch_size=8, seed=0, views=2)
  batch = next(it)
  assert batch["image"].shape == batch["image2"].shape == (8, 32, 32, 3)
  assert not np.allclose(batch["image"], batch["image2"])


# ------------------------------------------------------------ probes

def test_probes_separate_clusters_and_not_noise(rng):
  centers = rng.normal(size=(4, 16)) * 3
  y_tr, y_te = rng.integers(0, 4, 200), rng.integers(0, 4, 100)
  x_tr = centers[y_tr] + rng.normal(size=(200, 16))
  x_te = centers[y_te] + rng.normal(size=(100, 16))
  assert linear_probe_accuracy(x_tr, y_tr, x_te, y_te) > 0.95
  assert knn_accuracy(x_tr, y_tr, x_te, y_te, k=10) > 0.95
  noise_tr, noise_te = rng.normal(size=(200, 16)), rng.normal(size=(100, 16))
  assert linear_probe_accuracy(noise_tr, y_tr, noise_te, y_te) < 0.5
  assert knn_accuracy(noise_tr, y_tr, noise_te, y_te) < 0.5
  with pytest.raises(ValueError, match="train_x .* and test_x"):
    knn_accuracy(x_tr, y_tr, x_te[:, :3], y_te)
  with pytest.raises(ValueError, match="train_y"):
    linear_probe_accuracy(x_tr, y_tr[:5], x_te, y_te)


def test_few_shot_probe_uses_k_examples_per_class(rng):
  from mmjax.evaluate.probe import few_shot_indices
  labels = np.repeat(np.arange(5), [3, 20, 20, 20, 20])
  idx = few_shot_indices(labels, 10, seed=1)
  assert np.array_equal(np.bincount(labels[idx]), [3, 10, 10, 10, 10])
  np.testing.assert_array_equal(idx, few_shot_indices(labels, 10, seed=1))
  x = np.eye(5)[labels] * 5 + rng.normal(size=(len(labels), 5)) * 0.1
  assert linear_probe_accuracy(x, labels, x, labels, shots=2) == 1.0
  with pytest.raises(ValueError, match="shots"):
    linear_probe_accuracy(x, labels, x, labels, shots=0)
