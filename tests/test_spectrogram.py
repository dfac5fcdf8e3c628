"""mmjax.nn.spectrogram against librosa (float64) and against a float64 NumPy reference written
here (a loop over frames with np.fft.rfft, a loop over mel filters), on fresh seeded waveforms:
random noise and a sum of sines with noise, lengths not multiples of the hop.

Tolerances (float32 FFT and filterbank against float64). A float32 FFT's error in a bin is a
fraction of its whole frame's energy, so a band far below the frame's loudest has a large
relative error (a band 20 nats down on sines + noise: up to 3.2e-3 in the log). So, each ~10x the
worst seen over 20 seeds x 2 settings x {noise, sines + noise}:
- FRAME_RTOL: |mel power - librosa's| / the frame's largest mel power (worst 6.1e-7);
- LOG_ATOL: |log mel - librosa's| (the relative error of the power) in the bands within 40 dB of
  their frame's loudest (worst 3.9e-5; 1.7e-5 on noise).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.signal

from mmjax.nn import spectrogram as sp
from tests.reference import rel_err

librosa = pytest.importorskip("librosa")

FRAME_RTOL = 6e-6   # mel power error / the frame's largest mel power
LOG_ATOL = 4e-4     # natural log of the mel power within 40 dB of the frame's loudest band
POWER_RTOL = 1e-5   # ||got - want|| / ||want|| of the STFT power (tests/reference.py's float32 TOL)


# ---------------------------------------------------------------- float64 references

def _slaney_mel(hz):
  """One frequency -> Slaney mel, as Slaney's Auditory Toolbox writes it."""
  if hz < 1000.0:
    return hz * 3.0 / 200.0
  return 15.0 + np.log(hz / 1000.0) * 27.0 / np.log(6.4)


def _slaney_hz(mel):
  if mel < 15.0:
    return mel * 200.0 / 3.0
  return 1000.0 * 6.4 ** ((mel - 15.0) / 27.0)


