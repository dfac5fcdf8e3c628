"""bf16 paths of the losses and of attention against float64 on the same bf16 inputs, element by
element: each bf16 result is one rounding of a float32 value whose error is bounded from where
the code computes in float32 and rounds to bf16 on purpose (tests/reference.py,
assert_one_bf16_rounding). Inputs are bf16 numbers on a fixed-point grid, so dot products of
inputs are exact in float32 and the bound is not swamped by their worst-case error. A rounding
the code should not make (bf16 accumulation across tiles, blocks or devices, a bf16 partial sum,
a dropped float32 upcast, a scale applied in bf16) moves many elements past the bound; a 2%
(or 1%) relative comparison lets all of these through.

XLA:CPU keeps a bf16 dot's float32 result where a float32 consumer follows (excess precision), so
a dot that lost preferred_element_type=float32 computes the same numbers here: a jaxpr check
catches that. The one-device tiled and Pallas losses in bf16 are checked the same way in
tests/test_tiled_losses.py; "auto" attention is compared bit for bit with the impl it picks in
tests/test_attention_auto.py.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from mmjax.nn.attention import dot_product_attention
from mmjax.nn.blockwise import blockwise_attention
from mmjax.pallas.flash_attention import flash_attention
from tests.reference import (LOSSES, REFS, U32, assert_close, assert_one_bf16_rounding,
                             bf16_grid_inputs, bf16_half_ulp, bf16_loss_dlogits, bf16_round,
                             bf16_scaled_product, make_mesh, ref_bf16_loss_grads,
                             rounded_product, term_sizes)

# ---------------------------------------------------------------- the check itself


def test_bf16_round_is_the_float32_to_bf16_cast(rng):
  """bf16_round (float64 in) rounds as jax's float32 -> bf16 cast, ties to even included."""
  x = rng.normal(size=4000) * np.exp(rng.uniform(-20, 20, size=4000))
  ties = bf16_round(x[:1000]) + np.ldexp(1.0, np.frexp(bf16_round(x[:1000]))[1] - 9)
  x = np.concatenate([x, ties]).astype(np.float32)
  want = np.asarray(jnp.asarray(x).astype(jnp.bfloat16).astype(jnp.float32), np.float64)
  np.testing.assert_array_equal(bf16_round(x.astype(np.float64)), want)


def test_one_rounding_check_accepts_one_rounding_and_rejects_two(rng):
  """A float32 operand rounded to bf16 times a bf16 operand, float32 accumulation, rounded once
  to bf16 (what the tiles and attention blocks do) passes the model of rounded_product; the
  same product accumulated over 4 blocks in bf16, with its 4 block products rounded to bf16
  before a float32 sum, or without rounding the float32 operand fails it."""
  a = rng.random((48, 64)) / 64                       # probabilities, a gradient tile, ...
  b = bf16_round(rng.normal(size=(64, 40)))
  a32 = jnp.asarray(a, jnp.float32)
  want, err = rounded_product("ij,jd->id", a, np.abs(a32 - a), b)
  bb = jnp.asarray(b, jnp.bfloat16)

  def dot(lhs, rhs):
    return jax.lax.dot_general(lhs, rhs, (((1,), (0,)), ((), ())),
                               preferred_element_type=jnp.float32)
  once = dot(a32.astype(jnp.bfloat16), bb)
  assert_one_bf16_rounding(once.astype(jnp.bfloat16), want, err, name="once")
  parts = [dot(a32[:, i:i + 16].astype(jnp.bfloat16), bb[i:i + 16]) for i in range(0, 64, 16)]
  acc = jnp.zeros((48, 40), jnp.bfloat16)
  for p in parts:
    acc = (acc.astype(jnp.float32) + p).astype(jnp.bfloat16)
  rounded_parts = sum(p.astype(jnp.bfloat16).astype(jnp.float32) for p in parts)
  unrounded = dot(a32, bb.astype(jnp.float32))
  for name, bad in [("bf16 accumulation", acc), ("bf16 partials", rounded_parts),
                    ("no operand rounding", unrounded)]:
    with pytest.raises(AssertionError, match="beyond one bf16 rounding"):
      assert_one_bf16_rounding(jnp.asarray(bad).astype(jnp.bfloat16), want, err, name=name)


