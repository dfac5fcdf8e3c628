"""ResNet towers (mmjax.models.resnet): norms against float64, weight standardisation, shapes,
variants, the tower as every objective's image tower, and the config's errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.models import image as image_lib
from mmjax.models import resnet
from mmjax import objectives
from tests.configs import tiny_config
from tests.reference import assert_close

TINY = dict(layers=(1, 1, 1, 1), width=8, num_heads=2)


def test_frozen_batch_norm_matches_float64_and_its_statistics_are_not_params(rng):
  x = rng.normal(size=(3, 5, 4, 6))
  p = {k: rng.normal(size=6) for k in ("scale", "bias", "mean")}
  p["var"] = rng.uniform(0.5, 2.0, size=6)
  norm = resnet.Norm("frozen_bn")
  f32 = lambda d: jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), d)
  params, stats = f32({k: p[k] for k in ("scale", "bias")}), f32({k: p[k] for k in ("mean", "var")})
  shapes = jax.eval_shape(norm.init, jax.random.PRNGKey(0), jnp.zeros((1, 5, 4, 6)))
  assert set(shapes["params"]) == {"scale", "bias"} and set(shapes["batch_stats"]) == {"mean", "var"}
  got = norm.apply({"params": params, "batch_stats": stats}, jnp.asarray(x, jnp.float32))
  want = (x - p["mean"]) / np.sqrt(p["var"] + 1e-5) * p["scale"] + p["bias"]
  assert_close(got, want, dtype=jnp.float32, name="frozen_bn")
  _, moved = norm.apply({"params": params, "batch_stats": stats}, jnp.asarray(x, jnp.float32),
                        True, mutable=["batch_stats"])
  for k in ("mean", "var"):   # fixed statistics, even at train time
    np.testing.assert_array_equal(moved["batch_stats"][k], stats[k])


def test_batch_norm_normalises_by_the_batch_at_train_time_and_moves_the_running_stats(rng):
  """norm='batch': train=True normalises by the batch's mean and biased variance over
  (b, H, W) and moves the running mean and var as torch (momentum 0.1, unbiased variance);
  train=False is the running ones' (frozen_bn's formula)."""
  # Three channels whose batch mean is 30 standard deviations from 0 and from the running
  # mean: there a one-pass variance E[x^2] - E[x]^2 loses ~3 digits (the shifted one does not).
  x = (rng.normal(size=(3, 5, 4, 6)) * np.r_[2.0, 2.0, 2.0, 0.1, 0.1, 1.0]
       + np.r_[1.0, -1.0, 0.0, 3.0, -3.0, 30.0])
  x = np.asarray(np.float32(x), np.float64)   # the float32 input, exactly
  p = {k: rng.normal(size=6) for k in ("scale", "bias", "mean")}
  p["var"] = rng.uniform(0.5, 2.0, size=6)
  f32 = lambda d: jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), d)
  variables = {"params": f32({k: p[k] for k in ("scale", "bias")}),
               "batch_stats": f32({k: p[k] for k in ("mean", "var")})}
  norm = resnet.Norm("batch")
  got, state = norm.apply(variables, jnp.asarray(x, jnp.float32), True, mutable=["batch_stats"])
  mean, var = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
  assert_close(got, (x - mean) / np.sqrt(var + 1e-5) * p["scale"] + p["bias"],
               dtype=jnp.float32, name="batch norm, train")
  moved = state["batch_stats"]
  assert_close([moved["mean"], moved["var"]],
               [0.9 * p["mean"] + 0.1 * mean, 0.9 * p["var"] + 0.1 * var * 60 / 59],
               dtype=jnp.float32, name=["running mean", "running var (unbiased)"])
  evaluated = norm.apply(variables, jnp.asarray(x, jnp.float32))
  assert_close(evaluated, (x - p["mean"]) / np.sqrt(p["var"] + 1e-5) * p["scale"] + p["bias"],
               dtype=jnp.float32, name="batch norm, eval")
  grads = jax.grad(lambda q: norm.apply({**variables, "params": q}, jnp.asarray(x, jnp.float32),
                                        True, mutable=["batch_stats"])[0].sum())(
      variables["params"])
  assert set(grads) == {"scale", "bias"}   # the optimizer never sees the statistics


def test_group_norm_matches_float64(rng):
  c = 48   # gcd(32, 48) = 16 groups of 3 channels
  x = rng.normal(size=(2, 5, 3, c)) * 3 + 1
  scale, bias = rng.normal(size=c), rng.normal(size=c)
  got = resnet.Norm("group").apply(
      {"params": {"scale": jnp.asarray(scale, jnp.float32),
                  "bias": jnp.asarray(bias, jnp.float32)}},
      jnp.asarray(x, jnp.float32))
  g = x.reshape(2, 5, 3, 16, 3)
  mean, var = g.mean(axis=(1, 2, 4), keepdims=True), g.var(axis=(1, 2, 4), keepdims=True)
  want = ((g - mean) / np.sqrt(var + 1e-5)).reshape(x.shape) * scale + bias
  assert_close(got, want, dtype=jnp.float32, name="group_norm")


def test_weight_standardisation_ignores_each_filters_offset_and_scale(rng):
  """BiT's convolution sees each output channel's kernel standardised: an affine change of one
  filter (a * w + b) leaves its output as it was; without standardisation it would not."""
  x = jnp.asarray(rng.normal(size=(2, 9, 7, 5)), jnp.float32)
  w = rng.normal(size=(3, 3, 5, 4))
  a, b = rng.uniform(0.5, 3.0, size=4), rng.normal(size=4)
  for standardize in (True, False):
    conv = resnet.Conv(4, 3, 2, standardize=standardize)
    run = lambda k: conv.apply({"params": {"kernel": jnp.asarray(k, jnp.float32)}}, x)
    same = np.allclose(run(w), run(w * a + b), rtol=1e-4, atol=1e-4)
    assert same == standardize
  assert run(w).shape == (2, 5, 4, 4)   # 3x3, stride 2, padding 1: ceil(9 / 2), ceil(7 / 2)


@pytest.mark.parametrize("variant,n_params", [
    # torchvision's resnet50 without its fc layer: 25,557,032 - 2,049,000 (its BatchNorm has
    # as many params as GroupNorm).
    ("BiT-R50x1", 23_508_032),
    # open_clip's RN50 visual (38,316,896 params: its attention pool projects to 1024) with
    # the pool's output at the features' 2048 (+ 2048 x 1024 + 1024) and each BatchNorm's
    # running mean and var (2 x 26,624 channels).
    ("RN50", 38_316_896 + 2048 * 1024 + 1024 + 2 * 26_624),
])
def test_variants_have_the_reference_architectures_sizes(variant, n_params):
  norm = "frozen_bn" if variant == "RN50" else "group"
  model = resnet.Model(variant, norm=norm)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)))
  assert sum(x.size for x in jax.tree.leaves(shapes)) == n_params
  pooled, out = jax.eval_shape(model.apply, shapes, jnp.zeros((2, 224, 224, 3)))
  assert pooled.shape == (2, 2048) and out["encoded"].shape == (2, 49, 2048)


def test_variant_names_decode_and_bad_ones_are_named():
  assert resnet.decode_variant("RN50x16") == dict(style="clip", layers=(6, 8, 18, 8), width=96,
                                                   num_heads=48)
  assert resnet.decode_variant("BiT-R101x3") == dict(style="bit", layers=(3, 4, 23, 3),
                                                      width=192)
  for bad, match in [(dict(variant="RN51"), r"variant: Unknown ResNet variant 'RN51'"),
                     (dict(variant="BiT-R34x1"), r"variant: Unknown ResNet variant"),
                     (dict(variant="RN50", patch_size=16), r"patch_size: not a ResNet field"),
                     (dict(variant="RN50", patch_dropout=0.5), r"patch_dropout=0.5: FLIP"),
                     (dict(variant="RN50", norm="sync"), r"norm='sync' is not one of"),
                     (dict(variant="RN50", num_heads=3), r"num_heads=3 must divide"),
                     (dict(variant="BiT-R50x1", pool_type="attn"), r"pool_type='attn': BiT"),
                     (dict(layers=(1, 1, 1), width=8), r"layers=\(1, 1, 1\) must be 4"),
                     (dict(layers=(1, 1, 1, 1)), r"width: not given; name a variant")]:
    with pytest.raises(ValueError, match=match):
      image_lib.config(**bad)


def test_odd_sizes_pool_like_torch_and_blocks_start_as_their_shortcut(rng):
  """40 x 56 px: stem /4 -> 10 x 14, then /2 per stage with floor (avg pool, CLIP) or ceil
  (strided convolution, BiT); the zero-initialised last norm makes each block relu(shortcut)."""
  x = jnp.asarray(rng.normal(size=(2, 40, 56, 3)), jnp.float32)
  for style, grid in (("clip", 1 * 1), ("bit", 2 * 2)):
    model = resnet.Model(**TINY, style=style, pool_type="none" if style == "clip" else "gap")
    params = jax.jit(model.init)(jax.random.PRNGKey(0), x)   # one compile, not one per op
    pooled, out = jax.jit(model.apply)(params, x)
    assert out["encoded"].shape == (2, grid, 8 * 32)
    if style == "clip":
      assert pooled.shape == out["encoded"].shape
    else:
      np.testing.assert_allclose(pooled, out["encoded"].mean(axis=1), rtol=1e-6)
  block = resnet.Bottleneck(4, stride=1, style="clip")
  y = jnp.asarray(rng.normal(size=(2, 6, 6, 16)), jnp.float32)
  block_params = jax.jit(block.init)(jax.random.PRNGKey(1), y)
  np.testing.assert_array_equal(jax.jit(block.apply)(block_params, y), jax.nn.relu(y))


def _config(loss, accum_steps=1, **image):
  c = tiny_config("/nonexistent", loss=loss, accum_steps=accum_steps)
  c.model.image.variant = None
  for k, v in {**TINY, **image}.items():
    c.model.image[k] = v
  return c


@pytest.mark.parametrize("loss", ["siglip", "clip", "moco", "catlip", "coca"])
def test_every_objective_takes_a_resnet_tower(loss, rng):
  """The objective's model built from config.model.image with ResNet fields; init and one
  gradient traced (shapes only): the gradient reaches the tower's first convolution."""
  c = _config(loss)
  obj = objectives.make(c, vocab_size=64, train_texts=lambda: ["a cat", "a dog", "the cat"] * 5)
  b, size = 4, c.data.image_size
  batch = {"image": jnp.zeros((b, size, size, 3)), "image2": jnp.zeros((b, size, size, 3)),
           "text": jnp.ones((b, c.data.text_len), jnp.int32),
           "targets": jnp.zeros((b, 2))}   # CatLIP's labels: cat, dog
  batch = {k: batch[k] for k in obj.batch_keys}
  params = jax.eval_shape(obj.init, jax.random.PRNGKey(0), batch)
  assert params["img"]["stem_conv1"]["kernel"].shape == (3, 3, 3, 4)
  ema = jax.eval_shape(obj.ema_init, params)
  (loss_value, _), grads = jax.eval_shape(obj.grad_fn, params, ema, batch, jax.random.PRNGKey(1))
  assert loss_value.shape == ()
  assert grads["img"]["stem_conv1"]["kernel"].shape == (3, 3, 3, 4)
  if loss in ("siglip", "clip"):   # CLIP's layout: the attention pool projects to embed_dim
    assert obj.model.image_proj == "none" and "img_proj" not in params
    assert params["img"]["attnpool"]["attn"]["out"]["kernel"].shape == (2, 128, 16)


