"""Trace and compile time, and compiled memory, of the CLIP train step: scanned encoder blocks
against unrolled ones, per remat policy.

  python -m benchmarks.compile_time [--models ViT-L-14 ViT-bigG-14] [--batch 32]
      [--policies none nothing_saveable dots_saveable] [--scan 0 1] [--dtype bfloat16]
      [--attention_impl xla] [--repeats 2] [--out benchmarks/results/compile_time_cpu.jsonl]

The step is one AdamW update of mmjax.losses.clip_loss over the two towers that
`mmjax.convert.open_clip_config(model)` describes, with config.model.scan / remat_policy set
on both towers, compute in --dtype (params and AdamW state float32), random-shaped 224-px
images and 77 tokens. Nothing is allocated: params and the optimizer state are
jax.ShapeDtypeStructs from jax.eval_shape, and the step goes through
jax.jit(step).trace(...), .lower(), .compile(), each timed. "peak" is the compiled
memory_analysis()'s temporaries + arguments + outputs (nothing donated). Each point runs in a
fresh subprocess (no cache shared between points), --repeats times, and prints one JSON line,
the fastest run's (total_s_runs: all of them); policy 'none' is no remat.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from benchmarks import emit
from mmjax import hostmem

POLICIES = ("none", "nothing_saveable", "dots_saveable")


def point(model_name: str, scan: bool, policy: str, batch: int, dtype: str,
          attention_impl: str = "xla") -> dict:
  import jax
  import jax.numpy as jnp
  import optax
  from mmjax.convert import get_spec, open_clip_config
  from mmjax.losses import clip_loss
  from mmjax.models import two_tower
  from mmjax.nn import precision

  cfg = open_clip_config(model_name)
  dt = jnp.dtype(dtype)
  tower = dict(dtype=dt, scan=scan, remat_policy=None if policy == "none" else policy,
               attention_impl=attention_impl)
  model = two_tower.Model(**{**cfg, "image": {**cfg["image"], **tower},
                             "text": {**cfg["text"], **tower}, "dtype": dt})
  size = get_spec(model_name).image_size
  images = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
  texts = jax.ShapeDtypeStruct((batch, cfg["text"]["max_len"]), jnp.int32)
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), images, texts)["params"]
  tx = optax.adamw(1e-4, weight_decay=0.1)
  opt_state = jax.eval_shape(tx.init, params)

  def step(p, s, images, texts):
    def loss_fn(p):
      zimg, ztxt, out = model.apply({"params": p}, images, texts, train=True)
      return clip_loss(zimg, ztxt, out["scale"])
    loss, grads = jax.value_and_grad(loss_fn)(p)
    updates, s = tx.update(grads, s, p)
    return optax.apply_updates(p, updates), s, loss

  t0 = time.perf_counter()
  traced = jax.jit(step).trace(params, opt_state, images, texts)
  t1 = time.perf_counter()
  lowered = traced.lower()
  t2 = time.perf_counter()
  compiled = lowered.compile()
  t3 = time.perf_counter()
  mem = compiled.memory_analysis()
  parts = {k: getattr(mem, f"{k}_size_in_bytes") for k in ("temp", "argument", "output", "alias")}
  n_params = sum(x.size for x in jax.tree.leaves(params))
  return {"model": model_name, "scan": scan, "remat_policy": policy, "batch": batch,
          "dtype": dtype, "attention_impl": attention_impl, "bf16_dots": bool(precision.enabled()), "params_m": n_params / 1e6,
          "trace_s": t1 - t0, "lower_s": t2 - t1, "compile_s": t3 - t2, "total_s": t3 - t0,
          "peak_gib": (parts["temp"] + parts["argument"] + parts["output"]) / 2 ** 30,
          **{f"{k}_gib": v / 2 ** 30 for k, v in parts.items()},
          "backend": jax.default_backend()}


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--models", nargs="+", default=["ViT-L-14", "ViT-bigG-14"])
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
  p.add_argument("--scan", type=int, nargs="+", default=[0, 1], choices=[0, 1])
  p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
  p.add_argument("--attention_impl", nargs="+", default=["xla"],
                 choices=["xla", "blockwise", "pallas", "auto"])
  p.add_argument("--repeats", type=int, default=2, help="runs per point; the fastest is kept")
  p.add_argument("--out", help="also append each JSON line to this file")
  p.add_argument("--point", action="store_true", help=argparse.SUPPRESS)
  a = p.parse_args()
  if a.point:   # the child: exactly one point
    print(json.dumps(point(a.models[0], bool(a.scan[0]), a.policies[0], a.batch, a.dtype,
                           a.attention_impl[0])))
    return
  points = [(m, p, s, i) for m in a.models for p in a.policies for s in a.scan
            for i in a.attention_impl]
  for model, policy, scan, impl in points:
    cmd = [sys.executable, "-m", "benchmarks.compile_time", "--point", "--models", model,
           "--scan", str(scan), "--policies", policy, "--batch", str(a.batch),
           "--dtype", a.dtype, "--attention_impl", impl]
    runs = []
    for _ in range(a.repeats):
      r = subprocess.run(cmd, capture_output=True, text=True)
      if r.returncode:
        runs = [{"model": model, "scan": bool(scan), "remat_policy": policy,
                 "error": f"exit {r.returncode}: "
                          + (r.stderr.strip().splitlines() or [""])[-1][:300]}]
        break
      runs.append(json.loads(r.stdout.strip().splitlines()[-1]))
    # Other load on the machine only ever adds time: the fastest run is the measurement.
    best = min(runs, key=lambda row: row.get("total_s", 0.0))
    if "error" not in best:
      best.update(repeats=len(runs), total_s_runs=[row["total_s"] for row in runs])
    emit(json.dumps(best), a.out)


if __name__ == "__main__":
  hostmem.keep_freed_memory()   # timed as the launcher runs: mmjax/hostmem.py
  main()
