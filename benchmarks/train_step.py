"""One CLIP train step (AdamW), mmjax against open_clip, f32 and bf16, on this machine.

  python -m benchmarks.train_step [MODEL] [BATCH] [--steps 5] [--dtypes float32 bfloat16]
      [--output FILE]

MODEL is any open_clip model name with a ViT tower (default ViT-B-32; mmjax builds the same
architecture from `mmjax.convert.open_clip_config`), BATCH the batch size (default 32), random
224-px images (the model's size) and tokens. mmjax: the jit step with `model.dtype` and param
dtype float32 (bf16 compute, f32 params and AdamW state, as the launcher's
`config.model.dtype=bfloat16`). open_clip: `open_clip.create_model(MODEL, pretrained=None)`,
its ClipLoss and torch.optim.AdamW, bf16 as `torch.autocast("cpu", torch.bfloat16)`, in a
subprocess on the same threads. Each prints the median of `--steps` timed steps after two
warm-up steps; mmjax's step donates params and optimizer state, as the train loop's does
(torch updates in place). mmjax's FLOPs per step come from XLA's cost analysis, and the matmul peak
(4096^3, f32 and bf16 operands with f32 accumulation) is measured in the same run, so its
share of the peak is flops / step time / peak. One JSON line per (library, dtype), then a
summary line with the ratios.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time

from mmjax import hostmem

hostmem.keep_freed_memory()   # before JAX's CPU client starts (import mmjax does it too)

TORCH_CHILD = r"""
import json, statistics, sys, time
sys.path.insert(0, sys.argv[5])
from tests.open_clip_peer import _patch_torchvision
_patch_torchvision()
import torch
torch.set_num_threads(int(sys.argv[4]))
import open_clip
name, batch, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
out = []
for dtype in sys.argv[6].split(","):
  torch.manual_seed(0)
  model = open_clip.create_model(name, pretrained=None)
  size = model.visual.image_size
  size = size[0] if isinstance(size, (tuple, list)) else size
  images = torch.randn(batch, 3, size, size)
  texts = torch.randint(0, 49408, (batch, model.context_length))
  loss_fn = open_clip.loss.ClipLoss()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
  def step():
    opt.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
      img, txt, scale = model(images, texts)
      loss = loss_fn(img, txt, scale)
    loss.backward()
    opt.step()
    return float(loss)
  for _ in range(2):
    step()
  times = []
  for _ in range(steps):
    t = time.perf_counter(); step(); times.append(time.perf_counter() - t)
  out.append({"library": "open_clip", "dtype": dtype, "step_s": statistics.median(times),
              "samples_per_second": batch / statistics.median(times)})
print(json.dumps(out))
"""


def matmul_peak(n: int = 4096, reps: int = 3) -> dict:
  """GFLOP/s of an n^3 matmul: f32, and bf16 operands with f32 accumulation (median)."""
  import jax
  import jax.numpy as jnp
  out = {}
  for name, dtype in (("float32", jnp.float32), ("bfloat16", jnp.bfloat16)):
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
    f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
    f(a, a).block_until_ready()
    times = []
    for _ in range(reps):
      t = time.perf_counter()
      f(a, a).block_until_ready()
      times.append(time.perf_counter() - t)
    out[name] = 2 * n ** 3 / statistics.median(times) / 1e9
  return out


def mmjax_step(model_name: str, batch: int, dtype: str, steps: int) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from mmjax.convert import open_clip_config
  from mmjax.losses import clip_loss
  from mmjax.models import two_tower
  cfg = open_clip_config(model_name)
  dt = jnp.dtype(dtype)
  cfg = {**cfg, "image": {**cfg["image"], "dtype": dt}, "text": {**cfg["text"], "dtype": dt},
         "dtype": dt}
  model = two_tower.Model(**cfg)
  size = cfg["image"].get("image_size", 224)
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(batch, size, size, 3)), jnp.float32)
  texts = jnp.asarray(rng.integers(0, cfg["text"]["vocab_size"], (batch, cfg["text"]["max_len"])),
                      jnp.int32)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), images[:1], texts[:1])["params"]
  tx = optax.adamw(1e-4, weight_decay=0.1)
  opt_state = tx.init(params)

  def loss_fn(p):
    zimg, ztxt, out = model.apply({"params": p}, images, texts, train=True)
    return clip_loss(zimg, ztxt, out["scale"])

  @functools.partial(jax.jit, donate_argnums=(0, 1))   # as the train loop's step
  def step(p, s):
    loss, grads = jax.value_and_grad(loss_fn)(p)
    updates, s = tx.update(grads, s, p)
    return optax.apply_updates(p, updates), s, loss

  t0 = time.perf_counter()
  compiled = step.lower(params, opt_state).compile()
  print(f"mmjax {dtype}: compiled in {time.perf_counter() - t0:.1f} s", file=sys.stderr,
        flush=True)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  for _ in range(2):
    params, opt_state, loss = compiled(params, opt_state)
  jax.block_until_ready(loss)
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    params, opt_state, loss = compiled(params, opt_state)
    jax.block_until_ready(loss)
    times.append(time.perf_counter() - t)
  step_s = statistics.median(times)
  return {"library": "mmjax", "dtype": dtype, "step_s": step_s,
          "samples_per_second": batch / step_s, "tflop_per_step": cost["flops"] / 1e12,
          "gflop_per_second": cost["flops"] / step_s / 1e9}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("model", nargs="?", default="ViT-B-32")
  p.add_argument("batch", nargs="?", type=int, default=32)
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
  p.add_argument("--threads", type=int, default=os.cpu_count())
  p.add_argument("--no_torch", action="store_true", help="mmjax only")
  p.add_argument("--output", default=None)
  a = p.parse_args()
  rows = []
  peak = matmul_peak()
  for dtype in a.dtypes:
    r = mmjax_step(a.model, a.batch, dtype, a.steps)
    r["share_of_matmul_peak"] = r["gflop_per_second"] / peak[dtype]
    rows.append(r)
  if not a.no_torch:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", TORCH_CHILD, a.model, str(a.batch), str(a.steps),
                           str(a.threads), root, ",".join(a.dtypes)],
                          capture_output=True, text=True, check=False)
    if proc.returncode:
      sys.exit(f"open_clip failed: {proc.stderr[-2000:]}")
    rows += json.loads(proc.stdout.strip().splitlines()[-1])
  cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
              if line.startswith("model name")), "unknown")
  for r in rows:
    r.update(model=a.model, batch=a.batch, steps=a.steps, cpu=cpu)
  summary = {"matmul_peak_gflop_per_second": peak, "model": a.model, "batch": a.batch, "cpu": cpu}
  by = {(r["library"], r["dtype"]): r["samples_per_second"] for r in rows}
  for dtype in a.dtypes:
    if ("open_clip", dtype) in by:
      summary[f"mmjax_over_open_clip_{dtype}"] = by[("mmjax", dtype)] / by[("open_clip", dtype)]
  lines = [json.dumps(r) for r in rows + [summary]]
  print("\n".join(lines), flush=True)
  if a.output:
    with open(a.output, "a") as f:
      f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
  main()
