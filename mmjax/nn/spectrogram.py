"""Log-mel spectrograms in JAX: the audio front end (ImageBind-style audio towers).

Pure functions, jit-able, matching librosa's defaults: `mel_filterbank` is
`librosa.filters.mel(htk=False, norm='slaney')` transposed, and `log_mel` is the natural log of
`librosa.feature.melspectrogram(center=True, pad_mode='reflect', power=2.0, window='hann')`
(periodic Hann, win_length = n_fft), floored at `log_floor`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# Slaney's mel scale (librosa htk=False, the Auditory Toolbox): linear below 1 kHz, 200/3 Hz per
# mel, then logarithmic with 27 mels per factor 6.4 of frequency.
_F_SP = 200.0 / 3.0
_MIN_LOG_HZ = 1000.0
_MIN_LOG_MEL = _MIN_LOG_HZ / _F_SP
_LOGSTEP = np.log(6.4) / 27.0


def hz_to_mel(hz) -> np.ndarray:
  """Slaney mel of frequencies in Hz (any shape, float64)."""
  hz = np.asarray(hz, np.float64)
  log_part = _MIN_LOG_MEL + np.log(np.maximum(hz, _MIN_LOG_HZ) / _MIN_LOG_HZ) / _LOGSTEP
  return np.where(hz >= _MIN_LOG_HZ, log_part, hz / _F_SP)


def mel_to_hz(mel) -> np.ndarray:
  """Inverse of `hz_to_mel` (any shape, float64)."""
  mel = np.asarray(mel, np.float64)
  log_part = _MIN_LOG_HZ * np.exp(_LOGSTEP * (np.maximum(mel, _MIN_LOG_MEL) - _MIN_LOG_MEL))
  return np.where(mel >= _MIN_LOG_MEL, log_part, mel * _F_SP)


def mel_filterbank(n_mels: int, n_fft: int, sample_rate: float, f_min: float = 0.0,
                   f_max: float | None = None) -> np.ndarray:
  """[n_fft // 2 + 1, n_mels] float64: triangular mel filters over the rfft bins.

  Slaney mel scale and Slaney area normalisation (each triangle scaled by 2 / its width in Hz),
  librosa's defaults: `librosa.filters.mel(sr, n_fft, n_mels, fmin, fmax).T`. The filter edges
  are n_mels + 2 points evenly spaced in mel between f_min and f_max (default sample_rate / 2).
  A constant (NumPy), so under jit it is folded into the program.
  """
  if n_mels < 1 or n_fft < 2:
    raise ValueError(f"n_mels={n_mels} must be >= 1 and n_fft={n_fft} >= 2")
  f_max = sample_rate / 2.0 if f_max is None else float(f_max)
  if not 0.0 <= f_min < f_max <= sample_rate / 2.0:
    raise ValueError(f"f_min={f_min}, f_max={f_max}: need 0 <= f_min < f_max <= sample_rate / 2 "
                     f"= {sample_rate / 2.0}")
  bins_hz = np.linspace(0.0, sample_rate / 2.0, n_fft // 2 + 1)          # [f]
  edges = mel_to_hz(np.linspace(hz_to_mel(f_min), hz_to_mel(f_max), n_mels + 2))  # [m + 2]
  left, centre, right = edges[:-2], edges[1:-1], edges[2:]               # [m] each
  rising = (bins_hz[:, None] - left) / (centre - left)                   # [f, m]
  falling = (right - bins_hz[:, None]) / (right - centre)
  weights = np.maximum(0.0, np.minimum(rising, falling))
  return weights * (2.0 / (right - left))                                # Slaney area norm


def num_frames(length: int, *, n_fft: int = 400, hop: int = 160, center: bool = True) -> int:
  """Frames of a waveform of `length` samples: 1 + length // hop with center=True and an even
  n_fft (reflect padding of n_fft // 2 each side), else 1 + (length - n_fft) // hop."""
  padded = length + 2 * (n_fft // 2) if center else length
  return 1 + (padded - n_fft) // hop


def hann_window(n: int) -> np.ndarray:
  """[n] float64: the periodic Hann window (scipy's get_window('hann', n, fftbins=True))."""
  return 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n) / n)


def power_spectrogram(waveform: jax.Array, *, n_fft: int = 400, hop: int = 160,
                      center: bool = True, window: str | np.ndarray = "hann",
                      power: float = 2.0) -> jax.Array:
  """waveform [b, T] float -> |STFT|**power [b, frames, n_fft // 2 + 1] float32.

  Frames (see `num_frames`) are taken by one gather of [frames, n_fft] sample indices, no loop;
  window: 'hann' (periodic) or an array [n_fft]. power=2 is re**2 + im**2 (smooth at zero);
  other powers are that to power / 2, whose gradient is infinite at an exactly zero bin
  when power < 2.
  """
  if waveform.ndim != 2:
    raise ValueError(f"waveform must be [batch, samples]; got shape {waveform.shape}")
  if n_fft < 2 or hop < 1:
    raise ValueError(f"n_fft={n_fft} must be >= 2 and hop={hop} >= 1")
  length = waveform.shape[1]
  shortest = n_fft // 2 + 1 if center else n_fft
  if length < shortest:
    raise ValueError(f"waveform has {length} samples (shape {waveform.shape}); n_fft={n_fft} "
                     f"with center={center} needs at least {shortest}")
  win = hann_window(n_fft) if isinstance(window, str) and window == "hann" else window
  if isinstance(win, str) or np.shape(win) != (n_fft,):
    raise ValueError(f"window must be 'hann' or an array of shape ({n_fft},); got "
                     f"{window if isinstance(window, str) else np.shape(window)}")
  x = waveform.astype(jnp.float32)
  if center:
    x = jnp.pad(x, ((0, 0), (n_fft // 2, n_fft // 2)), mode="reflect")
  frames = num_frames(length, n_fft=n_fft, hop=hop, center=center)
  index = np.arange(frames)[:, None] * hop + np.arange(n_fft)[None, :]   # [frames, n_fft]
  spec = jnp.fft.rfft(x[:, index] * jnp.asarray(win, jnp.float32), axis=-1)
  magnitude2 = jnp.real(spec) ** 2 + jnp.imag(spec) ** 2
  return magnitude2 if power == 2.0 else magnitude2 ** (power / 2.0)


def log_mel(waveform: jax.Array, *, sample_rate: float = 16000, n_fft: int = 400, hop: int = 160,
            n_mels: int = 128, f_min: float = 0.0, f_max: float | None = None,
            center: bool = True, window: str | np.ndarray = "hann", power: float = 2.0,
            log_floor: float = 1e-10) -> jax.Array:
  """waveform [b, T] float -> log mel power [b, frames, n_mels] float32.

  The NATURAL log of max(mel power, log_floor) (not 10 * log10, librosa's power_to_db: that
  is this times 10 / ln 10, without power_to_db's top_db clipping). Mel power is the
  `power_spectrogram` (periodic Hann, reflect padding of n_fft // 2 each side when center)
  times `mel_filterbank` (Slaney scale and area normalisation), as librosa's
  melspectrogram with its defaults. frames = 1 + T // hop for center=True and an even n_fft.
  The filterbank matmul runs at HIGHEST precision (no TF32 / bf16 passes on accelerators).
  """
  spec = power_spectrogram(waveform, n_fft=n_fft, hop=hop, center=center, window=window,
                           power=power)
  bank = jnp.asarray(mel_filterbank(n_mels, n_fft, sample_rate, f_min, f_max), jnp.float32)
  mel = jnp.matmul(spec, bank, precision=jax.lax.Precision.HIGHEST)
  return jnp.log(jnp.maximum(mel, log_floor))