def test_batch_norm_refuses_gradcache_and_a_frozen_tower(data_dir, tmp_path):
  with pytest.raises(ValueError, match=r"config.accum_steps=2: GradCache's micro-batches"):
    objectives.make(_config("siglip", norm="batch", accum_steps=2), vocab_size=64)
  from mmjax.train import loop
  c = _config("siglip", norm="batch")
  c.data.data_dir, c.frozen = data_dir, ("img/.*",)
  with pytest.raises(ValueError, match=r"config.frozen=\('img/.\*',\) locks BatchNorm "
                                       r"statistics \(img/attnpool|img/stage|img/stem"):
    loop.train(c, str(tmp_path / "run"))


def test_config_errors_name_the_field():
  with pytest.raises(ValueError, match=r"config.model.image.variant: Unknown ResNet variant"):
    objectives.make(_config("siglip", variant="RN51", layers=None, width=None), vocab_size=64)
  with pytest.raises(ValueError, match=r"config.model.image.variant=None: MAE masks"):
    objectives.make(_config("mae"), vocab_size=64)
  c = tiny_config("/nonexistent")
  c.model.image.norm = "group"
  with pytest.raises(ValueError, match=r"config.model.image.norm: not a ViT field"):
    objectives.make(c, vocab_size=64)


def test_batch_norm_on_8_devices_uses_the_global_batch(rng):
  """The ResNet with norm='batch' at train time, jitted with 16 images split over 8 devices (2
  each): its features and sown statistics equal one device's (XLA all-reduces them)."""
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  assert len(jax.devices()) >= 8
  mesh = Mesh(np.asarray(jax.devices()[:8]), ("data",))
  model = resnet.Model(**TINY, norm="batch")
  x = jnp.asarray(rng.normal(size=(16, 32, 32, 3)), jnp.float32)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), x[:1])
  run = jax.jit(lambda p, x: model.apply(p, x, train=True, mutable=["batch_stats"]))
  (pooled8, _), stats8 = run(jax.device_put(params, NamedSharding(mesh, P())),
                             jax.device_put(x, NamedSharding(mesh, P("data"))))
  assert len(pooled8.sharding.device_set) == 8
  (pooled1, _), stats1 = run(params, x)
  assert_close([pooled8, stats8], [pooled1, stats1], dtype=jnp.float32, name="8 devices vs 1")


