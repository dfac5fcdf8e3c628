"""Training input pipeline speed: mmjax's webdataset reader against webdataset + torchvision.

  python -m benchmarks.input_pipeline [--images 2000] [--workers 0 1 2] [--batch 64]
      [--batches 20] [--dir DIR] [--output benchmarks/results/input_pipeline_cpu.jsonl]

Writes --images synthetic photo-like JPEGs (quality 90, 320..800 px a side: smooth random
gradients, filled ellipses and rectangles and a little grain) with captions "a photo of thing
{i}" as img2dataset-layout shards of 250 (mmjax.data.wds.write_shards), then for each worker
count W measures images/s of

- mmjax: mmjax.data.wds_pipeline.make_train_iterator at 224 px (RandomResizedCrop scale (0.6, 1),
  bicubic, the JPEG decoded at a reduced size where the crop allows; shuffle_buffer 1000,
  shard_cycle 4), handing uint8 [b, 224, 224, 3] to the device, which normalises there;
- torch: webdataset.WebDataset(...).shuffle(1000).decode("pil").to_tuple("jpg", "txt")
  .map_tuple(transform, tokenize).batched(b) in a torch DataLoader(num_workers=W), transform
  being open_clip's training one (torchvision RandomResizedCrop(224, scale=(0.6, 1), bicubic),
  ToTensor, Normalize(OpenAI mean/std)): float32, normalised on the host.

So each library runs its real pipeline (the host-side work differs by the normalisation, which
mmjax leaves to the accelerator). Both tokenize with the same CLIP tokenizer, both read the
shards endlessly (mmjax's iterator is endless; torch's pipeline is .repeat()-ed, each worker
reading its own shards, webdataset.split_by_worker). The first 2 batches (worker start-up) are
not timed, then --batches batches are. One JSON object per (library, workers), then
{"ratio_mmjax_over_torch": {W: r}}.
"""

import argparse
import csv
import json
import os
import platform
import sys
import tempfile
import time

from benchmarks import emit
from mmjax import hostmem

IMAGE_SIZE, TEXT_LEN, SHARD_SIZE, WARMUP = 224, 32, 250, 2
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def cpu_name() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


# --- data ---------------------------------------------------------------------------------

def synthetic_photo(rng, w: int, h: int):
  """A smooth, photo-like RGB image: a bicubic-upsampled random low-frequency field, a few
  filled ellipses and rectangles, a slight blur and a little grain (not iid noise)."""
  import numpy as np
  from PIL import Image, ImageDraw, ImageFilter
  g = int(rng.integers(2, 6))
  base = rng.integers(0, 256, size=(g, g, 3), dtype=np.uint8)
  im = Image.fromarray(base).resize((w, h), Image.BICUBIC)
  draw = ImageDraw.Draw(im)
  for _ in range(int(rng.integers(3, 9))):
    x0, x1 = sorted(rng.integers(0, w, 2).tolist())
    y0, y1 = sorted(rng.integers(0, h, 2).tolist())
    fill = tuple(int(c) for c in rng.integers(0, 256, 3))
    (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1 + 1, y1 + 1), fill=fill)
  im = im.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.5, 2.0))))
  x = np.asarray(im, np.float32) + rng.normal(0.0, 3.0, size=(h, w, 1)).astype(np.float32)
  return Image.fromarray(np.clip(x, 0, 255).astype(np.uint8))


