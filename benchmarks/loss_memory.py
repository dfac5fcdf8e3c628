"""Per-device memory and time of contrastive loss + grad, for every implementation.

  python -m benchmarks.loss_memory [--batch 4096 8192 16384 32768] [--dim 512] [--devices 8]

Each point runs in a fresh subprocess with `--devices` simulated CPU devices and
prints one JSON object: the compiled per-device memory (XLA memory analysis:
temporaries, arguments, outputs), the process's peak RSS (all devices of the
process together), and the median time of a jit-compiled loss + grad (wrt both
embeddings, scale and bias). The global batch is split over the devices;
impl="global" leaves the partitioning of the dense loss to XLA (blocks="dense"
everywhere; the JSON's "dense" rows before the impl/blocks split are this impl).
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

IMPLS = ("global", "gather", "ring")


def point(loss: str, impl: str, batch: int, dim: int, devices: int, repeats: int) -> dict:
  import jax
  jax.config.update("jax_num_cpu_devices", devices)
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import NamedSharding, PartitionSpec as P

  from mmjax.losses import clip_loss, siglip_loss

  mesh = jax.make_mesh((devices,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))

  def local(x, y, s, b, axis_name=None):
    kw = dict(impl=impl, axis_name=axis_name)
    return clip_loss(x, y, s, **kw) if loss == "clip" else siglip_loss(x, y, s, b, **kw)

  if impl == "global":
    fn = local
  else:
    fn = jax.shard_map(lambda *a: local(*a, axis_name="data"), mesh=mesh,
                       in_specs=(P("data"), P("data"), P(), P()), out_specs=P())
  step = jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2, 3)))
  rng = np.random.default_rng(0)
  x = rng.normal(size=(batch, dim)).astype(np.float32)
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  shard = NamedSharding(mesh, P("data"))
  args = (jax.device_put(x, shard), jax.device_put(np.roll(x, 1, 0), shard),
          jnp.float32(10.0), jnp.float32(-10.0))
  mem = step.lower(*args).compile().memory_analysis()
  jax.block_until_ready(step(*args))
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(step(*args))
    times.append(time.perf_counter() - t)
  return {"loss": loss, "impl": impl, "global_batch": batch, "dim": dim, "devices": devices,
          "per_device_temp_mib": mem.temp_size_in_bytes / 2 ** 20,
          "per_device_peak_mib": (mem.temp_size_in_bytes + mem.argument_size_in_bytes
                                  + mem.output_size_in_bytes) / 2 ** 20,
          "process_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
          "median_s": float(np.median(times)), "backend": jax.default_backend()}


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batch", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
  p.add_argument("--dim", type=int, default=512)
  p.add_argument("--devices", type=int, default=8)
  p.add_argument("--repeats", type=int, default=2)
  p.add_argument("--loss", nargs="+", default=["siglip", "clip"])
  p.add_argument("--impl", nargs="+", default=list(IMPLS))
  p.add_argument("--point", action="store_true", help=argparse.SUPPRESS)
  a = p.parse_args()
  if a.point:   # the child: exactly one point
    print(json.dumps(point(a.loss[0], a.impl[0], a.batch[0], a.dim, a.devices, a.repeats)))
    return
  for loss in a.loss:
    for impl in a.impl:
      for batch in a.batch:
        cmd = [sys.executable, "-m", "benchmarks.loss_memory", "--point", "--loss", loss,
               "--impl", impl, "--batch", str(batch), "--dim", str(a.dim),
               "--devices", str(a.devices), "--repeats", str(a.repeats)]
        r = subprocess.run(cmd, capture_output=True, text=True,
                           env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
        if r.returncode:
          print(json.dumps({"loss": loss, "impl": impl, "global_batch": batch,
                            "error": r.stderr.strip().splitlines()[-1:]}), flush=True)
        else:
          print(r.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
  main()
