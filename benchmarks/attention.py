"""Time, TFLOP/s and memory of attention forward (+ backward), per implementation.

  python -m benchmarks.attention [--seq 1024 2048 4096 8192 16384] [--impl xla blockwise tokamax]
      [--head_dim 64] [--heads 8 | --width W] [--batch 1 | --tokens T] [--dtype float32]
      [--mode fwd_bwd] [--masks none] [--same_process] [--budget_s S]
      [--out benchmarks/results/attention_cpu.jsonl]

Each point runs in a fresh subprocess (or, with --same_process, all in one that is started
again after a crash) and prints one JSON object: the median time of a jit-compiled
forward (--mode fwd: attention(q, k, v)) or forward + backward (fwd_bwd:
value_and_grad(sum(attention(q, k, v) * ct)) wrt q, k, v), its TFLOP/s by FlashAttention's
count (forward 4 * batch * heads * seq^2 * head_dim, halved when causal; backward 2.5x the
forward, so fwd_bwd is 3.5x), XLA's compiled memory (temporaries + arguments + outputs),
the process's peak RSS above its baseline before compiling and, where the backend reports
it, its peak device memory (both meaningful with fresh processes only). Implementations:
  xla:       jax.nn.dot_product_attention(implementation="xla")
  cudnn:     jax.nn.dot_product_attention(implementation="cudnn"): GPU only, bf16/f16
             (elsewhere the point is a "skipped" row)
  blockwise: mmjax.nn.attention.dot_product_attention(impl="blockwise")
  mmjax_xla: mmjax.nn.attention.dot_product_attention(impl="xla"): what impl="auto" runs on
             CPU below BLOCKWISE_MIN_SEQ (the two points give that threshold)
  auto:      mmjax.nn.attention.dot_product_attention(impl="auto"): chosen when lowered
  pallas:    mmjax.pallas.flash_attention (platform=None: Triton on GPU, Mosaic on TPU,
             interpret mode on CPU, which is correct but slow)
  tokamax:   tokamax.dot_product_attention(implementation="xla_chunked"), the
             peer (pip install tokamax; not an mmjax dependency)
--width W sets heads = W // head_dim for every head_dim; --tokens T sets batch = T // seq
(so every length sees the same tokens). A point that fails (e.g. out of memory, a shape
cuDNN rejects) is a row with an "error" and what it measured before failing.
"""

import argparse
import itertools
import resource
import time

from benchmarks import add_child_args, child_main, device_peak_mib, partial, run_points, timed
from mmjax import hostmem

IMPLS = ("xla", "cudnn", "blockwise", "mmjax_xla", "auto", "pallas", "tokamax")
MODES = ("fwd", "fwd_bwd")
FLOP_CONVENTION = ("FlashAttention's: fwd 4*batch*heads*seq^2*head_dim (halved when causal), "
                   "bwd 2.5x fwd, fwd_bwd 3.5x fwd")


def _rss_mib() -> float:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) / 1024
  return float("nan")


def attention_flops(batch: int, seq: int, heads: int, head_dim: int, causal: bool,
                    mode: str) -> float:
  """FlashAttention's FLOP count of one call (FLOP_CONVENTION)."""
  fwd = 4 * batch * heads * seq ** 2 * head_dim / (2 if causal else 1)
  return fwd * (3.5 if mode == "fwd_bwd" else 1.0)


def _attention_fn(impl: str, causal: bool):
  import jax
  if impl in ("xla", "cudnn"):
    def attn(q, k, v):
      return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation=impl)
  elif impl in ("blockwise", "mmjax_xla", "auto"):
    from mmjax.nn.attention import dot_product_attention
    name = "xla" if impl == "mmjax_xla" else impl

    def attn(q, k, v):
      return dot_product_attention(q, k, v, is_causal=causal, impl=name)
  elif impl == "pallas":
    from mmjax.pallas import flash_attention

    def attn(q, k, v):
      return flash_attention(q, k, v, is_causal=causal)
  elif impl == "tokamax":
    import tokamax
    from absl import flags
    flags.FLAGS.mark_as_parsed()   # tokamax reads absl flags; this script's are argparse's

    def attn(q, k, v):
      return tokamax.dot_product_attention(q, k, v, is_causal=causal,
                                           implementation="xla_chunked")
  else:
    raise ValueError(f"impl={impl!r} is not one of {IMPLS}")
  return attn


