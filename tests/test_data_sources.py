"""Data sources by name: a source written in this file, registered, trains through the loop
(checkpoints, exact resume, evaluation) without touching the package; the built-in names pick
the TFDS and webdataset sources, and every source hands the step uint8 images."""

import json
import os
import shutil

import numpy as np
import pytest

from mmjax.data import sources
from tests.configs import tiny_config
from tests.test_resume import _cut_back, _losses

N_CLASSES, N_TRAIN, N_TEST = 4, 64, 24
COLOURS = np.array([[230, 40, 40], [40, 200, 60], [50, 60, 220], [220, 210, 40]], np.uint8)


def _records(rng, n: int, size: int) -> list[dict]:
  """n examples {'image' uint8 [size, size, 3], 'text', 'label'}: a noisy card of the colour of
  class k, captioned 'a photo of class k'."""
  labels = rng.integers(0, N_CLASSES, n)
  noise = rng.integers(-30, 30, size=(n, size, size, 3))
  images = np.clip(COLOURS[labels][:, None, None] + noise, 0, 255).astype(np.uint8)
  return [{"image": x, "text": f"a photo of class {k}", "label": int(k)}
          for x, k in zip(images, labels)]


class _Batches:
  """Batch t of the epoch-wise seeded permutations, this process's rows; its state is t."""

  def __init__(self, records, data, *, tokenizer, global_batch_size, seed, process_index,
               process_count, views, caption_fields):
    self.records, self.data, self.tok, self.seed = records, data, tokenizer, seed
    self.batch, self.local = global_batch_size, global_batch_size // process_count
    self.start, self.views, self.fields = process_index * self.local, views, caption_fields
    self.t = 0

  def _index(self, position: int) -> int:
    epoch, i = divmod(position, len(self.records))
    return int(np.random.default_rng([self.seed, epoch]).permutation(len(self.records))[i])

  def __next__(self) -> dict:
    first = self.t * self.batch + self.start
    rows = [self.records[self._index(p)] for p in range(first, first + self.local)]
    self.t += 1
    texts = [r["text"] for r in rows]
    out = {"image": np.stack([r["image"] for r in rows]),
           "text": self.tok.encode(texts, self.data.text_len),
           "label": np.array([r["label"] for r in rows], np.int32)}
    if self.views == 2:
      out["image2"] = out["image"][:, :, ::-1].copy()
    for key, field in (self.fields or {}).items():
      out[key] = np.stack([field(t) for t in texts])
    return out

  def get_state(self) -> dict:
    return {"t": self.t}

  def set_state(self, state: dict) -> None:
    self.t = state["t"]


@sources.register("test_colour_cards")
class ColourCards(sources.DataSource):
  """Random colour cards in memory: the whole DataSource protocol in a few lines."""

  features = {"image": "image", "text": "text", "label": "label"}
  templates = ["a photo of class {}"]
  tokenizer_name = "test_colour_cards"
  built = 0   # how many times the loop opened it

  @classmethod
  def check_config(cls, config) -> None:
    if config.data.image_size > 64:
      raise ValueError(f"config.data.image_size={config.data.image_size}: the colour cards "
                       "are at most 64 px")

  def __init__(self, data, data_dir):
    ColourCards.built += 1
    rng = np.random.default_rng(0)
    self.train = _records(rng, N_TRAIN, data.image_size)
    self.test = _records(rng, N_TEST, data.image_size)

  def class_names(self, label_key):
    return [str(k) for k in range(N_CLASSES)] if label_key else None

  def eval_source(self):
    return self.test

  def train_records(self, limit, *, decode=True):
    return self.train

  def train_iterator(self, data, **kw):
    return _Batches(self.train, data, **kw)


def _config(tmp_path, **kw):
  return tiny_config(str(tmp_path / "data"), **{
      "data.name": "test_colour_cards", "total_steps": 6, "checkpoint.every": 2,
      "checkpoint.keep": 3, "evaluate.retrieval_match": "pair", **kw})


