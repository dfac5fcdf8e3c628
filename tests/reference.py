"""What several test files share (not a test module): float64 NumPy references of the losses and
of attention, with hand-derived gradients, and the input builders the loss tests use.

Builders that draw random numbers take a NumPy Generator (the tests' `rng` fixture).
`assert_close` is the one comparison with a float64 reference, to the tolerance `TOL` of the
compute dtype; for bf16 results, `assert_one_bf16_rounding` compares element by element with a
float64 model of where the code rounds (the end of the file).
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


# ---------------------------------------------------------------- bf16: one rounding of float64
# The bf16 paths compute in float32 (bf16 operands, float32 accumulation) and round to bf16 where
# the code says so. The checks below compare with float64 on the same (bf16-exact) inputs, the
# code's deliberate roundings to bf16 modelled in the reference, element by element: a result
# rounded once to bf16 from a float32 value within `err` of the float64 one is within
# err + half an ulp of it. A rounding too many (bf16 accumulation, a bf16 partial sum, a bf16
# operand where float32 was due) moves most elements by up to half an ulp more, and fails.

U32 = 2.0 ** -24   # float32's unit round-off


def bf16_round(x):
  """float64 values rounded to the nearest bfloat16 (8 significant bits, ties to even), as
  float64 (directly, not through float32, which would round twice)."""
  m, e = np.frexp(np.asarray(x, np.float64))
  return np.ldexp(np.rint(np.ldexp(m, 8)), e - 8)


def bf16_half_ulp(a):
  """Half the spacing of the bfloat16 numbers around |a|: the most rounding to bf16 moves a
  value of that size (0 at 0)."""
  a = np.abs(np.asarray(a, np.float64))
  _, e = np.frexp(a)
  return np.where(a > 0, np.ldexp(1.0, e - 9), 0.0)


def bf16_slack(x, err):
  """How far the bf16 rounding of a float32 value within `err` of x can be from bf16_round(x):
  0 unless x is within err of a rounding boundary (then one bf16 ulp)."""
  r = bf16_round(x)
  return np.maximum(np.abs(bf16_round(x + err) - r), np.abs(bf16_round(x - err) - r))


def rounded_product(spec, a, a_err, b):
  """The float64 model of `a` computed in float32 (within a_err), rounded to bf16, and multiplied
  by b (bf16-exact) with float32 accumulation: (einsum(spec, bf16_round(a), b), the error bound
  of the float32 product: a's possible other roundings (bf16_slack) times |b|, plus float32
  accumulation of k terms, 2 k U32 |a| . |b| as in tests/test_precision.py)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  ar = bf16_round(a)
  ins, out = spec.split("->")
  sizes = {c: n for s_, x in zip(ins.split(","), (ar, b)) for c, n in zip(s_, x.shape)}
  k = int(np.prod([n for c, n in sizes.items() if c not in out]))
  err = (np.einsum(spec, bf16_slack(a, a_err), np.abs(b))
         + 2 * k * U32 * np.einsum(spec, np.abs(ar), np.abs(b)))
  return np.einsum(spec, ar, b), err


def assert_one_bf16_rounding(got, want, err, *, name=""):
  """got, a bf16 array, is float64 `want` rounded once to bf16 from a float32 value within
  `err` (per element, or one number) of it: |got - want| <= err + bf16_half_ulp(|want| + err)
  everywhere."""
  assert jnp.asarray(got).dtype == jnp.bfloat16, f"{name}: dtype {jnp.asarray(got).dtype}"
  got = np.asarray(jnp.asarray(got).astype(jnp.float32), np.float64)
  want = np.asarray(want, np.float64)
  assert got.shape == want.shape, f"{name}: shape {got.shape}, want {want.shape}"
  err = np.broadcast_to(np.asarray(err, np.float64), want.shape)
  bound = err + bf16_half_ulp(np.abs(want) + err)
  diff = np.abs(got - want)
  bad = diff > bound
  if bad.any():
    ratio = np.where(bad, diff / np.maximum(bound, np.finfo(np.float64).tiny), 0.0)
    w = np.unravel_index(np.argmax(ratio), ratio.shape)
    raise AssertionError(
        f"{name}: {int(bad.sum())} of {bad.size} elements beyond one bf16 rounding; worst at {w}: "
        f"got {got[w]:.6g}, want {want[w]:.6g}, |error| {diff[w]:.3g} > bound {bound[w]:.3g} "
        f"({ratio[w]:.3g}x)")


