"""NaFlex images on the host: aspect-preserving resize to a patch budget, patches, padding, packing.

SigLIP 2's NaFlex variant resizes each image so that its patch grid (h, w) holds at most
`max_patches` patches while keeping (about) the image's aspect ratio, then cuts it into p x p
patches flattened in (patch_row, patch_col, channel) order: [h * w, p * p * 3] uint8. The
resize is transformers' (Siglip2ImageProcessor, PIL backend): the same scale search and PIL's
bilinear filter, so the patches normalised as (x / 255 - 0.5) / 0.5 are its pixel_values.

A batch is a dict of NumPy arrays, one row per sequence of L tokens (what a NaFlex tower takes):
  'patches'     uint8 [b, L, p * p * 3]   (normalised on the device)
  'segment_ids' int32 [b, L]              0 = padding, k = the row's k-th image (1-based)
  'positions'   int32 [b, L, 2]           the token's (row, col) in its image's grid; 0 for padding
  'shapes'      int32 [b, k_max, 2]       each slot's grid (h, w); (0, 0) for an empty slot
`pad` puts one image in each row; `pack` several (NaViT's patch n' pack).

A training run's NaFlex batches (config.data.naflex): `train_batching` gives the sources'
per-example view, the iterator that assembles the tower's input (NaflexIterator over Batches)
and the evaluation's NaflexPrep; mmjax.data.sources registers it for the tower kind 'naflex'.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from PIL import Image

from mmjax.data.preprocess import ImageBatching, crop_box

# transformers' search interval and tolerance for the scale (get_image_size_for_max_num_patches):
# kept equal so that the target sizes are equal for every input, including where a finer
# search would give a larger image (a step of the patch count within EPS of the best scale)
# and tiny images, which stop growing at SCALE_MAX.
EPS = 1e-5
SCALE_MIN, SCALE_MAX = EPS / 10, 100.0


class NaflexImage(NamedTuple):
  """One image as patches: patches uint8 [h * w, p * p * 3], row-major over grid (h, w)."""
  patches: np.ndarray
  grid: tuple[int, int]


def _check_positive_int(name: str, value, low: int = 1) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
    raise ValueError(f"{name} must be an int >= {low}; got {value!r}")


def _patches_along(size: int, scale: float, patch: int) -> int:
  """How many patches a side of `size` pixels scaled by `scale` takes: rounded up, at least 1.
  The float operations in transformers' order (size * scale, then / patch)."""
  return max(1, math.ceil(size * scale / patch))


def size_for_budget(height: int, width: int, patch: int, max_patches: int) -> tuple[int, int]:
  """The NaFlex resize target (H, W) in pixels for a height x width image.

  H and W are multiples of `patch` (each side rounded up, at least one patch) with
  (H / patch) * (W / patch) <= max_patches, at the largest scale a bisection over
  [1e-6, 100] to 1e-5 finds: transformers' get_image_size_for_max_num_patches, equal to it
  for every input.
  """
  _check_positive_int("height", height)
  _check_positive_int("width", width)
  _check_positive_int("patch", patch)
  _check_positive_int("max_patches", max_patches)
  low, high = SCALE_MIN, SCALE_MAX
  while high - low >= EPS:
    scale = (low + high) / 2
    count = _patches_along(height, scale, patch) * _patches_along(width, scale, patch)
    if count <= max_patches:
      low = scale
    else:
      high = scale
  return _patches_along(height, low, patch) * patch, _patches_along(width, low, patch) * patch


def _as_rgb(image) -> Image.Image:
  """A PIL image in mode RGB from a PIL image of any mode (converted as open_clip does:
  .convert('RGB'), alpha dropped) or a uint8 [H, W, 3] array (other arrays refused)."""
  if isinstance(image, Image.Image):
    return image if image.mode == "RGB" else image.convert("RGB")
  array = np.asarray(image)
  if array.ndim != 3 or array.shape[-1] != 3 or array.dtype != np.uint8:
    raise ValueError(f"image must be uint8 [H, W, 3] (or a PIL image, converted to RGB); "
                     f"got {array.dtype} {list(array.shape)}")
  return Image.fromarray(array)


