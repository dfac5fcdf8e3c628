"""Time and peak memory of attention forward + backward on CPU, per implementation.

  python -m benchmarks.attention [--seq 1024 2048 4096 8192 16384] [--impl xla blockwise tokamax]
      [--out benchmarks/results/attention_cpu.jsonl]

Each point runs in a fresh subprocess and prints one JSON object: batch 1,
8 heads, head_dim 64, f32, the median time of a jit-compiled
value_and_grad(sum(attention(q, k, v) * ct)) wrt q, k, v, XLA's compiled memory
(temporaries + arguments + outputs) and the process's peak RSS above its
baseline before compiling. Implementations:
  xla:       jax.nn.dot_product_attention(implementation="xla")
  blockwise: mmjax.nn.attention.dot_product_attention(impl="blockwise")
  tokamax:   tokamax.dot_product_attention(implementation="xla_chunked"), the
             peer (pip install tokamax; not an mmjax dependency)
A point that fails (e.g. out of memory) prints what it measured before failing
(the compiled size) with an "error".
"""

import argparse
import json
import resource
import subprocess
import sys
import time

from benchmarks import emit

IMPLS = ("xla", "blockwise", "tokamax")


def _rss_mib() -> float:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) / 1024
  return float("nan")


def point(impl: str, seq: int, heads: int, head_dim: int, repeats: int, causal: bool) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np

  if impl == "xla":
    def attn(q, k, v):
      return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="xla")
  elif impl == "blockwise":
    from mmjax.nn.attention import dot_product_attention

    def attn(q, k, v):
      return dot_product_attention(q, k, v, is_causal=causal, impl="blockwise")
  elif impl == "tokamax":
    import tokamax
    from absl import flags
    flags.FLAGS.mark_as_parsed()   # tokamax reads absl flags; this script's are argparse's

    def attn(q, k, v):
      return tokamax.dot_product_attention(q, k, v, is_causal=causal,
                                           implementation="xla_chunked")
  else:
    raise ValueError(f"impl={impl!r} is not one of {IMPLS}")

  rng = np.random.default_rng(0)
  q, k, v, ct = (jnp.asarray(rng.normal(size=(1, seq, heads, head_dim)), jnp.float32)
                 for _ in range(4))
  step = jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(attn(q, k, v) * ct), (0, 1, 2)))
  base = _rss_mib()
  mem = step.lower(q, k, v).compile().memory_analysis()
  row = {"impl": impl, "seq": seq, "batch": 1, "heads": heads, "head_dim": head_dim,
         "causal": causal, "dtype": "float32",
         "compiled_peak_mib": (mem.temp_size_in_bytes + mem.argument_size_in_bytes
                               + mem.output_size_in_bytes) / 2 ** 20}
  print(json.dumps(row), flush=True)   # the compiled size survives an out-of-memory kill
  jax.block_until_ready(step(q, k, v))
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(step(q, k, v))
    times.append(time.perf_counter() - t)
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  return {**row, "rss_above_baseline_mib": peak - base, "median_s": float(np.median(times)),
          "repeats": repeats, "backend": jax.default_backend()}


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--seq", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
  p.add_argument("--impl", nargs="+", default=list(IMPLS), choices=IMPLS)
  p.add_argument("--heads", type=int, default=8)
  p.add_argument("--head_dim", type=int, default=64)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--causal", action="store_true")
  p.add_argument("--out", help="also append each JSON line to this file")
  p.add_argument("--point", action="store_true", help=argparse.SUPPRESS)
  a = p.parse_args()
  if a.point:   # the child: exactly one point
    print(json.dumps(point(a.impl[0], a.seq[0], a.heads, a.head_dim, a.repeats, a.causal)))
    return
  for seq in a.seq:
    for impl in a.impl:
      cmd = [sys.executable, "-m", "benchmarks.attention", "--point", "--impl", impl,
             "--seq", str(seq), "--heads", str(a.heads), "--head_dim", str(a.head_dim),
             "--repeats", str(a.repeats)] + (["--causal"] if a.causal else [])
      r = subprocess.run(cmd, capture_output=True, text=True)
      lines = r.stdout.strip().splitlines()
      if r.returncode == 0:
        line = lines[-1]
      else:   # keep what the child measured before it failed (e.g. killed out of memory)
        row = json.loads(lines[-1]) if lines else {"impl": impl, "seq": seq}
        row["error"] = f"exit {r.returncode}: " + (r.stderr.strip().splitlines() or [""])[-1][:300]
        line = json.dumps(row)
      emit(line, a.out)


if __name__ == "__main__":
  main()