# ---------------------------------------------------------------- losses

def _sharded(name, impl, blocks, **kw):
  """Loss + grad of `impl` on 8 devices (shard_map over the batch)."""
  mesh = make_mesh((8,), ("data",))

  def local(x, y, s, b):
    return LOSSES[name](x, y, s, b, impl=impl, blocks=blocks, axis_name="data", **kw)
  f = jax.shard_map(local, mesh=mesh, in_specs=(P("data"), P("data"), P(), P()), out_specs=P())
  return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3)))


def _global(name):
  return jax.jit(jax.value_and_grad(lambda *a: LOSSES[name](*a), argnums=(0, 1, 2, 3)))


# (name, impl, blocks): the dense loss under autodiff (a float32 G times bf16 embeddings), and
# the rings, whose steps round G to bf16 and accumulate in float32 across steps and devices.
# The tiled and Pallas blocks on one device: tests/test_tiled_losses.py.
LOSS_CASES = [("clip", "global", "dense"), ("siglip", "global", "dense"),
              ("clip", "ring", "dense"), ("siglip", "ring", "dense"),
              ("clip", "ring", "tiled"), ("siglip", "ring_bidir", "tiled")]


@pytest.mark.parametrize("name,impl,blocks", LOSS_CASES)
def test_loss_gradients_are_one_rounding_of_float64(name, impl, blocks, rng):
  """bf16 embeddings: the loss and d_scale, d_bias (float32) within the float32 tolerance of
  float64, and d_img, d_txt one bf16 rounding of the float64 model (ref_bf16_loss_grads); 8
  devices x 13 rows, tiled ring steps in tiles of 8 (2 x 2)."""
  x, y, s, b, x64, y64 = bf16_grid_inputs(8 * 13, 24, rng)
  if impl == "global":
    f = _global(name)
  else:
    f = _sharded(name, impl, blocks, **({"block": 8} if blocks == "tiled" else {}))
  loss, grads = f(x, y, s, b)
  s, b = float(s), float(b)
  for got, (want, err), label in zip(grads[:2], ref_bf16_loss_grads(
      name, x64, y64, s, b, rounded=impl != "global"), ("d_img", "d_txt")):
    assert_one_bf16_rounding(got, want, err, name=f"{name} {impl} {blocks} {label}")
  _assert_float32_results_match(name, loss, grads, x64, y64, s, b)


def _assert_float32_results_match(name, loss, grads, x64, y64, s, b):
  """The loss, d_scale and d_bias (float32 whatever the embeddings) within the float32
  tolerance of float64."""
  ref_loss, ref_grads = REFS[name](x64, y64, s, b)
  assert_close(loss, ref_loss, dtype=jnp.float32, name="loss")
  k = len(ref_grads)
  assert_close(grads[2:k], ref_grads[2:], dtype=jnp.float32, name=("d_scale", "d_bias")[:k - 2],
               scale=term_sizes(name, x64, y64, s, b)[2:])


def _gather_model(name, x, y, s, b, devices):
  """(want, err) of d_img and d_txt of impl="gather" on `devices` devices, before the final
  rounding (assert_one_bf16_rounding adds it). Autodiff through the gather: each device's part
  of a gradient is a float32 product (G unrounded) rounded to bf16, since the transposes of its
  dots take the bf16 operand's dtype; the all_gather's transpose, a reduce-scatter of bf16,
  sums the devices' parts, and CLIP adds the owner's direct part, in bf16. So each part's
  rounding and all but the last of the sums' roundings are in err: k parts give up to
  2k - 1 roundings, not one. CLIP: the image-to-text logits give d_img directly (row softmax)
  and d_txt in parts, the text-to-image ones the other way round; SigLIP: d_img directly,
  d_txt in parts."""
  terms = bf16_loss_dlogits(name, x, y, s, b)
  rows = np.split(np.arange(x.shape[0]), devices)
  product = functools.partial(bf16_scaled_product, s=s, rounded=False)
  G, eG = terms[0]
  d_img = [product("ij,jd->id", G, eG, y)]                           # direct
  d_txt = [product("ij,id->jd", G[r], eG[r], x[r]) for r in rows]     # each device's part
  if name == "clip":
    G, eG = terms[1]
    d_txt.append(product("ij,id->jd", G, eG, x))
    d_img += [product("ij,jd->id", G[:, r], eG[:, r], y[r]) for r in rows]
  return _sum_of_rounded(d_img), _sum_of_rounded(d_txt)


