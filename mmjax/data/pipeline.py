"""Input pipeline without TensorFlow: TFDS array_record sources read by grain.

Train batches are dicts of numpy arrays: 'image' uint8 [b, S, S, 3] (normalised once, on the
device: mmjax.train.state.images_to_float), 'text' int32 [b, L] (and 'label' int32 [b] when the
data has one, the fields of make_train_iterator's caption_fields, e.g. CatLIP's 'targets'
float32 [b, V]), b = global batch // process count: each process reads its own shard. The
training loop reads it through mmjax.data.sources.TfdsSource.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from typing import Iterator

import grain
import numpy as np
import tensorflow_datasets as tfds
from absl import flags
from PIL import Image
from tensorflow_datasets.core.utils import tqdm_utils

from mmjax.data import naflex as naflex_lib
from mmjax.data import digits, scenes
from mmjax.data import regions as region_lib
from mmjax.data.preprocess import crop_box

# Datasets mmjax ships and can build offline on first use.
_EMBEDDED = {"mmjax_digits": digits.MmjaxDigits, "mmjax_digit_scenes": scenes.MmjaxDigitScenes}
_DEFAULT_TEMPLATES = {"mmjax_digits": digits.ZEROSHOT_TEMPLATES,
                      "mmjax_digit_scenes": scenes.ZEROSHOT_TEMPLATES}


def default_templates(name: str) -> list[str] | None:
  """The zero-shot prompt templates a dataset ships, if any."""
  return _DEFAULT_TEMPLATES.get(name)


class _TfdsNoise(logging.Filter):
  """Drops two TFDS warnings that say nothing to an mmjax user: OpenCV's absence
  (PIL decodes the images) and a missing dataset_info.json while a build runs."""

  NOISE = ("OpenCV is not installed", "has no dataset_info.json")

  def filter(self, record: logging.LogRecord) -> bool:
    return not (record.levelno <= logging.WARNING and "tensorflow_datasets" in record.pathname
                and any(n in record.getMessage() for n in self.NOISE))


def quiet_tfds_noise() -> None:
  """Drops those two warnings from absl's logger, for the whole process: the launchers call it
  (importing mmjax changes no logging)."""
  logger = logging.getLogger("absl")
  if not any(isinstance(f, _TfdsNoise) for f in logger.filters):
    logger.addFilter(_TfdsNoise())


def prepare(builder: tfds.core.DatasetBuilder) -> None:
  """builder.download_and_prepare offline, saying one line instead of TFDS's
  progress bars and 'Downloading and preparing dataset Unknown size' text."""
  print(f"mmjax: preparing dataset {builder.name!r} in {builder.data_dir} (first use)",
        flush=True)
  shown = tqdm_utils._active
  tfds.display_progress_bar(False)
  try:
    with contextlib.redirect_stdout(io.StringIO()):
      builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
          try_download_gcs=False))
  finally:
    tfds.display_progress_bar(shown)


def _builder(name: str, data_dir: str) -> tfds.core.DatasetBuilder:
  if name in _EMBEDDED:
    builder = _EMBEDDED[name](data_dir=data_dir, file_format="array_record")
    if not builder.is_prepared():
      prepare(builder)
    return builder
  try:
    return tfds.builder_from_directory(_prepared_dir(name, data_dir))
  except (FileNotFoundError, ValueError) as e:
    raise ValueError(
        f"config.data.name={name!r}: no prepared dataset under data_dir {data_dir!r} ({e}). "
        "Prepare it in array_record format (your own images + captions: "
        "mmjax.data.image_folder.build_image_text_folder)") from None


def _prepared_dir(name: str, data_dir: str) -> str:
  """<data_dir>/<name>[/<config>]/<version>: the newest version prepared there."""
  root = os.path.join(data_dir, *name.split(":")[0].split("/"))
  if ":" in name:
    return os.path.join(root, name.split(":")[1])
  versions = sorted(v for v in os.listdir(root) if v[:1].isdigit()) if os.path.isdir(root) else []
  if not versions:
    raise FileNotFoundError(f"{root} has no prepared version")
  return os.path.join(root, versions[-1])


class Dataset:
  """A prepared TFDS dataset, opened once: its features, its splits as
  random-access sources, its zero-shot class names and prompt templates.

  Raises ValueError naming config.data.image_key / text_key when the dataset
  lacks an image or text feature under that key.
  """

  def __init__(self, name: str, *, data_dir: str, image_key: str = "image",
               text_key: str = "text"):
    self.name = name
    self.builder = _builder(name, data_dir)
    self.features = dict(self.builder.info.features)
    for field, key, kind in (("image_key", image_key, tfds.features.Image),
                             ("text_key", text_key, tfds.features.Text)):
      if not isinstance(self.features.get(key), kind):
        raise ValueError(f"config.data.{field}={key!r}: dataset {name!r} has no "
                         f"{kind.__name__} feature {key!r}; its features: {sorted(self.features)}")
    if self.builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
      raise ValueError(f"config.data.name={name!r} is stored as {self.builder.info.file_format}; "
                       "mmjax reads array_record (TFRecord needs TensorFlow)")

  def source(self, split: str):
    """A random-access source of one split (records: dicts of numpy)."""
    if split not in self.builder.info.splits:
      raise ValueError(f"dataset {self.name!r} has no split {split!r}; "
                       f"splits: {list(self.builder.info.splits)}")
    return self.builder.as_data_source(split=split)

  def class_names(self, label_key: str | None) -> list[str] | None:
    """The names of the ClassLabel feature label_key, or None without one."""
    label = self.features.get(label_key) if label_key else None
    names = getattr(label, "names", None)
    return list(names) if names else None

  @property
  def templates(self) -> list[str] | None:
    """The zero-shot prompt templates the dataset ships, if any."""
    return default_templates(self.name)


def open_dataset(data, data_dir: str) -> Dataset:
  """The dataset of config.data (its name, image_key, text_key), opened once."""
  return Dataset(data.name, data_dir=data_dir, image_key=data.image_key, text_key=data.text_key)


def get_source(name: str, split: str, *, data_dir: str, image_key: str = "image",
               text_key: str = "text"):
  """One split of a dataset as a random-access source; builds the embedded default on first use."""
  return Dataset(name, data_dir=data_dir, image_key=image_key, text_key=text_key).source(split)


def _meta(source, i: int) -> dict:
  """Record i, or only its text and label fields where the source can skip the image
  (`source.meta(i)`: webdataset shards)."""
  return source.meta(i) if hasattr(source, "meta") else source[i]


def _where(source, i: int) -> str:
  """Example i, named as the source names it (webdataset shards: the shard and the sample's key)."""
  return source.where(i) if hasattr(source, "where") else f"example {i}"


def iter_texts(source, text_key: str = "text") -> Iterator[str]:
  for i in range(len(source)):
    t = _meta(source, i)[text_key]
    yield t.decode() if isinstance(t, bytes) else str(t)


def resize(image: np.ndarray, size: int) -> np.ndarray:
  """uint8 [H, W, 3] -> uint8 [size, size, 3] (bicubic)."""
  if image.shape[:2] == (size, size):
    return image
  return np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC))


