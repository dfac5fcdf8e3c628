"""SigLIP 2's objective (issue 32, in progress): the sigmoid loss + LocCa captioning from the
start, SILC + TIPS against the EMA teacher from the switch-on step; the teacher copies the
student before it and averages it after; exact resume across the switch-on; the two towers
export as a SigLIP model."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.configs import tiny_config
from tests.test_resume import _cut_back, _losses, _rows

SMALL = {"loss": "siglip2", "total_steps": 6, "checkpoint.every": 2, "checkpoint.keep": 3,
         "siglip2.distill_fraction": 0.5, "siglip2.prototypes": 24,
         "evaluate.probes": False}


def _built(data_dir, rng, seed: int, **overrides):
  """(the objective of SMALL, image [3, 32, 32, 3], text [3, 16], its initial params)."""
  from mmjax import objectives
  from mmjax.train import config as config_lib
  config = tiny_config(data_dir, **{**SMALL, **overrides})
  config_lib.validate(config)
  obj = objectives.make(config, objectives.Context(vocab_size=300))
  obj.config = config
  image = jnp.asarray(rng.normal(size=(3, 32, 32, 3)), jnp.float32)
  text = jnp.asarray(rng.integers(1, 300, size=(3, config.data.text_len)), jnp.int32)
  params = obj.init_variables(jax.random.PRNGKey(seed), {"image": image, "text": text})["params"]
  return obj, image, text, params


def test_teacher_copies_before_and_averages_after(data_dir):
  from mmjax import objectives
  from mmjax.objectives.siglip2 import TEACHER_KEYS
  from mmjax.train import config as config_lib
  config = tiny_config(data_dir, **SMALL)
  config_lib.validate(config)
  obj = objectives.make(config, objectives.Context(vocab_size=300))
  batch = {"image": jnp.zeros((2, 32, 32, 3)), "text": jnp.ones((2, 16), jnp.int32)}
  params = obj.init_variables(jax.random.PRNGKey(0), batch)["params"]
  ema = obj.ema_init(params)
  moved = jax.tree.map(lambda x: x + 1.0, params)
  before = obj.ema_update(ema, moved, jnp.int32(2))
  jax.tree.map(np.testing.assert_array_equal, before["teacher"],
               {k: moved[k] for k in TEACHER_KEYS})
  after = obj.ema_update(ema, moved, jnp.int32(3))
  m = config.siglip2.teacher_momentum
  jax.tree.map(lambda t, e, p: np.testing.assert_allclose(t, m * e + (1 - m) * p, rtol=1e-6,
                                                         atol=1e-7),
               after["teacher"], ema["teacher"], {k: moved[k] for k in TEACHER_KEYS})


def test_the_towers_export_as_a_siglip_model(data_dir, rng):
  """Without the training-only params, a SigLIP TwoTower gives the objective's embeddings."""
  from mmjax.models import siglip2, two_tower
  obj, image, text, params = _built(data_dir, rng, seed=1)
  m = obj.model
  plain = two_tower.TwoTower(image={k: v for k, v in m.image.items() if k != "mask_token"},
                             text=m.text, embed_dim=m.embed_dim,
                             temperature_init=m.temperature_init, bias_init=m.bias_init,
                             image_proj=m.image_proj, text_proj=m.text_proj)
  kept = {k: v for k, v in params.items() if k not in siglip2.EXTRA_KEYS}
  kept["img"] = {k: v for k, v in kept["img"].items() if k != "mask_token"}
  got = plain.apply({"params": kept}, image, text)
  want = m.apply({"params": params}, image, text)
  for g, w in zip(got[:2], want[:2]):
    np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)


def test_bad_settings_are_one_line(data_dir, tmp_path):
  from mmjax.train import loop
  for key, bad, message in (("siglip2.mask_ratio", 1.0, r"config\.siglip2\.mask_ratio must be"),
                            ("siglip2.local_crops", 0, r"config\.siglip2\.local_crops must be"),
                            ("siglip2.distill_fraction", 1.5, r"distill_fraction must be"),
                            ("siglip2.regions_per_image", 5,
                             r"regions_per_image must be an int in \[0, max_regions=4\]")):
    with pytest.raises(ValueError, match=message):
      loop.train(tiny_config(data_dir, **{**SMALL, key: bad}), str(tmp_path / "r"))
  resnet = {"model.image.variant": None, "model.image.layers": (1, 1, 1, 1),
            "model.image.width": 8, "model.image.num_heads": 2}
  with pytest.raises(ValueError, match=r"siglip2' needs a ViT image tower .* 'resnet'"):
    loop.train(tiny_config(data_dir, **{**SMALL, **resnet}), str(tmp_path / "r"))