def _sum_of_rounded(parts):
  """(want, err) of a sum of parts, each (want, err) a float32 value rounded to bf16, summed in
  bf16 in any order, before the last rounding: each part's rounding and all but one of the
  sums' roundings (each at most half an ulp of the sum of the parts' sizes) in err."""
  if len(parts) == 1:
    return parts[0]
  size = sum(np.abs(w) + e for w, e in parts)
  return (sum(w for w, _ in parts), sum(e + bf16_half_ulp(np.abs(w) + e) for w, e in parts)
          + (len(parts) - 2) * bf16_half_ulp(size))


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_gather_gradients_round_each_device_part(name, rng):
  """impl="gather" (8 devices x 13 rows, bf16 embeddings): the loss, d_scale, d_bias as above;
  the embedding gradients within the roundings _gather_model counts (one per device's part and
  per bf16 sum) and, for the gathered tower, not one rounding of float64 (the other impls'
  accuracy, above): its devices' parts are rounded to bf16 before their sum."""
  x, y, s, b, x64, y64 = bf16_grid_inputs(8 * 13, 24, rng)
  loss, grads = _sharded(name, "gather", "dense")(x, y, s, b)
  s, b = float(s), float(b)
  _assert_float32_results_match(name, loss, grads, x64, y64, s, b)
  for got, (want, err), label in zip(grads[:2], _gather_model(name, x64, y64, s, b, 8),
                                     ("d_img", "d_txt")):
    assert_one_bf16_rounding(got, want, err, name=f"{name} gather {label}")
  want, err = ref_bf16_loss_grads(name, x64, y64, s, b, rounded=False)[1]
  with pytest.raises(AssertionError, match="beyond one bf16 rounding"):
    assert_one_bf16_rounding(grads[1], want, err, name=f"{name} gather d_txt")


# ---------------------------------------------------------------- attention

def _grid(rng, shape):
  """Normal numbers that are bf16 and multiples of 2^-8, float64: products of two are multiples
  of 2^-16, so a head_dim-term dot whose absolute terms sum below 2^8 is exact in float32."""
  return bf16_round(np.round(rng.normal(size=shape) * 256) / 256)


