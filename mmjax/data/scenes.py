"""Digit scenes: several handwritten digits on one canvas, with boxes, region texts, a spatial
caption and a per-pixel class map (for LocCa-style decoder losses and dense probes).

Built offline and deterministically from scikit-learn's 8x8 digits (mmjax.data.digits): train
scenes use only the digits of digits.split_indices' train part, 'test' scenes only its held-out
part. A scene is a canvas of 24-40 x 24-64 px (height x width), background near 0, holding 1-4
digits, each an 8x8 digit resized to 8-16 px (distinct sizes within a scene), light ink, at
random non-overlapping places.

  ds = pipeline.Dataset("mmjax_digit_scenes", data_dir=d)   # built on first use
  ex = ds.source("test")[0]
  ex["image"]       uint8 [H, W, 3]
  ex["text"]        b"a seven left of a two and above a four"
  ex["label"]       int: the class of the largest digit (the caption's first digit)
  ex["regions"]     JSON: [{"box": [x0, y0, x1, y1], "text": "a seven", "label": 7,
                            "digit": <index into sklearn's load_digits()>}, ...]
  ex["class_map"]   uint8 [H, W]: 0 background, class + 1 where that digit's ink is

A box is the tight box of its digit's ink (the class map's pixels of that digit) in
normalised image coordinates: pixel columns x0 * W .. x1 * W - 1 and rows y0 * H .. y1 * H - 1;
regions[0] is the largest digit, the others follow in the order the caption names them.

Sizes: the TFDS training pipeline squashes every image to config.data.image_size x image_size
(mmjax.data.pipeline.resize, no aspect kept), which keeps normalised boxes and relations
valid; config.data.augment's random resized crop moves and cuts them, and config.data.flip
swaps left and right: train a box or relation objective with augment=False and flip=False.
(NaFlex towers, config.data.naflex, keep the aspect ratio; the same two settings apply.)

write_scene_shards writes the same scenes as webdataset shards (CLIP_benchmark's layout).
"""

from __future__ import annotations

import io
import json
import os
from typing import Iterator, NamedTuple

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from mmjax.data import digits, shard_writer

NAMES = digits.CLASS_NAMES
SEED = 20260611
SPLIT_SIZES = {"train": 2000, "test": 400}
HEIGHTS, WIDTHS = (24, 40), (24, 64)   # inclusive ranges, pixels
SIZES = (8, 16)                        # a digit's side, pixels, inclusive
MAX_DIGITS = 4
INK = 64                               # intensity (0..255) from which a pixel is a digit's ink
_TRIES = 50                            # placements tried per digit before it is left out

ZEROSHOT_TEMPLATES = [
    "a scene with a handwritten {}.",
    "the largest digit is a {}.",
    "a big {} among small digits.",
]


class Region(NamedTuple):
  box: tuple[float, float, float, float]   # x0, y0, x1, y1 in [0, 1]
  label: int
  digit: int                                # index into load_digits()


class Scene(NamedTuple):
  image: np.ndarray       # uint8 [H, W, 3]
  class_map: np.ndarray   # uint8 [H, W]
  regions: list           # [Region], regions[0] the largest digit
  caption: str


def article(name: str) -> str:
  return "an" if name == "eight" else "a"   # "a one", "an eight"


def region_text(label: int) -> str:
  """A region's text, in the captions' words ("a seven", "an eight")."""
  return f"{article(NAMES[label])} {NAMES[label]}"


def relation(a, b) -> str:
  """Where box a lies relative to box b (boxes (x0, y0, x1, y1), same units): 'left of',
  'right of', 'above' or 'below', along the axis on which their centres differ more."""
  dx = (a[0] + a[2]) - (b[0] + b[2])
  dy = (a[1] + a[3]) - (b[1] + b[3])
  if abs(dx) >= abs(dy):
    return "left of" if dx < 0 else "right of"
  return "above" if dy < 0 else "below"


