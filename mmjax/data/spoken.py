"""Spoken digits: the digits' images paired with their words spoken by espeak-ng, offline.

ImageBind-style binding needs audio paired with the images. Each digit image gets its class
word ("seven") synthesised by the espeak-ng binary (Debian's `espeak-ng` package) in a random
English voice, speed and pitch, placed at a random offset in a fixed-length clip with white
noise at a random SNR, and written beside the image as 16-bit PCM mono WAV:
`write_spoken_shards` writes webdataset shards with KEY.png, KEY.txt, KEY.cls and KEY.wav
(read back with config.data.audio_ext='wav').
"""

from __future__ import annotations

import functools
import itertools
import io
import math
import os
import shutil
import subprocess
import wave

import numpy as np
from scipy.signal import resample_poly   # scipy: a dependency of jax

from mmjax.data import digits, shard_writer
from mmjax.data.scenes import _png

# English voices of espeak-ng 1.51 that sound different ('en' is 'en-gb').
VOICES = ("en-us", "en-gb", "en+f3", "en+m3", "en+f2", "en-gb-scotland")
SPEED = (120, 220)       # words per minute, both ends drawn
PITCH = (20, 80)         # espeak-ng's 0..99 pitch scale
SNR_DB = (10.0, 30.0)    # the word's RMS over the white noise's
SAMPLE_RATE = 16000
CLIP_SECONDS = 2.0
SPLIT_SIZES = {"train": None, "test": None}   # None: the whole digits split


def _binary() -> str:
  path = shutil.which("espeak-ng")
  if path is None:
    raise FileNotFoundError("espeak-ng: the binary is not on PATH; install it: "
                            "apt-get install espeak-ng")
  return path