def random_resized_crop(image: np.ndarray, size: int, rng: np.random.Generator, *,
                        scale=(0.6, 1.0), ratio=(3 / 4, 4 / 3)) -> np.ndarray:
  """Inception-style crop (preprocess.crop_box), then resize."""
  box = crop_box(*image.shape[:2], rng, scale, ratio)
  if box is None:
    return resize(image, size)
  top, left, ch, cw = box
  crop = Image.fromarray(image[top:top + ch, left:left + cw])
  return np.asarray(crop.resize((size, size), Image.BICUBIC))


def _to_float(image: np.ndarray, normalize: tuple | None = None) -> np.ndarray:
  """uint8 -> float32: [-1, 1], or (x / 255 - mean) / std for normalize=(mean, std)."""
  if normalize is None:
    return image.astype(np.float32) * (2.0 / 255.0) - 1.0
  mean, std = (np.asarray(v, np.float32) for v in normalize)
  return (image.astype(np.float32) / np.float32(255.0) - mean) / std


def _rgb(image: np.ndarray) -> np.ndarray:
  return np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image


def _decode_text(t) -> str:
  return t.decode() if isinstance(t, bytes) else str(t)


class _Preprocess:
  """Example -> {'image' uint8 [S, S, 3], 'text'[, 'label', 'image2', caption fields]}; a
  module-level class so grain workers can pickle it."""

  def __init__(self, tokenizer, image_size, text_len, augment, crop_scale_min, flip,
               image_key, text_key, label_key, views=1, caption_fields=None, naflex=None,
               region_fields=None, regions_key="regions"):
    self.__dict__.update(locals())
    del self.__dict__["self"]

  def _view(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    if self.augment:
      image = random_resized_crop(image, self.image_size, rng, scale=(self.crop_scale_min, 1.0))
    else:
      image = resize(image, self.image_size)
    if self.flip and rng.random() < 0.5:
      image = image[:, ::-1]
    return np.ascontiguousarray(image)

  def __call__(self, ex: dict, rng: np.random.Generator) -> dict:
    image = _rgb(np.asarray(ex[self.image_key]))
    text = _decode_text(ex[self.text_key])
    out = {"text": self.tokenizer.encode([text], self.text_len)[0]}
    if self.naflex:   # (patch, max_patches, native): mmjax.data.naflex.train_view
      out["image"], out["image_grid"] = naflex_lib.train_view(
          image, *self.naflex[:2], native=self.naflex[2], rng=rng,
          crop_scale_min=self.crop_scale_min if self.augment else 1.0, flip=self.flip)
    else:
      out["image"] = self._view(image, rng)
    for key, field in (self.caption_fields or {}).items():
      out[key] = field(text)
    if self.region_fields:
      if self.regions_key not in ex:
        raise ValueError(f"config.data.regions_key={self.regions_key!r}: the records have no "
                         f"such field (theirs: {sorted(ex)})")
      regions = _decode_text(ex[self.regions_key])
      for key, field in self.region_fields.items():
        out[key] = field(regions)
    if self.views == 2:
      out["image2"] = self._view(image, rng)
    if self.label_key and self.label_key in ex:
      out["label"] = np.int32(ex[self.label_key])
    return out


def make_train_iterator(source, data, *, tokenizer, global_batch_size: int, seed: int,
                        process_index: int = 0, process_count: int = 1, views: int = 1,
                        read_threads: int = 2, prefetch_batches: int = 2, caption_fields=None,
                        naflex: tuple[int, int, bool] | None = None, region_fields=None):
  """An endless, seeded, shuffled iterator over this process's share of each global batch,
  with get_state/set_state.

  data: config.data (image_size, text_len, augment, crop_scale_min, flip,
  image_key, text_key, label_key, num_workers). Images are uint8 [b, S, S, 3]. views=2 adds
  'image2', a second independent augmentation of each image (MoCo). prefetch_batches: local
  batches read ahead by the read_threads. A batch may be larger than the dataset.
  caption_fields: {key: a picklable caption -> array function}: each batch gets key [b, ...]
  (an objective's Objective.caption_fields: CatLIP's multi-hot label 'targets').
  region_fields: {key: a picklable regions-JSON -> array function}, applied to each record's
  config.data.regions_key field (an objective's Objective.region_fields).
  naflex: (patch, max_patches, native) for a NaFlex tower: 'image' is each image's patches
  uint8 [b, max_patches, p*p*3] and 'image_grid' int32 [b, 2] (mmjax.data.naflex.train_view).

  Restoring a saved state (`it.set_state(state)`) continues with exactly the
  batches the original iterator would have produced.
  """
  if global_batch_size % process_count:
    raise ValueError(f"config.batch_size={global_batch_size} is not divisible by "
                     f"{process_count} processes")
  local = global_batch_size // process_count
  if len(source) < global_batch_size and process_index == 0:
    # Allowed: the stream is endless and each epoch reshuffled (grain seeds each epoch's
    # permutation), so a batch spans epochs and holds each example about B / n times, each
    # with its own augmentation (GradCache batches of 16,384 on the 1,437 digits).
    print(f"mmjax: config.batch_size={global_batch_size} is larger than the dataset "
          f"({len(source)} examples): each batch holds every example about "
          f"{global_batch_size / len(source):.1f} times", flush=True)
  if views not in (1, 2) or (naflex and views != 1):
    raise ValueError(f"views={views} must be 1 or 2 (1 with NaFlex batches)")
  prep = _Preprocess(tokenizer, data.image_size, data.text_len, data.augment,
                     data.crop_scale_min, data.flip, data.image_key, data.text_key,
                     data.label_key, views, caption_fields, naflex, region_fields,
                     data.regions_key)
  # Few reader threads: grain's default 16 fight XLA for the cores of a small host. The
  # elements read ahead are whole local batches (batched before to_iter_dataset), so
  # prefetch_batches counts batches (2 * local of them would be 32,768 batches of 16,384).
  # One global shuffled stream, augmented by global position, cut into local batches;
  # process p takes local batches p, p + P, ... (batching is lazy: it reads only those).
  # Global batch t, the processes' batches stacked in process order as the loop does
  # (make_array_from_process_local_data), is then the same array, examples, order and
  # augmentations, whatever the number of processes.
  ds = (grain.MapDataset.source(source).seed(seed).shuffle().repeat(None).random_map(prep)
        .batch(local, drop_remainder=True)
        [process_index::process_count]
        .to_iter_dataset(grain.ReadOptions(num_threads=read_threads,
                                           prefetch_buffer_size=prefetch_batches)))
  if data.num_workers > 0:
    # grain 0.2.18's mp_prefetch reads an absl flag (google/grain#1355): outside absl.app
    # (notebooks, scripts) the flags were never parsed and it would raise.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=data.num_workers))
  return iter(ds)


class EvalImages:
  """A split's images as a lazy float32 array [n, S, S, 3]: `len`, `shape`, and `x[i:j]`
  (or `x[i]`) decodes and preprocesses just those rows, so an evaluation that walks it in
  batches holds one batch of images, however large the split. `np.asarray(x)` materialises it.
  """

  def __init__(self, source, image_key: str, image_size: int, normalize: tuple | None = None,
               prep=None):
    self.source, self.image_key, self.size, self.normalize = (source, image_key, image_size,
                                                              normalize)
    self.prep = prep
    self.shape = (len(source), image_size, image_size, 3)
    self.dtype = np.dtype(np.float32)

  def __len__(self) -> int:
    return self.shape[0]

  def _row(self, i: int) -> np.ndarray:
    image = _rgb(np.asarray(self.source[i][self.image_key]))
    if self.prep is not None:
      return self.prep(image)
    return _to_float(resize(image, self.size), self.normalize)

  def __getitem__(self, index):
    if isinstance(index, slice):
      rows = range(*index.indices(len(self)))
      if not rows:
        return np.zeros((0, *self.shape[1:]), np.float32)
      out = [self._row(i) for i in rows]
      if isinstance(out[0], dict):   # a NaFlex tower's input (mmjax.data.naflex.NaflexPrep)
        return {k: np.stack([o[k] for o in out]) for k in out[0]}
      return np.stack(out)
    i = int(index)
    if not -len(self) <= i < len(self):
      raise IndexError(f"index {i} out of range for {len(self)} images")
    return self._row(i % len(self))

  def __array__(self, dtype=None, copy=None):
    out = self[:]
    return out if dtype is None else out.astype(dtype)


def make_eval_arrays(source, data, *, tokenizer, normalize: tuple | None = None,
                     lazy_images: bool = False, prep=None, audio: bool = False) -> dict:
  """The split, no augmentation: 'image' float32 [n, S, S, 3], 'text' int32 [n, L] if the
  examples have captions (all of them: ValueError naming the first without), 'label' int32 [n]
  if present. lazy_images: 'image' is an `EvalImages` (decoded per
  slice: memory independent of the split's size) instead of one stacked array.
  prep: a converted checkpoint's `ImagePrep` (its resize, crop and normalisation, as
  experiments.evaluate applies them) in place of the square resize and `normalize`.

  'region_boxes' float64 [n, 16, 5] (mmjax.data.regions.region_boxes) if every example has
  regions (config.data.regions_key: the dense probe's patch labels).

  audio: 'audio' float32 [n, T] when the source reads audio (webdataset shards with
  config.data.audio_ext: `source.audio(i)`, decoded as training decodes it, T = audio_rate x
  audio_seconds), all in memory (the spoken digits' test split: 360 x 32000 floats, 46 MB).

  data: config.data (image_size, text_len, image_key, text_key, label_key, regions_key).
  """
  image_size, text_len = data.image_size, data.text_len
  image_key, text_key, label_key = data.image_key, data.text_key, data.label_key
  regions_key = data.get("regions_key") or None
  texts, labels, missing, boxes = [], [], None, []
  for i in range(len(source)):
    ex = _meta(source, i)
    if regions_key in ex:
      try:
        boxes.append(region_lib.region_boxes(ex[regions_key]))
      except ValueError as e:
        raise ValueError(f"{_where(source, i)}: {regions_key!r}: {e}") from None
    if text_key in ex:
      texts.append(_decode_text(ex[text_key]))
    elif missing is None:
      missing = i
    if label_key and label_key in ex:
      labels.append(int(ex[label_key]))
  if texts and missing is not None:
    raise ValueError(f"{_where(source, missing)} has no caption ({text_key!r}), and the set's "
                     "other examples do; an evaluation set captions all its examples or none")
  if prep is not None and prep.size is not None and prep.size != image_size:
    raise ValueError(f"config.data.image_size={image_size} but the checkpoint's preprocessing "
                     f"makes {prep.size} px images")
  images = EvalImages(source, image_key, image_size, normalize, prep)
  out = {"image": images if lazy_images else images[:]}
  if texts:
    out["text"] = tokenizer.encode(texts, text_len)
  if labels:
    out["label"] = np.asarray(labels, np.int32)
  if boxes and len(boxes) == len(source):
    out["region_boxes"] = np.stack(boxes)
  if audio and getattr(source, "audio_exts", ()) and len(source):
    out["audio"] = np.stack([source.audio(i) for i in range(len(source))])
  return out
