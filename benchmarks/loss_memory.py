"""Per-device memory and time of contrastive loss + grad, for every implementation.

  python -m benchmarks.loss_memory [--batch 4096 8192 16384 32768] [--dim 512] [--devices 8]
      [--blocks dense] [--dtype float32] [--same_process] [--budget_s S] [--out FILE]

Each point runs in a fresh subprocess with `--devices` simulated CPU devices (on a GPU or TPU
host: the first `--devices` accelerators) and prints one JSON object: the compiled per-device
memory (XLA memory analysis: temporaries, arguments, outputs), the process's peak RSS (all
devices of the process together), the device allocator's peak where the backend reports one
(`memory_stats()['peak_bytes_in_use']`: GPU, TPU), the loss value and the median time of a
jit-compiled loss + grad (wrt both embeddings, scale and bias). The global batch is split
over the devices; impl="global" leaves the partitioning of the loss to XLA; `--blocks` are
the blocks= values (dense, tiled, pallas) each impl is run with (the JSON's rows without
"blocks" are dense). Embeddings: unit-norm random [batch, dim] in `--dtype`. A point that
fails is a row with an "error" ("oom": true when it ran out of memory); after a dense point
runs out of memory the larger dense batches of that loss and impl are skipped rows.
"""

import argparse
import itertools

from benchmarks import add_child_args, child_main, device_peak_mib, partial, run_points, timed
from mmjax import hostmem

IMPLS = ("global", "gather", "ring")


def embeddings(batch: int, dim: int, dtype: str):
  """The benchmark's inputs: unit-norm random x [batch, dim] and y = x rolled by one row."""
  import jax
  import jax.numpy as jnp
  x = jax.random.normal(jax.random.PRNGKey(0), (batch, dim), jnp.float32)
  x = x / jnp.linalg.norm(x, axis=1, keepdims=True)
  return x.astype(dtype), jnp.roll(x, 1, 0).astype(dtype)


def point(loss: str, impl: str, batch: int, dim: int, devices: int, repeats: int,
          blocks: str = "dense", dtype: str = "float32", point_budget_s: float | None = None) -> dict:
  import jax
  try:
    jax.config.update("jax_num_cpu_devices", devices)
  except RuntimeError:   # a later point of a --same_process child: the backend is up
    pass
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P

  from mmjax.losses import clip_loss, siglip_loss

  mesh = jax.make_mesh((devices,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))

  def local(x, y, s, b, axis_name=None):
    kw = dict(impl=impl, axis_name=axis_name, blocks=blocks)
    return clip_loss(x, y, s, **kw) if loss == "clip" else siglip_loss(x, y, s, b, **kw)

  if impl == "global":
    fn = local
  else:
    fn = jax.shard_map(lambda *a: local(*a, axis_name="data"), mesh=mesh,
                       in_specs=(P("data"), P("data"), P(), P()), out_specs=P(),
                       check_vma=blocks != "pallas")   # pallas_call inside needs it off
  step = jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2, 3)))
  shard = NamedSharding(mesh, P("data"))

  # Made on the devices: 262,144 x 1,024 floats are 1 GiB.
  x, y = jax.jit(lambda: embeddings(batch, dim, dtype), out_shardings=(shard, shard))()
  args = (x, y, jnp.float32(10.0), jnp.float32(-10.0))
  compiled = step.lower(*args).compile()
  mem = compiled.memory_analysis()
  row = {"per_device_temp_mib": mem.temp_size_in_bytes / 2 ** 20,
         "per_device_peak_mib": (mem.temp_size_in_bytes + mem.argument_size_in_bytes
                                 + mem.output_size_in_bytes) / 2 ** 20,
         "backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind}
  partial(row)   # the compiled size survives an out-of-memory kill
  t = timed(lambda: compiled(*args), repeats=repeats, budget_s=point_budget_s)
  import resource
  return {"global_batch": batch, **row, "device_peak_mib": device_peak_mib(),
          "process_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
          "loss_value": float(t["out"][0]), "median_s": t["median_s"], "repeats": len(t["times_s"])}


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batch", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
  p.add_argument("--dim", type=int, default=512)
  p.add_argument("--devices", type=int, default=8)
  p.add_argument("--repeats", type=int, default=2)
  p.add_argument("--point_budget_s", type=float, default=None,
                 help="stop timing a point once this many seconds are spent (>= 1 sample)")
  p.add_argument("--loss", nargs="+", default=["siglip", "clip"])
  p.add_argument("--impl", nargs="+", default=list(IMPLS))
  p.add_argument("--blocks", nargs="+", default=["dense"], choices=["dense", "tiled", "pallas"])
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--same_process", action="store_true",
                 help="all points in one process (restarted after a crash): faster, but the "
                      "RSS and device peaks are then the process's, not the point's")
  p.add_argument("--budget_s", type=float, default=None,
                 help="stop starting points after this many seconds (the rest: skipped rows)")
  p.add_argument("--out", default=None, help="also append each JSON line to this file")
  add_child_args(p)
  a = p.parse_args()
  if a.points is not None:   # a child
    child_main(point, a.points, a.deadline)
    return
  grid = [{"loss": loss, "impl": impl, "blocks": blocks, "batch": batch, "dim": a.dim,
           "devices": a.devices, "repeats": a.repeats, "dtype": a.dtype,
           "point_budget_s": a.point_budget_s}   # batch-major: a budget cut drops the largest
          for batch, loss, impl, blocks in itertools.product(sorted(a.batch), a.loss, a.impl,
                                                             a.blocks)
          if not (impl == "gather" and blocks != "dense")]   # gather makes [n, N] logits

  def after(row: dict):
    if row["blocks"] != "dense" or not row.get("oom"):
      return None
    return ([q for q in grid if q["blocks"] == "dense" and q["batch"] > row["batch"]
             and (q["loss"], q["impl"]) == (row["loss"], row["impl"])],
            f"dense ran out of memory at batch {row['batch']:,}")

  run_points("benchmarks.loss_memory", grid, fresh=not a.same_process, budget_s=a.budget_s,
             out=a.out, extra={"benchmark": "loss_memory"}, on_row=after)


if __name__ == "__main__":
  hostmem.keep_freed_memory()   # timed as the launcher runs: mmjax/hostmem.py
  main()