@functools.lru_cache(maxsize=4096)
def _speak_cached(word: str, voice: str, speed: int, pitch: int, sample_rate: int) -> np.ndarray:
  cmd = [_binary(), "--stdout", "-v", voice, "-s", str(speed), "-p", str(pitch), word]
  run = subprocess.run(cmd, capture_output=True, check=False)
  if run.returncode or not run.stdout:
    raise ValueError(f"espeak-ng {' '.join(cmd[1:])}: no audio (exit {run.returncode}: "
                     f"{run.stderr.decode(errors='replace').strip()})")
  # --stdout streams: the header's frame count is a placeholder, readframes stops at the end.
  with wave.open(io.BytesIO(run.stdout)) as w:
    rate, width, channels = w.getframerate(), w.getsampwidth(), w.getnchannels()
    pcm = w.readframes(w.getnframes())
  if width != 2 or channels != 1:
    raise ValueError(f"espeak-ng {voice!r}: expected 16-bit mono WAV, got {width * 8}-bit "
                     f"{channels} channels")
  x = np.frombuffer(pcm, "<i2").astype(np.float32) / 32768.0
  if rate != sample_rate:
    g = math.gcd(rate, sample_rate)
    x = resample_poly(x, sample_rate // g, rate // g).astype(np.float32)
  x = np.clip(x, -1.0, 1.0)
  x.setflags(write=False)   # shared by the cache
  return x


def speak(word: str, *, voice: str, speed: int, pitch: int,
          sample_rate: int = SAMPLE_RATE) -> np.ndarray:
  """`word` spoken by espeak-ng -> float32 [T] in [-1, 1] at sample_rate (espeak-ng's 22,050
  Hz resampled); T follows the word and the speed. Cached per (word, voice, speed, pitch)."""
  return _speak_cached(str(word), str(voice), int(speed), int(pitch), int(sample_rate)).copy()


def spoken_digit(label: int, rng: np.random.Generator, *, sample_rate: int = SAMPLE_RATE,
                 clip_seconds: float = CLIP_SECONDS) -> np.ndarray:
  """The word of digit `label` (digits.CLASS_NAMES) in a voice, speed and pitch drawn from
  rng, at a random offset in a clip of float32 [sample_rate * clip_seconds] in [-1, 1] (a
  longer word is cut), with white noise at an SNR drawn from SNR_DB. Same rng state, same
  clip."""
  if not 0 <= label < len(digits.CLASS_NAMES):
    raise ValueError(f"label={label} is not a digit (0..{len(digits.CLASS_NAMES) - 1})")
  length = int(round(sample_rate * clip_seconds))
  voice = VOICES[rng.integers(len(VOICES))]
  speed, pitch = int(rng.integers(SPEED[0], SPEED[1] + 1)), int(rng.integers(PITCH[0], PITCH[1] + 1))
  snr_db = rng.uniform(*SNR_DB)
  word = speak(digits.CLASS_NAMES[label], voice=voice, speed=speed, pitch=pitch,
               sample_rate=sample_rate)[:length]
  clip = np.zeros(length, np.float32)
  start = int(rng.integers(length - len(word) + 1))
  clip[start:start + len(word)] = word
  noise_rms = np.sqrt(np.mean(word.astype(np.float64) ** 2)) / 10 ** (snr_db / 20)
  clip += (noise_rms * rng.standard_normal(length)).astype(np.float32)
  return np.clip(clip, -1.0, 1.0)


def encode_wav(audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> bytes:
  """float32 [T] in [-1, 1] -> a 16-bit PCM mono WAV file's bytes (the stdlib wave module)."""
  audio = np.asarray(audio)
  if audio.ndim != 1:
    raise ValueError(f"audio {audio.shape} must be [T] (mono)")
  pcm = np.round(np.clip(audio, -1.0, 1.0) * 32767).astype("<i2")
  buf = io.BytesIO()
  with wave.open(buf, "wb") as w:
    w.setnchannels(1)
    w.setsampwidth(2)
    w.setframerate(sample_rate)
    w.writeframes(pcm.tobytes())
  return buf.getvalue()


def _spoken_sample(index: int, ex: dict, rng, sample_rate: int, clip_seconds: float) -> dict:
  """One digit example as a webdataset sample with its spoken word (KEY.wav)."""
  audio = spoken_digit(ex["label"], rng, sample_rate=sample_rate, clip_seconds=clip_seconds)
  return {"__key__": f"{index:06d}", "png": _png(np.asarray(ex["image"])), "txt": ex["text"],
          "cls": str(ex["label"]), "wav": encode_wav(audio, sample_rate)}


def write_spoken_shards(out: str, *, sizes: dict | None = None, shard_size: int = 500,
                        seed: int = digits.SEED, sample_rate: int = SAMPLE_RATE,
                        clip_seconds: float = CLIP_SECONDS) -> dict:
  """The digits' train / test splits (digits.split_examples) with spoken words, as webdataset
  shards written by webdataset's TarWriter: out/{split}/{k}.tar (and nshards.txt) and
  out/classnames.txt. A sample's members: png (the 32x32 image), txt (its caption), cls (its
  label), wav (spoken_digit of the label, 16-bit PCM mono at sample_rate). sizes: {split:
  the first n examples, None for all} (default: both whole splits). Sample i of a split draws
  its voice from seed, the split and i. Returns {split: [shard paths]}."""
  if shard_size < 1:
    raise ValueError(f"shard_size={shard_size} must be >= 1")
  _binary()   # fail before writing anything
  sizes = dict(SPLIT_SIZES if sizes is None else sizes)
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "classnames.txt"), "w") as f:
    f.write("\n".join(digits.CLASS_NAMES) + "\n")
  shards = {}
  for split, n in sizes.items():
    shards[split] = shard_writer.tar_split(os.path.join(out, split), (
        _spoken_sample(index, ex, np.random.default_rng([seed, len(split), i]), sample_rate,
                       clip_seconds)
        for i, (index, ex) in enumerate(itertools.islice(digits.split_examples(split), n))),
        shard_size=shard_size)
  return shards
