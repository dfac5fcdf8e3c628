"""The embedded default dataset: scikit-learn's handwritten digits as image-caption pairs.

1,797 real 8x8 scans (UCI optdigits, shipped inside scikit-learn), upscaled to
32x32x3, each with a caption drawn from varied templates. Built offline into
the data dir on first use; the 'test' split is fixed (seeded, stratified).
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

CLASS_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

# {w}: the word, {n}: the numeral. Used for the training captions.
CAPTION_TEMPLATES = [
    "a handwritten {w}",
    "the digit {n} written by hand",
    "a scanned image of the number {w}",
    "a {w}, drawn with a pen",
    "handwriting: the numeral {n}",
    "a blurry picture of a handwritten {n}",
    "someone wrote the number {w}",
    "a low resolution scan of a {w}",
    "the figure {n}",
    "an ink sketch of the digit {w}",
]

# Prompt ensemble for zero-shot classification, "{}" = the class name.
ZEROSHOT_TEMPLATES = [
    "a handwritten {}.",
    "a photo of the digit {}.",
    "the number {}, written by hand.",
    "a scan of a handwritten {}.",
    "a drawing of the digit {}.",
]

IMAGE_SIZE = 32
TEST_PER_CLASS = 36
SEED = 20261123


def caption(label: int, rng: np.random.Generator) -> str:
  return rng.choice(CAPTION_TEMPLATES).format(w=CLASS_NAMES[label], n=label)


def upscale(img8: np.ndarray) -> Image.Image:
  """[8, 8] values 0..16 (ink high) -> 32x32 RGB PIL image, dark ink on white, full 0..255."""
  grey = 255 - np.round(img8 * (255 / 16)).astype(np.uint8)
  big = Image.fromarray(grey, "L").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC)
  return big.convert("RGB")


def split_indices(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(train, test) indices: TEST_PER_CLASS per class held out, fixed by SEED."""
  rng = np.random.default_rng(SEED)
  test = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:TEST_PER_CLASS]
                         for c in range(10)])
  train = np.setdiff1d(np.arange(len(labels)), test)
  return train, np.sort(test)


class MmjaxDigits(tfds.core.GeneratorBasedBuilder):
  """Handwritten digits with captions; TFDS name 'mmjax_digits'."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "scikit-learn digits, 32x32x3, templated captions."}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 3)),
            "text": tfds.features.Text(),
            "label": tfds.features.ClassLabel(names=CLASS_NAMES),
        }),
        supervised_keys=("image", "label"),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download: the data ships inside scikit-learn
    return {split: self._generate_examples(split) for split in ("train", "test")}

  def _generate_examples(self, split):
    yield from split_examples(split)


def split_examples(split: str):
  """The split's examples in order, as the TFDS build has them: (scikit-learn index,
  {'image': 32x32 RGB PIL image, 'text': caption, 'label': int})."""
  from sklearn.datasets import load_digits   # ~0.7 s to import: only when building
  digits = load_digits()
  train, test = split_indices(digits.target)
  indices = {"train": train, "test": test}.get(split)
  if indices is None:
    raise ValueError(f"digits split {split!r}: the digits have 'train' and 'test'")
  rng = np.random.default_rng([SEED, len(split)])
  for i in indices:
    label = int(digits.target[i])
    yield int(i), {"image": upscale(digits.images[i]), "text": caption(label, rng),
                   "label": label}
