"""Compiled per-device memory of a ViT tower's train step under FSDP, with and without the
activation sharding constraints (mmjax.nn.partitioning).

  python -m benchmarks.activation_sharding [--variants So400m/14 g/14] [--batch 32]
      [--mesh 2 4] [--image-size 224] [--dtype bfloat16] [--scan 1]
      [--remat-policies none nothing_saveable] [--out FILE.jsonl]

The step is value_and_grad of a stand-in loss (mean square of the pooled features) and one
AdamW update over the ViT's params, sharded as the trainer shards them
(mmjax.train.sharding.state_shardings, config.sharding's defaults) on a data x fsdp mesh of
simulated CPU devices, the batch split over both axes. Nothing runs: params and the optimizer
state are jax.ShapeDtypeStructs, the step is only lowered and compiled, and each row is the
compiled memory_analysis() per device (temporaries, arguments), constraints on and off.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from benchmarks import emit
from mmjax import hostmem


def point(variant: str, batch: int, mesh_shape, image_size: int, dtype: str, scan: bool,
          policy: str, constrain: bool) -> dict:
  import jax
  import jax.numpy as jnp
  import optax
  from jax.sharding import NamedSharding, PartitionSpec as P

  from mmjax.models import vit
  from mmjax.nn import partitioning
  from mmjax.train import config as config_lib, sharding

  mesh = jax.make_mesh(tuple(mesh_shape), ("data", "fsdp"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  model = vit.Model(variant, dtype=jnp.dtype(dtype), scan=scan,
                    remat_policy=None if policy == "none" else policy)
  images = jax.ShapeDtypeStruct((batch, image_size, image_size, 3), jnp.float32)
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), images)["params"]
  tx = optax.adamw(1e-4, weight_decay=0.1)
  state = {"params": params, "opt_state": jax.eval_shape(tx.init, params)}
  shardings = sharding.state_shardings(state, mesh, config_lib.defaults().sharding)
  batch_sharding = NamedSharding(mesh, P(("data", "fsdp")))

  def step(state, images):
    with partitioning.logical_rules(mesh if constrain else None):
      def loss_fn(p):
        pooled, _ = model.apply({"params": p}, images, train=True)
        return jnp.mean(jnp.square(pooled.astype(jnp.float32)))
      loss, grads = jax.value_and_grad(loss_fn)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    return {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state}, loss

  t0 = time.perf_counter()
  compiled = jax.jit(step, in_shardings=(shardings, batch_sharding),
                     out_shardings=(shardings, None), donate_argnums=0).lower(
                         state, images).compile()
  mem = compiled.memory_analysis()
  gib = lambda k: getattr(mem, f"{k}_size_in_bytes") / 2 ** 30
  return {"variant": variant, "batch": batch, "mesh": list(mesh_shape), "dtype": dtype,
          "scan": scan, "remat_policy": policy, "constraints": constrain, "temp_gib": gib("temp"),
          "argument_gib": gib("argument"), "output_gib": gib("output"),
          "compile_s": time.perf_counter() - t0, "backend": jax.default_backend()}


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--variants", nargs="+", default=["So400m/14", "g/14"])
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--mesh", type=int, nargs=2, default=[2, 4], metavar=("DATA", "FSDP"))
  p.add_argument("--image-size", type=int, default=224)
  p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
  p.add_argument("--scan", type=int, default=1, choices=[0, 1])
  p.add_argument("--remat-policies", nargs="+", default=["none"],
                 help="'none' (no remat) or mmjax.nn.layers.REMAT_POLICIES names")
  p.add_argument("--out", help="also append each JSON line to this file")
  a = p.parse_args()
  n = a.mesh[0] * a.mesh[1]
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + f" --xla_force_host_platform_device_count={n}").strip()
  for variant in a.variants:
    for policy in a.remat_policies:
      for constrain in (False, True):
        emit(json.dumps(point(variant, a.batch, a.mesh, a.image_size, a.dtype, bool(a.scan),
                              policy, constrain)), a.out)


if __name__ == "__main__":
  hostmem.keep_freed_memory()   # timed as the launcher runs: mmjax/hostmem.py
  main()
