"""The main job (experiments/configs/siglip_digits.py) from the TFDS digits and from the same
digits written as webdataset shards, side by side: the zero-shot and retrieval numbers each
reaches, and its examples/s.

  python -m benchmarks.wds_digits [--steps 600] [--workers 0] [--output FILE]

The shards are written by `mmjax.data.wds.write_shards` from an image folder (the digits as
PNGs and a captions.csv, tests/wds_digits.py), with the class labels and a classnames.txt, so
both runs see the same images, captions, splits and labels; they differ in how the data is read
(global shuffle of a random-access source vs. shard streams with a window shuffle) and in the
augmentation's random draws. One JSON object per run.
"""

import argparse
import json
import os
import tempfile
import time

from mmjax import hostmem


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--steps", type=int, default=600)
  p.add_argument("--workers", type=int, default=0)
  p.add_argument("--output", default=None)
  a = p.parse_args()
  from experiments.configs import siglip_digits
  from mmjax.train import loop
  from tests.wds_digits import wds_overrides, write_digits_shards
  with tempfile.TemporaryDirectory() as tmp:
    data_dir = os.path.join(tmp, "tfds")
    shards = write_digits_shards(data_dir, os.path.join(tmp, "wds"), shard_size=100)
    for source, overrides in (("tfds", {}), ("wds", wds_overrides(shards))):
      c = siglip_digits.get_config()
      c.data.data_dir, c.total_steps, c.data.num_workers = data_dir, a.steps, a.workers
      for k, v in overrides.items():
        c.data[k.split(".")[1]] = v
      t0 = time.time()
      r = loop.train(c, os.path.join(tmp, f"run_{source}"))
      row = {"data": source, "steps": a.steps, "batch": c.batch_size, "workers": a.workers,
             **{k: r[k] for k in ("zeroshot_top1", "retrieval_i2t_r1", "retrieval_t2i_r1",
                                  "linear_probe_top1", "examples_per_sec") if k in r},
             "wall_s": time.time() - t0}
      print(json.dumps(row), flush=True)
      if a.output:
        with open(a.output, "a") as f:
          f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
  hostmem.keep_freed_memory()   # timed as the launcher runs: mmjax/hostmem.py
  main()