def patchify(pixels: np.ndarray, patch: int) -> np.ndarray:
  """uint8 [H, W, C] (H, W multiples of patch) -> [H/p * W/p, p * p * C], patches row-major,
  each flattened in (row within the patch, column within the patch, channel) order."""
  height, width, channels = pixels.shape
  if height % patch or width % patch:
    raise ValueError(f"pixels [{height}, {width}, {channels}] are not multiples of patch={patch}")
  h, w = height // patch, width // patch
  blocks = pixels.reshape(h, patch, w, patch, channels).transpose(0, 2, 1, 3, 4)
  return blocks.reshape(h * w, patch * patch * channels)


def prepare(image, patch: int, max_patches: int) -> NaflexImage:
  """One image -> NaflexImage(patches uint8 [h * w, p * p * 3], grid (h, w)), h * w <= max_patches.

  image: uint8 [H0, W0, 3] or a PIL image (any mode, converted to RGB). Resized to
  size_for_budget(H0, W0, ...) with PIL's bilinear filter, as transformers' Siglip2 PIL-backend
  processor does, then cut into patches (see `patchify`).
  """
  _check_positive_int("patch", patch)
  _check_positive_int("max_patches", max_patches)
  rgb = _as_rgb(image)
  height, width = size_for_budget(rgb.height, rgb.width, patch, max_patches)
  if (rgb.height, rgb.width) != (height, width):
    rgb = rgb.resize((width, height), Image.BILINEAR)
  return NaflexImage(patchify(np.asarray(rgb), patch), (height // patch, width // patch))


def _check_images(images, seq_len: int) -> int:
  """The common patch width D of `images`; a ValueError naming the first bad image otherwise."""
  _check_positive_int("seq_len", seq_len)
  if not len(images):
    raise ValueError("images is empty")
  dim = images[0].patches.shape[-1]
  for i, (patches, (h, w)) in enumerate(images):
    if h < 1 or w < 1:
      raise ValueError(f"images[{i}].grid must be at least (1, 1); got ({h}, {w})")
    if patches.ndim != 2 or patches.shape != (h * w, dim) or patches.dtype != np.uint8:
      raise ValueError(f"images[{i}].patches must be uint8 [h * w, {dim}] = [{h * w}, {dim}] for "
                       f"grid ({h}, {w}); got {patches.dtype} {list(patches.shape)}")
    if h * w > seq_len:
      raise ValueError(f"images[{i}] has {h * w} patches (grid {h} x {w}) > seq_len={seq_len}")
  return dim


def _empty_batch(rows: int, seq_len: int, slots: int, dim: int) -> dict[str, np.ndarray]:
  return {"patches": np.zeros((rows, seq_len, dim), np.uint8),
          "segment_ids": np.zeros((rows, seq_len), np.int32),
          "positions": np.zeros((rows, seq_len, 2), np.int32),
          "shapes": np.zeros((rows, slots, 2), np.int32)}


def _put(batch: dict, row: int, start: int, slot: int, image: NaflexImage) -> int:
  """Writes `image` into `row` from token `start` as slot `slot` (segment id slot + 1);
  returns the token after it."""
  h, w = image.grid
  end = start + h * w
  batch["patches"][row, start:end] = image.patches
  batch["segment_ids"][row, start:end] = slot + 1
  # Row-major within the image: token i of it sits at (i // w, i % w).
  batch["positions"][row, start:end] = np.stack(np.divmod(np.arange(h * w), w), axis=-1)
  batch["shapes"][row, slot] = (h, w)
  return end


def pad(images: list[NaflexImage], seq_len: int) -> dict[str, np.ndarray]:
  """One image per sequence, padded to seq_len tokens (padding at the end).

  Returns 'patches' uint8 [b, L, D], 'segment_ids' int32 [b, L] (1 for the image, 0 for
  padding), 'positions' int32 [b, L, 2], 'shapes' int32 [b, 1, 2], b = len(images), L = seq_len.
  """
  dim = _check_images(images, seq_len)
  batch = _empty_batch(len(images), seq_len, 1, dim)
  for i, image in enumerate(images):
    _put(batch, i, 0, 0, image)
  return batch


def first_fit_decreasing(counts, capacity: int, max_items: int) -> np.ndarray:
  """int32 [n, 2]: (bin, slot) of each item when `counts` [n] are packed into bins of
  `capacity` with at most `max_items` each.

  First fit decreasing: items in order of decreasing count (ties in input order), each into
  the first open bin with room, or a new bin; slots numbered in the order items arrive. The
  same counts always give the same placement.
  """
  counts = np.asarray(counts, np.int64)
  room = np.zeros(0, np.int64)     # free tokens of each bin
  filled = np.zeros(0, np.int64)   # items in each bin
  placement = np.zeros((len(counts), 2), np.int32)
  for i in np.argsort(-counts, kind="stable"):
    fits = np.flatnonzero((room >= counts[i]) & (filled < max_items))
    if fits.size:
      b = fits[0]
    else:
      b = len(room)
      room, filled = np.append(room, capacity), np.append(filled, 0)
    placement[i] = (b, filled[b])
    room[b] -= counts[i]
    filled[b] += 1
  return placement


def pack(images: list[NaflexImage], seq_len: int,
         max_per_seq: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """Several images per sequence (NaViT's patch n' pack), placed by `first_fit_decreasing`.

  Returns (batch, placement). batch: 'patches' uint8 [rows, L, D], 'segment_ids' int32
  [rows, L] (k for the row's k-th image, 1-based; its tokens contiguous; 0 for the padding at
  the row's end), 'positions' int32 [rows, L, 2], 'shapes' int32 [rows, max_per_seq, 2].
  placement: int32 [n_images, 2], (row, slot) of each input image, slot = segment id - 1, so
  per-slot outputs [rows, max_per_seq, ...] map back to the input order as out[row, slot].
  rows is as few as the packing needs (not fixed: pad rows yourself for a static batch shape).
  """
  _check_positive_int("max_per_seq", max_per_seq)
  dim = _check_images(images, seq_len)
  counts = [image.patches.shape[0] for image in images]
  placement = first_fit_decreasing(counts, seq_len, max_per_seq)
  batch = _empty_batch(int(placement[:, 0].max()) + 1, seq_len, max_per_seq, dim)
  next_token = np.zeros(len(batch["patches"]), np.int64)
  # Slots were numbered in the order images arrived in their row, so writing them in that
  # order keeps each row's segments in slot order.
  for i in np.lexsort((placement[:, 1], placement[:, 0])):
    row, slot = placement[i]
    next_token[row] = _put(batch, row, next_token[row], slot, images[i])
  return batch, placement


def padding_share(batch: dict[str, np.ndarray]) -> float:
  """The share of tokens that are padding (segment id 0) in batch['segment_ids'] [b, L]."""
  segment_ids = np.asarray(batch["segment_ids"])
  return float(np.mean(segment_ids == 0)) if segment_ids.size else 0.0


class NaflexPrep(NamedTuple):
  """A NaFlex checkpoint's eval image preparation (ImagePrep's counterpart): an image ->
  the tower's input for one image a row of max_patches tokens, normalised,
  {'patches' float32 [L, p*p*3], 'segment_ids' int32 [L], 'positions' int32 [L, 2],
  'shapes' int32 [1, 2]} (stacked per key into a batch). Evaluating at another sequence
  length is NaflexPrep(patch, L, ...)."""
  patch: int
  max_patches: int
  mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
  std: tuple[float, float, float] = (0.5, 0.5, 0.5)

  @property
  def size(self) -> None:
    """No fixed image size (ImagePrep.size's place in a result)."""
    return None

  def check(self) -> "NaflexPrep":
    _check_positive_int("NaflexPrep.patch", self.patch)
    _check_positive_int("NaflexPrep.max_patches", self.max_patches)
    return self

  def __call__(self, image) -> dict[str, np.ndarray]:
    one = {k: v[0] for k, v in pad([prepare(image, self.patch, self.max_patches)],
                                   self.max_patches).items()}
    x = one["patches"].reshape(self.max_patches, -1, 3).astype(np.float32) / np.float32(255.0)
    x = (x - np.float32(self.mean)) / np.float32(self.std)
    return {**one, "patches": x.reshape(self.max_patches, -1)}


# --- training batches -------------------------------------------------------------------------
#
# Both data pipelines (TFDS through grain, webdataset shards) prepare examples one at a time
# and stack them; a NaFlex image has its own patch count, so each example carries its patches
# padded to a fixed `max_patches` ('image' uint8 [M, p*p*3]) and its grid ('image_grid' int32
# [2]). `Batches` then turns a stacked local batch into the tower's input: one image a row
# ('pad'), or packed into a fixed number of rows ('pack').


def native_patches(height: int, width: int, patch: int) -> int:
  """The patch count of an image at its own resolution: ceil(H / p) * ceil(W / p)."""
  return -(-height // patch) * -(-width // patch)


def train_view(image: np.ndarray, patch: int, max_patches: int, *, native: bool,
               rng: np.random.Generator | None = None, crop_scale_min: float = 1.0,
               flip: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """One training example's image -> (patches uint8 [max_patches, p*p*3] (zeros past the
  image's), grid int32 [2]).

  image: uint8 [H, W, 3]. native: at most the image's own patch count (packed batches keep
  small images small); else resized to fill max_patches (SigLIP 2's padded batches). With
  rng: a random crop keeping at least crop_scale_min of the area (any aspect ratio the crop
  box gives) and a random horizontal flip (flip)."""
  box = None
  if rng is not None and crop_scale_min < 1.0:
    box = crop_box(*image.shape[:2], rng, (crop_scale_min, 1.0), (3 / 4, 4 / 3))
  if box is not None:   # None: ten misses, the whole image
    top, left, h, w = box
    image = image[top:top + h, left:left + w]
  if rng is not None and flip and rng.random() < 0.5:
    image = image[:, ::-1]
  budget = max_patches
  if native:
    budget = max(1, min(max_patches, native_patches(*image.shape[:2], patch)))
  one = prepare(np.ascontiguousarray(image), patch, budget)
  out = np.zeros((max_patches, one.patches.shape[1]), np.uint8)
  out[:len(one.patches)] = one.patches
  return out, np.asarray(one.grid, np.int32)


def unpatchify(image: NaflexImage, patch: int) -> np.ndarray:
  """patchify's inverse: uint8 [h * p, w * p, 3]."""
  (h, w), p = image.grid, patch
  return image.patches.reshape(h, w, p, p, 3).transpose(0, 2, 1, 3, 4).reshape(h * p, w * p, 3)


class Batches:
  """A stacked local batch of train_view outputs -> the tower's input, fixed shapes.

  mode 'pad': row i holds image i (rows = b, L = max_patches). mode 'pack': the b images
  packed into `rows` rows of seq_len tokens, at most max_per_seq a row; when they do not fit,
  the largest is shrunk (re-resized to 85% of its patches) until they do, counted in
  `shrunk`. 'image' becomes {'patches' uint8 [R, L, D], 'segment_ids', 'positions', 'shapes'
  [R, k, 2], 'index' int32 [b]}: image i's pooled output is pooled.reshape(R * k, -1)[index[i]]
  (offset by `first_row` * k: the rows of the processes before this one).
  """

  def __init__(self, mode: str, patch: int, seq_len: int, *, rows: int = 0,
               max_per_seq: int = 1, first_row: int = 0):
    if mode not in ("pad", "pack"):
      raise ValueError(f"config.data.naflex.mode={mode!r} must be 'pad' or 'pack'")
    self.mode, self.patch, self.seq_len = mode, patch, seq_len
    self.rows, self.max_per_seq, self.first_row = rows, max_per_seq, first_row
    self.shrunk = 0

  def __call__(self, batch: dict) -> dict:
    patches, grids = batch["image"], batch.pop("image_grid")
    images = [NaflexImage(p[:h * w], (int(h), int(w))) for p, (h, w) in zip(patches, grids)]
    if self.mode == "pad":
      out = pad(images, patches.shape[1])
      out["index"] = np.arange(len(images), dtype=np.int32) + self.first_row
    else:
      out = self._pack(images)
    return {**batch, "image": out}

  def _pack(self, images: list[NaflexImage]) -> dict:
    while True:
      counts = [len(im.patches) for im in images]
      place = first_fit_decreasing(counts, self.seq_len, self.max_per_seq)
      if place[:, 0].max() < self.rows:
        break
      i = int(np.argmax(counts))
      if counts[i] == 1:
        raise ValueError(f"config.data.naflex: {len(images)} images do not fit {self.rows} "
                         f"rows of {self.max_per_seq} (max_per_seq) at one patch each")
      images[i] = prepare(unpatchify(images[i], self.patch), self.patch,
                          max(1, int(counts[i] * 0.85)))
      self.shrunk += 1
    out, place = pack(images, self.seq_len, self.max_per_seq)
    full = _empty_batch(self.rows, self.seq_len, self.max_per_seq, out["patches"].shape[-1])
    for k, v in out.items():
      full[k][:len(v)] = v
    full["index"] = ((place[:, 0] + self.first_row) * self.max_per_seq + place[:, 1]).astype(
        np.int32)
    return full


class NaflexIterator:
  """A train iterator whose batches' images become a NaFlex tower's input (Batches): the
  position, state and counters are its parent's, plus data/padding_share and
  data/naflex_shrunk (images shrunk to fit the rows so far)."""

  def __init__(self, parent, batches: Batches):
    self.parent, self.batches, self.padding = parent, batches, 0.0

  def __next__(self) -> dict:
    out = self.batches(dict(next(self.parent)))
    self.padding = padding_share(out["image"])
    return out

  def get_state(self) -> dict:
    return self.parent.get_state()

  def set_state(self, state: dict) -> None:
    self.parent.set_state(state)

  def metrics(self) -> dict:
    out = self.parent.metrics() if hasattr(self.parent, "metrics") else {}
    return {**out, "data/padding_share": self.padding,
            "data/naflex_shrunk": float(self.batches.shrunk)}

  def close(self) -> None:
    if hasattr(self.parent, "close"):
      self.parent.close()


def train_batching(config, fields: dict, *, normalize=None, process_index: int = 0,
                   process_count: int = 1) -> ImageBatching | None:
  """config.data.naflex for one process of the run, or None when its mode is unset.

  fields: the image tower's complete fields (the checkpoint's when the run starts from one);
  normalize: the checkpoint's (mean, std), None for [-1, 1]. The view is the sources'
  naflex=(patch, max_patches, native); the wrap a NaflexIterator whose Batches place this
  process's rows (pack) or images (pad) after those of the processes before it."""
  n = config.data.naflex
  if n.mode is None:
    return None
  if fields.get("tower") != "naflex":
    raise ValueError("config.data.naflex.mode is set but the image tower (the checkpoint's) is "
                     "not a NaFlex one")
  patch = int(fields["patch_size"][0])
  if n.mode == "pack":
    if n.rows % process_count:
      raise ValueError(f"config.data.naflex.rows={n.rows} is not divisible by {process_count} "
                       "processes")
    rows = n.rows // process_count
    batches = Batches("pack", patch, n.seq_len, rows=rows, max_per_seq=n.max_per_seq,
                      first_row=process_index * rows)
  else:
    local = config.batch_size // process_count
    batches = Batches("pad", patch, n.max_patches, first_row=process_index * local)
  mean, std = normalize if normalize is not None else ((0.5,) * 3, (0.5,) * 3)
  return ImageBatching(view={"naflex": (patch, n.max_patches, n.mode == "pack")},
                       wrap=lambda train_iterator: NaflexIterator(train_iterator, batches),
                       prep=NaflexPrep(patch, n.eval_max_patches or n.max_patches, mean, std))
