"""What several test files share (not a test module): float64 NumPy references of the losses and
of attention, with hand-derived gradients, and the input builders the loss tests use.

Builders that draw random numbers take a NumPy Generator (the tests' `rng` fixture).
`assert_close` is the one comparison with a float64 reference, to the tolerance `TOL` of the
compute dtype.
"""

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.losses import clip_loss, siglip_loss

# ---------------------------------------------------------------- comparison

# Relative error ||got - want|| / ||want|| (each whole array, want in float64) allowed per
# compute dtype, about 3x the worst seen over 20 seeds of every float64 check of the losses
# (dense, tiled, pallas, gather/ring/ring_bidir; values and gradients; the extreme scales):
# float32 3.2e-6 (tiled CLIP at scale 100, d_img), bfloat16 3.2e-3 (gradients rounded to
# bf16). Both reject a 2% error (tests/test_tolerances.py).
TOL = {"float32": 1e-5, "bfloat16": 1e-2}


def rel_err(got, want, scale=0.0):
  """||got - want|| / max(||want||, scale) over the whole array."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  err = float(np.linalg.norm((got - want).ravel()))
  den = max(float(np.linalg.norm(want.ravel())), float(scale))
  return err / den if den else (0.0 if err == 0 else np.inf)


def assert_close(got, want, *, dtype, name="", scale=0.0):
  """Each leaf of `got` within TOL[dtype] relative error (`rel_err`) of the same leaf of `want`.

  dtype: the dtype `got` was computed in; name: a label, or one per leaf; scale: a number, or
  one per leaf, below which ||want|| does not measure the round-off: where want is 0 (CLIP
  with one pair: pass its logit scale) or a cancelling sum (d_scale, d_bias: `term_sizes`).
  """
  tol = TOL[jnp.dtype(dtype).name]
  flat, wants = jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)
  assert len(flat) == len(wants), f"{name}: {len(flat)} arrays, want {len(wants)}"
  names = ([f"{name}{jax.tree_util.keystr(p)}" for p, _ in flat] if isinstance(name, str)
           else list(name))
  scales = [scale] * len(wants) if np.ndim(scale) == 0 else list(scale)
  assert len(names) == len(scales) == len(wants), "one name and scale per array"
  for label, (_, g), w, sc in zip(names, flat, wants, scales):
    assert np.shape(g) == np.shape(w), f"{label}: shape {np.shape(g)}, want {np.shape(w)}"
    err = rel_err(g, w, sc)
    assert err <= tol, (f"{label}: relative error {err:.3g} > tol {tol:.3g} "
                        f"({jnp.dtype(dtype).name})")


# ---------------------------------------------------------------- float64 references


def _logsumexp(x, axis):
  m = x.max(axis=axis, keepdims=True)
  return (m + np.log(np.exp(x - m).sum(axis=axis, keepdims=True))).squeeze(axis)


def _softmax(x, axis):
  e = np.exp(x - x.max(axis=axis, keepdims=True))
  return e / e.sum(axis=axis, keepdims=True)


def _log_sigmoid(x):
  return -np.logaddexp(0.0, -x)


def ref_clip(x, y, s):
  """float64 loss and (dx, dy, ds) with hand-derived gradients."""
  loss, g, dots = _clip(x, y, s)
  return loss, (s * g @ y, s * g.T @ x, np.sum(g * dots))


def _clip(x, y, s):
  """loss, dL/dz and the dots."""
  n = x.shape[0]
  dots = x @ y.T
  z = s * dots
  d = np.diag(z)
  loss = 0.5 * (np.mean(_logsumexp(z, 1) - d) + np.mean(_logsumexp(z, 0) - d))
  return loss, 0.5 / n * (_softmax(z, 1) + _softmax(z, 0) - 2 * np.eye(n)), dots


def ref_siglip(x, y, s, b):
  """float64 loss and (dx, dy, ds, db) with hand-derived gradients."""
  loss, g, dots = _siglip(x, y, s, b)
  return loss, (s * g @ y, s * g.T @ x, np.sum(g * dots), np.sum(g))


def _siglip(x, y, s, b):
  """loss, dL/dz and the dots."""
  n = x.shape[0]
  dots = x @ y.T
  z = s * dots + b
  sign = 2 * np.eye(n) - 1
  loss = -np.sum(_log_sigmoid(sign * z)) / n
  return loss, -sign / n / (1 + np.exp(sign * z)), dots  # d/dz of -log sigmoid(sign*z) / n


def term_sizes(name, x, y, s, b=0.0):
  """Per gradient of ref_clip / ref_siglip, the sum of its terms' sizes: for d_scale and
  d_bias, sums of n^2 terms that may cancel, what their round-off scales with; 0 (unused)
  for the embeddings'. The `scale` of assert_close."""
  # d_scale = sum_ij g_ij <x_i, y_j>: n^2 d products, each dot itself a sum that may cancel
  # (near-orthogonal pairs; seed 12 gave 1.02e-5 against |g . dots| with n=1), so its size is
  # sum_ij |g_ij| <|x_i|, |y_j|>.
  sizes = np.abs(x) @ np.abs(y).T
  if name == "clip":
    _, g, _ = _clip(x, y, s)
    return (0.0, 0.0, float((np.abs(g) * sizes).sum()))
  _, g, _ = _siglip(x, y, s, b)
  return (0.0, 0.0, float((np.abs(g) * sizes).sum()), float(np.abs(g).sum()))