def point(impl: str, seq: int, batch: int, heads: int, head_dim: int, causal: bool,
          dtype: str = "float32", mode: str = "fwd_bwd", repeats: int = 3) -> dict:
  import jax
  import jax.numpy as jnp

  backend = jax.default_backend()
  if impl == "cudnn" and backend != "gpu":
    return {"skipped": f"no GPU: cuDNN attention needs one (backend {backend})",
            "backend": backend}
  if mode not in MODES:
    raise ValueError(f"mode={mode!r} is not one of {MODES}")
  attn = _attention_fn(impl, causal)
  dt = jnp.dtype(dtype)
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  q, k, v = (jax.random.normal(key, (batch, seq, heads, head_dim), dt) for key in keys[:3])
  if mode == "fwd":
    step, args = jax.jit(attn), (q, k, v)
  else:
    ct = jax.random.normal(keys[3], (batch, seq, heads, head_dim), jnp.float32)
    step = jax.jit(jax.value_and_grad(
        lambda q, k, v, ct: jnp.sum(attn(q, k, v).astype(jnp.float32) * ct), (0, 1, 2)))
    args = (q, k, v, ct)
  jax.block_until_ready(args)
  base = _rss_mib()
  t = time.perf_counter()
  compiled = step.lower(*args).compile()
  compile_s = time.perf_counter() - t
  mem = compiled.memory_analysis()
  flops = attention_flops(batch, seq, heads, head_dim, causal, mode)
  row = {"compile_s": compile_s, "backend": backend, "device_kind": jax.devices()[0].device_kind,
         "flop_convention": FLOP_CONVENTION, "tflop": flops / 1e12}
  if mem is not None:
    row["compiled_peak_mib"] = (mem.temp_size_in_bytes + mem.argument_size_in_bytes
                                + mem.output_size_in_bytes) / 2 ** 20
  partial(row)   # the compiled size survives an out-of-memory kill
  # Samples of >= 20 ms on an accelerator: a 1k-token forward there is well under 1 ms.
  t = timed(lambda: compiled(*args), repeats=repeats,
            min_s=0.02 if backend != "cpu" else 0.0)
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  return {**row, "rss_above_baseline_mib": peak - base, "device_peak_mib": device_peak_mib(),
          "median_s": t["median_s"], "inner": t["inner"],
          "tflop_per_s": flops / t["median_s"] / 1e12, "repeats": len(t["times_s"])}


def points(a) -> list[dict]:
  """The grid, causal outermost (a budget cut drops the causal rows first), then head_dim,
  sequence, mode and impl."""
  out = []
  for mask, d, seq, mode, impl in itertools.product(a.masks, a.head_dim, a.seq, a.mode, a.impl):
    heads = a.width // d if a.width else a.heads
    batch = max(1, a.tokens // seq) if a.tokens else a.batch
    out.append({"impl": impl, "seq": seq, "batch": batch, "heads": heads, "head_dim": d,
                "causal": mask == "causal", "dtype": a.dtype, "mode": mode,
                "repeats": a.repeats})
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--seq", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
  p.add_argument("--impl", nargs="+", default=["xla", "blockwise", "tokamax"], choices=IMPLS)
  p.add_argument("--heads", type=int, default=8)
  p.add_argument("--width", type=int, default=None, help="heads = width // head_dim")
  p.add_argument("--head_dim", type=int, nargs="+", default=[64])
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--tokens", type=int, default=None, help="batch = tokens // seq")
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
  p.add_argument("--mode", nargs="+", default=["fwd_bwd"], choices=MODES)
  p.add_argument("--masks", nargs="+", default=None, choices=["none", "causal"])
  p.add_argument("--causal", action="store_true", help="same as --masks causal")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--same_process", action="store_true",
                 help="all points in one process (restarted after a crash): faster, but RSS "
                      "and device peaks are then the process's, not the point's")
  p.add_argument("--budget_s", type=float, default=None,
                 help="stop starting points after this many seconds (the rest: skipped rows)")
  p.add_argument("--out", help="also append each JSON line to this file")
  add_child_args(p)
  a = p.parse_args()
  if a.points is not None:   # a child
    child_main(point, a.points, a.deadline)
    return
  a.masks = a.masks or (["causal"] if a.causal else ["none"])
  run_points("benchmarks.attention", points(a), fresh=not a.same_process, budget_s=a.budget_s,
             out=a.out, extra={"benchmark": "attention"})


if __name__ == "__main__":
  hostmem.keep_freed_memory()   # timed as the launcher runs: mmjax/hostmem.py
  main()
