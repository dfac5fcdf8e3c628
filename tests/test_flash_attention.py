"""Flash attention (Pallas, interpret mode) and blockwise attention against float64 NumPy.

Values and gradients of q, k, v; lengths that are not multiples of the blocks,
causal, segment ids, grouped-query heads, head_dim 32..256, f32 and bf16. The
Pallas interpreter fills outputs and scratch with NaN before a kernel runs
(checked below), so an element a kernel forgets to write fails the comparison.
Lowering for TPU (Mosaic) and GPU (Triton) is proven with jax.export.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from mmjax.nn.attention import dot_product_attention
from mmjax.nn.blockwise import blockwise_attention
from mmjax.pallas import flash_attention
from tests.reference import as_dtype, assert_close, ref_attention


def _visible(lq, lk, causal, q_seg, kv_seg):
  vis = q_seg[:, :, None] == kv_seg[:, None, :]
  if causal:
    vis = vis & np.tril(np.ones((lq, lk), bool))[None]
  return vis


IMPLS = {
    "blockwise": functools.partial(blockwise_attention, block_q=16, block_k=16),
    "gpu": functools.partial(flash_attention, platform="gpu", block_q=16, block_k=16),
    "tpu": functools.partial(flash_attention, platform="tpu", block_q=16,
                                    block_k=128, interpret=pltpu.InterpretParams()),
}

# (batch, q_len, kv_len, q_heads, kv_heads, head_dim, causal, segments, dtype)
CASES = [
    (2, 37, 45, 4, 2, 32, False, False, "float32"),     # GQA, ragged lengths
    (1, 70, 70, 2, 2, 64, True, False, "float32"),      # causal over several blocks
    (2, 33, 150, 2, 1, 40, False, True, "float32"),     # segments, head_dim 40 (Triton pads)
    (1, 150, 150, 4, 1, 128, True, True, "bfloat16"),   # multi-query, causal + segments, bf16
    (1, 20, 20, 1, 1, 256, False, False, "float32"),
]


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_matches_float64_reference(impl, case, rng):
  b, lq, lk, hq, hk, d, causal, segments, dtype = case
  if impl == "tpu" and (d, dtype) == (40, "float32"):
    d = 48   # same case, a head_dim Mosaic also takes unpadded
  q, k, v, w = (rng.normal(size=s) for s in [(b, lq, hq, d), (b, lk, hk, d), (b, lk, hk, d),
                                              (b, lq, hq, d)])
  if segments:   # two or three segments per row, keys of segment 7 are padding
    q_seg = np.sort(rng.integers(0, 2, size=(b, lq)), axis=1)
    kv_seg = np.sort(rng.integers(0, 2, size=(b, lk)), axis=1)
    kv_seg[:, -3:] = 7
    kv_seg[:, 0], q_seg[:, 0] = 0, 0
    kv_seg[:, 1], q_seg[:, -1] = 1, 1
    seg = dict(q_segment_ids=jnp.asarray(q_seg), kv_segment_ids=jnp.asarray(kv_seg))
  else:
    q_seg, kv_seg, seg = np.zeros((b, lq), int), np.zeros((b, lk), int), {}
  jdt = jnp.dtype(dtype)
  # The inputs in dtype, and their exact values: what the kernel sees is what float64 sees.
  (q, qx), (k, kx), (v, vx), (w, wx) = (as_dtype(x, jdt) for x in (q, k, v, w))
  want, want_grads = ref_attention(qx, kx, vx, wx, _visible(lq, lk, causal, q_seg, kv_seg))

  f = lambda q, k, v: IMPLS[impl](q, k, v, is_causal=causal, **seg)
  out, vjp = jax.vjp(f, q, k, v)
  grads = vjp(w)
  assert out.dtype == jdt and all(g.dtype == jdt for g in grads)
  assert_close(out, want, dtype=jdt, name="out")
  assert_close(grads, want_grads, dtype=jdt, name=["dq", "dk", "dv"])


@pytest.mark.parametrize("impl", list(IMPLS))
def test_rows_that_see_no_key_give_zero_and_finite_grads(impl, rng):
  q, k, v = (jnp.asarray(rng.normal(size=(1, 24, 2, 32)), jnp.float32) for _ in range(3))
  q_seg = jnp.asarray(np.r_[np.zeros(20), np.full(4, 5)][None], jnp.int32)   # segment 5: no keys
  kv_seg = jnp.zeros((1, 24), jnp.int32)
  f = lambda q, k, v: IMPLS[impl](q, k, v, q_segment_ids=q_seg, kv_segment_ids=kv_seg)
  out = f(q, k, v)
  grads = jax.grad(lambda *a: jnp.sum(f(*a) ** 2), (0, 1, 2))(q, k, v)
  np.testing.assert_array_equal(out[:, 20:], 0.0)
  assert np.isfinite(out).all() and all(np.isfinite(g).all() for g in grads)
  np.testing.assert_array_equal(grads[0][:, 20:], 0.0)


def test_interpreter_poisons_unwritten_outputs():
  """The premise of the NaN check: what a kernel does not write comes back NaN."""
  def half(x_ref, o_ref):
    o_ref[:4] = x_ref[:4]

  for interpret in (True, pltpu.InterpretParams()):
    out = pl.pallas_call(half, out_shape=jax.ShapeDtypeStruct((8, 128), jnp.float32),
                         interpret=interpret)(jnp.ones((8, 128), jnp.float32))
    assert np.isnan(out[4:]).all() and (out[:4] == 1).all()


@pytest.mark.parametrize("impl", ["blockwise", "pallas"])
def test_dispatch_with_key_padding_matches_xla(impl, rng):
  q, k, v = (jnp.asarray(rng.normal(size=(3, 21, 2, 16)), jnp.float32) for _ in range(3))
  mask = jnp.asarray(np.arange(21)[None, :] < rng.integers(1, 22, size=3)[:, None])[:, None, None]
  w = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
  attend = lambda impl: lambda q, k, v: dot_product_attention(
      q, k, v, mask=mask, is_causal=True, impl=impl)
  want, want_vjp = jax.vjp(attend("xla"), q, k, v)
  got, got_vjp = jax.vjp(attend(impl), q, k, v)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  # Gradients are sums of terms that cancel (row 0 sees one key, so its dq is exactly 0
  # in XLA and round-off elsewhere): atol relative to the largest entry. Over 40 seeds
  # the worst excess over rtol was 1.2e-6 * max|grad| (pallas), 4.5e-7 (blockwise).
  for name, g, r in zip("qkv", got_vjp(w), want_vjp(w)):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5 * float(np.abs(r).max()),
                               err_msg=f"d{name}")


def test_bad_arguments_are_named():
  x = jnp.zeros((1, 8, 4, 32))
  with pytest.raises(ValueError, match="multiple of k/v heads"):
    flash_attention(x, jnp.zeros((1, 8, 3, 32)), jnp.zeros((1, 8, 3, 32)))
  with pytest.raises(ValueError, match="block_q=48"):
    flash_attention(x, x, x, block_q=48)
  with pytest.raises(ValueError, match="block_k=64 must be a multiple of 128 on TPU"):
    flash_attention(x, x, x, block_k=64, platform="tpu")
  with pytest.raises(ValueError, match="platform='cuda'"):
    flash_attention(x, x, x, platform="cuda")
  with pytest.raises(ValueError, match="kv_segment_ids"):
    flash_attention(x, x, x, q_segment_ids=jnp.zeros((1, 8), jnp.int32))
  with pytest.raises(ValueError, match="q_segment_ids .* must be"):
    flash_attention(x, x, x, q_segment_ids=jnp.zeros((1, 7), jnp.int32),
                    kv_segment_ids=jnp.zeros((1, 8), jnp.int32))
  with pytest.raises(ValueError, match="key-padding mask"):
    dot_product_attention(x, x, x, mask=jnp.ones((1, 1, 8, 8), bool), impl="blockwise")


# ------------------------------------------------------------ lowering for accelerators

_MARKERS = {"tpu": "tpu_custom_call", "cuda": "__gpu$xla.gpu.triton"}


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("causal,segments,dtype", [(False, False, jnp.bfloat16),
                                                   (True, True, jnp.float32)])
def test_forward_and_gradient_lower_for_accelerators(platform, causal, segments, dtype):
  """Export fwd + grad for the platform on this CPU: the Pallas lowering runs (block
  shapes, ops) and the module holds the forward, dq and dk/dv kernels."""
  layout = "tpu" if platform == "tpu" else "gpu"
  b, lq, lk, hq, hk, d = 2, 300, 200, 8, 2, 64
  seg = {}
  if segments:
    seg = dict(q_segment_ids=jnp.zeros((b, lq), jnp.int32),
               kv_segment_ids=jnp.zeros((b, lk), jnp.int32))

  def loss(q, k, v):
    o = flash_attention(q, k, v, is_causal=causal, platform=layout, interpret=False, **seg)
    return jnp.sum(o.astype(jnp.float32))

  structs = [jax.ShapeDtypeStruct(s, dtype) for s in [(b, lq, hq, d), (b, lk, hk, d),
                                                      (b, lk, hk, d)]]
  marker = _MARKERS[platform]
  checks = [] if platform == "tpu" else [export.DisabledSafetyCheck.custom_call(marker)]
  exp = export.export(jax.jit(jax.value_and_grad(loss, (0, 1, 2))), platforms=[platform],
                      disabled_checks=checks)(*structs)
  module = exp.mlir_module()
  assert module.count(marker) >= 3
  for name in ("mmjax_flash_fwd", "mmjax_flash_dq", "mmjax_flash_dkv"):
    assert name in module, name


_BOTH = dict(platforms=["tpu", "cuda"],
             disabled_checks=[export.DisabledSafetyCheck.custom_call(_MARKERS["cuda"])])


@pytest.mark.parametrize("interpret", [None, False])
@pytest.mark.parametrize("grad", [False, True], ids=["forward", "grad"])
def test_default_platform_picks_the_layout_per_lowering_platform(grad, interpret):
  """platform=None: ONE jitted function exports for tpu and cuda together from this CPU
  host, Mosaic kernels for one and Triton kernels for the other (before, the layout and
  interpret mode came from jax.default_backend(): no kernels at all with interpret=None,
  and with interpret=False an AssertionError in the Mosaic lowering of the Triton layout)."""
  b, lq, lk, hq, hk, d = 1, 40, 24, 4, 2, 32

  def attend(q, k, v):
    return flash_attention(q, k, v, is_causal=True, q_segment_ids=jnp.zeros((b, lq), jnp.int32),
                           kv_segment_ids=jnp.zeros((b, lk), jnp.int32), interpret=interpret)

  def loss(q, k, v):
    return jnp.sum(attend(q, k, v).astype(jnp.float32))

  fn = jax.jit(jax.grad(loss, (0, 1, 2)) if grad else attend)
  structs = [jax.ShapeDtypeStruct(s, jnp.bfloat16)
             for s in [(b, lq, hq, d), (b, lk, hk, d), (b, lk, hk, d)]]
  module = export.export(fn, **_BOTH)(*structs).mlir_module()
  kernels = 3 if grad else 1   # the forward, and dq and dk/dv under the custom VJP
  assert module.count(_MARKERS["tpu"]) == kernels
  assert module.count(_MARKERS["cuda"]) == kernels
  if grad:
    for name in ("mmjax_flash_fwd", "mmjax_flash_dq", "mmjax_flash_dkv"):
      assert name in module, name


def test_default_platform_on_cpu_is_the_interpreted_triton_layout(rng):
  """On CPU platform=None lowers its default branch: exactly the values and gradients of
  platform='gpu' in interpret mode (as before), and the float64 reference. Ragged lengths,
  GQA, causal, segments, head_dim 40 (padded for the Triton layout)."""
  b, lq, lk, hq, hk, d = 2, 37, 45, 4, 2, 40
  q, k, v, w = (rng.normal(size=s) for s in [(b, lq, hq, d), (b, lk, hk, d), (b, lk, hk, d),
                                              (b, lq, hq, d)])
  q_seg = np.sort(rng.integers(0, 2, size=(b, lq)), axis=1)
  kv_seg = np.sort(rng.integers(0, 2, size=(b, lk)), axis=1)
  q_seg[:, 0], kv_seg[:, 0] = 0, 0
  seg = dict(q_segment_ids=jnp.asarray(q_seg), kv_segment_ids=jnp.asarray(kv_seg))
  args = [jnp.asarray(x, jnp.float32) for x in (q, k, v)]

  def run(**kw):
    f = lambda q, k, v: flash_attention(q, k, v, is_causal=True, block_q=16, block_k=16,
                                        **seg, **kw)
    out, vjp = jax.vjp(jax.jit(f), *args)
    return out, vjp(jnp.asarray(w, jnp.float32))

  got, got_grads = run()
  want, want_grads = run(platform="gpu")
  np.testing.assert_array_equal(got, want)
  for name, g, r in zip("qkv", got_grads, want_grads):
    np.testing.assert_array_equal(g, r, err_msg=f"d{name}")
  ref, ref_grads = ref_attention(*(np.asarray(a, np.float64) for a in args),
                                 np.asarray(jnp.asarray(w, jnp.float32), np.float64),
                                 _visible(lq, lk, True, q_seg, kv_seg))
  assert_close(got, ref, dtype=jnp.float32, name="out")
  assert_close(got_grads, ref_grads, dtype=jnp.float32, name=["dq", "dk", "dv"])


def test_default_platform_under_vmap_matches_the_gpu_layout(rng):
  """The per-platform primitive's batching rule: vmap of values and gradients."""
  x = jnp.asarray(rng.normal(size=(3, 1, 20, 2, 16)), jnp.float32)

  def loss(**kw):
    attend = lambda q: flash_attention(q, q, q, is_causal=True, block_q=16, block_k=16, **kw)
    return lambda x: jnp.sum(jax.vmap(attend)(x) ** 2)

  got, want = (jax.jit(jax.value_and_grad(loss(**kw)))(x) for kw in ({}, {"platform": "gpu"}))
  np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
  np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------ in the models