def test_local_views_are_crops_of_the_image(data_dir, rng):
  """On a horizontal ramp, each view spans about local_crop of the ramp, at its own place."""
  from mmjax import objectives
  from mmjax.train import config as config_lib
  config = tiny_config(data_dir, **SMALL)
  config_lib.validate(config)
  obj = objectives.make(config, objectives.Context(vocab_size=300))
  ramp = jnp.broadcast_to(jnp.linspace(0.0, 1.0, 32)[None, None, :, None], (4, 32, 32, 3))
  views = obj.local_views(jax.random.PRNGKey(0), ramp)
  assert views.shape == (2, 4, 32, 32, 3)
  spans = np.asarray(views.max((2, 3, 4)) - views.min((2, 3, 4)))
  assert np.all(np.abs(spans - 0.5) < 0.06), spans
  starts = np.asarray(views.min((2, 3, 4)))
  assert len(np.unique(np.round(starts, 3))) > 1   # not all the same crop
  down = jnp.swapaxes(ramp, 1, 2)                  # the same, vertically
  tops = np.asarray(obj.local_views(jax.random.PRNGKey(0), down).min((2, 3, 4)))
  assert len(np.unique(np.round(tops, 3))) > 1


def test_distillation_reads_the_views_it_should(data_dir, rng):
  """SILC: the student's global prototypes of the local views against the teacher's of the
  whole image; TIPS: the student's patch prototypes with the masked patches replaced against
  the teacher's unmasked ones, averaged over the masked patches: recomputed here through the
  model's methods from the same random draws."""
  from mmjax.losses import distill
  obj, image, _, params = _built(data_dir, rng, seed=2)
  config = obj.config
  ema = obj.ema_init(jax.tree.map(lambda x: x * 0.9, params))   # a teacher unlike the student
  ema["center_global"] = jnp.asarray(rng.normal(size=24), jnp.float32)
  rng_key = jax.random.PRNGKey(3)
  got = obj.distill_losses(params, ema, image, rng_key)
  m, s = obj.model, config.siglip2
  r_views, r_mask, _ = jax.random.split(rng_key, 3)
  apply = lambda p, *a, **k: m.apply({"params": p}, *a, **k)
  teacher = {**params, **ema["teacher"]}
  tp, tt = apply(teacher, image, method="image_outputs")
  t_global, t_patch = apply(teacher, tp, tt, method="prototype_logits")
  views = obj.local_views(r_views, image)
  s_global = jnp.stack([apply(params, *apply(params, v, method="image_outputs"),
                              method="prototype_logits")[0] for v in views])
  temps = dict(student_temp=s.student_temp, teacher_temp=s.teacher_temp)
  want = distill.consistency_loss(s_global, t_global, ema["center_global"], **temps)
  np.testing.assert_allclose(got["consistency_loss"], want, rtol=1e-5)
  mask = jax.random.uniform(r_mask, tt.shape[:2]) < s.mask_ratio
  sp, st = apply(params, image, mask=mask, method="image_outputs")
  s_patch = apply(params, sp, st, method="prototype_logits")[1]
  want = distill.masked_prediction_loss(s_patch, t_patch, mask, ema["center_patch"], **temps)
  np.testing.assert_allclose(got["masked_loss"], want, rtol=1e-5)