def make_shards(root: str, n: int, seed: int) -> list[str]:
  """n JPEGs and captions under root/images, as shards under root/shards/train; reused when
  root/shards/train already holds them."""
  import numpy as np
  from mmjax.data import wds
  out = os.path.join(root, "shards")
  want = (n + SHARD_SIZE - 1) // SHARD_SIZE
  have = sorted(os.path.join(out, "train", f) for f in os.listdir(os.path.join(out, "train"))
                ) if os.path.isdir(os.path.join(out, "train")) else []
  if len(have) == want and os.path.isfile(os.path.join(root, "captions.csv")):
    with open(os.path.join(root, "captions.csv")) as f:
      if sum(1 for _ in f) - 1 == n:
        return have
  rng = np.random.default_rng(seed)
  os.makedirs(os.path.join(root, "images"), exist_ok=True)
  rows = []
  for i in range(n):
    w, h = (int(v) for v in rng.integers(320, 801, 2))
    name = os.path.join("images", f"{i:06d}.jpg")
    synthetic_photo(rng, w, h).save(os.path.join(root, name), quality=90)
    rows.append((name, f"a photo of thing {i}", "train"))
  with open(os.path.join(root, "captions.csv"), "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(("image", "caption", "split"))
    writer.writerows(rows)
  return wds.write_shards(os.path.join(root, "captions.csv"), out, shard_size=SHARD_SIZE,
                          test_fraction=0.0, seed=seed, overwrite=True)["train"]


# --- the two pipelines --------------------------------------------------------------------

def timed(it, batches: int) -> tuple[float, int]:
  """(seconds, images) of `batches` batches after WARMUP untimed ones."""
  for _ in range(WARMUP):
    next(it)
  n, t0 = 0, time.perf_counter()
  for _ in range(batches):
    b = next(it)
    n += len(b["text"] if isinstance(b, dict) else b[1])
  return time.perf_counter() - t0, n


def run_mmjax(paths, workers: int, batch: int, batches: int, tokenizer, seed: int):
  from mmjax.data import wds_pipeline
  from mmjax.train import config as config_lib
  data = config_lib.defaults().data
  data.update(dict(image_size=IMAGE_SIZE, text_len=TEXT_LEN, augment=True, crop_scale_min=0.6,
                   flip=False, num_workers=workers, shuffle_buffer=1000, shard_cycle=4,
                   streams=0))
  it = wds_pipeline.make_train_iterator(paths, data, tokenizer=tokenizer,
                                        global_batch_size=batch, seed=seed)
  try:
    seconds, n = timed(it, batches)
  finally:
    it.close()
  return seconds, n


class Tokenize:
  """The caption (str) -> int32 [TEXT_LEN], with mmjax's tokenizer object."""

  def __init__(self, tokenizer):
    self.tokenizer = tokenizer

  def __call__(self, text: str):
    return self.tokenizer.encode([text], TEXT_LEN)[0]


def run_torch(paths, workers: int, batch: int, batches: int, tokenizer, seed: int):
  import torch
  torch.set_num_threads(1)
  from tests.open_clip_peer import _patch_torchvision   # the test extra's torch, as the tests
  _patch_torchvision()
  import webdataset
  from torchvision import transforms
  transform = transforms.Compose([
      transforms.RandomResizedCrop(IMAGE_SIZE, scale=(0.6, 1.0),
                                   interpolation=transforms.InterpolationMode.BICUBIC),
      transforms.ToTensor(),
      transforms.Normalize(OPENAI_MEAN, OPENAI_STD)])
  ds = (webdataset.WebDataset(paths, shardshuffle=len(paths), seed=seed,
                              workersplitter=webdataset.split_by_worker)
        .shuffle(1000).decode("pil").to_tuple("jpg", "txt")
        .map_tuple(transform, Tokenize(tokenizer)).batched(batch, partial=False).repeat())
  loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers)
  it = iter(loader)
  try:
    seconds, n = timed(it, batches)
  finally:
    del it   # shuts the workers down
  return seconds, n


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--images", type=int, default=2000)
  p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--batches", type=int, default=20)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--dir", default=None, help="keep (and reuse) the images and shards here")
  p.add_argument("--output", default=None, help="append the JSON lines to this file")
  a = p.parse_args()
  from mmjax.data import tokenizers
  tokenizer = tokenizers.get_tokenizer("clip")
  cpu = cpu_name()
  with tempfile.TemporaryDirectory() as tmp:
    root = os.path.expanduser(a.dir) if a.dir else tmp
    os.makedirs(root, exist_ok=True)
    t0 = time.perf_counter()
    paths = make_shards(root, a.images, a.seed)
    print(f"# {len(paths)} shards of {a.images} images in {time.perf_counter() - t0:.1f} s "
          f"({sum(os.path.getsize(q) for q in paths) / a.images / 1024:.0f} KiB a sample)",
          file=sys.stderr, flush=True)
    rates = {}
    for w in a.workers:
      for lib, fn in (("mmjax", run_mmjax), ("torch", run_torch)):
        seconds, n = fn(paths, w, a.batch, a.batches, tokenizer, a.seed)
        rates[(lib, w)] = n / seconds
        emit(json.dumps({"library": lib, "workers": w, "batch": a.batch,
                         "image_size": IMAGE_SIZE, "images_per_second": n / seconds,
                         "seconds": seconds, "cpu": cpu}), a.output)
    emit(json.dumps({"ratio_mmjax_over_torch": {
        str(w): rates[("mmjax", w)] / rates[("torch", w)] for w in a.workers}}), a.output)


if __name__ == "__main__":
  hostmem.keep_freed_memory()   # timed as the launcher runs: mmjax/hostmem.py
  main()