def caption(labels: list[int], boxes: list) -> str:
  """The caption of a layout: labels [n] ints, boxes [n] (x0, y0, x1, y1) in pixels; the
  first is the subject, related to each other in order ("a one above a four and a nine",
  "a three left of a seven and below a two")."""
  if len(labels) != len(boxes) or not labels:
    raise ValueError(f"labels ({len(labels)}) and boxes ({len(boxes)}) must be as many, >= 1")
  named = [f"{article(NAMES[c])} {NAMES[c]}" for c in labels]
  if len(labels) == 1:
    return f"a single {NAMES[labels[0]]}"
  rels = [relation(boxes[0], b) for b in boxes[1:]]
  if len(set(rels)) == 1:   # one relation to all: "a one above a four, a two and a nine"
    others = named[1:]
    listed = others[0] if len(others) == 1 else ", ".join(others[:-1]) + " and " + others[-1]
    return f"{named[0]} {rels[0]} {listed}"
  parts = [f"{r} {o}" for r, o in zip(rels, named[1:])]
  return f"{named[0]} " + ", ".join(parts[:-1]) + " and " + parts[-1]


def render_digit(img8: np.ndarray, size: int) -> np.ndarray:
  """[8, 8] values 0..16 (ink high) -> uint8 [size, size] intensities 0..255 (bilinear)."""
  grey = np.round(np.asarray(img8, np.float64) * (255 / 16)).astype(np.uint8)
  return np.asarray(Image.fromarray(grey, "L").resize((size, size), Image.BILINEAR))


def _place(rng, h: int, w: int, size: int, taken: list) -> tuple[int, int] | None:
  """A top-left (y, x) for a size x size square inside h x w that keeps a 1 px gap from
  every square in taken [(y, x, size)], or None after _TRIES tries."""
  for _ in range(_TRIES):
    y, x = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
    if all(y + size < ty or ty + ts < y or x + size < tx or tx + ts < x
           for ty, tx, ts in taken):
      return y, x
  return None


def make_scene(images: np.ndarray, targets: np.ndarray, pool: np.ndarray,
               rng: np.random.Generator) -> Scene:
  """One scene from the digits `pool` (indices into images [N, 8, 8] 0..16, targets [N])."""
  h = int(rng.integers(HEIGHTS[0], HEIGHTS[1] + 1))
  w = int(rng.integers(WIDTHS[0], WIDTHS[1] + 1))
  n = int(rng.integers(1, MAX_DIGITS + 1))
  sizes = sorted(rng.choice(np.arange(SIZES[0], SIZES[1] + 1), n, replace=False), reverse=True)
  image = rng.integers(0, 12, size=(h, w), dtype=np.uint8)   # background near 0
  class_map = np.zeros((h, w), np.uint8)
  taken, found = [], []
  for size in sizes:   # largest first: it is placed whenever any digit is
    at = _place(rng, h, w, int(size), taken)
    digit = int(rng.choice(pool))
    if at is None:
      continue
    y, x = at
    taken.append((y, x, int(size)))
    ink = render_digit(images[digit], int(size))
    view = image[y:y + size, x:x + size]
    np.maximum(view, ink, out=view)
    label = int(targets[digit])
    class_map[y:y + size, x:x + size][ink >= INK] = label + 1
    rows, cols = np.nonzero(ink >= INK)
    found.append((label, digit, (x + cols.min(), y + rows.min(),
                                 x + cols.max() + 1, y + rows.max() + 1)))
  boxes = [b for _, _, b in found]
  regions = [Region((float(b[0] / w), float(b[1] / h), float(b[2] / w), float(b[3] / h)),
                    label, digit) for (label, digit, _), b in zip(found, boxes)]
  text = caption([r.label for r in regions], boxes)
  return Scene(np.repeat(image[..., None], 3, axis=-1), class_map, regions, text)