def test_batch_norm_init_at_train_time_leaves_the_running_stats_at_their_init(rng):
  """init(..., train=True) makes the statistics (mean 0, var 1) without moving them by the
  dummy batch it traces (Flax's is_initializing guard): a Norm and a whole tower."""
  x = jnp.asarray(rng.normal(size=(3, 5, 4, 6)) * 2 + 3, jnp.float32)
  stats = resnet.Norm("batch").init(jax.random.PRNGKey(0), x, True)["batch_stats"]
  np.testing.assert_array_equal(stats["mean"], np.zeros(6, np.float32))
  np.testing.assert_array_equal(stats["var"], np.ones(6, np.float32))
  model = resnet.Model(**TINY, norm="batch")
  image = jnp.asarray(rng.normal(size=(2, 32, 32, 3)) + 1, jnp.float32)
  stats = jax.jit(lambda k, y: model.init(k, y, train=True))(jax.random.PRNGKey(0),
                                                              image)["batch_stats"]
  for path, leaf in jax.tree_util.tree_leaves_with_path(stats):
    want = 1.0 if jax.tree_util.keystr(path).endswith("['var']") else 0.0
    np.testing.assert_array_equal(leaf, np.full(leaf.shape, want, np.float32),
                                  err_msg=jax.tree_util.keystr(path))


