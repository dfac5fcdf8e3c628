"""Data sources behind one protocol, registered by name (big_vision's `datasets/core.get`).

config.data.name picks the source: 'wds' reads webdataset shards (mmjax.data.wds_pipeline);
any other name is a TFDS dataset prepared in array_record format under the data dir (the
embedded 'mmjax_digits', or your images and captions built by mmjax.data.image_folder).
A source of your own subclasses `DataSource` and is registered with `@register('name')`;
the training loop then reads it by that name, knowing no format.

Every source's train batches hold uint8 images ('image', and 'image2' for two views:
[b, S, S, 3] uint8); the train step normalises them once, on the device
(mmjax.train.state.images_to_float).

An image tower that takes more than such images (a NaFlex ViT: patches, grids, packed rows)
has its batches made by a maker registered for its kind with `register_batching`; the loop
asks `image_batching` and so knows no tower kind.

Records: a random-access source of examples, `len(src)` and `src[i]` -> {image_key: uint8
[H, W, 3], text_key: str or bytes[, label_key: int]} (config.data's keys); an optional
`src.meta(i)` returns record i without decoding its image.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

from mmjax.data import naflex, pipeline, wds_pipeline
from mmjax.data.preprocess import ImageBatching


class TrainIterator(Protocol):
  """Endless local batches (numpy dicts) with a JSON-able position; may also have
  `metrics() -> dict` (logged with the losses) and `close()`."""

  def __next__(self) -> dict: ...

  def get_state(self) -> dict: ...

  def set_state(self, state: dict) -> None: ...


class DataSource:
  """The protocol the training loop reads data through; `open` makes one as cls(data, data_dir).

  features: {name: kind} of the records' fields (the loop checks config.data.label_key in it).
  templates: the zero-shot prompt templates the data ships, or None.
  tokenizer_name: the folder under the data dir caching a tokenizer trained on its captions.
  """

  features: dict[str, Any] = {}
  templates: list[str] | None = None
  tokenizer_name: str = ""

  def __init__(self, data, data_dir: str):
    """data: config.data; data_dir: where datasets and tokenizers are kept."""

  @classmethod
  def check_config(cls, config) -> None:
    """Raises ValueError naming the field when config.data does not fit this source
    (called once, by mmjax.train.config.validate, before anything is opened)."""

  def class_names(self, label_key: str | None) -> list[str] | None:
    """The names of the classes of label_key, in label order; None without labels."""
    return None

  def eval_source(self):
    """The evaluation records (config.data.eval_split)."""
    raise NotImplementedError

  def train_records(self, limit: int, *, decode: bool = True):
    """At least the first `limit` training records (all of them where that is cheap), for
    the probes' train set and the captions of a trained tokenizer. decode=False: the images
    need not decode (only the captions are read)."""
    raise NotImplementedError

  def train_iterator(self, data, *, tokenizer, global_batch_size: int, seed: int,
                     process_index: int = 0, process_count: int = 1, views: int = 1,
                     caption_fields: dict[str, Callable[[str], Any]] | None = None
                     ) -> TrainIterator:
    """This process's share of each global batch, endless and seeded: 'image' uint8
    [b, S, S, 3] (S = data.image_size), 'text' int32 [b, L] (L = data.text_len), 'label'
    int32 [b] when the data has labels, 'image2' uint8 [b, S, S, 3] (a second augmentation
    of each image) for views=2, and caption_fields' keys (key: f(caption) stacked, [b, ...]);
    b = global_batch_size // process_count. set_state(get_state()) resumes the same batches."""
    raise NotImplementedError


_REGISTRY: dict[str, type] = {}


def register(name: str):
  """Class decorator: config.data.name=name reads data through this DataSource (a later
  registration of the name replaces it, as a notebook cell run again does)."""
  def add(cls):
    _REGISTRY[name] = cls
    return cls
  return add


def names() -> list[str]:
  return sorted(_REGISTRY)


