"""SigLIP 2's late-training losses (mmjax.losses.distill) against float64 NumPy: values and
the student's gradients (closed form: (softmax(s / T_s) - target) / T_s, averaged), no gradient
into the teacher or the center; the center's update; LocCa's box tokens and IoU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.losses import distill
from tests.reference import assert_close


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _log_softmax(x):
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


TS, TT = 0.1, 0.04


def test_consistency_loss_and_gradients_match_float64(rng):
  v, b, k = 3, 5, 37   # views, images, prototypes (no multiples of anything)
  s = rng.normal(size=(v, b, k)) * 0.3
  t = rng.normal(size=(b, k)) * 0.3
  c = rng.normal(size=(k,)) * 0.1
  target = _softmax((t - c) / TT)
  want = -np.mean(np.sum(target[None] * _log_softmax(s / TS), -1))
  want_ds = (_softmax(s / TS) - target[None]) / TS / (v * b)
  f = lambda s_, t_, c_: distill.consistency_loss(s_, t_, c_, student_temp=TS, teacher_temp=TT)
  got, (ds, dt, dc) = jax.value_and_grad(f, argnums=(0, 1, 2))(
      *(jnp.asarray(x, jnp.float32) for x in (s, t, c)))
  assert_close([got, ds], [want, want_ds], dtype=jnp.float32, name=["loss", "d student"])
  assert not np.any(dt) and not np.any(dc)   # the teacher and its center take no gradient


def test_masked_prediction_averages_over_masked_patches_only(rng):
  b, n, k = 4, 13, 29
  s, t = rng.normal(size=(b, n, k)) * 0.3, rng.normal(size=(b, n, k)) * 0.3
  mask = rng.random((b, n)) < 0.5
  mask[0, 0] = True
  target = _softmax(t / TT)
  per = -np.sum(target * _log_softmax(s / TS), -1)
  want = per[mask].mean()
  want_ds = (_softmax(s / TS) - target) / TS * mask[..., None] / mask.sum()
  f = lambda s_: distill.masked_prediction_loss(s_, jnp.asarray(t, jnp.float32),
                                                jnp.asarray(mask), student_temp=TS,
                                                teacher_temp=TT)
  got, ds = jax.value_and_grad(f)(jnp.asarray(s, jnp.float32))
  assert_close([got, ds], [want, want_ds], dtype=jnp.float32, name=["loss", "d student"])
  none = distill.masked_prediction_loss(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32),
                                        jnp.zeros((b, n), bool))
  assert float(none) == 0.0


def test_center_update_and_bad_arguments(rng):
  c, t = rng.normal(size=(7,)), rng.normal(size=(3, 4, 7))
  got = distill.update_center(jnp.asarray(c), jnp.asarray(t), 0.8)
  np.testing.assert_allclose(got, 0.8 * c + 0.2 * t.reshape(-1, 7).mean(0), rtol=1e-5)
  with pytest.raises(ValueError, match=r"student \(2, 3, 5\) must be \[views, \*teacher"):
    distill.consistency_loss(jnp.zeros((2, 3, 5)), jnp.zeros((4, 5)))
  with pytest.raises(ValueError, match=r"teacher_temp=0 must be positive"):
    distill.consistency_loss(jnp.zeros((2, 3, 5)), jnp.zeros((3, 5)), teacher_temp=0)
  with pytest.raises(ValueError, match=r"mask \(3, 4\) be \[batch, patches\]"):
    distill.masked_prediction_loss(jnp.zeros((3, 5, 2)), jnp.zeros((3, 5, 2)),
                                   jnp.zeros((3, 4), bool))


def test_box_tokens_round_trip_within_a_bin_and_iou(rng):
  bins, offset = 32, 1000
  x0, y0 = rng.random((2, 50)) * 0.8
  boxes = np.stack([x0, y0, x0 + rng.random(50) * 0.2, y0 + rng.random(50) * 0.2], -1)
  boxes[0] = (0.0, 0.0, 1.0, 1.0)   # the edges land in the first and last bins
  tok = np.asarray(distill.box_tokens(boxes, bins, offset))
  assert tok.min() >= offset and tok.max() < offset + bins
  assert list(tok[0]) == [offset, offset, offset + bins - 1, offset + bins - 1]
  back = np.asarray(distill.token_boxes(tok, bins, offset))
  assert np.all(np.abs(back - boxes) <= 0.5 / bins + 1e-6)
  a = np.array([[0.0, 0.0, 0.5, 0.5], [0.1, 0.1, 0.2, 0.2], [0, 0, 0, 0.0]])
  b = np.array([[0.25, 0.25, 0.75, 0.75], [0.5, 0.5, 0.6, 0.6], [0, 0, 0, 0.0]])
  np.testing.assert_allclose(distill.box_iou(a, b), [0.0625 / (0.25 + 0.25 - 0.0625), 0, 0],
                             rtol=1e-6)


def test_vit_mask_token_replaces_masked_patches_only(rng):
  """mask=all False is the unmasked forward; masked patches all become the mask token (before
  the position embedding), so the output no longer depends on their pixels; the token learns."""
  from mmjax.models import vit
  tower = vit.Model("mu/4", posemb="learn", mask_token=True, pool_type="gap")
  image = jnp.asarray(rng.normal(size=(2, 12, 16, 3)), jnp.float32)   # 3 x 4 patches
  params = tower.init(jax.random.PRNGKey(0), image)
  none = jnp.zeros((2, 12), bool)
  np.testing.assert_array_equal(tower.apply(params, image, mask=none)[0],
                                tower.apply(params, image)[0])
  mask = jnp.asarray(rng.random((2, 12)) < 0.5).at[:, 0].set(True)
  other = jnp.where(jnp.repeat(jnp.repeat(mask.reshape(2, 3, 4), 4, 1), 4, 2)[..., None],
                    jnp.asarray(rng.normal(size=image.shape), jnp.float32), image)
  np.testing.assert_allclose(tower.apply(params, image, mask=mask)[0],
                             tower.apply(params, other, mask=mask)[0], rtol=1e-5, atol=1e-6)
  assert not np.allclose(tower.apply(params, image, mask=mask)[0], tower.apply(params, image)[0])
  g = jax.grad(lambda p: tower.apply(p, image, mask=mask)[0].sum())(params)
  assert np.any(g["params"]["mask_token"])
  with pytest.raises(ValueError, match="mask= needs a ViT with mask_token=True"):
    vit.Model("mu/4").apply(vit.Model("mu/4").init(jax.random.PRNGKey(0), image), image,
                            mask=mask)
