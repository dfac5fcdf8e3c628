"""One CLIP/SigLIP train step (AdamW), mmjax against open_clip, f32 and bf16, on this machine.

  python -m benchmarks.train_step [MODEL] [BATCH] [--steps 5] [--dtypes float32 bfloat16]
      [--attention_impl xla] [--no_torch] [--tiny] [--budget_s S] [--output FILE]

MODEL is any open_clip model name with a ViT or ResNet tower (default ViT-B-32; mmjax builds
the same architecture from `mmjax.convert.open_clip_config`; a ResNet's BatchNorm trains on
batch statistics in both, mmjax's norm='batch'), BATCH the batch size (default 32), random
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

The loss is the model's (`clip_loss`, or `siglip_loss` for SigLIP models such as
ViT-B-16-SigLIP). `--attention_impl` runs mmjax once per value of the towers' attention_impl.
Each mmjax run and the matmul peak are a fresh subprocess (benchmarks.run_points: a crash or
an out-of-memory error is that row's "error"). On a GPU or TPU the rows also carry the
device's peak memory and the MFU: model FLOPs / step time / the device's dense bf16 peak from
PEAK_TFLOPS (datasheet numbers keyed by `jax.devices()[0].device_kind`). The model FLOPs are
XLA's cost analysis of the attention_impl="xla" step where that ran (XLA does not count the
FLOPs inside custom calls such as cuDNN's or Pallas' attention kernels, so their own count
is low), else the run's own. `--tiny` shrinks the towers (width 64, depth 2, 32-px images,
16 tokens) to check the script on a CPU in seconds.
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

from benchmarks import add_child_args, child_main, device_peak_mib, run_points, timed
from mmjax import hostmem

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


# Dense bf16 peaks (TFLOP/s, datasheet, no sparsity), first match in device_kind wins.
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0))
PEAK_SOURCE = ("datasheet dense bf16 peak keyed by device_kind: H100/H200 SXM 989, "
               "H100 PCIe 756, A100 312 TFLOP/s")


def device_peak_tflops(device_kind: str) -> float | None:
  return next((v for k, v in PEAK_TFLOPS if k in device_kind), None)


def matmul_peak(n: int = 4096, reps: int = 3) -> dict:
  """GFLOP/s of an n^3 matmul: f32, and bf16 operands with f32 accumulation (median)."""
  import jax
  import jax.numpy as jnp
  out = {}
  for name, dtype in (("float32", jnp.float32), ("bfloat16", jnp.bfloat16)):
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
    f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
    f(a, a).block_until_ready()
    t = timed(lambda: f(a, a), repeats=reps,
              min_s=0.02 if jax.default_backend() != "cpu" else 0.0)
    out[name] = 2 * n ** 3 / t["median_s"] / 1e9
  return out


def _tiny(cfg: dict) -> dict:
  """The same architecture family, shrunk to check the script in seconds."""
  dims = dict(width=64, depth=2, num_heads=2, mlp_dim=128)
  image = {**cfg["image"], **dims, "patch_size": (8, 8), "image_size": 32}
  text = {**cfg["text"], **dims, "vocab_size": 1000, "max_len": 16}
  return {**cfg, "image": image, "text": text, "embed_dim": 64}


def mmjax_step(model_name: str, batch: int, dtype: str, steps: int,
               attention_impl: str | None = None, tiny: bool = False) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from mmjax.convert import get_spec, open_clip_config
  from mmjax.losses import clip_loss
  from mmjax.models import two_tower
  from mmjax.losses import siglip_loss
  cfg = open_clip_config(model_name)
  if tiny:
    cfg = _tiny(cfg)
  size = cfg["image"].pop("image_size", get_spec(model_name).image_size)
  if "layers" in cfg["image"]:   # a ResNet: BatchNorm in train mode, as open_clip trains it
    cfg["image"]["norm"] = "batch"
  dt = jnp.dtype(dtype)
  impl = {} if attention_impl is None else {"attention_impl": attention_impl}
  cfg = {**cfg, "image": {**cfg["image"], "dtype": dt, **impl},
         "text": {**cfg["text"], "dtype": dt, **impl}, "dtype": dt}
  model = two_tower.Model(**cfg)
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(batch, size, size, 3)), jnp.float32)
  texts = jnp.asarray(rng.integers(0, cfg["text"]["vocab_size"], (batch, cfg["text"]["max_len"])),
                      jnp.int32)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), images[:1], texts[:1])["params"]
  tx = optax.adamw(1e-4, weight_decay=0.1)
  opt_state = tx.init(params)

  def loss_fn(p):
    zimg, ztxt, out = model.apply({"params": p}, images, texts, train=True)
    if cfg.get("loss") == "siglip":
      return siglip_loss(zimg, ztxt, out["scale"], out["bias"])
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
          "gflop_per_second": cost["flops"] / step_s / 1e9, "loss": cfg.get("loss", "clip"),
          "attention_impl": attention_impl or "xla", "final_loss": float(loss),
          "device_kind": jax.devices()[0].device_kind, "backend": jax.default_backend(),
          "device_peak_mib": device_peak_mib()}


def point(kind: str, **kw) -> dict:
  """One child's work (benchmarks.run_points): the matmul peak or one mmjax run."""
  if kind == "matmul_peak":
    import jax
    return {"matmul_peak_gflop_per_second": matmul_peak(kw["n"]),
            "device_kind": jax.devices()[0].device_kind}
  return mmjax_step(**kw)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("model", nargs="?", default="ViT-B-32")
  p.add_argument("batch", nargs="?", type=int, default=32)
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
  p.add_argument("--attention_impl", nargs="+", default=[None],
                 help="the towers' attention_impl, one mmjax run each (default: the config's)")
  p.add_argument("--threads", type=int, default=os.cpu_count())
  p.add_argument("--no_torch", action="store_true", help="mmjax only")
  p.add_argument("--tiny", action="store_true", help="shrunk towers: checks the script")
  p.add_argument("--peak_n", type=int, default=4096, help="the matmul peak's n (n^3)")
  p.add_argument("--budget_s", type=float, default=None,
                 help="stop starting runs after this many seconds (the rest: skipped rows)")
  p.add_argument("--output", "--out", default=None)
  add_child_args(p)
  a = p.parse_args()
  if a.points is not None:   # a child
    child_main(point, a.points, a.deadline)
    return
  runs = [{"kind": "mmjax", "model_name": a.model, "batch": a.batch, "dtype": dtype,
           "steps": a.steps, "attention_impl": impl, "tiny": a.tiny}
          for dtype in a.dtypes for impl in a.attention_impl]
  # The rows are printed by the summary below, not as they come (run_points' out=None).
  peak_row, *rows = run_points("benchmarks.train_step", [{"kind": "matmul_peak", "n": a.peak_n}]
                               + runs, fresh=True, budget_s=a.budget_s, quiet=True)
  peak = peak_row.get("matmul_peak_gflop_per_second", {})
  xla_flops = {r["dtype"]: r["tflop_per_step"] for r in rows
               if r.get("attention_impl") in (None, "xla") and "tflop_per_step" in r}
  for r in rows:
    if "step_s" not in r:
      continue
    if r["dtype"] in peak:
      r["share_of_matmul_peak"] = r["gflop_per_second"] / peak[r["dtype"]]
    dev_peak = device_peak_tflops(r["device_kind"])
    if r["backend"] != "cpu":
      model_tflop = xla_flops.get(r["dtype"], r["tflop_per_step"])
      r.update(model_tflop_per_step=model_tflop,
               model_flops_source=("XLA cost analysis of the attention_impl='xla' step"
                                   if r["dtype"] in xla_flops else
                                   "XLA cost analysis of this step (custom calls not counted)"),
               peak_tflop_per_s=dev_peak, peak_source=PEAK_SOURCE,
               mfu=None if dev_peak is None else model_tflop / r["step_s"] / dev_peak)
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
    r.update(model=a.model, batch=a.batch, steps=a.steps, cpu=cpu, benchmark="train_step")
    r.setdefault("library", "mmjax")
    r.pop("kind", None)
    r.pop("model_name", None)
  summary = {"benchmark": "train_step", "summary": True, "matmul_peak_gflop_per_second": peak,
             "model": a.model, "batch": a.batch, "cpu": cpu,
             "device_kind": peak_row.get("device_kind")}
  if "error" in peak_row:
    summary["matmul_peak_error"] = peak_row["error"]
  by = {(r["library"], r["dtype"]): r["samples_per_second"] for r in rows
        if "samples_per_second" in r and r.get("attention_impl") in (None, "xla")}
  for dtype in a.dtypes:
    if ("open_clip", dtype) in by and ("mmjax", dtype) in by:
      summary[f"mmjax_over_open_clip_{dtype}"] = by[("mmjax", dtype)] / by[("open_clip", dtype)]
  lines = [json.dumps(r) for r in rows + [summary]]
  print("\n".join(lines), flush=True)
  if a.output:
    with open(a.output, "a") as f:
      f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
  hostmem.keep_freed_memory()   # timed as the launcher runs: mmjax/hostmem.py
  main()