def get(data) -> type:
  """The DataSource class of config.data.name: a registered one, else TfdsSource."""
  return _REGISTRY.get(data.name, TfdsSource)


def open(data, data_dir: str) -> DataSource:   # noqa: A001  (sources.open, as tfds.builder)
  """config.data's source, opened once (a TFDS dataset is built on first use)."""
  return get(data)(data, data_dir)


_BATCHING: dict[str, Callable[..., ImageBatching | None]] = {}


def register_batching(kind: str, make: Callable[..., ImageBatching | None]) -> None:
  """Adds (or replaces) how the image tower kind `kind`'s batches are made:
  make(config, fields, *, normalize, process_index, process_count) -> ImageBatching, or None
  when the config does not ask for it (it raises ValueError when it does but `fields`, the
  tower's complete fields, are not of its kind)."""
  _BATCHING[kind] = make


def image_batching(config, fields: dict, *, normalize=None, process_index: int = 0,
                   process_count: int = 1) -> ImageBatching:
  """How this process's batches reach the image tower of complete fields `fields` (the
  checkpoint's when the run starts from one): the first registered maker that answers, else
  the sources' images unchanged. normalize: the checkpoint's (mean, std), None for [-1, 1]."""
  for make in _BATCHING.values():
    out = make(config, fields, normalize=normalize, process_index=process_index,
               process_count=process_count)
    if out is not None:
      return out
  return ImageBatching()


register_batching("naflex", naflex.train_batching)


class TfdsSource(DataSource):
  """A prepared TFDS dataset named config.data.name (array_record under data_dir): the
  default for every name no other source registered."""

  @classmethod
  def check_config(cls, config) -> None:
    if config.data.get("audio_ext"):
      raise ValueError(f"config.data.audio_ext={config.data.audio_ext!r}: audio is read from "
                       "webdataset shards (config.data.name='wds'), not from TFDS "
                       f"{config.data.name!r}")

  def __init__(self, data, data_dir: str):
    self.data = data
    self.dataset = pipeline.open_dataset(data, data_dir)
    self.features, self.templates = self.dataset.features, self.dataset.templates
    self.tokenizer_name = data.name
    self._train = None

  def class_names(self, label_key):
    return self.dataset.class_names(label_key)

  def eval_source(self):
    return self.dataset.source(self.data.eval_split)

  def train_records(self, limit: int = 0, *, decode: bool = True):
    """The whole train split (random access costs nothing until a record is read)."""
    if self._train is None:
      self._train = self.dataset.source(self.data.train_split)
    return self._train

  def train_iterator(self, data, **kw) -> TrainIterator:
    return pipeline.make_train_iterator(self.train_records(), data, **kw)


@register("wds")
class WdsSource(DataSource):
  """webdataset shards: config.data.shards to train, config.data.eval_shards to evaluate."""

  @classmethod
  def check_config(cls, config) -> None:
    for key in ("shards", "eval_shards"):
      if not config.data[key]:
        raise ValueError(f"config.data.{key} must be set for config.data.name='wds' (brace "
                         "ranges '/data/{00000..00099}.tar', a glob or a file listing shards)")

  def __init__(self, data, data_dir: str):
    self.dataset = wds_pipeline.WdsDataset(data)
    self.features, self.templates = self.dataset.features, self.dataset.templates
    self.names_path = self.dataset.names_path   # the class names' file (errors name it)
    self.tokenizer_name = wds_pipeline.shards_id(self.dataset.train_paths)

  def class_names(self, label_key):
    return self.dataset.class_names(label_key)

  def eval_source(self):
    return self.dataset.source(self.dataset.data.eval_split)

  def train_records(self, limit: int, *, decode: bool = True):
    """The first `limit` train samples with a caption and an image (one that decodes)."""
    return self.dataset.train_samples(limit, decode=decode)

  def train_iterator(self, data, **kw) -> TrainIterator:
    return wds_pipeline.make_train_iterator(self.dataset.train_paths, data, **kw)