def bf16_grid_inputs(n, d, rng, scale=None, bias=None):
  """`inputs` as bf16 embeddings on the grid of multiples of 2^-12 (every bf16 number above 2^-5
  in size is on it), rows of norm < 1: then every partial sum of a dot product of two rows is a
  multiple of 2^-24 below 1 in size, exact in float32 in any order, so the logits' only float32
  error is the scale's rounding. Returns (img bf16, txt bf16, scale, bias, img float64,
  txt float64), the float64 arrays the exact values."""
  x, y, s, b = inputs(n, d, rng, scale, bias)
  exact = [bf16_round(np.round(0.99 * np.asarray(a, np.float64) * 4096) / 4096) for a in (x, y)]
  assert (np.abs(exact[0]) @ np.abs(exact[1]).T).max() < 1
  return (*(jnp.asarray(a, jnp.bfloat16) for a in exact), s, b, *exact)


def bf16_loss_dlogits(name, x, y, s, b=0.0):
  """float64 dL/dlogits of clip_loss / siglip_loss on the exact embeddings of bf16_grid_inputs,
  as the code computes it in float32: a list of (G, eG) terms summing to it (CLIP: the row
  softmax's and the column softmax's; SigLIP: one), eG a first-order bound on the float32
  error of G (from the exact dots, the scale's rounding, float32 log-sum-exps or sigmoids),
  with a factor 2 to spare."""
  n, d = x.shape
  dots = x @ y.T
  if name == "clip":
    z = s * dots
    ez = U32 * np.abs(z)                                  # the scale's rounding
    eye = np.eye(n)
    terms = []
    for axis in (1, 0):
      lse = np.expand_dims(_logsumexp(z, axis), axis)
      p = np.exp(z - lse)
      # a log-sum-exp's error: the softmax-weighted logit errors, its n-term sum, its roundings
      e_lse = ((p * ez).sum(axis, keepdims=True) + (2 * n + 16) * U32 + 4 * U32 * np.abs(lse))
      terms.append((0.5 / n * (p - eye),
                    1.0 / n * (p * (ez + e_lse + U32 * np.abs(z - lse)) + 8 * U32 * (p + eye))))
    return terms
  z = s * dots + b
  ez = U32 * (np.abs(s * dots) + np.abs(z))
  sign = 2 * np.eye(n) - 1
  G = -sign / n / (1 + np.exp(sign * z))
  return [(G, 2 * np.abs(G) * (ez + 8 * U32))]            # d log sigmoid / dz is at most 1


def bf16_scaled_product(spec, G, eG, other, s, *, rounded):
  """(want, err) of s * einsum(spec, G, other) computed in float32 from G (within eG), rounded
  to bf16 first if `rounded` (rounded_product), with float32 accumulation; before the result's
  own rounding."""
  k = G.shape[0]
  if rounded:
    want, err = rounded_product(spec, G, eG, other)
    mag = np.einsum(spec, np.abs(bf16_round(G)), np.abs(other))
  else:
    want, mag = np.einsum(spec, G, other), np.einsum(spec, np.abs(G), np.abs(other))
    err = np.einsum(spec, eG, np.abs(other)) + 2 * k * U32 * mag
  return s * want, s * err * (1 + 4 * U32) + 4 * U32 * s * mag   # s's roundings


def ref_bf16_loss_grads(name, x, y, s, b=0.0, *, rounded):
  """float64 models of the bf16 embedding gradients (d_img, d_txt) of clip_loss / siglip_loss on
  bf16_grid_inputs, each a (want, err) pair for assert_one_bf16_rounding: d_img = s * G @ txt,
  d_txt = s * G^T @ img with G = dL/dlogits (bf16_loss_dlogits) in float32, float32
  accumulation, rounded once to bf16. `rounded`: G is rounded to bf16 before the products
  (the tiled and Pallas blocks and the ring steps: mmjax/logit_tiles.py dot_nn, dot_tn), else
  not (the dense loss under autodiff: a float32 G times the bf16 operand)."""
  terms = bf16_loss_dlogits(name, x, y, s, b)
  G, eG = sum(t[0] for t in terms), sum(t[1] for t in terms)
  return tuple(bf16_scaled_product(spec, G, eG, other, s, rounded=rounded)
               for spec, other in (("ij,jd->id", y), ("ij,id->jd", x)))