def regions_json(regions: list) -> str:
  """The regions as the datasets store them: a JSON list of {"box": [x0, y0, x1, y1],
  "text": "a three", "label": int, "digit": sklearn index}."""
  return json.dumps([{"box": [round(v, 6) for v in r.box], "text": region_text(r.label),
                      "label": r.label, "digit": r.digit} for r in regions])


def _load_digits():
  from sklearn.datasets import load_digits   # ~0.7 s to import: only when scenes are made
  d = load_digits()
  return d.images, d.target


def generate(split: str, n: int | None = None, *, seed: int = SEED) -> Iterator[Scene]:
  """The first n scenes of split ('train': from the digits' train part, 'test': from the
  held-out part; n None: SPLIT_SIZES[split]); scene i depends only on (seed, split, i)."""
  if split not in SPLIT_SIZES:
    raise ValueError(f"split={split!r}: one of {sorted(SPLIT_SIZES)}")
  images, targets = _load_digits()
  train, test = digits.split_indices(targets)
  pool = {"train": train, "test": test}[split]
  code = sorted(SPLIT_SIZES).index(split)
  for i in range(SPLIT_SIZES[split] if n is None else n):
    yield make_scene(images, targets, pool, np.random.default_rng([seed, code, i]))


class MmjaxDigitScenes(tfds.core.GeneratorBasedBuilder):
  """Scenes of handwritten digits with boxes and captions; TFDS name 'mmjax_digit_scenes'."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.0.0": "1-4 scikit-learn digits per scene, boxes, class maps.",
                   "1.1.0": "Region texts in the captions' words ('a seven', not 'the digit "
                            "seven')."}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "text": tfds.features.Text(),
            "label": tfds.features.ClassLabel(names=NAMES),
            "regions": tfds.features.Text(),
            "class_map": tfds.features.Tensor(shape=(None, None), dtype=np.uint8,
                                              encoding=tfds.features.Encoding.ZLIB),
        }),
        supervised_keys=("image", "label"),
        disable_shuffling=True,   # record i of a split is generate(split)'s scene i
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download: the digits ship inside scikit-learn
    return {split: self._generate_examples(split) for split in SPLIT_SIZES}

  def _generate_examples(self, split):
    for i, s in enumerate(generate(split)):
      yield i, {"image": Image.fromarray(s.image), "text": s.caption, "label": s.regions[0].label,
                "regions": regions_json(s.regions), "class_map": s.class_map}


def _png(array: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format="PNG")
  return buf.getvalue()


def write_scene_shards(out: str, *, sizes: dict | None = None, shard_size: int = 500,
                       seed: int = SEED) -> dict:
  """The scenes as webdataset shards written by webdataset's TarWriter, CLIP_benchmark's
  layout: out/{split}/{k}.tar (and nshards.txt), out/classnames.txt and
  out/zeroshot_classification_templates.txt. A sample's members: png (the image), txt (the
  caption), cls (the label), json (regions_json) and map.png (the class map, 8-bit grey).
  sizes: {split: number of scenes} (default SPLIT_SIZES). Returns {split: [shard paths]}."""
  if shard_size < 1:
    raise ValueError(f"shard_size={shard_size} must be >= 1")
  sizes = dict(SPLIT_SIZES if sizes is None else sizes)
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "classnames.txt"), "w") as f:
    f.write("\n".join(NAMES) + "\n")
  with open(os.path.join(out, "zeroshot_classification_templates.txt"), "w") as f:
    f.write("\n".join(t.replace("{}", "{c}") for t in ZEROSHOT_TEMPLATES) + "\n")
  shards = {}
  for split, n in sizes.items():
    shards[split] = shard_writer.tar_split(os.path.join(out, split), (
        {"__key__": f"{i:06d}", "png": _png(s.image), "txt": s.caption,
         "cls": str(s.regions[0].label), "json": regions_json(s.regions),
         "map.png": _png(s.class_map)}
        for i, s in enumerate(generate(split, n, seed=seed))), shard_size=shard_size)
  return shards
