"""mmjax.data.spoken and the webdataset source's audio: espeak-ng's words against espeak-ng's own
WAV read here (length after resampling to 16 kHz, scale), determinism, exact clip length, the word
above the noise, voices that differ; the shards read back by webdataset's own reader; bad WAVs
(truncated, no header, no frames, 8 kHz) skipped, named and counted, the others batched as
'audio' float32 [b, T]."""

import io
import shutil
import subprocess
import wave

import numpy as np
import pytest

from mmjax.data import digits, spoken
from mmjax.data import wds_pipeline as wp
from tests.test_wds import _RowTokenizer, _data, _jpeg

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None,
                                  reason="espeak-ng is not installed (apt-get install espeak-ng; "
                                  ".ci/run installs it)")


def _webdataset():
  from tests.open_clip_peer import _patch_torchvision
  _patch_torchvision()   # webdataset imports torch where it is installed
  return pytest.importorskip("webdataset")


def _frame_rms(x, frame=320):
  n = len(x) // frame
  return np.sqrt(np.mean(x[:n * frame].reshape(n, frame).astype(np.float64) ** 2, axis=1))


@needs_espeak
def test_speak_is_espeak_ng_resampled_to_16k_in_unit_range(tmp_path):
  """espeak-ng's own WAV file (-w, 22,050 Hz int16): speak's length is its length x 16000 /
  22050, its RMS the int16 RMS / 32768 (resampling keeps the level), all in [-1, 1]."""
  path = tmp_path / "w.wav"
  subprocess.run(["espeak-ng", "-w", str(path), "-v", "en-us", "-s", "150", "-p", "50", "seven"],
                 check=True)
  with wave.open(str(path)) as w:
    assert w.getframerate() == 22050
    raw = np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float64) / 32768
  x = spoken.speak("seven", voice="en-us", speed=150, pitch=50)
  assert x.dtype == np.float32 and x.ndim == 1
  assert abs(len(x) - len(raw) * 16000 / 22050) <= 1, (len(x), len(raw))
  assert np.abs(x).max() <= 1
  assert np.sqrt(np.mean(x ** 2)) == pytest.approx(np.sqrt(np.mean(raw ** 2)), rel=0.05)


@needs_espeak
def test_spoken_digit_is_deterministic_exact_length_and_the_word_stands_above_the_noise():
  for seed in (0, 1, 2):
    a = spoken.spoken_digit(seed + 3, np.random.default_rng(seed))
    b = spoken.spoken_digit(seed + 3, np.random.default_rng(seed))
    assert a.dtype == np.float32 and a.shape == (32000,)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a).max() <= 1
    rms = _frame_rms(a)   # 20 ms frames: the loudest are the word, the quietest noise only
    assert rms.max() > 5 * rms.min() > 0, (rms.max(), rms.min())
  c = spoken.spoken_digit(3, np.random.default_rng(0), clip_seconds=1.5, sample_rate=8000)
  assert c.shape == (12000,)
  assert not np.array_equal(spoken.spoken_digit(3, np.random.default_rng(0)),
                            spoken.spoken_digit(3, np.random.default_rng(1)))


@needs_espeak
def test_voices_differ():
  clips = {v: spoken.speak("four", voice=v, speed=160, pitch=50) for v in spoken.VOICES}
  for i, u in enumerate(spoken.VOICES):
    for v in spoken.VOICES[i + 1:]:
      a, b = clips[u], clips[v]
      n = min(len(a), len(b))
      assert len(a) != len(b) or not np.allclose(a[:n], b[:n], atol=1e-3), (u, v)


def test_missing_espeak_names_the_binary(monkeypatch):
  monkeypatch.setattr(spoken.shutil, "which", lambda name: None)
  spoken._speak_cached.cache_clear()
  with pytest.raises(FileNotFoundError, match="espeak-ng.*apt-get install espeak-ng"):
    spoken.speak("one", voice="en-us", speed=150, pitch=50)


@needs_espeak
def test_shards_read_back_by_webdatasets_reader(tmp_path):
  """write_spoken_shards' shards through webdataset.WebDataset: every sample has png, txt, cls
  and wav; the wav is 16-bit mono 16 kHz of 2 s, equal to spoken_digit of its label (drawn
  from seed, split, position), the png and caption those of digits.split_examples."""
  webdataset = _webdataset()
  sizes = {"train": 7, "test": 4}
  shards = spoken.write_spoken_shards(str(tmp_path), sizes=sizes, shard_size=3, seed=5)
  assert [len(shards[s]) for s in sizes] == [3, 2]
  for split, n in sizes.items():
    want = [ex for _, (_, ex) in zip(range(n), digits.split_examples(split))]
    got = list(webdataset.WebDataset(shards[split], shardshuffle=False))
    assert len(got) == n
    for i, (s, ex) in enumerate(zip(got, want)):
      assert {k for k in s if not k.startswith("__")} == {"png", "txt", "cls", "wav"}
      assert s["txt"].decode() == ex["text"] and int(s["cls"]) == ex["label"]
      from PIL import Image
      np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(s["png"]))),
                                    np.asarray(ex["image"]))
      with wave.open(io.BytesIO(s["wav"])) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth(), w.getnframes()) == (
            16000, 1, 2, 32000)
        pcm = np.frombuffer(w.readframes(32000), "<i2") / 32767
      ref = spoken.spoken_digit(ex["label"], np.random.default_rng([5, len(split), i]))
      np.testing.assert_allclose(pcm, ref, atol=1 / 32767)


