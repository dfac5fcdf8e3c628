"""How a model's eval images are prepared: resize, crop, normalise (per checkpoint); and how
an image tower that takes more than [b, S, S, 3] images gets its batches (ImageBatching)."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import numpy as np
from PIL import Image

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)   # OpenAI CLIP's (open_clip's OPENAI_DATASET_*)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
RESIZES = ("squash", "crop")
RESAMPLES = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}
CROP_OFFSETS = ("floor", "round")


class ImageBatching(NamedTuple):
  """How a run's image tower takes its images (mmjax.data.sources.image_batching), beside the
  sources' uint8 [b, S, S, 3]: the default changes nothing.

  view: extra keyword arguments of DataSource.train_iterator (each example's image view);
  wrap: the train iterator -> one whose batches are the tower's input (same position, state
  and close; its metrics() may add counters); prep: the evaluation's image preparation, or
  None (the run's default, ImagePrep or the checkpoint's)."""
  view: dict = {}
  wrap: Callable[[Any], Any] = lambda train_iterator: train_iterator
  prep: Any = None


class ImagePrep(NamedTuple):
  """uint8 [H, W, 3] (or a PIL image) -> float32 [size, size, 3].

  resize='squash': both sides to `size` (SigLIP); 'crop': the shorter side to
  `size`, then the centre size x size (CLIP). Then (x / 255 - mean) / std; the
  defaults (0.5) give [-1, 1], what mmjax's own runs train on.

  crop_offset: where the centre crop starts when the excess d is odd: 'floor' = d // 2
  (transformers' processors), 'round' = round(d / 2), half to even (torchvision's CenterCrop,
  so open_clip's); they differ by one pixel when d % 4 == 3.
  """
  size: int
  resize: str = "squash"
  resample: str = "bicubic"   # a key of RESAMPLES
  mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
  std: tuple[float, float, float] = (0.5, 0.5, 0.5)
  crop_offset: str = "floor"   # one of CROP_OFFSETS

  def check(self) -> "ImagePrep":
    if not isinstance(self.size, int) or self.size <= 0:
      raise ValueError(f"ImagePrep.size must be a positive int; got {self.size!r}")
    if self.resize not in RESIZES:
      raise ValueError(f"ImagePrep.resize={self.resize!r} is not one of {RESIZES}")
    if self.resample not in RESAMPLES:
      raise ValueError(f"ImagePrep.resample={self.resample!r} is not one of {sorted(RESAMPLES)}")
    if self.crop_offset not in CROP_OFFSETS:
      raise ValueError(f"ImagePrep.crop_offset={self.crop_offset!r} is not one of {CROP_OFFSETS}")
    return self

  def resized(self, image) -> np.ndarray:
    """uint8 [size, size, 3]: the resize (and crop), no normalisation."""
    img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    img = img.convert("RGB")
    w, h = img.size
    s, method = self.size, RESAMPLES[self.resample]
    if self.resize == "squash":
      out = img if (w, h) == (s, s) else img.resize((s, s), method)
    else:
      # The longer side to s * long / short rounded down, as transformers'
      # get_resize_output_image_size and torchvision's Resize (open_clip's) do.
      nw, nh = (s, s * h // w) if w <= h else (s * w // h, s)
      img = img if (nw, nh) == (w, h) else img.resize((nw, nh), method)
      if self.crop_offset == "round":   # Python's round is half to even, as torchvision's
        left, top = round((nw - s) / 2), round((nh - s) / 2)
      else:
        left, top = (nw - s) // 2, (nh - s) // 2
      out = img.crop((left, top, left + s, top + s))
    return np.asarray(out, np.uint8)

  def __call__(self, image) -> np.ndarray:
    x = self.resized(image).astype(np.float32) / 255.0
    return (x - np.float32(self.mean)) / np.float32(self.std)


def crop_box(h: int, w: int, rng: np.random.Generator, scale=(0.6, 1.0),
             ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int] | None:
  """Inception-style random crop (top, left, height, width): a random share of the area in
  `scale`, aspect in `ratio`; None after 10 misses (then use the whole image)."""
  for _ in range(10):
    area = h * w * rng.uniform(*scale)
    aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
    ch, cw = int(round(np.sqrt(area / aspect))), int(round(np.sqrt(area * aspect)))
    if 0 < ch <= h and 0 < cw <= w:
      return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw
  return None
