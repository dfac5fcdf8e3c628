"""Peak memory and speed of `experiments.evaluate` against the dataset's size.

  python -m benchmarks.evaluate [--sizes 1000 5000 20000] [--image 48] [--batch 64]

Generates one image folder (random PNGs of --image px in 10 class folders), writes a
random-init SigLIP-layout model as a big_vision .npz (mu/8 towers at 64 px, CLIP's BPE
vocabulary), then evaluates zero-shot on the first N images of the folder for each N, each in a
fresh subprocess, and prints one JSON object per N: the process's peak RSS, images/s of the
streaming loop (decode, preprocess, embed, score) and the wall time. The model is tiny on
purpose: what is measured is the evaluation's own memory and the input pipeline, which a
bigger model would hide behind its compute.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

from mmjax import hostmem

CHILD = r"""
import json, resource, sys
from mmjax import hostmem
hostmem.keep_freed_memory()   # timed as the launcher runs: mmjax/hostmem.py
from experiments import evaluate
r = evaluate.evaluate(sys.argv[1], sys.argv[2], tokenizer="clip", templates="simple",
                      batch_size=int(sys.argv[3]), limit=int(sys.argv[4]), progress=False)
print(json.dumps({"n": r["metrics"]["n"], "images_per_second": r["images_per_second"],
                  "seconds": r["seconds"],
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def make_folder(root: str, n: int, size: int) -> None:
  import numpy as np
  from PIL import Image
  rng = np.random.default_rng(0)
  for i in range(n):
    d = os.path.join(root, f"class_{i % 10}")
    os.makedirs(d, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)).save(
        os.path.join(d, f"{i:06d}.png"))


def make_checkpoint(path: str) -> None:
  import jax
  import jax.numpy as jnp
  from mmjax import convert
  from mmjax.models import two_tower
  config = dict(image=dict(variant="mu/8", pool_type="map", posemb="learn"),
                text=dict(variant="mu", vocab_size=49408, max_len=16, pad_id=None),
                embed_dim=32, loss="siglip", text_proj="dense_bias")
  model = two_tower.Model(**config)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)),
                      jnp.zeros((1, 16), jnp.int32))["params"]
  full = dict(config, image=dict(width=32, depth=1, mlp_dim=128, num_heads=2, patch_size=(8, 8),
                                 pool_type="map", posemb="learn"),
              text=dict(width=32, depth=1, mlp_dim=128, num_heads=2, vocab_size=49408,
                        max_len=16, pad_id=None))
  convert.to_big_vision(full, jax.device_get(params), path)


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 20000])
  p.add_argument("--image", type=int, default=48)
  p.add_argument("--batch", type=int, default=64)
  a = p.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    folder, ckpt = os.path.join(tmp, "val"), os.path.join(tmp, "model.npz")
    make_folder(folder, max(a.sizes), a.image)
    make_checkpoint(ckpt)
    for n in a.sizes:
      out = subprocess.run([sys.executable, "-c", CHILD, f"big_vision:{ckpt}", f"folder:{folder}",
                            str(a.batch), str(n)], check=True, capture_output=True, text=True)
      row = json.loads(out.stdout.strip().splitlines()[-1])
      print(json.dumps({"benchmark": "evaluate", "image_px": a.image, "batch": a.batch, **row}),
            flush=True)


if __name__ == "__main__":
  hostmem.keep_freed_memory()   # timed as the launcher runs: mmjax/hostmem.py
  main()