def _wav(x, rate=16000):
  return spoken.encode_wav(x, rate)


def _audio_shards(rng, tmp_path, bad):
  """Two shards of 6 samples 'caption N' with a JPEG and a WAV (a ramp scaled by N + 1);
  bad: {row: how its WAV is broken}."""
  webdataset = _webdataset()
  paths = []
  for s in range(2):
    path = str(tmp_path / f"{s}.tar")
    with webdataset.TarWriter(path) as w:
      for row in range(s * 6, s * 6 + 6):
        wav = _wav(np.linspace(-0.5, 0.5, 1000 + 100 * row) * (row + 1) / 12)
        if bad.get(row) == "truncated":
          wav = wav[:len(wav) // 2]
        elif bad.get(row) == "no_header":
          wav = wav[:20]
        elif bad.get(row) == "zero_frames":
          wav = _wav(np.zeros(0, np.float32))
        elif bad.get(row) == "8khz":
          wav = _wav(np.linspace(-0.5, 0.5, 800), rate=8000)
        w.write({"__key__": f"{row:06d}", "jpg": _jpeg(rng, 30, 40),
                 "txt": f"caption {row}".encode(), "wav": wav})
    paths.append(path)
  return paths


BAD = {1: "truncated", 4: "zero_frames", 7: "8khz", 9: "no_header"}


def test_bad_wavs_are_skipped_named_and_counted_the_others_batched(rng, tmp_path, capsys):
  paths = _audio_shards(rng, tmp_path, BAD)
  data = _data(streams=1, shuffle_buffer=1, shard_cycle=1, max_skip_fraction=0.9,
               audio_ext="wav", audio_seconds=0.1)
  decode = wp.Decode(tokenizer=_RowTokenizer(), image_size=24, text_len=6, image_ext="jpg",
                     text_ext="txt", seed=0, audio_ext="wav", audio_seconds=0.1)
  for row, why in BAD.items():   # each bad one, named: shard, key, member and reason
    shard = paths[row // 6]
    sample = next(s for s, _ in wp.wds.read_shard(shard) if s["__key__"] == f"{row:06d}")
    out = decode({**sample, "__item__": 0, "__n__": 2})
    reason = {"truncated": "truncated", "zero_frames": "no audio frames", "8khz": "8000 Hz",
              "no_header": "not a PCM WAV"}[why]
    assert out["__skip__"] == "image" and f"{shard}:{row:06d}.wav: {reason}" in out["__where__"]
  it = wp.make_train_iterator(paths, data, tokenizer=_RowTokenizer(), global_batch_size=4, seed=0)
  try:
    batches = [next(it) for _ in range(2)]
    metrics = it.metrics()
  finally:
    it.close()
  good = [r for r in range(12) if r not in BAD]
  seen = [int(r) for b in batches for r in b["text"][:, 0]]
  assert sorted(seen) == good   # one epoch: all the good rows, none of the bad
  assert metrics["data/skipped_image"] == len(BAD) and metrics["data/skipped_caption"] == 0
  for b in batches:
    assert b["audio"].shape == (4, 1600) and b["audio"].dtype == np.float32
    for r, a in zip(b["text"][:, 0], b["audio"]):
      ref = (np.linspace(-0.5, 0.5, 1000 + 100 * r) * (r + 1) / 12)[:1600]   # cut to T
      n = len(ref)
      np.testing.assert_allclose(a[:n], ref, atol=1 / 32767)   # scaled to [-1, 1]
      assert not a[n:].any()   # zero-padded to T = 16000 * 0.1
  out = capsys.readouterr().out
  assert out.count("skipped a bad image:") == 1 and ".wav:" in out


def test_no_audio_ext_means_no_audio_and_flac_is_refused(rng, tmp_path):
  paths = _audio_shards(rng, tmp_path, {})
  it = wp.make_train_iterator(paths, _data(streams=1), tokenizer=_RowTokenizer(),
                              global_batch_size=4, seed=0)
  try:
    assert "audio" not in next(it)
  finally:
    it.close()
  with pytest.raises(ValueError, match="config.data.audio_ext='flac'"):
    wp.Decode(tokenizer=_RowTokenizer(), image_size=24, text_len=6, image_ext="jpg",
              text_ext="txt", seed=0, audio_ext="flac")


def test_audio_ext_on_a_tfds_source_is_refused_naming_the_field():
  from mmjax.train.config import defaults, validate
  config = defaults()
  config.data.audio_ext = "wav"
  with pytest.raises(ValueError, match=r"config.data.audio_ext='wav'.*'wds'"):
    validate(config)
