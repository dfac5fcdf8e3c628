"""Time loss + grad (wrt both embeddings, scale and bias) of every loss implementation.

  python -m benchmarks.losses [--batch 1024 4096] [--dim 512] [--repeats 5]

Prints one JSON object per (loss, impl, dtype, batch): median wall time of a
jit-compiled value_and_grad, and XLA's compiled memory estimate of its temporaries.
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.losses import clip_loss, siglip_loss

LOSSES = {"clip": lambda x, y, s, b, impl: clip_loss(x, y, s, impl=impl),
          "siglip": lambda x, y, s, b, impl: siglip_loss(x, y, s, b, impl=impl)}
IMPLS = {"clip": ("dense",), "siglip": ("dense",)}


def measure(name, impl, dtype, n, d, repeats):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(n, d))
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  x, y = jnp.asarray(x, dtype), jnp.asarray(np.roll(x, 1, axis=0), dtype)
  fn = jax.jit(jax.value_and_grad(lambda *a: LOSSES[name](*a, impl=impl), argnums=(0, 1, 2, 3)))
  args = (x, y, jnp.float32(10.0), jnp.float32(-10.0))
  compiled = fn.lower(*args).compile()
  mem = compiled.memory_analysis()
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return {"loss": name, "impl": impl, "dtype": jnp.dtype(dtype).name, "batch": n, "dim": d,
          "devices": 1, "median_ms": 1e3 * float(np.median(times)),
          "temp_bytes": getattr(mem, "temp_size_in_bytes", None),
          "backend": jax.default_backend()}


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batch", type=int, nargs="+", default=[1024, 4096])
  p.add_argument("--dim", type=int, default=512)
  p.add_argument("--repeats", type=int, default=5)
  a = p.parse_args()
  for name in LOSSES:
    for impl in IMPLS[name]:
      for dtype in (jnp.float32, jnp.bfloat16):
        for n in a.batch:
          print(json.dumps(measure(name, impl, dtype, n, a.dim, a.repeats)), flush=True)


if __name__ == "__main__":
  main()