def _np_stem_conv1(image, kernel):
  """float64 stem_conv1: 3x3, stride 2, zero padding 1, NHWC x HWIO."""
  x = np.pad(np.asarray(image, np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
  k = np.asarray(kernel, np.float64)
  h, w = (x.shape[1] - 3) // 2 + 1, (x.shape[2] - 3) // 2 + 1
  return sum(x[:, i:i + 2 * h:2, j:j + 2 * w:2] @ k[i, j] for i in range(3) for j in range(3))


@pytest.mark.parametrize("loss", ["siglip", "moco", "catlip", "coca"])   # clip: as siglip
def test_every_objective_moves_the_running_stats_it_is_given(loss, rng):
  """norm='batch': grad_fn(..., batch_stats=S) returns 'batch_stats' 0.9 S + 0.1 x (the
  batch's statistics): from two starts S1, S2 the moved ones differ by 0.9 (S2 - S1) at every
  BatchNorm (so the objective passes the state's statistics in, not fresh ones), the loss is
  the same (train time normalises by the batch), and the stem's first norm moved as float64
  says, by the mean of the views' mean and unbiased variance (MoCo's two views)."""
  c = _config(loss, norm="batch")
  obj = objectives.make(c, vocab_size=64, train_texts=lambda: ["a cat", "a dog", "the cat"] * 5)
  b, size = 4, c.data.image_size
  batch = {"image": jnp.asarray(rng.uniform(-1, 1, size=(b, size, size, 3)), jnp.float32),
           "image2": jnp.asarray(rng.uniform(-0.5, 1, size=(b, size, size, 3)), jnp.float32),
           "text": jnp.asarray(rng.integers(1, 64, size=(b, c.data.text_len)), jnp.int32),
           "targets": jnp.asarray(rng.integers(0, 2, size=(b, 2)), jnp.float32)}
  batch = {k: batch[k] for k in obj.batch_keys}
  variables = jax.jit(obj.init_variables)(jax.random.PRNGKey(0), batch)
  params, s1 = variables["params"], variables["batch_stats"]
  s2 = jax.tree.map(lambda a: jnp.asarray(rng.uniform(0.5, 2.0, size=a.shape), jnp.float32), s1)
  ema = obj.ema_init(params)
  run = jax.jit(lambda s: obj.grad_fn(params, ema, batch, jax.random.PRNGKey(1), batch_stats=s))
  (l1, aux1), _ = run(s1)
  (l2, aux2), _ = run(s2)
  m1, m2 = aux1["batch_stats"], aux2["batch_stats"]
  assert jax.tree.structure(m1) == jax.tree.structure(s1)
  np.testing.assert_allclose(l2, l1, rtol=1e-6)
  for (path, a1), a2, x1, x2 in zip(jax.tree_util.tree_leaves_with_path(m1), jax.tree.leaves(m2),
                                    jax.tree.leaves(s1), jax.tree.leaves(s2)):
    want = 0.9 * (np.asarray(x2, np.float64) - np.asarray(x1, np.float64))
    assert_close(np.asarray(a2, np.float64) - np.asarray(a1, np.float64), want,
                 dtype=jnp.float32, name=f"moved from S2 - from S1 {jax.tree_util.keystr(path)}")
  views = [batch[k] for k in ("image", "image2") if k in batch]
  y = [_np_stem_conv1(v, params["img"]["stem_conv1"]["kernel"]) for v in views]
  n = y[0].size // y[0].shape[-1]
  mean = np.mean([v.mean(axis=(0, 1, 2)) for v in y], axis=0)
  var = np.mean([v.var(axis=(0, 1, 2)) * n / (n - 1) for v in y], axis=0)
  s, m = s2["img"]["stem_norm1"], m2["img"]["stem_norm1"]
  assert_close([m["mean"], m["var"]],
               [0.9 * np.asarray(s["mean"], np.float64) + 0.1 * mean,
                0.9 * np.asarray(s["var"], np.float64) + 0.1 * var],
               dtype=jnp.float32, name=["stem_norm1 mean", "stem_norm1 var"])
