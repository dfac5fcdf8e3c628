"""mmjax.models.audio: the AudioViT's shapes and patch count against a NumPy count, its overlapping
patch embedding against a float64 NumPy im2col, jit, and the one-line errors of its config."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.models import audio
from mmjax.nn.spectrogram import log_mel
from tests.reference import TOL, rel_err

# A small tower over a non-square spectrogram: 0.55 s at 16 kHz -> 56 frames x 40 mels.
SMALL = dict(variant="mu/16", clip_seconds=0.55, n_mels=40)


def _numpy_patch_count(frames, mels, patch, stride):
  """Patches whose whole 16x16 window lies inside the spectrogram, by enumerating their corners."""
  rows = [r for r in range(frames) if r + patch[0] <= frames and r % stride[0] == 0]
  cols = [c for c in range(mels) if c + patch[1] <= mels and c % stride[1] == 0]
  return len(rows) * len(cols)


def _init(model, b=2, rng=None):
  t = audio.clip_samples(model.sample_rate, model.clip_seconds)
  wav = (rng or np.random.default_rng(0)).normal(size=(b, t)).astype(np.float32)
  return wav, model.init(jax.random.key(0), jnp.asarray(wav))


@pytest.mark.parametrize("pool_type", ["map", "gap", "tok"])
def test_output_shapes_non_square_spectrogram(rng, pool_type):
  model = audio.Model(**SMALL, pool_type=pool_type)
  wav, params = _init(model, 3, rng)
  pooled, out = model.apply(params, jnp.asarray(wav))
  n = audio.num_patches(audio.config(**SMALL))
  assert audio.patch_grid(audio.config(**SMALL)) == (5, 3)   # (56 - 16) // 10 + 1, (40 - 16) // 10 + 1
  assert pooled.shape == (3, 32) and pooled.dtype == jnp.float32
  assert out["encoded"].shape == (3, n + (pool_type == "tok"), 32)
  assert params["params"]["embedding"]["kernel"].shape == (16, 16, 1, 32)
  assert params["params"]["pos_embedding"].shape == (1, n, 32)
  assert np.all(np.isfinite(np.asarray(pooled)))


@pytest.mark.parametrize("fields", [
    {}, dict(clip_seconds=0.55, n_mels=40), dict(clip_seconds=1.0, n_mels=64, hop=100),
    dict(clip_seconds=0.5, n_mels=80, patch_size=12, patch_stride=(6, 8)),
    dict(clip_seconds=0.5, n_mels=64, patch_stride=16)])
def test_num_patches_matches_a_numpy_count(fields):
  f = audio.config("Ti/16", **fields)
  sr, secs = f.get("sample_rate", 16000), f.get("clip_seconds", 2.0)
  hop = f.get("hop", 160)
  t = int(round(sr * secs))
  frames = len(range(0, t + 1, hop))   # centred frames: one per hop start in [0, T]
  want = _numpy_patch_count(frames, f.get("n_mels", 128), f["patch_size"],
                            f.get("patch_stride", (10, 10)))
  assert audio.num_patches(f) == want
  if not fields:
    assert want == 19 * 12 == 228   # ImageBind's audio token count


def test_patch_embedding_matches_numpy_im2col(rng):
  """The 'embedding' Conv's output [b, h, w, width] on random weights and bias, against im2col of
  the normalised log-mel image in float64: overlapping 16x16 windows at stride 10."""
  model = audio.Model(**SMALL, mean=-3.0, std=5.0)
  wav, params = _init(model, 2, rng)
  params = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
  _, state = model.apply(params, jnp.asarray(wav), capture_intermediates=True)
  got = np.asarray(state["intermediates"]["embedding"]["__call__"][0])
  image = (np.asarray(log_mel(jnp.asarray(wav), n_mels=40), np.float64) + 3.0) / 5.0
  kernel = np.asarray(params["params"]["embedding"]["kernel"], np.float64)   # [16, 16, 1, d]
  bias = np.asarray(params["params"]["embedding"]["bias"], np.float64)
  h, w = audio.patch_grid(audio.config(**SMALL))
  cols = np.stack([np.stack([image[:, 10 * i:10 * i + 16, 10 * j:10 * j + 16].reshape(2, -1)
                             for j in range(w)], 1) for i in range(h)], 1)    # [b, h, w, 256]
  want = cols @ kernel.reshape(256, -1) + bias
  assert got.shape == want.shape == (2, h, w, 32)
  assert rel_err(got, want) < TOL["float32"], rel_err(got, want)


def test_jit_matches_eager(rng):
  model = audio.Model(**SMALL)
  wav, params = _init(model, 2, rng)
  eager, out = model.apply(params, jnp.asarray(wav))
  jitted, jout = jax.jit(model.apply)(params, jnp.asarray(wav))
  np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(jout["encoded"]), np.asarray(out["encoded"]),
                             rtol=1e-5, atol=1e-5)


def test_wrong_length_waveform_is_one_value_error_line():
  model = audio.Model(**SMALL)
  wav, params = _init(model)
  with pytest.raises(ValueError, match=r"sample_rate \* clip_seconds.*16000 \* 0.55 = 8800") as e:
    model.apply(params, jnp.zeros((2, 8000)))
  assert "\n" not in str(e.value) and "(2, 8000)" in str(e.value)


@pytest.mark.parametrize("fields,match", [
    (dict(variant="Q/16"), "^variant: Unknown ViT variant"),
    (dict(variant="mu/16", n_mel=40), "^n_mel: not an AudioViT field"),
    (dict(variant="mu/16", pool_type="none"), "^pool_type='none' is not one of"),
    (dict(variant="mu/16", clip_seconds=0.1), "^patch_size: .* larger than the spectrogram"),
    (dict(variant="mu/16", clip_seconds=1 / 3), "^clip_seconds: "),
    (dict(variant="mu/16", patch_stride=0), "^patch_stride=0 must be positive"),
])
def test_config_errors_name_the_field(fields, match):
  with pytest.raises(ValueError, match=match) as e:
    audio.config(**fields)
  assert "\n" not in str(e.value)