@pytest.mark.parametrize("impl", ["blockwise", "pallas", "auto"])
def test_two_tower_first_step_matches_xla(impl, rng):
  """SigLIP loss and every parameter's gradient of a ViT + text tower (padded
  captions, so key padding is exercised) with attention_impl=impl equal 'xla' in f32."""
  from mmjax.models import two_tower
  from mmjax.objectives.contrastive import loss_of, two_tower_grad_fn

  tiny = dict(width=32, depth=1, mlp_dim=64, num_heads=2)
  text = rng.integers(4, 50, size=(6, 9)).astype(np.int32)
  text[np.arange(9)[None, :] >= rng.integers(2, 10, size=6)[:, None]] = 0   # padding
  batch = {"image": jnp.asarray(rng.normal(size=(6, 32, 32, 3)), jnp.float32),
           "text": jnp.asarray(text)}

  def grads(attention_impl):
    model = two_tower.Model(
        image=dict(**tiny, patch_size=(8, 8), pool_type="map", attention_impl=attention_impl),
        text=dict(**tiny, vocab_size=50, max_len=9, pool_type="last", attention_impl=attention_impl),
        embed_dim=16, loss="siglip")
    params = model.init(jax.random.PRNGKey(1), batch["image"][:1], batch["text"][:1])["params"]
    fn = jax.jit(two_tower_grad_fn(model, loss_of("siglip")))
    (loss, _), g = fn(params, batch, jax.random.PRNGKey(0))
    return loss, g

  want, want_g = grads("xla")
  got, got_g = grads(impl)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  scale = max(float(np.abs(y).max()) for y in jax.tree.leaves(want_g))
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(got_g), jax.tree.leaves(want_g)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6 * scale,
                               err_msg=jax.tree_util.keystr(path))


def test_config_chooses_the_attention_impl(tmp_path):
  from mmjax.train.config import validate
  from mmjax.models import factory
  from tests.configs import tiny_config

  config = tiny_config(str(tmp_path), **{"model.attention_impl": "blockwise"})
  validate(config)
  model = factory.two_tower_model(config, 64, loss=config.loss)
  assert model.image["attention_impl"] == model.text["attention_impl"] == "blockwise"
  config.model.attention_impl = "flash9"
  with pytest.raises(ValueError, match="config.model.attention_impl"):
    validate(config)
