"""LiT (frozen params, init_from), FLIP (patch dropout), MAE, MoCo v3, linear probe and kNN."""

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
from tests.reference import ref_infonce

TINY = dict(width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=(4, 4))


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
                    **{"init_from.workdir": mae_dir})
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

def test_patch_dropout_drops_tokens_at_train_time_only(rng):
  model = vit.Model(**TINY, pool_type="gap", patch_dropout=0.5)
  x = jnp.asarray(rng.normal(size=(3, 16, 16, 3)), jnp.float32)
  params = model.init(jax.random.PRNGKey(0), x)
  _, out = model.apply(params, x)
  assert out["encoded"].shape == (3, 16, 32)
  _, out = model.apply(params, x, train=True, rngs={"dropout": jax.random.PRNGKey(1)})
  assert out["encoded"].shape == (3, 8, 32)
  # The kept tokens are those positions' tokens: keep everything == no dropout.
  keep = jnp.tile(jnp.arange(16), (3, 1))
  np.testing.assert_allclose(model.apply(params, x, keep=keep)[0], model.apply(params, x)[0],
                             rtol=1e-6)
  tok = vit.Model(**TINY, pool_type="tok", patch_dropout=0.25)
  p = tok.init(jax.random.PRNGKey(0), x)
  _, out = tok.apply(p, x, train=True, rngs={"dropout": jax.random.PRNGKey(1)})
  assert out["encoded"].shape == (3, 1 + 12, 32)   # the class token always stays


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


def test_mae_loss_is_the_masked_patches_mse_of_normalised_pixels(rng):
  model = mae.Model(image=TINY, mask_ratio=0.75, decoder_width=16, decoder_depth=1,
                    decoder_heads=2, decoder_mlp_dim=32)
  x = jnp.asarray(rng.normal(size=(2, 16, 16, 3)), jnp.float32)
  rngs = {"params": jax.random.PRNGKey(0), "mask": jax.random.PRNGKey(1)}
  params = model.init(rngs, x)
  loss, aux = model.apply(params, x, rngs={"mask": jax.random.PRNGKey(2)})
  mask = np.asarray(aux["mask"])
  assert mask.shape == (2, 16) and (mask.sum(1) == 12).all()   # 75% of 16 masked
  t = np.asarray(mae.patchify(x, (4, 4)), np.float64)
  t = (t - t.mean(-1, keepdims=True)) / np.sqrt(t.var(-1, keepdims=True) + 1e-6)
  err = ((np.asarray(aux["pred"], np.float64) - t) ** 2).mean(-1)
  np.testing.assert_allclose(loss, (err * mask).sum() / mask.sum(), rtol=1e-5)
  # The encoder saw 4 of 16 patches: its parameters do not depend on the rest.
  assert jax.tree.leaves(params["params"]["img"])


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
  from mmjax.train.objectives import MoCo
  obj = MoCo.__new__(MoCo)
  obj.total_steps, obj.base_momentum = 100, 0.99
  params = {"img": jnp.ones(3), "projector": jnp.zeros(2), "predictor": jnp.ones(1)}
  ema = {"img": jnp.zeros(3), "projector": jnp.ones(2)}
  new = obj.ema_update(ema, params, 0)
  np.testing.assert_allclose(new["img"], 0.01, rtol=1e-5)
  np.testing.assert_allclose(new["projector"], 0.99, rtol=1e-5)
  assert set(new) == set(moco.EMA_KEYS)


def test_two_views_differ_but_share_the_example(data_dir):
  from mmjax.data import pipeline, tokenizer
  src = pipeline.get_source("mmjax_digits", "train", data_dir=data_dir)
  tok = tokenizer.get_tokenizer(name="mmjax_digits", data_dir=data_dir, vocab_size=512,
                                train_texts_fn=lambda: pipeline.iter_texts(src))
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