def test_region_targets_and_sequences(data_dir, rng):
  """RegionTargets packs each region's box tokens and text; the referring-expression rows
  target exactly the 4 box tokens after the text, the grounded rows exactly the text's tokens
  after the box; missing regions target nothing."""
  import json as json_lib
  from mmjax.losses import distill
  from mmjax.objectives.siglip2 import RegionTargets
  obj, _, _, _ = _built(data_dir, rng, seed=3, **{"siglip2.refexp_weight": 1.0})

  class Tok:   # ids = word lengths, padded with 0 (enough to see where the words land)
    def encode(self, texts, length):
      rows = [[len(w) for w in t.split()][:length] for t in texts]
      return np.asarray([r + [0] * (length - len(r)) for r in rows], np.int32)

  s = obj.settings
  regions = [{"box": [0.1, 0.2, 0.55, 0.9], "text": "the digit seven"},
             {"box": [0.0, 0.0, 1.0, 1.0], "text": "a one"}]
  packed = RegionTargets(Tok(), 4, s.region_len, s.box_bins, obj.box_offset)(
      json_lib.dumps(regions))
  box0 = np.asarray(distill.box_tokens(np.asarray([regions[0]["box"]]), s.box_bins,
                                       obj.box_offset))[0]
  assert list(packed[0, :5]) == [1, *box0] and list(packed[0, 5:8]) == [3, 5, 5]
  assert packed[2].sum() == 0 and packed[3].sum() == 0
  seq = obj.region_sequences(jnp.asarray(packed[None]))
  inputs, labels = (np.asarray(x) for x in seq["ref"])
  assert inputs[0, 0] == obj.task_ids["ref"] and list(inputs[0, 1:4]) == [3, 5, 5]
  assert list(labels[0, -4:]) == list(box0) and not labels[0, :-4].any()
  inputs, labels = (np.asarray(x) for x in seq["ground"])
  assert inputs[0, 0] == obj.task_ids["ground"] and list(inputs[0, 1:5]) == list(box0)
  assert list(labels[0, 4:7]) == [3, 5, 5] and not labels[0, :4].any()
  for name in ("ref", "ground"):   # teacher forcing: a target is the next input token
    inputs, labels = (np.asarray(x) for x in seq[name])
    full = np.concatenate([inputs, labels[:, -1:]], 1)
    on = labels != 0
    assert on.any() and np.array_equal(labels[on], full[:, 1:][on]), name
  assert not labels[2].any() and not np.asarray(seq["ref"][1])[3].any()   # no region, no target
  off = packed.copy()
  off[1, 0] = 0   # region 1 marked invalid, its tokens left in place: still no target
  for name in ("ref", "ground"):
    assert not np.asarray(obj.region_sequences(jnp.asarray(off[None]))[name][1])[1].any(), name
  with pytest.raises(ValueError, match=r"regions JSON: a list of"):
    RegionTargets(Tok(), 4, 8, 32, 0)('[{"text": "x"}]')


