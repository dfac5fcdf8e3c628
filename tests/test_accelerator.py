"""The Pallas kernels compiled (not interpreted), on the GPU or TPU this runs on.

Marked `accelerator`: deselected by default (pyproject's addopts), so a CPU run neither runs
nor counts them. On a machine with a GPU or TPU: `python -m pytest -q -m accelerator tests`
(`bash benchmarks/gpu.sh` runs this before its benchmarks). Run on CPU with `-m accelerator`, they skip, saying why.

Compiled f32 matmuls on accelerators default to reduced precision (TF32 on NVIDIA, bf16
passes on the TPU MXU), so f32 runs are held to the bf16 tolerance of tests/reference.TOL.
These tests have not yet run on an accelerator (the development machines have none).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.pallas import flash_attention
from tests.reference import LOSSES, REFS, assert_close, inputs, ref_attention, term_sizes
from tests.test_flash_attention import CASES, _visible

pytestmark = [
    pytest.mark.accelerator,
    pytest.mark.skipif(jax.default_backend() not in ("gpu", "tpu"),
                       reason="compiled Pallas kernels need a GPU or TPU; "
                              f"this backend is {jax.default_backend()}"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_compiled_flash_attention_matches_float64(case, rng):
  b, lq, lk, hq, hk, d, causal, segments, dtype = case
  if jax.default_backend() == "tpu" and d == 40:
    d = 48   # Mosaic takes head_dim 48 unpadded; the case is otherwise the same
  q, k, v, w = (rng.normal(size=s) for s in [(b, lq, hq, d), (b, lk, hk, d), (b, lk, hk, d),
                                              (b, lq, hq, d)])
  q_seg, kv_seg, seg = np.zeros((b, lq), int), np.zeros((b, lk), int), {}
  if segments:
    q_seg = np.sort(rng.integers(0, 2, size=(b, lq)), axis=1)
    kv_seg = np.sort(rng.integers(0, 2, size=(b, lk)), axis=1)
    kv_seg[:, 0], q_seg[:, 0], kv_seg[:, 1], q_seg[:, -1] = 0, 0, 1, 1
    seg = dict(q_segment_ids=jnp.asarray(q_seg), kv_segment_ids=jnp.asarray(kv_seg))
  args = [jnp.asarray(x, dtype) for x in (q, k, v)]
  exact = [np.asarray(a.astype(jnp.float32), np.float64) for a in args]
  want, want_grads = ref_attention(*exact, w, _visible(lq, lk, causal, q_seg, kv_seg))
  f = jax.jit(lambda q, k, v: flash_attention(q, k, v, is_causal=causal, **seg))
  out, vjp = jax.vjp(f, *args)
  grads = vjp(jnp.asarray(w, dtype))
  assert_close((out, *grads), (want, *want_grads), dtype="bfloat16", name=("out", "dq", "dk", "dv"))


@pytest.mark.parametrize("name", ["clip", "siglip"])
@pytest.mark.parametrize("n", [300, 1000])   # not multiples of the kernels' blocks
def test_compiled_pallas_losses_match_float64(name, n, rng):
  x, y, s, b = inputs(n, 64, rng)
  f = jax.jit(jax.value_and_grad(lambda *a: LOSSES[name](*a, blocks="pallas"), (0, 1, 2, 3)))
  loss, grads = f(x, y, s, b)
  exact = [np.asarray(a, np.float64) for a in (x, y, s, b)]
  want, want_grads = REFS[name](*exact)
  grads = grads[:len(want_grads)]   # CLIP has no bias
  assert_close(loss, want, dtype="bfloat16", name="loss")
  assert_close(tuple(grads), tuple(want_grads), dtype="bfloat16",
               name=("dx", "dy", "ds", "db")[:len(want_grads)], scale=term_sizes(name, *exact))


@pytest.mark.parametrize("causal,masked", [(False, False), (True, True)])
def test_compiled_auto_attention_matches_float64(causal, masked, rng):
  """impl="auto" compiled here: Mosaic flash on TPU, cuDNN on a GPU (bf16, head_dim 64), its
  kernel in the compiled module, values and gradients against float64."""
  from mmjax.nn.attention import dot_product_attention
  b, lq, lk, hq, hk, d = 2, 256, 256, 4, 2, 64
  q, k, v, w = (rng.normal(size=s) for s in [(b, lq, hq, d), (b, lk, hk, d), (b, lk, hk, d),
                                              (b, lq, hq, d)])
  lengths = rng.integers(1, lk + 1, size=b)
  kv_mask = np.arange(lk)[None, :] < lengths[:, None]
  args = [jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)]

  def attend(q, k, v):
    return dot_product_attention(q, k, v, mask=jnp.asarray(kv_mask)[:, None, None, :]
                                 if masked else None, is_causal=causal, impl="auto")

  fn = jax.jit(lambda q, k, v, w: jax.vjp(attend, q, k, v)[1](w) + (attend(q, k, v),))
  hlo = fn.lower(*args, jnp.asarray(w, jnp.bfloat16)).compile().as_text()
  kernel = "tpu_custom_call" if jax.default_backend() == "tpu" else "cudnn"
  assert kernel in hlo, f"no {kernel} call in the compiled step"
  *grads, out = fn(*args, jnp.asarray(w, jnp.bfloat16))
  visible = np.broadcast_to(kv_mask[:, None, :] if masked else True, (b, lq, lk))
  if causal:
    visible = visible & np.tril(np.ones((lq, lk), bool))
  f64 = [np.asarray(x, np.float64) for x in (*args, jnp.asarray(w, jnp.bfloat16))]
  ref, ref_grads = ref_attention(*f64, visible)
  assert_close(out, ref, dtype=jnp.bfloat16, name="out")
  assert_close(tuple(grads), ref_grads, dtype=jnp.bfloat16, name=["dq", "dk", "dv"])