def ref_infonce(q, k, s):
  """float64 InfoNCE (query i's positive is key i) and (dq, dk)."""
  n = q.shape[0]
  z = s * q @ k.T
  loss = np.mean(_logsumexp(z, 1) - np.diag(z))
  g = (_softmax(z, 1) - np.eye(n)) / n  # dL/dz
  return loss, (s * g @ k, s * g.T @ q)


def ref_attention(q, k, v, w, visible):
  """float64 out and (dq, dk, dv) of sum(out * w); layout [b, n, h, d]; visible: bool [b, lq, lk].

  Grouped heads: query head h reads kv head h // g. Rows that see no key give 0.
  """
  g = q.shape[2] // k.shape[2]
  ke, ve = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
  scale = q.shape[-1] ** -0.5
  vis = visible[:, None]                                      # [b, 1, lq, lk]
  s = np.where(vis, np.einsum("bqhd,bkhd->bhqk", q, ke) * scale, -np.inf)
  m = np.max(s, -1, keepdims=True)
  p = np.where(vis, np.exp(s - np.where(np.isfinite(m), m, 0)), 0.0)
  p = p / np.maximum(p.sum(-1, keepdims=True), 1e-300)
  out = np.einsum("bhqk,bkhd->bqhd", p, ve)
  dp = np.einsum("bqhd,bkhd->bhqk", w, ve)
  ds = p * (dp - (dp * p).sum(-1, keepdims=True))
  dq = np.einsum("bhqk,bkhd->bqhd", ds, ke) * scale
  fold = lambda x: x.reshape(x.shape[0], x.shape[1], k.shape[2], g, -1).sum(3)
  dk = fold(np.einsum("bhqk,bqhd->bkhd", ds, q) * scale)
  dv = fold(np.einsum("bhqk,bqhd->bkhd", p, w))
  return out, (dq, dk, dv)


# ---------------------------------------------------------------- inputs


def normed(rng, n, d):
  """[n, d] float64 rows of unit norm."""
  x = rng.normal(size=(n, d))
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def as_dtype(x, dtype):
  """The array in `dtype`, and its exact float64 value (what the reference sees)."""
  a = jnp.asarray(x, dtype)
  return a, np.asarray(a.astype(jnp.float32), np.float64)


def inputs(n, d, rng, scale=None, bias=None):
  """float32 (img, txt, scale, bias) for a loss: related unit-norm pairs, moderate logits
  (scale and bias drawn unless given)."""
  x, y = rng.normal(size=(2, n, d))
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  y /= np.linalg.norm(y, axis=1, keepdims=True)
  y = 0.3 * x + 0.7 * y   # related pairs, so the loss is not at chance
  y /= np.linalg.norm(y, axis=1, keepdims=True)
  # Moderate logits: a saturated softmax has gradients at f32 round-off level,
  # where any two summation orders differ by more than rtol 1e-5.
  return (jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32),
          jnp.float32(rng.uniform(1, 10) if scale is None else scale),
          jnp.float32(rng.uniform(-5, 0) if bias is None else bias))


# Extreme but real (name, scale, bias): CLIP's learned scale (clamped at 100), SigLIP's init
# (t' = log 10, b = -10), and SigLIP saturated at scale 100.
EXTREMES = [("clip", 100.0, 0.0), ("siglip", 10.0, -10.0), ("siglip", 100.0, -10.0)]


# Both references and both losses with one signature (x, y, scale, bias, **kw); CLIP ignores
# the bias (its gradients: (d_img, d_txt, d_scale); SigLIP's add d_bias).
REFS = {"clip": lambda x, y, s, b: ref_clip(x, y, s), "siglip": ref_siglip}
LOSSES = {"clip": lambda x, y, s, b, **kw: clip_loss(x, y, s, **kw),
          "siglip": lambda x, y, s, b, **kw: siglip_loss(x, y, s, b, **kw)}


def dense(name, x, y, s, b):
  """The default (dense) loss `name` and its gradients wrt (x, y, s, b)."""
  return jax.value_and_grad(lambda *a: LOSSES[name](*a), argnums=(0, 1, 2, 3))(x, y, s, b)


def make_mesh(shape, names):
  """A mesh of Auto axes over the (8 simulated CPU) devices."""
  return jax.make_mesh(shape, names, axis_types=(jax.sharding.AxisType.Auto,) * len(names))