def ref_filterbank(n_mels, n_fft, sr, f_min, f_max):
  """[n_fft // 2 + 1, n_mels] float64, one filter and one bin at a time."""
  lo, hi = _slaney_mel(f_min), _slaney_mel(f_max)
  edges = [_slaney_hz(lo + (hi - lo) * i / (n_mels + 1)) for i in range(n_mels + 2)]
  out = np.zeros((n_fft // 2 + 1, n_mels))
  for m in range(n_mels):
    a, c, b = edges[m], edges[m + 1], edges[m + 2]
    for k in range(n_fft // 2 + 1):
      f = k * sr / n_fft
      if a < f <= c:
        out[k, m] = (f - a) / (c - a)
      elif c < f < b:
        out[k, m] = (b - f) / (b - c)
    out[:, m] *= 2.0 / (b - a)   # Slaney: equal area
  return out


def ref_power(y, n_fft, hop, center):
  """|STFT|^2 [frames, n_fft // 2 + 1] of one float64 waveform, a loop over frames."""
  if center:
    y = np.pad(y, n_fft // 2, mode="reflect")
  window = scipy.signal.get_window("hann", n_fft, fftbins=True)   # periodic
  frames = []
  start = 0
  while start + n_fft <= len(y):
    frames.append(np.abs(np.fft.rfft(y[start:start + n_fft] * window)) ** 2)
    start += hop
  return np.array(frames)


def ref_log_mel(y, *, sr, n_fft, hop, n_mels, center=True, floor=1e-10):
  power = ref_power(np.asarray(y, np.float64), n_fft, hop, center)
  return np.log(np.maximum(power @ ref_filterbank(n_mels, n_fft, sr, 0.0, sr / 2), floor))


def librosa_log_mel(y, *, sr, n_fft, hop, n_mels, floor=1e-10):
  """[b, frames, n_mels] float64: librosa's melspectrogram of each row, natural log."""
  mel = [librosa.feature.melspectrogram(
      y=np.asarray(row, np.float64), sr=sr, n_fft=n_fft, hop_length=hop, n_mels=n_mels,
      center=True, pad_mode="reflect", power=2.0, htk=False, norm="slaney", dtype=np.float64).T
      for row in y]
  return np.log(np.maximum(np.stack(mel), floor))


def waveforms(rng, kind, b, length, sr):
  """[b, length] float64: white noise, or a few sines (random frequencies, phases, amplitudes)
  over a little noise, as a recording might look."""
  if kind == "noise":
    return rng.normal(size=(b, length)) * rng.uniform(0.1, 1.0, (b, 1))
  t = np.arange(length) / sr
  freqs = rng.uniform(50.0, 0.45 * sr, (b, 5, 1))
  amps = rng.uniform(0.05, 0.5, (b, 5, 1))
  phases = rng.uniform(0, 2 * np.pi, (b, 5, 1))
  return (amps * np.sin(2 * np.pi * freqs * t + phases)).sum(1) + 0.01 * rng.normal(
      size=(b, length))


# ---------------------------------------------------------------- the tests

@pytest.mark.parametrize("n_mels,n_fft,sr,f_min,f_max", [
    (128, 400, 16000, 0.0, None), (40, 512, 22050, 50.0, 8000.0), (80, 1024, 44100, 20.0, 18000.0),
    (64, 256, 8000, 300.0, 3400.0)])
def test_mel_filterbank_matches_loop_reference_and_librosa(n_mels, n_fft, sr, f_min, f_max):
  got = sp.mel_filterbank(n_mels, n_fft, sr, f_min, f_max)
  assert got.shape == (n_fft // 2 + 1, n_mels) and got.dtype == np.float64
  want = ref_filterbank(n_mels, n_fft, sr, f_min, sr / 2 if f_max is None else f_max)
  np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)
  theirs = librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels, fmin=f_min, fmax=f_max,
                               htk=False, norm="slaney", dtype=np.float64).T
  np.testing.assert_allclose(got, theirs, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("center", [True, False])
@pytest.mark.parametrize("n_fft,hop,length", [(400, 160, 3217), (256, 100, 2049), (64, 17, 301)])
def test_power_spectrogram_matches_a_loop_over_frames(rng, center, n_fft, hop, length):
  y = rng.normal(size=(2, length))
  got = np.asarray(sp.power_spectrogram(jnp.asarray(y, jnp.float32), n_fft=n_fft, hop=hop,
                                        center=center))
  want = np.stack([ref_power(row, n_fft, hop, center) for row in y])
  frames = 1 + length // hop if center else 1 + (length - n_fft) // hop
  assert got.shape == want.shape == (2, frames, n_fft // 2 + 1), (got.shape, want.shape)
  assert got.dtype == np.float32
  assert rel_err(got, want) < POWER_RTOL


@pytest.mark.parametrize("kind", ["noise", "sines"])
@pytest.mark.parametrize("sr,n_fft,hop,n_mels,length", [
    (16000, 400, 160, 128, 16037), (22050, 512, 128, 64, 11111)])
def test_log_mel_matches_librosa(rng, kind, sr, n_fft, hop, n_mels, length):
  y = waveforms(rng, kind, 3, length, sr)
  got = np.asarray(jax.jit(lambda w: sp.log_mel(w, sample_rate=sr, n_fft=n_fft, hop=hop,
                                                n_mels=n_mels))(jnp.asarray(y, jnp.float32)))
  want = librosa_log_mel(y, sr=sr, n_fft=n_fft, hop=hop, n_mels=n_mels)
  assert got.shape == want.shape == (3, 1 + length // hop, n_mels) and got.dtype == np.float32
  top = want.max(-1, keepdims=True)   # each frame's loudest band
  frame_err = (np.abs(np.exp(got) - np.exp(want)) / np.exp(top)).max()
  assert frame_err < FRAME_RTOL, frame_err
  near = want >= top - np.log(1e4)
  assert np.abs(got - want)[near].max() < LOG_ATOL, np.abs(got - want)[near].max()
  ours = np.stack([ref_log_mel(row, sr=sr, n_fft=n_fft, hop=hop, n_mels=n_mels) for row in y])
  np.testing.assert_allclose(ours, want, rtol=0, atol=1e-9)   # the two float64 references agree


def test_log_mel_floor_and_silence():
  """Silence is log(log_floor) everywhere (natural log), and the floor is the argument's."""
  out = sp.log_mel(jnp.zeros((1, 1000)), log_floor=1e-6)
  np.testing.assert_allclose(np.asarray(out), np.log(1e-6), rtol=1e-6)


def test_log_mel_gradient_matches_float64_finite_differences(rng):
  """d/dy sum(w * log_mel(y)) of a short signal (reflect padding included) against central
  differences of the float64 loop reference."""
  kw = dict(sr=8000, n_fft=64, hop=24, n_mels=12)
  y = waveforms(rng, "sines", 1, 203, kw["sr"])[0] + 0.1 * rng.normal(size=203)
  w = rng.normal(size=(1 + 203 // 24, 12))

  def f_jax(x):
    return jnp.sum(w * sp.log_mel(x[None], sample_rate=kw["sr"], n_fft=kw["n_fft"],
                                  hop=kw["hop"], n_mels=kw["n_mels"])[0])

  got = np.asarray(jax.jit(jax.grad(f_jax))(jnp.asarray(y, jnp.float32)))
  assert np.all(np.isfinite(got))
  eps = 1e-6
  want = np.empty_like(y)
  for i in range(len(y)):
    up, down = y.copy(), y.copy()
    up[i] += eps
    down[i] -= eps
    want[i] = (np.sum(w * ref_log_mel(up, **kw)) - np.sum(w * ref_log_mel(down, **kw))) / (2 * eps)
  assert rel_err(got, want) < 1e-5, rel_err(got, want)   # worst seen 5.3e-7 over 3 seeds


def test_log_mel_frames_and_jit():
  y = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32000)), jnp.float32)
  eager = sp.log_mel(y)
  assert eager.shape == (2, 201, 128) and sp.num_frames(32000) == 201
  np.testing.assert_allclose(np.asarray(jax.jit(sp.log_mel)(y)), np.asarray(eager), atol=1e-5)
  assert sp.num_frames(1000, n_fft=400, hop=160, center=False) == 1 + 600 // 160


@pytest.mark.parametrize("call,match", [
    (lambda: sp.log_mel(jnp.zeros(16000)), r"waveform must be \[batch, samples\]; got shape"),
    (lambda: sp.log_mel(jnp.zeros((1, 100))), "waveform has 100 samples"),
    (lambda: sp.log_mel(jnp.zeros((1, 300)), center=False), "needs at least 400"),
    (lambda: sp.log_mel(jnp.zeros((1, 1000)), window=np.ones(256)), r"window must be .*\(400,\)"),
    (lambda: sp.log_mel(jnp.zeros((1, 1000)), f_max=9000.0), "f_max=9000.0"),
])
def test_bad_arguments_are_one_line_value_errors(call, match):
  with pytest.raises(ValueError, match=match) as e:
    call()
  assert "\n" not in str(e.value)