def test_a_source_registered_here_trains_resumes_and_evaluates(tmp_path):
  """The loop reads the colour cards by name: 6 steps with checkpoints, evaluated (zero-shot
  from its class names and templates, retrieval); resumed from the step-2 checkpoint, steps
  3-6 have the uninterrupted run's losses."""
  from mmjax.train import loop
  ref_dir, dir_ = str(tmp_path / "ref"), str(tmp_path / "resumed")
  results = loop.train(_config(tmp_path), ref_dir)
  assert results["steps"] == 6 and results["resumed_from_step"] == 0
  for key in ("zeroshot_top1", "retrieval_i2t_r1", "retrieval_t2i_r1"):
    assert 0 <= results[key] <= 1, key
  assert os.path.exists(tmp_path / "data" / "test_colour_cards" / "tokenizer-bpe-v512.model")
  shutil.copytree(ref_dir, dir_)
  _cut_back(dir_, 2)
  resumed = loop.train(_config(tmp_path), dir_)
  assert resumed["resumed_from_step"] == 2
  assert _losses(dir_) == _losses(ref_dir)
  assert [s for s, _ in _losses(dir_)] == list(range(1, 7))
  with open(os.path.join(dir_, "results.json")) as f:
    assert json.load(f)["retrieval_i2t_r1"] == results["retrieval_i2t_r1"]


def test_the_registry_picks_sources_by_name_and_checks_their_config(tmp_path):
  """'wds' and registered names pick their sources, any other name is a TFDS dataset; each
  source's own config rules run in config.validate."""
  from mmjax.train import config as config_lib
  pick = lambda name: sources.get(_config(tmp_path, **{"data.name": name}).data)
  assert pick("test_colour_cards") is ColourCards
  assert pick("wds") is sources.WdsSource
  assert pick("mmjax_digits") is pick("my_pics") is sources.TfdsSource
  assert "test_colour_cards" in sources.names() and "wds" in sources.names()
  with pytest.raises(ValueError, match=r"^config.data.image_size=96: the colour cards"):
    config_lib.validate(_config(tmp_path, **{"data.image_size": 96}))
  with pytest.raises(ValueError, match=r"^config.data.shards must be set for config.data.name"):
    config_lib.validate(_config(tmp_path, **{"data.name": "wds"}))


def test_the_loop_opens_the_source_once_and_hands_the_step_uint8(tmp_path):
  """build: one DataSource, its iterator's batches uint8 (normalised on the device only)."""
  from mmjax.train import loop
  before = ColourCards.built
  built = loop.build(_config(tmp_path))
  assert ColourCards.built == before + 1
  batch = next(built.data_iter)
  assert batch["image"].dtype == np.uint8 and batch["image"].shape == (16, 32, 32, 3)
  assert built.normalize is None


class _ZeroTokenizer:
  def encode(self, texts, max_len):
    return np.zeros((len(texts), max_len), np.int32)


def _caption_length(text: str) -> np.ndarray:
  """A caption field (as CatLIP's targets): int32 [1]."""
  return np.array([len(text)], np.int32)


@pytest.mark.parametrize("name", ["mmjax_digits", "wds"])
def test_built_in_sources_give_uint8_views_and_caption_fields(name, data_dir, rng, tmp_path):
  """The TFDS and webdataset sources' train iterators (through the protocol): 'image' and
  'image2' uint8 [b, S, S, 3], two different augmentations, and each caption field."""
  from mmjax.train.config import defaults
  data = defaults().data
  data.update(name=name, image_size=24, text_len=6, crop_scale_min=0.3)
  tok = _ZeroTokenizer()
  if name == "wds":
    from tests.test_wds import _RowTokenizer, _shards
    _shards(rng, tmp_path)
    data.update(shards=str(tmp_path / "*.tar"), eval_shards=str(tmp_path / "*.tar"),
                shuffle_buffer=16, shard_cycle=2)
    tok = _RowTokenizer()
  source = sources.open(data, data_dir)
  it = source.train_iterator(data, tokenizer=tok, global_batch_size=8, seed=1, process_index=0,
                             process_count=1, views=2, caption_fields={"n": _caption_length})
  b = next(it)
  for key in ("image", "image2"):
    assert b[key].dtype == np.uint8 and b[key].shape == (8, 24, 24, 3), key
  assert not np.array_equal(b["image"], b["image2"])
  assert b["n"].shape == (8, 1) and b["n"].dtype == np.int32 and (b["n"] > 0).all()
  if name == "wds":   # 'caption N': the field is its caption's
    np.testing.assert_array_equal(b["n"][:, 0], [len(f"caption {n}") for n in b["text"][:, 0]])
  if hasattr(it, "close"):
    it.close()