def _attention_model(q, k, v, w, o_got, visible, *, impl, block_k=None, bf16_dots=True,
                     heads_rounded=True):
  """float64 models of attention's bf16 out, dq, dk, dv (each (want, err), as
  assert_one_bf16_rounding takes) on exact bf16 q [b, lq, hq, d], k, v [b, lk, hk, d] and the
  cotangent w of out; visible: bool [b, lq, lk]. The scores s = q k^T / sqrt(d) are float32:
  exact dots, one rounding of the scale.

  impl "xla": P = softmax(s) (float32) rounded to bf16 times v. Backward (bf16_dots: through
    mmjax.nn.precision, which rounds each dot's cotangent to bf16): dP = w v^T rounded to bf16,
    dv = round(P)^T w, dS = P (dP - rowsum(P dP)) times the scale, rounded to bf16 (bf16_dots)
    or not (jax's own dots) before dq = dS k, dk = dS^T q. With grouped heads k and v are
    repeated: each query head's dk, dv is rounded to bf16 before their sum over the group
    (heads_rounded; False: the model of one rounding, which that is not).
  impl "flash" (blockwise and the Pallas kernels): per kv block j of block_k keys, the running
    row max m_j, p = exp(s - m_j) rounded to bf16 times v, rescaled by exp(m_j - m) and divided
    by the float32 row sum. Backward from the forward's bf16 out o_got (delta = rowsum(o_got w)):
    P = exp(s - lse), dv = round(P)^T w, dS = P (w v^T - delta) rounded to bf16, dq = dS k,
    dk = dS^T q, float32 sums over blocks and the query heads of a kv head, times the scale."""
  b, lq, hq, d = q.shape
  lk, hk = k.shape[1], k.shape[2]
  qg, wg, og = (a.reshape(b, lq, hk, hq // hk, d) for a in (q, w, o_got))
  scale = d ** -0.5
  assert np.einsum("bqhgd,bkhd->bhgqk", np.abs(qg), np.abs(k)).max() < 2 ** 8   # exact dots
  assert np.einsum("bqhgd,bkhd->bhgqk", np.abs(wg), np.abs(v)).max() < 2 ** 8
  vis = visible[:, None, None]                                      # [b, 1, 1, lq, lk]
  s = np.einsum("bqhgd,bkhd->bhgqk", qg, k) * scale
  es = U32 * np.abs(s)
  m = np.max(np.where(vis, s, -np.inf), -1, keepdims=True)
  e = np.where(vis, np.exp(s - m), 0.0)
  l = e.sum(-1, keepdims=True)
  P, lse = e / l, m + np.log(l)
  # row-wise float32 errors of a softmax, log-sum-exp, running max and sum (generous)
  E = (4 * lk + 32) * U32 + 4 * es.max() + 8 * U32 * (np.abs(lse) + np.abs(s).max())
  eP = 2 * P * (es + es.max() + U32 * np.abs(s - lse) + E)
  to_out = lambda a: np.moveaxis(a, 3, 1)          # [b, h, g, q, 1] -> [b, q, h, g, 1]
  if impl == "xla":
    o, eo = rounded_product("bhgqk,bkhd->bqhgd", P, eP, v)
  else:
    o, eo = np.zeros(qg.shape), np.zeros(qg.shape)
    for j in range(-(-lk // block_k)):
      cols = slice(j * block_k, (j + 1) * block_k)
      mj = np.max(np.where(vis[..., :(j + 1) * block_k], s[..., :(j + 1) * block_k], -1e30),
                  -1, keepdims=True)
      pj = np.where(vis[..., cols], np.exp(s[..., cols] - mj), 0.0)
      epj = 2 * pj * (es[..., cols] + es.max() + U32 * np.abs(s[..., cols] - mj) + E)
      oj, eoj = rounded_product("bhgqk,bkhd->bqhgd", pj, epj, v[:, cols])
      alpha = to_out(np.exp(np.minimum(mj - m, 0.0)))
      o, eo = o + alpha * oj, eo + alpha * eoj
    mag = np.einsum("bhgqk,bkhd->bqhgd", e, np.abs(v))
    o, eo = o / to_out(l), (eo + to_out(E) * mag) / to_out(l) + 2 * U32 * np.abs(o / to_out(l))
  dp = np.einsum("bqhgd,bkhd->bhgqk", wg, v)                       # exact
  if impl == "xla":
    dp = bf16_round(dp)
    c = (P * dp).sum(-1, keepdims=True)
    ds = P * (dp - c)
    eds = (eP * np.abs(dp - c) + 2 * U32 * np.abs(ds)
           + P * ((eP * np.abs(dp)).sum(-1, keepdims=True)
                  + (lk + 8) * U32 * (P * np.abs(dp)).sum(-1, keepdims=True)))
    ds, eds, post = scale * ds, scale * eds + U32 * np.abs(scale * ds), 1.0
  else:
    delta = np.einsum("bqhgd,bqhgd->bhgq", og, wg)[..., None]
    edelta = 2 * d * U32 * np.einsum("bqhgd,bqhgd->bhgq", np.abs(og), np.abs(wg))[..., None]
    ds = P * (dp - delta)
    eds = (eP * np.abs(dp - delta) + P * (edelta + 2 * U32 * np.abs(dp - delta))
           + 2 * U32 * np.abs(ds))
    post = scale

  def product(spec, a, ea, other, factor, rounded=True):   # factor * a . other, from float32 a
    if rounded:
      g, eg = rounded_product(spec, a, ea, other)
    else:
      g = np.einsum(spec, a, other)
      eg = (np.einsum(spec, ea, np.abs(other))
            + 2 * max(lq, lk) * hq * U32 * np.einsum(spec, np.abs(a), np.abs(other)))
    return factor * g, factor * eg + 2 * U32 * np.abs(factor * g)

  def per_head(spec, a, ea, other, factor, rounded=True):   # dk, dv: sums over a group
    if impl != "xla" or not heads_rounded:
      return product(spec, a, ea, other, factor, rounded)
    return _sum_of_rounded([product(spec, a[:, :, [i]], ea[:, :, [i]], other[:, :, :, [i]],
                                    factor, rounded) for i in range(hq // hk)])
  rounded_ds = impl != "xla" or bf16_dots
  out = [(o, eo), product("bhgqk,bkhd->bqhgd", ds, eds, k, post, rounded_ds),
         per_head("bhgqk,bqhgd->bkhd", ds, eds, qg, post, rounded_ds),
         per_head("bhgqk,bqhgd->bkhd", P, eP, wg, 1.0)]
  return [(want.reshape(shape), err.reshape(shape)) for (want, err), shape in
          zip(out, (q.shape, q.shape, k.shape, v.shape))]


def _dispatch(impl):
  return lambda q, k, v, mask, causal: dot_product_attention(q, k, v, mask=mask, is_causal=causal,
                                                             impl=impl)


def _direct(fn, **kw):   # key padding as segment ids (padded keys in segment 1)
  def f(q, k, v, mask, causal):
    kv_seg = jnp.where(mask[:, 0, 0], 0, 1).astype(jnp.int32)
    return fn(q, k, v, is_causal=causal, q_segment_ids=jnp.zeros(q.shape[:2], jnp.int32),
              kv_segment_ids=kv_seg, **kw)
  return f


# id: (attention function, its model's options, grouped-query heads). mmjax.nn.attention's
# entry point for "xla" (both matmul paths), "blockwise" and "pallas" (one kv block at these
# lengths, the Triton layout interpreted on CPU); blockwise and both Pallas layouts with several
# kv blocks. "xla" with grouped heads repeats k and v, so it rounds each query head's dk, dv to
# bf16 before their sum over the group (its own case).
ATTENTION = {
    "xla": (_dispatch("xla"), dict(impl="xla"), False),
    "xla-gqa": (_dispatch("xla"), dict(impl="xla"), True),
    "xla-jax-dots": (_dispatch("xla"), dict(impl="xla", bf16_dots=False), False),
    "blockwise": (_dispatch("blockwise"), dict(impl="flash", block_k=512), True),
    "pallas": (_dispatch("pallas"), dict(impl="flash", block_k=128), True),
    "blockwise-16": (_direct(blockwise_attention, block_q=16, block_k=16),
                     dict(impl="flash", block_k=16), True),
    "flash-gpu-16": (_direct(flash_attention, platform="gpu", block_q=16, block_k=16),
                     dict(impl="flash", block_k=16), True),
    "flash-tpu": (_direct(flash_attention, platform="tpu", block_q=16, block_k=128,
                          interpret=True), dict(impl="flash", block_k=128), True),
}


@pytest.mark.parametrize("impl", list(ATTENTION))
def test_attention_is_one_rounding_of_float64(impl, rng, monkeypatch):
  """bf16 q, k, v and cotangent, causal with key padding, 37 queries and 45 keys: out, dq, dk,
  dv each one bf16 rounding of the float64 model (_attention_model), "xla" with grouped heads
  one per query head's part of dk, dv and per bf16 sum."""
  fn, opts, grouped = ATTENTION[impl]
  monkeypatch.setenv("MMJAX_BF16_DOTS", "0" if impl == "xla-jax-dots" else "1")
  b, lq, lk, hq, hk, d = 2, 37, 45, 4, 2 if grouped else 4, 32
  q, k, v, w = (_grid(rng, s) for s in [(b, lq, hq, d), (b, lk, hk, d), (b, lk, hk, d),
                                         (b, lq, hq, d)])
  lengths = rng.integers(1, lk + 1, size=b)
  mask = (np.arange(lk)[None, :] < lengths[:, None])[:, None, None, :]
  visible = mask[:, 0] & np.tril(np.ones((lq, lk), bool))
  attend = jax.jit(lambda q, k, v: fn(q, k, v, jnp.asarray(mask), True))
  out, vjp = jax.vjp(attend, *(jnp.asarray(a, jnp.bfloat16) for a in (q, k, v)))
  grads = vjp(jnp.asarray(w, jnp.bfloat16))
  o_got = np.asarray(out.astype(jnp.float32), np.float64)
  models = _attention_model(q, k, v, w, o_got, visible, **opts)
  for label, got, (want, err) in zip(("out", "dq", "dk", "dv"), (out, *grads), models):
    assert_one_bf16_rounding(got, want, err, name=f"{impl} {label}")
  if impl == "xla-gqa":   # not one rounding (blockwise and pallas are, with the same heads)
    want, err = _attention_model(q, k, v, w, o_got, visible, heads_rounded=False, **opts)[3]
    with pytest.raises(AssertionError, match="beyond one bf16 rounding"):
      assert_one_bf16_rounding(grads[2], want, err, name="xla-gqa dv")


# ---------------------------------------------------------------- float32 accumulation, by type

def _dots(jaxpr):
  """(operand dtypes, result dtype) of every dot_general in a jaxpr and in the jaxprs inside it:
  loops, custom VJPs, shard_map, Pallas kernels, every per-platform branch (the TPU and GPU
  kernels included, traced on this CPU host)."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      yield tuple(v.aval.dtype for v in eqn.invars), eqn.outvars[0].aval.dtype
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          yield from _dots(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          yield from _dots(sub)


def _loss_grad_fn(name, impl, blocks):
  if impl == "global":
    return jax.value_and_grad(lambda *a: LOSSES[name](*a, blocks=blocks,
                                                      **({} if blocks == "dense" else
                                                         {"block": 16})), argnums=(0, 1, 2, 3))
  return _sharded(name, impl, blocks, **({} if blocks == "dense" else {"block": 8}))


DOT_CASES = ([("loss", name, "global", blocks) for name in LOSSES
              for blocks in ("dense", "tiled", "pallas")]
             + [("loss", "clip", "ring", "tiled"), ("loss", "siglip", "ring_bidir", "pallas")]
             + [("attention", impl) for impl in ATTENTION]
             + [("attention", "auto")])


@pytest.mark.parametrize("case", DOT_CASES, ids=lambda c: "-".join(c))
def test_every_bf16_dot_accumulates_in_float32(case, monkeypatch):
  """In the jaxpr of loss + grad (bf16 embeddings) and of attention's out + vjp (bf16 q, k, v),
  every dot with a bf16 operand has a float32 result (preferred_element_type): XLA:CPU keeps a
  bf16 dot's float32 result where its consumer is float32 (excess precision), so the numbers
  above cannot see that argument dropped, where a TPU's or GPU's bf16 result would be rounded."""
  monkeypatch.setenv("MMJAX_BF16_DOTS", "0" if case[-1] == "xla-jax-dots" else "1")
  if case[0] == "loss":
    n = 8 * 13
    fn = _loss_grad_fn(*case[1:])
    args = (jax.ShapeDtypeStruct((n, 24), jnp.bfloat16),) * 2 + (jnp.float32(2), jnp.float32(-1))
  else:
    fn = ATTENTION[case[1]][0] if case[1] in ATTENTION else _dispatch("auto")
    mask = jnp.ones((2, 1, 1, 45), bool)
    fn = functools.partial(lambda f, q, k, v, w: jax.vjp(
        lambda q, k, v: f(q, k, v, mask, True), q, k, v)[1](w), fn)
    q, kv = (2, 37, 4, 32), (2, 45, 2, 32)
    args = [jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in (q, kv, kv, q)]
  dots = list(_dots(jax.make_jaxpr(fn)(*args).jaxpr))
  low = [(ins, out) for ins, out in dots if jnp.dtype(jnp.bfloat16) in ins]
  assert len(low) >= 3, dots
  assert all(out == jnp.float32 for _, out in low), low
