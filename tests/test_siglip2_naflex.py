"""SigLIP 2's recipe with a NaFlex image tower (issue 32, item 4): the decoder's cross-attention
leaves the padding tokens out, a local view is a sub-grid of the image's patches (the patches of
a crop of the pixels), the masked view masks valid patches only, and a tiny run on the digit
scenes trains, evaluates referring expressions and resumes exactly across the switch-on."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.configs import tiny_config
from tests.test_resume import _cut_back, _losses, _rows
from tests.test_siglip2_objective import SMALL

NAFLEX = {"model.image.tower": "naflex", "model.image.variant": "mu/8",
          "model.image.posemb_grid": 8, "data.naflex.mode": "pad", "data.naflex.max_patches": 16,
          "data.naflex.seq_len": 16}


def _naflex_batch(rng, grids, patch: int, seq_len: int):
  """(pixels per image uint8 [h p, w p, 3], mmjax.data.naflex.pad's batch of them)."""
  from mmjax.data import naflex as naflex_data
  pixels = [rng.integers(0, 256, (h * patch, w * patch, 3), dtype=np.uint8) for h, w in grids]
  images = [naflex_data.NaflexImage(naflex_data.patchify(p, patch), g)
            for p, g in zip(pixels, grids)]
  return pixels, naflex_data.pad(images, seq_len)


def test_masked_cross_attention_sees_the_valid_tokens_only(rng):
  """The decoder with a key mask gives, row by row, what it gives on the valid image tokens
  alone; the padding's values change nothing; no mask is the unmasked decoder."""
  from mmjax.models import coca
  b, n, length, w = 3, 7, 5, 16
  counts = [7, 3, 1]
  x = jnp.asarray(rng.normal(size=(b, length, w)), jnp.float32)
  tokens = rng.normal(size=(b, n, 12)).astype(np.float32)
  key_mask = np.arange(n)[None] < np.asarray(counts)[:, None]
  for remat in (False, True):
    dec = coca.Decoder(vocab_size=11, width=w, depth=2, mlp_dim=32, num_heads=2, remat=remat)
    v = dec.init(jax.random.PRNGKey(0), x, jnp.asarray(tokens))
    got, _ = dec.apply(v, x, jnp.asarray(tokens), key_mask=jnp.asarray(key_mask))
    for i, c in enumerate(counts):
      want, _ = dec.apply(v, x[i:i + 1], jnp.asarray(tokens[i:i + 1, :c]))
      np.testing.assert_allclose(got[i], want[0], rtol=2e-5, atol=2e-5)
    noisy = np.where(key_mask[..., None], tokens, 100 * rng.normal(size=tokens.shape))
    again, _ = dec.apply(v, x, jnp.asarray(noisy, jnp.float32), key_mask=jnp.asarray(key_mask))
    np.testing.assert_allclose(again, got, rtol=2e-5, atol=2e-5)
    plain, _ = dec.apply(v, x, jnp.asarray(tokens))
    assert not np.allclose(plain[1:], got[1:], atol=1e-3)   # the padding did count unmasked
  with pytest.raises(ValueError, match=r"key_mask \(3, 6\) must be \[batch, context tokens\]"):
    dec.apply(v, x, jnp.asarray(tokens), key_mask=jnp.asarray(key_mask[:, :6]))


def _crop_reference(pixels, key, share: float, patch: int):
  """NumPy: the local view's offsets from the same draws (one key a row, split into row and
  column keys), the pixels cropped on patch boundaries, then patchified."""
  from mmjax.data import naflex as naflex_data
  out = []
  for p, k in zip(pixels, jax.random.split(key, len(pixels))):
    h, w = p.shape[0] // patch, p.shape[1] // patch
    ch, cw = max(1, int(np.round(share * h))), max(1, int(np.round(share * w)))
    ky, kx = jax.random.split(k)
    y0 = int(jax.random.randint(ky, (), 0, h - ch + 1))
    x0 = int(jax.random.randint(kx, (), 0, w - cw + 1))
    crop = p[y0 * patch:(y0 + ch) * patch, x0 * patch:(x0 + cw) * patch]
    out.append((naflex_data.patchify(crop, patch), (ch, cw), (y0, x0)))
  return out


def test_local_view_is_the_patches_of_a_pixel_crop(rng):
  """crop_grid's view of each image: the patches of the pixels cropped to its sub-grid, at
  positions 0..h'-1 x 0..w'-1, shape (h', w'), padding after; the same whatever the order of
  the input's tokens; offsets spread over the grid."""
  from mmjax.models import naflex
  patch, seq_len, share = 2, 40, 0.5
  grids = [(5, 8), (8, 3), (1, 1), (6, 6), (2, 7), (3, 1)]
  pixels, batch = _naflex_batch(rng, grids, patch, seq_len)
  offsets = set()
  for seed in range(6):
    key = jax.random.PRNGKey(seed)
    got = {k: np.asarray(v) for k, v in naflex.crop_grid(batch, key, share).items()}
    assert set(got) == set(naflex.KEYS)
    perm = np.stack([rng.permutation(seq_len) for _ in grids])   # tokens in another order
    shuffled = {k: np.take_along_axis(v, perm.reshape(perm.shape + (1,) * (v.ndim - 2)), 1)
                if k != "shapes" else v for k, v in batch.items()}
    moved = naflex.crop_grid(shuffled, key, share)
    for k in naflex.KEYS:
      np.testing.assert_array_equal(np.asarray(moved[k]), got[k], err_msg=k)
    for i, (want, (ch, cw), corner) in enumerate(_crop_reference(pixels, key, share, patch)):
      offsets.add((i, corner))
      m = ch * cw
      np.testing.assert_array_equal(got["patches"][i, :m], want)
      assert not got["patches"][i, m:].any() and got["patches"].dtype == np.uint8
      np.testing.assert_array_equal(got["segment_ids"][i], np.arange(seq_len) < m)
      np.testing.assert_array_equal(got["positions"][i, :m],
                                    np.stack(np.divmod(np.arange(m), cw), -1))
      assert not got["positions"][i, m:].any()
      assert tuple(got["shapes"][i, 0]) == (ch, cw)
  assert len({o for o in offsets if o[0] == 0}) > 3   # image 0: random places, rows and columns
  assert {o[1][0] for o in offsets if o[0] == 0} != {0} and {o[1][1] for o in offsets
                                                             if o[0] == 0} != {0}


def _naflex_objective(data_dir, rng):
  """(the objective of SMALL with a NaFlex tower, a padded NaFlex batch, texts, its params)."""
  from mmjax import objectives
  from mmjax.train import config as config_lib
  config = tiny_config(data_dir, **{**SMALL, **NAFLEX})
  config_lib.validate(config)
  obj = objectives.make(config, objectives.Context(vocab_size=300))
  _, batch = _naflex_batch(rng, [(4, 4), (2, 3), (3, 1), (1, 2)], 8, 16)
  image = {**batch, "patches": jnp.asarray(batch["patches"] / 127.5 - 1.0, jnp.float32)}
  text = jnp.asarray(rng.integers(1, 300, size=(4, 16)), jnp.int32)
  params = obj.init_variables(jax.random.PRNGKey(0), {"image": image, "text": text})["params"]
  return obj, image, text, params


def _noisy_padding(image):
  valid = jnp.asarray(image["segment_ids"] > 0)[..., None]
  return {**image, "patches": jnp.where(valid, image["patches"], 50.0)}


def test_masks_never_touch_padding(data_dir, rng):
  """The masked view masks about mask_ratio of the valid patches and no padding; the masked
  loss and the patch center are those of the valid tokens (recomputed through the model's
  methods); the padding's values change neither."""
  from mmjax.losses import distill
  obj, image, _, params = _naflex_objective(data_dir, rng)
  valid = np.asarray(image["segment_ids"]) > 0
  shares = []
  for seed in range(20):
    mask = np.asarray(obj.masked_patches(jax.random.PRNGKey(seed), image))
    assert not (mask & ~valid).any(), seed
    shares.append(mask.sum() / valid.sum())
  assert abs(np.mean(shares) - obj.settings.mask_ratio) < 0.08, shares
  ema = obj.ema_init(jax.tree.map(lambda x: x * 0.9, params))
  key = jax.random.PRNGKey(3)
  got = obj.distill_losses(params, ema, image, key)
  m, s = obj.model, obj.settings
  apply = lambda p, *a, **k: m.apply({"params": p}, *a, **k)
  mask = jnp.asarray(obj.masked_patches(jax.random.split(key, 3)[1], image))
  t_pooled, t_tokens = apply({**params, **ema["teacher"]}, image, method="image_outputs")
  _, t_patch = apply({**params, **ema["teacher"]}, t_pooled, t_tokens, method="prototype_logits")
  sp, st = apply(params, image, mask=mask, method="image_outputs")
  s_patch = np.asarray(apply(params, sp, st, method="prototype_logits")[1])
  want = distill.masked_prediction_loss(jnp.asarray(s_patch[valid][None]),
                                        jnp.asarray(np.asarray(t_patch)[valid][None]),
                                        mask[jnp.asarray(valid)][None], ema["center_patch"],
                                        student_temp=s.student_temp, teacher_temp=s.teacher_temp)
  np.testing.assert_allclose(got["masked_loss"], want, rtol=1e-5)
  center = distill.update_center(ema["center_patch"], jnp.asarray(np.asarray(t_patch)[valid]),
                                 s.center_momentum)
  np.testing.assert_allclose(got["center_patch"], center, rtol=1e-5, atol=1e-7)
  again = obj.distill_losses(params, ema, _noisy_padding(image), key)
  for k in ("masked_loss", "consistency_loss", "center_patch"):
    np.testing.assert_allclose(again[k], got[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_padding_values_change_no_loss_and_no_caption(data_dir, rng):
  """Before and after the switch-on, every loss, and the greedy captions, are the same when the
  padding tokens' pixels change (the decoder's cross-attention and the distillation read the
  valid tokens only)."""
  obj, image, text, params = _naflex_objective(data_dir, rng)
  ema = obj.ema_init(params)
  noisy = _noisy_padding(image)
  for step in (0, obj.start):
    key = jax.random.PRNGKey(step)
    total, parts = obj.losses(params, ema, {"image": image, "text": text}, key, jnp.int32(step))
    total2, parts2 = obj.losses(params, ema, {"image": noisy, "text": text}, key, jnp.int32(step))
    np.testing.assert_allclose(total2, total, rtol=1e-5)
    for k in ("caption_loss", "sigmoid_loss", "consistency_loss", "masked_loss"):
      np.testing.assert_allclose(parts2[k], parts[k], rtol=1e-5, atol=1e-6, err_msg=k)
  assert parts["distill_on"] == 1.0
  big = jax.tree.map(lambda p: p + 0.3 * jax.random.normal(jax.random.PRNGKey(1), p.shape), params)
  caps = np.asarray(obj.captioner()({"params": big}, image))
  assert caps.shape == (4, obj.text_len) and len(np.unique(caps)) > 1
  np.testing.assert_array_equal(np.asarray(obj.captioner()({"params": big}, noisy)), caps)


def test_naflex_siglip2_trains_on_scenes_and_resumes_across_the_switch_on(data_dir, tmp_path):
  """Captioning, referring expressions, grounded captioning on padded NaFlex batches, then the
  distillation: finite losses, refexp_acc and the captioner evaluated on NaFlex eval batches;
  cut back before the switch-on and resumed, the same losses."""
  from mmjax.train import loop
  config = tiny_config(data_dir, **{**SMALL, **NAFLEX, "data.name": "mmjax_digit_scenes",
                                    "data.augment": False, "siglip2.refexp_weight": 1.0,
                                    "siglip2.grounded_weight": 1.0, "total_steps": 4})
  whole, part = tmp_path / "whole", tmp_path / "part"
  results = loop.train(config, str(whole))
  assert 0.0 <= results["refexp_acc"] <= 1.0 and "caption_bleu" in results, results
  rows = [r for r in _rows(str(whole)) if "loss" in r]
  assert [r["distill_on"] for r in rows] == [0.0, 0.0, 1.0, 1.0]
  for key in ("loss", "ref_loss", "ground_loss", "caption_loss", "consistency_loss",
              "masked_loss"):
    values = [r[key] for r in rows]
    assert np.all(np.isfinite(values)), (key, values)
  assert rows[-1]["consistency_loss"] > 0 and rows[-1]["masked_loss"] > 0
  shutil.copytree(whole, part)
  _cut_back(str(part), 2)
  loop.train(config, str(part))
  want, got = dict(_losses(str(whole))), dict(_losses(str(part)))
  assert [got[s] for s in (3, 4)] == [want[s] for s in (3, 4)], (got, want)


def test_packed_naflex_batches_are_refused_in_one_line(data_dir, tmp_path):
  from mmjax.train import loop
  config = tiny_config(data_dir, **{**SMALL, **NAFLEX, "data.naflex.mode": "pack",
                                    "data.naflex.rows": 4})
  with pytest.raises(ValueError, match=r"^config\.data\.naflex\.mode='pack': siglip2 takes "
                                       r"NaFlex batches in mode 'pad'$"):
    loop.train(config, str(tmp_path / "r"))
