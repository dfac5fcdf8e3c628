"""The 'audio' evaluator (audio -> image recall, emergent audio -> text zero-shot and recall):
its metrics on synthetic embeddings whose answers are known, against a NumPy recomputation;
NotApplicable without an audio hook or audio in the split; the eval split of audio shards
carries the decoded waveforms; the spoken recipe configs; SigLIP then bind end to end on
spoken-digit shards with the audio metrics and the frozen image zero-shot unchanged."""

import io
import os
import tarfile

import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.evaluate import evaluators
from mmjax.evaluate.streaming import Split
from mmjax.train import config as config_lib
from tests.configs import tiny_config
from tests.test_bind import AUDIO, FROZEN, PREFIX, needs_espeak, spoken_shards  # noqa: F401

N, C, D = 40, 5, 8
NAMES = ["zero", "one", "two", "three", "four"]


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


class _Tokenizer:
  """A prompt -> [class index + 1, 0, ...] (the class named in it; 0 when none is)."""

  def encode(self, texts, length):
    out = np.zeros((len(texts), length), np.int32)
    for i, t in enumerate(texts):
      words = t.replace(".", " ").split()
      out[i, 0] = next((1 + c for c, name in enumerate(NAMES) if name in words), 0)
    return out


class _Objective:
  """Towers on vectors: an image or audio 'input' is its embedding before normalising; a text's
  embedding is its class's row of `table` (token 0 = class + 1)."""

  def __init__(self, table, has_audio=True):
    self.table, self.has_audio = jnp.asarray(table), has_audio

  def towers(self):
    unit = lambda v, x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    return unit, lambda v, tokens: unit(v, self.table[tokens[:, 0]])

  def modality_encoders(self):
    return {"audio": self.towers()[0]} if self.has_audio else {}


def _world(rng):
  labels = np.arange(N) % C
  classes = rng.normal(size=(C, D))
  table = np.concatenate([np.zeros((1, D)), classes])     # token c + 1 -> class c
  images = rng.normal(size=(N, D))
  tokens = np.zeros((N, 4), np.int32)
  tokens[:, 0] = labels + 1                                  # caption: its class
  return labels, classes, table, images, tokens


def _run(rng, audio, match="pair", **objective):
  labels, classes, table, images, tokens = _world(rng)
  arrays = {"image": images, "audio": audio, "label": labels.astype(np.int32), "text": tokens}
  inputs = evaluators.Inputs(_Objective(table, **objective), Split.from_arrays(arrays),
                             tokenizer=_Tokenizer(), text_len=4, class_names=NAMES,
                             templates=["a photo of {c}.", "{c}"])
  s = dict(batch_size=16, retrieval_match=match, templates=None)
  return evaluators.get("audio").build(inputs, s).run(None)


def _recall(q, keys, q_ids, key_ids, k):
  """Share of queries whose top k keys by cosine hold one with the query's id."""
  top = np.argsort(-(_unit(q) @ _unit(keys).T), axis=1, kind="stable")[:, :k]
  return float(np.mean([np.any(key_ids[t] == i) for t, i in zip(top, q_ids)]))


def _reference(audio, labels, classes, images, match):
  ids = labels if match == "label" else np.arange(N)
  cap_ids = labels          # captions are their class: identical captions count as one
  pred = np.argmax(_unit(audio) @ _unit(classes).T, axis=1)
  return {"audio_image_r1": _recall(audio, images, ids, ids, 1),
          "audio_image_r5": _recall(audio, images, ids, ids, 5),
          "audio_text_zeroshot_top1": float(np.mean(pred == labels)),
          "audio_text_r1": _recall(audio, classes[labels], cap_ids, cap_ids, 1)}


@pytest.mark.parametrize("match", ["pair", "label"])
def test_the_metrics_against_numpy_on_embeddings_with_known_answers(rng, match):
  labels, classes, _, images, _ = _world(np.random.default_rng(0))
  near_image = images + 0.01 * rng.normal(size=images.shape)
  got = _run(np.random.default_rng(0), near_image, match)
  assert got["audio_image_r1"] == 1.0 and got["audio_image_r5"] == 1.0
  np.testing.assert_allclose([got[k] for k in sorted(got)],
                             [v for _, v in sorted(_reference(near_image, labels, classes, images,
                                                              match).items())], atol=1e-6)
  shuffled = images[rng.permutation(N)]
  got = _run(np.random.default_rng(0), shuffled, match)
  want = _reference(shuffled, labels, classes, images, match)
  assert got == pytest.approx(want, abs=1e-6)
  if match == "pair":
    assert got["audio_image_r1"] < 0.2
  # Audio at its class's text embedding: the emergent zero-shot and caption recall are perfect,
  # the image recall is whatever those give (checked against NumPy, not assumed).
  at_class = classes[labels] + 0.01 * rng.normal(size=images.shape)
  got = _run(np.random.default_rng(0), at_class, match)
  assert got["audio_text_zeroshot_top1"] == 1.0 and got["audio_text_r1"] == 1.0
  assert got == pytest.approx(_reference(at_class, labels, classes, images, match), abs=1e-6)
  # Random audio: every metric as NumPy computes it.
  noise = rng.normal(size=images.shape)
  got = _run(np.random.default_rng(0), noise, match)
  assert got == pytest.approx(_reference(noise, labels, classes, images, match), abs=1e-6)


def test_not_applicable_without_an_audio_hook_or_audio_in_the_split(rng):
  with pytest.raises(evaluators.NotApplicable, match="encodes no audio"):
    _run(rng, np.zeros((N, D)), has_audio=False)
  labels, _, table, images, tokens = _world(rng)
  inputs = evaluators.Inputs(_Objective(table), Split.from_arrays(
      {"image": images, "label": labels, "text": tokens}))
  with pytest.raises(evaluators.NotApplicable, match="split's 'audio'"):
    evaluators.get("audio").build(inputs, dict(batch_size=8, retrieval_match="pair"))


