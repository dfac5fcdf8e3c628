"""ImageBind-style binding (mmjax.models.bind, config.loss='bind'): the two-tower param names kept
(a TwoTower's params are Bind's image-text part, encode('image') its encode_image), the audio
tower's embedding computed by hand, each pair's loss and temperature gradient against the float64
references with its own head, no gradient into frozen towers; end to end on spoken-digit shards:
a SigLIP run, then a bind run initialised from it (prefix tuple), image/text frozen bit for bit,
the audio tower trained, the loss falling, zero-shot evaluated; init_from.prefix errors."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import objectives
from mmjax.models import audio as audio_lib, bind as bind_lib, two_tower
from mmjax.train import config as config_lib, optimizer
from tests.configs import tiny_config
from tests.reference import ref_clip, ref_siglip

TWO_TOWER_KEYS = {"img", "txt", "img_proj", "txt_proj", "t", "b"}
FROZEN = ("img/.*", "img_proj/.*", "txt/.*", "txt_proj/.*", "t", "b")
PREFIX = ("img", "img_proj", "txt", "txt_proj")
AUDIO = dict(variant="mu/16", n_mels=32, pool_type="gap")   # 0.25 s: 2 x 2 patches
needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None,
                                  reason="espeak-ng is not installed (apt-get install espeak-ng; "
                                  ".ci/run installs it)")


def _inputs(rng, b=4, seconds=0.25):
  return {"image": jnp.asarray(rng.normal(size=(b, 16, 16, 3)), jnp.float32),
          "text": jnp.asarray(rng.integers(1, 50, (b, 6)), jnp.int32),
          "audio": jnp.asarray(rng.uniform(-0.5, 0.5, (b, int(16000 * seconds))), jnp.float32)}


def test_bind_keeps_the_two_tower_names_and_encodes_audio_through_its_own_projection(rng):
  base = two_tower.Model(image=dict(variant="mu/8"), text=dict(variant="mu", vocab_size=50,
                                                               max_len=6), embed_dim=16)
  audio = dict(AUDIO, clip_seconds=0.25)
  model = bind_lib.Model(base, {"audio": audio}, [("image", "audio")])
  x = _inputs(rng)
  params = model.init(jax.random.PRNGKey(0), x, method="embed")["params"]
  ref = base.init(jax.random.PRNGKey(1), x["image"], x["text"])["params"]
  assert set(params) == TWO_TOWER_KEYS | {"audio", "audio_proj", "t_image_audio",
                                          "b_image_audio"}
  shapes = lambda t: jax.tree.map(lambda a: a.shape, t)
  assert shapes({k: params[k] for k in TWO_TOWER_KEYS}) == shapes(ref)
  assert params["audio_proj"]["kernel"].shape == (32, 16)   # mu's width -> embed_dim
  # A SigLIP run's params are Bind's image-text part: the same functions of them.
  mine = {k: params[k] for k in TWO_TOWER_KEYS}
  for name, method, arg in (("image", "encode_image", x["image"]),
                            ("text", "encode_text", x["text"])):
    np.testing.assert_array_equal(
        model.apply({"params": params}, name, arg, method="encode"),
        base.apply({"params": mine}, arg, method=method))
  # The audio embedding by hand: the AudioViT's pooled output, its own projection, unit norm.
  pooled, _ = audio_lib.Model(**audio).apply({"params": params["audio"]}, x["audio"])
  want = np.asarray(pooled, np.float64) @ np.asarray(params["audio_proj"]["kernel"], np.float64)
  want /= np.linalg.norm(want, axis=1, keepdims=True)
  got = model.apply({"params": params}, "audio", x["audio"], method="encode")
  np.testing.assert_allclose(got, want, atol=2e-6)
  with pytest.raises(ValueError, match=r"pairs: \('image', 'speech'\) must be"):
    bind_lib.Model(base, {"audio": audio}, [("image", "speech")])


def _bind_config(data_dir, loss, **overrides):
  cfg = tiny_config(data_dir, loss="bind", **{"data.audio_ext": "wav",
                                              "data.audio_seconds": 0.25, **overrides})
  cfg.data.image_size, cfg.data.text_len = 16, 6
  cfg.bind.loss = loss
  cfg.bind.audio.update(AUDIO)
  return cfg


@pytest.mark.parametrize("loss", ["siglip", "clip"])
def test_the_pair_loss_is_the_contrastive_loss_with_its_own_head_frozen_towers_get_no_gradient(
    data_dir, rng, loss):
  cfg = _bind_config(data_dir, loss)
  obj = objectives.make(cfg, vocab_size=50)
  x = _inputs(rng)
  params = obj.init(jax.random.PRNGKey(0), x)
  # The pair's head differs from the image-text one, so using the wrong one shows.
  params = {**params, "t_image_audio": jnp.log(jnp.float32(7.0))}
  if loss == "siglip":
    params["b_image_audio"] = jnp.float32(-3.0)
  batch = {k: x[k] for k in obj.batch_keys}
  assert obj.batch_keys == ("image", "audio")
  (value, metrics), grads = obj.grad_fn(params, None, batch, jax.random.PRNGKey(1))
  v = {"params": params}
  zi = np.asarray(obj.model.apply(v, "image", x["image"], method="encode"), np.float64)
  za = np.asarray(obj.model.apply(v, "audio", x["audio"], method="encode"), np.float64)
  want, dwant = ref_siglip(zi, za, 7.0, -3.0) if loss == "siglip" else ref_clip(zi, za, 7.0)
  np.testing.assert_allclose(value, want, rtol=2e-5)
  np.testing.assert_allclose(metrics["image_audio/loss"], want, rtol=2e-5)
  # d/dt of the loss through scale = exp(t): ds * scale; the image-text head gets nothing.
  np.testing.assert_allclose(grads["t_image_audio"], dwant[2] * 7.0, rtol=1e-4, atol=1e-6)
  assert float(grads["t"]) == 0.0
  norm = lambda t: float(sum(jnp.sum(jnp.abs(g)) for g in jax.tree.leaves(t)))
  assert norm(grads["img"]) > 0 and norm(grads["audio"]) > 0   # unfrozen: both towers learn
  frozen = obj.with_frozen(optimizer.frozen_labels(params, FROZEN[:-1] if loss == "clip"
                                                    else FROZEN))   # CLIP learns no bias
  _, grads = frozen.grad_fn(params, None, batch, jax.random.PRNGKey(1))
  for key in ("img", "img_proj", "txt", "txt_proj"):
    assert norm(grads[key]) == 0.0, key
  assert norm(grads["audio"]) > 0 and norm(grads["audio_proj"]) > 0


def test_check_config_refuses_an_unknown_modality_and_audio_without_audio_ext(data_dir):
  cfg = _bind_config(data_dir, "siglip")
  cfg.bind.pairs = (("image", "smell"),)
  with pytest.raises(ValueError, match=r"^config.bind.pairs: \('image', 'smell'\) must be"):
    config_lib.validate(cfg)
  cfg = _bind_config(data_dir, "siglip", **{"data.audio_ext": None})
  with pytest.raises(ValueError, match=r"^config.bind.pairs binds audio but "
                                       r"config.data.audio_ext is unset \(config.data.name="
                                       r"'mmjax_digits'\)"):
    config_lib.validate(cfg)


@pytest.fixture(scope="module")
def spoken_shards(tmp_path_factory):
  if shutil.which("espeak-ng") is None:
    pytest.skip("espeak-ng is not installed (apt-get install espeak-ng; .ci/run installs it)")
  pytest.importorskip("webdataset")
  from mmjax.data import spoken
  out = tmp_path_factory.mktemp("spoken")
  spoken.write_spoken_shards(str(out), sizes={"train": 128, "test": 40}, shard_size=64)
  return {"data.name": "wds", "data.shards": os.path.join(out, "train", "*.tar"),
          "data.eval_shards": os.path.join(out, "test", "*.tar")}


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [r for r in map(json.loads, f) if "loss" in r]
  return [r["loss"] for r in sorted(rows, key=lambda r: r["step"])]


@needs_espeak
def test_a_siglip_run_then_audio_bound_to_its_frozen_towers(spoken_shards, data_dir, tmp_path):
  from mmjax.train import checkpoint, init_from, loop
  short = {"total_steps": 4, "checkpoint.every": 4, **spoken_shards}
  siglip_dir = str(tmp_path / "siglip")
  loop.train(tiny_config(data_dir, **short), siglip_dir)
  cfg = tiny_config(data_dir, loss="bind", frozen=FROZEN, **{
      **short, "total_steps": 10, "checkpoint.every": 10, "data.audio_ext": "wav",
      "data.audio_seconds": 0.5, "init_from.workdir": siglip_dir, "init_from.prefix": PREFIX,
      "optim.lr": 3e-3})
  cfg.bind.audio.update(AUDIO)
  bind_dir = str(tmp_path / "bind")
  results = loop.train(cfg, bind_dir)
  saved, _ = checkpoint.load_params(siglip_dir)
  trained, _ = checkpoint.load_params(bind_dir)
  for key in PREFIX:   # loaded and frozen: bit for bit the SigLIP run's
    jax.tree.map(np.testing.assert_array_equal, trained[key], saved[key])
  built = loop.build(cfg)
  fresh = built.init_state()
  for key in ("t", "b"):   # frozen, not loaded (the pairs have their own heads): as initialised
    np.testing.assert_array_equal(trained[key], jax.device_get(fresh.params[key]))
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), trained["audio"],
                         jax.device_get(fresh.params["audio"]))
  assert all(jax.tree.leaves(changed))
  losses = _losses(bind_dir)
  assert len(losses) == 10 and np.all(np.isfinite(losses))
  assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses
  assert 0.0 <= results["zeroshot_top1"] <= 1.0, results   # the frozen image-text space
  # init_from.prefix: each key must be one of both runs'; a missing one is named in one line.
  cfg.init_from.prefix = ("img", "audio_proj")
  with pytest.raises(ValueError, match=r"^config.init_from.prefix='audio_proj' must be a "
                                       r"top-level params key of both runs"):
    init_from.from_run(fresh, cfg.init_from, built.state_sharding, built.objective)
  cfg.init_from.prefix = "img"   # a str still works: one subtree
  state = init_from.from_run(fresh, cfg.init_from, built.state_sharding, built.objective)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params["img"]), saved["img"])
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params["txt"]),
               jax.device_get(fresh.params["txt"]))
