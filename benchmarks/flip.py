"""FLIP: train-step time against the patch-dropout rate, and the zero-shot accuracy it reaches.

  python -m benchmarks.flip [--config experiments/configs/flip_digits.py | defaults] [--rates 0 0.5]
      [--steps 30] [--train] [--out benchmarks/results/flip_cpu.jsonl]

For each rate r (config.model.image.patch_dropout) one JSON object: the median
time of the jit-compiled train step on random data of the config's batch
(compile excluded), and its ratio to the first rate's. With --train, each rate
also trains the config for its total_steps (loop.train, a workdir under
--workdir) and reports the final zero-shot top-1 and the run's examples/s.
"""

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import emit

from mmjax import hostmem
from mmjax.models import vit
from mmjax import objectives
from mmjax.train import config as config_lib, optimizer, sharding
from mmjax.train import state as state_lib


def _load(path: str):
  """A config file's get_config(), or for 'defaults' the library's default config
  (mmjax.train.config.defaults(): Ti/4 image and Ti text towers, 12 layers each)."""
  if path == "defaults":
    return config_lib.defaults()
  import importlib.util
  spec = importlib.util.spec_from_file_location("cfg", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


def _depth(tower) -> int:
  return tower.depth or vit.decode_variant(tower.variant)["depth"]


def step_time(config, steps: int, vocab_size: int = 512) -> float:
  """Median seconds of one jit train step on random data (one device)."""
  config.num_devices = 1
  mesh = sharding.make_mesh(config)
  objective = objectives.make(config, vocab_size=vocab_size, mesh=mesh,
                              batch_axes=sharding.batch_axes(mesh))
  tx, schedule = optimizer.make_optimizer(config.optim, config.total_steps)
  rng = np.random.default_rng(0)
  d, b = config.data, config.batch_size
  batch = {"image": jnp.asarray(rng.uniform(-1, 1, (b, d.image_size, d.image_size, 3)),
                                jnp.float32),
           "text": jnp.asarray(rng.integers(4, vocab_size, (b, d.text_len)), jnp.int32)}
  state = jax.jit(lambda r: state_lib.init_state(objective, tx, r, batch))(
      jax.random.PRNGKey(0))
  step = jax.jit(state_lib.make_train_step(objective, tx, schedule=schedule), donate_argnums=0)
  state, _ = step(state, batch)
  jax.block_until_ready(state)
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    state, m = step(state, batch)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default="experiments/configs/flip_digits.py",
                 help="a config file, or 'defaults' for the library's default model")
  p.add_argument("--rates", type=float, nargs="+", default=[0.0, 0.5])
  p.add_argument("--steps", type=int, default=30)
  p.add_argument("--train", action="store_true", help="also train each rate to the end")
  p.add_argument("--workdir", default="workdirs/flip")
  p.add_argument("--out", help="also append each JSON line to this file")
  p.add_argument("--loss_blocks", help="override config.loss_blocks ('dense' | 'tiled' | 'pallas')")
  a = p.parse_args()
  base = None
  for r in a.rates:
    config = _load(a.config)
    config.model.image.patch_dropout = r
    if a.loss_blocks:
      config.loss_blocks = a.loss_blocks
    config_lib.validate(config)
    t = step_time(config, a.steps)
    base = base or t
    row = {"config": os.path.basename(a.config), "patch_dropout": r,
           "image_variant": config.model.image.variant, "image_depth": _depth(config.model.image),
           "text_depth": _depth(config.model.text), "batch": config.batch_size,
           "loss_blocks": config.loss_blocks,
           "step_s": t, "step_time_vs_first": t / base, "backend": jax.default_backend()}
    if a.train:
      from mmjax.train import loop
      config = _load(a.config)
      config.model.image.patch_dropout = r
      res = loop.train(config, os.path.join(a.workdir, f"r{r}"))
      row.update(steps=res["steps"], zeroshot_top1=res.get("zeroshot_top1"),
                 train_examples_per_sec=res["examples_per_sec"])
    line = json.dumps(row)
    emit(line, a.out)


if __name__ == "__main__":
  hostmem.keep_freed_memory()   # timed as the launcher runs: mmjax/hostmem.py
  main()