def _spoken_config(name, shards):
  import importlib
  c = importlib.import_module(f"experiments.configs.{name}").get_config()
  c.data.shards, c.data.eval_shards = shards["data.shards"], shards["data.eval_shards"]
  if c.loss == "bind":
    c.init_from.workdir = "/tmp/siglip_spoken"
  return c


def test_the_spoken_recipe_configs_validate_and_differ_where_they_should():
  shards = {"data.shards": "/x/train/{0..1}.tar", "data.eval_shards": "/x/test/0.tar"}
  siglip, bind, text = (_spoken_config(n, shards) for n in
                        ("siglip_spoken", "bind_spoken", "bind_spoken_text"))
  for c in (siglip, bind, text):
    config_lib.validate(c)
  assert siglip.loss == "siglip" and siglip.data.name == "wds" and not siglip.data.audio_ext
  assert bind.loss == text.loss == "bind" and bind.data.audio_ext == "wav"
  assert tuple(bind.init_from.prefix) == PREFIX and tuple(bind.frozen) == FROZEN
  assert tuple(bind.bind.pairs) == (("image", "audio"),)
  assert tuple(text.bind.pairs) == (("text", "audio"),)
  # The baseline differs from the bound run in its pairs alone (same steps, towers, data).
  a, b = bind.to_dict(), text.to_dict()
  a["bind"].pop("pairs"), b["bind"].pop("pairs")
  assert a == b
  # And the bound run's model and data are the SigLIP run's, loaded by prefix.
  assert bind.model.to_dict() == siglip.model.to_dict()
  assert bind.total_steps == siglip.total_steps and bind.data.image_size == siglip.data.image_size


def _first_wav(pattern, seconds):
  """The first test shard's first WAV, decoded by hand (the stdlib wave module)."""
  import glob
  import wave
  with tarfile.open(sorted(glob.glob(pattern))[0]) as tar:
    member = next(m for m in tar.getmembers() if m.name.endswith(".wav"))
    data = tar.extractfile(member).read()
  with wave.open(io.BytesIO(data)) as w:
    assert w.getsampwidth() == 2 and w.getframerate() == 16000
    x = np.frombuffer(w.readframes(w.getnframes()), "<i2") / 32768.0
  out = np.zeros(int(16000 * seconds))
  out[:min(len(out), len(x))] = x[:len(out)]
  return out


@needs_espeak
def test_siglip_then_bind_on_spoken_shards_gives_the_audio_metrics(spoken_shards, data_dir,  # noqa: F811
                                                                   tmp_path):
  from mmjax.data import pipeline, sources
  from mmjax.train import loop
  short = {"total_steps": 3, "checkpoint.every": 3, **spoken_shards}
  siglip_dir = str(tmp_path / "siglip")
  first = loop.train(tiny_config(data_dir, **short), siglip_dir)
  cfg = tiny_config(data_dir, loss="bind", frozen=FROZEN, **{
      **short, "total_steps": 4, "checkpoint.every": 4, "data.audio_ext": "wav",
      "data.audio_seconds": 0.5, "init_from.workdir": siglip_dir, "init_from.prefix": PREFIX})
  cfg.bind.audio.update(AUDIO)
  # The eval split carries the waveforms, decoded as training decodes them.
  src = sources.open(cfg.data, data_dir).eval_source()
  arrays = pipeline.make_eval_arrays(src, cfg.data, tokenizer=_Tokenizer(), lazy_images=True,
                                     audio=True)
  assert arrays["audio"].shape == (40, 8000) and arrays["audio"].dtype == np.float32
  np.testing.assert_allclose(arrays["audio"][0], _first_wav(spoken_shards["data.eval_shards"],
                                                            0.5), atol=0)
  results = loop.train(cfg, str(tmp_path / "bind"))
  for k in ("audio_image_r1", "audio_image_r5", "audio_text_zeroshot_top1", "audio_text_r1"):
    assert 0.0 <= results[k] <= 1.0, (k, results)
  assert results["audio_image_r1"] <= results["audio_image_r5"]
  assert results["zeroshot_top1"] == first["zeroshot_top1"]   # the frozen image-text space
  assert "audio_image_r1" not in first   # SigLIP has no audio tower


def test_the_text_anchored_baseline_binds_audio_to_the_batch_captions(data_dir, rng):
  import jax
  from mmjax import objectives
  from tests.reference import ref_siglip
  from tests.test_bind import _bind_config, _inputs
  cfg = _bind_config(data_dir, "siglip")
  cfg.bind.pairs = (("text", "audio"),)   # (bind_spoken_text.py's pairs validate above)
  obj = objectives.make(cfg, vocab_size=50)
  x = _inputs(rng)
  params = obj.init(jax.random.PRNGKey(0), x)
  assert obj.batch_keys == ("text", "audio") and "t_text_audio" in params
  (value, metrics), _ = obj.grad_fn(params, None, {k: x[k] for k in obj.batch_keys},
                                    jax.random.PRNGKey(1))
  v = {"params": params}
  zt = np.asarray(obj.model.apply(v, "text", x["text"], method="encode"), np.float64)
  za = np.asarray(obj.model.apply(v, "audio", x["audio"], method="encode"), np.float64)
  scale, bias = float(np.exp(params["t_text_audio"])), float(params["b_text_audio"])
  np.testing.assert_allclose(value, ref_siglip(zt, za, scale, bias)[0], rtol=2e-5)
  np.testing.assert_allclose(metrics["text_audio/loss"], value, rtol=1e-6)