def test_sample_regions_draws_distinct_valid_regions_uniformly(rng):
  """regions_per_image = k: k distinct rows per image, valid ones before invalid ones, each
  valid one equally likely; 0 keeps them all."""
  from types import SimpleNamespace
  from mmjax.objectives.siglip2 import Siglip2
  obj = SimpleNamespace(settings=SimpleNamespace(regions_per_image=2))   # all it reads
  obj.sample_regions = lambda key, x: Siglip2.sample_regions(obj, key, x)
  b, r = 500, 4
  regions = np.zeros((b, r, 6), np.int32)
  n_valid = np.array([1, 2, 3, 4] * (b // 4))
  regions[..., 0] = np.arange(r) < n_valid[:, None]
  regions[..., 1] = np.arange(r)                       # each row's own index
  got = np.asarray(obj.sample_regions(jax.random.PRNGKey(int(rng.integers(1 << 30))),
                                      jnp.asarray(regions)))
  assert got.shape == (b, 2, 6)
  rows = got[..., 1]
  assert np.all(rows[:, 0] != rows[:, 1])              # distinct
  assert np.all(got[..., 0].sum(1) == np.minimum(n_valid, 2))   # as many valid as there are
  four = rows[n_valid == 4].reshape(-1)                # 125 images x 2 draws: 62.5 a row
  assert np.all(np.abs(np.bincount(four, minlength=4) - 62.5) < 25), np.bincount(four)
  obj.settings.regions_per_image = 0
  assert obj.sample_regions(jax.random.PRNGKey(0), regions) is regions


def test_prototype_logits_are_cosines(rng):
  """DINO-style heads: the logits are cosines of the features and the prototypes (float64)."""
  from mmjax.models.siglip2 import Prototypes
  x = rng.normal(size=(5, 3, 12)) * rng.uniform(0.1, 30, size=(5, 3, 1))
  head = Prototypes(7)
  params = head.init(jax.random.PRNGKey(0), jnp.asarray(x, jnp.float32))
  got = np.asarray(head.apply(params, jnp.asarray(x, jnp.float32)))
  w = np.asarray(params["params"]["kernel"], np.float64)
  want = (x / np.linalg.norm(x, axis=-1, keepdims=True)) @ (w / np.linalg.norm(w, axis=0))
  np.testing.assert_allclose(got, want, atol=2e-6)
  assert got.shape == (5, 3, 7) and np.abs(got).max() <= 1 + 1e-6


def test_captioner_is_greedy_and_caption_exact_counts(data_dir, rng):
  """The captioner's tokens are the decoder's own argmax at every position when the caption is
  fed back whole (teacher forcing agrees with the loop: no position is off by one), all text
  tokens; caption_exact counts the captions equal to their reference."""
  from mmjax.evaluate import evaluators
  from mmjax.evaluate.streaming import Embedded, Split
  obj, image, _, params = _built(data_dir, rng, seed=5, **{"data.text_len": 6})
  # Params drawn larger than the init's, so the argmax is not the same token everywhere.
  params = jax.tree.map(lambda p: p + 0.3 * jax.random.normal(jax.random.PRNGKey(1), p.shape),
                        params)
  v = {"params": params}
  caps = np.asarray(obj.captioner()(v, image))
  assert caps.shape == (3, obj.text_len) and caps.min() >= 0
  assert caps.max() < obj.task_ids["caption"] and len(np.unique(caps)) > 1
  _, tokens = obj.model.apply(v, image, method="image_outputs")
  seq = np.concatenate([np.full((3, 1), obj.task_ids["caption"]), caps], 1)
  logits = np.asarray(obj.model.apply(v, jnp.asarray(seq[:, :-1]), tokens, method="decode"))
  np.testing.assert_array_equal(np.argmax(logits[..., :obj.task_ids["caption"]], -1), caps)

  class Tok:
    def decode(self, rows):
      return [" ".join(f"w{t}" for t in r if t) for r in np.asarray(rows)]
  texts = np.array([[1, 2, 0], [3, 4, 0], [5, 0, 0]])
  made = np.array([[1, 2, 0], [3, 5, 0], [5, 0, 0]])   # two of three right
  split = Split.from_arrays({"image": np.zeros((3, 2, 2, 3), np.float32), "text": texts})
  got = evaluators.Captioning(Embedded(split, lambda v, x: made[:len(x)], 3), Tok()).run(None)
  assert got["caption_exact"] == pytest.approx(2 / 3)


def test_full_recipe_switch_on_and_exact_resume(data_dir, tmp_path):
  """Captioning, referring expressions and grounded captioning from the scenes' regions, then
  the distillation from the switch-on (state.step >= 9 of 12): the total is the weighted sum of
  its parts, every loss finite, the region losses fall, the teacher an average since the
  switch-on (not a copy) with moved centers; cut back to step 8 (before the switch-on) and
  resumed, the same losses."""
  import shutil
  from mmjax.train import loop
  from tests.test_resume import _saved
  config = tiny_config(data_dir, **{**SMALL, "data.name": "mmjax_digit_scenes",
                                    "data.augment": False, "total_steps": 12,
                                    "siglip2.refexp_weight": 1.0, "siglip2.grounded_weight": 1.0,
                                    "evaluate.probes": True, "evaluate.probe_train_examples": 100,
                                    "evaluate.probe_shots": (),
                                    "checkpoint.every": 4, "siglip2.distill_fraction": 0.25})
  whole, part = tmp_path / "whole", tmp_path / "part"
  results = loop.train(config, str(whole))
  assert 0.0 <= results["refexp_acc"] <= 1.0 and 0.0 < results["dense_probe_top1"] <= 1.0
  rows = [r for r in _rows(str(whole)) if "loss" in r]
  assert {r["step"]: r["distill_on"] for r in rows} == {k: float(k > 9) for k in range(1, 13)}
  for r in rows:
    parts = (r["sigmoid_loss"] + r["caption_loss"] + r["ref_loss"] + r["ground_loss"]
             + r["distill_on"] * (r["consistency_loss"] + 0.25 * r["masked_loss"]))
    assert r["loss"] == pytest.approx(parts, rel=1e-5), r
  for key in ("ref_loss", "ground_loss", "caption_loss", "consistency_loss", "masked_loss"):
    values = [r[key] for r in rows]
    assert np.all(np.isfinite(values)), (key, values)
  for key in ("ref_loss", "ground_loss"):
    assert np.mean([r[key] for r in rows[-3:]]) < np.mean([r[key] for r in rows[:3]]), key
  state, _ = _saved(str(whole), 12)
  ema = state["ema"]
  assert np.any(np.asarray(ema["center_global"])) and np.any(np.asarray(ema["center_patch"]))
  t, p = ema["teacher"]["proto_global"]["kernel"], state["params"]["proto_global"]["kernel"]
  assert not np.allclose(t, p)   # an average of the student since the switch-on, not a copy
  shutil.copytree(whole, part)
  _cut_back(str(part), 8)   # before the switch-on: the resumed run switches it on itself
  loop.train(config, str(part))
  want, got = dict(_losses(str(whole))), dict(_losses(str(part)))
  assert [got[s] for s in range(9, 13)] == [want[s] for s in range(9, 13)], (got, want)


def test_refexp_accuracy_and_patch_labels():
  """refexp_acc counts a region right when the predicted box overlaps the true one with IoU
  >= 0.5, over valid regions only."""
  from mmjax.evaluate import evaluators
  from mmjax.evaluate.streaming import Embedded, Split
  bins, offset = 10, 100
  regions = np.zeros((2, 3, 9), np.int32)
  regions[:, :2, 0] = 1
  regions[:, :, 1:5] = offset + np.array([1, 1, 5, 5])            # the true boxes
  shift = {(0, 0): 0, (0, 1): 1, (1, 0): 3, (1, 1): 0}            # box tokens moved by this
  pred = regions[..., 1:5].copy()
  for (i, j), d in shift.items():
    pred[i, j] += d
  pred[:, 2] = offset   # an invalid region, predicted wrong: not counted
  split = Split.from_arrays({"image": np.zeros((2, 4, 4, 3), np.float32), "regions": regions})
  fn = lambda v, batch: pred[: len(batch["regions"])]
  got = evaluators.Refexp(Embedded(split, fn, 2, key=None), bins, offset).run(None)
  # shift 1 of a 4-bin box: IoU 9/16 + ... = (3*3)/(4*4+4*4-9) ~ 0.39 < 0.5; 3 bins: 0.
  assert got == {"refexp_acc": 0.5}, got


def test_the_recipe_configs_validate():
  """experiments/configs/siglip_scenes.py and siglip2_scenes.py differ in the objective only."""
  from experiments.configs import siglip2_scenes, siglip_scenes
  from mmjax.train import config as config_lib
  a, b = siglip_scenes.get_config(), siglip2_scenes.get_config()
  for c in (a, b):
    config_lib.validate(c)
  assert (a.loss, b.loss) == ("siglip", "siglip2")
  same = ("batch_size", "total_steps", "data", "model", "evaluate", "optim")
  assert all(a[k].to_dict() == b[k].to_dict() if hasattr(a[k], "to_dict") else a[k] == b[k]
             for k in same)


def test_init_from_skips_the_mask_token_both_ways(data_dir, tmp_path):
  """config.init_from.skip: a SigLIP 2 run (the decoder probe of siglip2_probe.py) takes a
  SigLIP run's image tower, its own mask token left as initialised; a SigLIP run takes a
  SigLIP 2 run's, its mask token not read. Without skip either way is one line naming it. The
  sources are initial states of another seed, saved as a run saves them (no training)."""
  from mmjax.train import checkpoint, init_from, loop
  short = {"total_steps": 2, "optim.warmup_steps": 1, "evaluate.probes": False}
  extra = {"siglip": {}, "siglip2": SMALL}
  for name in extra:
    built = loop.build(tiny_config(data_dir, **{**extra[name], **short, "seed": 7}))
    manager = checkpoint.make_manager(str(tmp_path / name), every=1, keep=1)
    checkpoint.save(manager, 1, built.init_state(), {}, force=True)
    manager.wait_until_finished()
  for source, loss in (("siglip", "siglip2"), ("siglip2", "siglip")):
    cfg = tiny_config(data_dir, **{**extra[loss], **short, "init_from.workdir": str(tmp_path / source)})
    built = loop.build(cfg)
    fresh = built.init_state()
    with pytest.raises(ValueError, match=r"config.init_from: img\['mask_token'\]|"
                                         r"has img parameters this run lacks, e\.g\. "
                                         r"img\['mask_token'\]"):
      init_from.from_run(fresh, cfg.init_from, built.state_sharding, built.objective)
    cfg.init_from.skip = ("img/mask_token",)
    state = init_from.from_run(fresh, cfg.init_from, built.state_sharding, built.objective)
    saved, _ = checkpoint.load_params(str(tmp_path / source))
    if state.ema is not None:   # the teacher starts as the params, in buffers of its own
      pointers = lambda t: {x.unsafe_buffer_pointer() for x in jax.tree.leaves(t)}
      assert not pointers(state.ema) & pointers(state.params)
    got = jax.tree.map(np.asarray, state.params["img"])
    if "mask_token" in got:
      np.testing.assert_array_equal(got.pop("mask_token"), fresh.params["img"]["mask_token"])
    saved["img"].pop("mask_token", None)
    jax.tree.map(np.testing.assert_array_equal, got, saved["img"])
    assert not np.array_equal(saved["img"]["embedding"]["kernel"],
                              fresh.params["img"]["embedding"]["kernel"])   # another seed
