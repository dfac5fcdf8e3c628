"""webdataset shards into training through grain: streams of shards, a window shuffle,
decode and augmentation in worker processes, bad samples skipped and counted.

The global batch is cut into `streams` equal parts. Stream k reads the shards of an endless,
seeded sequence (epoch e is a permutation of all shards; item i of the sequence is shard
perm_e[i mod n] of epoch e = i // n) at positions k, k + streams, ...: every shard is read once
per epoch over all streams, and an uneven split only means some streams read one shard more
per epoch. Each stream interleaves `shard_cycle` open shards sample by sample, shuffles a window
of `shuffle_buffer` raw samples, decodes and augments each sample with a generator seeded by its
identity (seed, sequence position, key), and batches what decodes. Process p of P reads streams
[p * streams / P, (p + 1) * streams / P), so the global batch, the processes' batches stacked in
process order, is the same whatever P divides `streams` (default: one stream per process).

A bad sample (an image that does not decode, no image member, no or an empty caption; with
config.data.audio_ext, no audio member or one that does not decode: counted as a bad image) or a
shard that cannot be read to its end is skipped: counted per kind (KINDS) in the batch that
would have held it, warned once per kind, and a run ends (DataError) when more than
max_skip_fraction of what it read was bad. The iterator's state (grain's, JSON) holds the
shards' byte offsets, so a resumed run reads exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import io
import os
import sys
import wave
import zlib

import grain
import numpy as np
import tqdm
from absl import flags
from PIL import Image

from mmjax.data import naflex as naflex_lib, wds
from mmjax.data.preprocess import crop_box

KINDS = ("image", "caption", "tar")   # data/skipped_<kind>
_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


class DataError(ValueError):
  """The data is mostly broken (config.data.max_skip_fraction)."""


def _exts(spec: str, field: str) -> tuple[str, ...]:
  out = tuple(e.strip().lower().lstrip(".") for e in str(spec).split(";") if e.strip())
  if not out:
    raise ValueError(f"config.data.{field}={spec!r} names no extension (e.g. 'jpg;png;webp')")
  return out


# --- shards -------------------------------------------------------------------------------

class _ShardIterator(grain.DatasetIterator):
  """One shard's samples from a byte offset; its state is that offset (None: done)."""

  def __init__(self, path: str, item: int, n: int):
    super().__init__()
    self.path, self.item, self.n = path, item, n
    self.offset, self.gen = 0, None

  def __next__(self) -> dict:
    if self.offset is None:
      raise StopIteration
    if self.gen is None:
      self.gen = wds.read_shard(self.path, self.offset)
    try:
      sample, self.offset = next(self.gen)
    except StopIteration:
      self.offset = None
      raise
    sample["__item__"], sample["__n__"] = self.item, self.n
    return sample

  def get_state(self) -> dict:
    return {"offset": self.offset}

  def set_state(self, state: dict) -> None:
    if self.gen is not None:
      self.gen.close()
    self.offset, self.gen = state["offset"], None

  def close(self) -> None:
    if self.gen is not None:
      self.gen.close()
    super().close()


class _Shard(grain.IterDataset):
  def __init__(self, path: str, item: int, n: int):
    super().__init__()
    self.path, self.item, self.n = path, item, n

  def __iter__(self):
    return _ShardIterator(self.path, self.item, self.n)


class ShardOrder(grain.MapDataset):
  """The endless shard sequence: item i is shard perm_e[i % n] of epoch e = i // n (perm_e a
  seeded permutation), as an IterDataset of its samples."""

  def __init__(self, paths: list[str], seed: int):
    super().__init__()
    self.paths, self.seed = list(paths), int(seed)

  def __len__(self) -> int:
    return sys.maxsize

  @functools.lru_cache(maxsize=4)
  def _perm(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self.seed, epoch]).permutation(len(self.paths))

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    epoch, j = divmod(int(index), len(self.paths))
    return _Shard(self.paths[self._perm(epoch)[j]], int(index), len(self.paths))

  def __str__(self) -> str:
    return f"ShardOrder({len(self.paths)} shards, seed={self.seed})"


# --- decode and augment -------------------------------------------------------------------

def random_resized_crop(im: Image.Image, size: int, rng: np.random.Generator, *,
                        scale=(0.6, 1.0), draft: bool = True) -> np.ndarray:
  """A PIL image (not yet decoded) -> uint8 [size, size, 3]: the crop is drawn from the
  header's size, then a JPEG is decoded at the smallest 1/2, 1/4 or 1/8 scale that keeps the
  crop at least `size` pixels on each side (PIL's draft mode), then crop and bicubic resize."""
  w, h = im.size
  box = crop_box(h, w, rng, scale)
  top, left, ch, cw = box if box is not None else (0, 0, h, w)
  if draft and im.format == "JPEG":
    shrink = min(cw, ch) / size
    if shrink >= 2:
      im.draft("RGB", (int(np.ceil(w / shrink)), int(np.ceil(h / shrink))))
  sx, sy = im.size[0] / w, im.size[1] / h
  im = im.convert("RGB")
  out = im.resize((size, size), Image.BICUBIC,
                  box=(left * sx, top * sy, (left + cw) * sx, (top + ch) * sy))
  return np.asarray(out, np.uint8)


def decode_wav(data: bytes, *, sample_rate: int, length: int) -> np.ndarray:
  """A PCM WAV file's bytes (8-, 16- or 32-bit, mono) -> float32 [length] in [-1, 1]: cut
  or zero-padded at the end. ValueError (a one-line reason) for a bad header, no frames,
  fewer frames than the header says, several channels or another sample rate (nothing is
  resampled)."""
  try:
    with wave.open(io.BytesIO(data)) as w:
      rate, width, channels, frames = (w.getframerate(), w.getsampwidth(), w.getnchannels(),
                                        w.getnframes())
      pcm = w.readframes(frames)
  except (wave.Error, EOFError, OSError) as e:
    raise ValueError(f"not a PCM WAV ({type(e).__name__}: {e})") from None
  if rate != sample_rate:
    raise ValueError(f"{rate} Hz, config.data.audio_rate is {sample_rate}")
  if channels != 1:
    raise ValueError(f"{channels} channels (mono only)")
  kinds = {1: ("u1", 128, 128.0), 2: ("<i2", 0, 32768.0), 4: ("<i4", 0, 2.0 ** 31)}
  if width not in kinds:
    raise ValueError(f"{8 * width}-bit samples (8, 16 or 32-bit PCM only)")
  dtype, zero, scale = kinds[width]
  if not pcm:
    raise ValueError("no audio frames")
  if len(pcm) < frames * width:
    raise ValueError(f"truncated: the header has {frames} frames, the file {len(pcm) // width}")
  x = (np.frombuffer(pcm, dtype).astype(np.float32) - zero) / scale
  out = np.zeros(length, np.float32)
  out[:min(length, len(x))] = x[:length]
  return out


def _skip(kind: str, where: str, sample: dict) -> dict:
  return {"__skip__": kind, "__where__": where, "__item__": sample["__item__"],
          "__n__": sample["__n__"]}


class Decode:
  """A raw sample -> {'image' uint8 [S, S, 3], 'text' int32 [L][, 'image2', caption fields,
  'audio' float32 [T]]} or a skip marker. caption_fields: {key: a picklable caption -> array
  function}. audio_ext (None: no audio): the WAV member read as 'audio', T = audio_rate *
  audio_seconds samples. A module-level class: grain's workers pickle it."""

  def __init__(self, *, tokenizer, image_size: int, text_len: int, image_ext: str,
               text_ext: str, seed: int, augment: bool = True, crop_scale_min: float = 0.6,
               flip: bool = False, views: int = 1, caption_fields=None, naflex=None,
               region_fields=None, regions_ext: str = "json", audio_ext: str | None = None,
               audio_rate: int = 16000, audio_seconds: float = 2.0):
    self.tokenizer, self.size, self.text_len = tokenizer, image_size, text_len
    self.naflex = naflex   # (patch, max_patches, native): mmjax.data.naflex.train_view
    self.image_exts, self.text_ext = _exts(image_ext, "image_ext"), _exts(text_ext, "text_ext")[0]
    self.seed, self.augment, self.scale_min, self.flip, self.views = (
        seed, augment, crop_scale_min, flip, views)
    self.caption_fields = dict(caption_fields or {})
    self.region_fields, self.regions_ext = dict(region_fields or {}), regions_ext
    self.audio_exts = _exts(audio_ext, "audio_ext") if audio_ext else ()
    if set(self.audio_exts) - {"wav"}:
      raise ValueError(f"config.data.audio_ext={audio_ext!r}: only 'wav' (PCM) is read")
    samples = audio_rate * audio_seconds   # 16000 * 0.3 is 4800.000000000001
    self.audio_rate, self.audio_len = audio_rate, int(round(samples))
    if self.audio_exts and (self.audio_len <= 0 or abs(samples - self.audio_len) > 1e-6):
      raise ValueError(f"config.data.audio_seconds={audio_seconds} x audio_rate={audio_rate} "
                       "must be a positive whole number of samples")

  def _view(self, im: Image.Image, rng: np.random.Generator, draft: bool) -> np.ndarray:
    if self.augment:
      x = random_resized_crop(im, self.size, rng, scale=(self.scale_min, 1.0), draft=draft)
    else:
      x = np.asarray(im.convert("RGB").resize((self.size, self.size), Image.BICUBIC), np.uint8)
    if self.flip and rng.random() < 0.5:
      x = x[:, ::-1]
    return np.ascontiguousarray(x)

  def __call__(self, sample: dict) -> dict:
    if "__skip__" in sample:
      return sample
    where = f"{sample['__shard__']}:{sample['__key__']}"
    ext = next((e for e in self.image_exts if e in sample), None)
    if ext is None:
      have = sorted(k for k in sample if not k.startswith("__"))
      return _skip("image", f"{where}: no image ({';'.join(self.image_exts)}; it has {have})",
                   sample)
    try:
      text = sample[self.text_ext].decode("utf-8").strip() if self.text_ext in sample else ""
    except UnicodeDecodeError:
      return _skip("caption", f"{where}.{self.text_ext}: not UTF-8", sample)
    if not text:
      why = "empty" if self.text_ext in sample else "missing"
      return _skip("caption", f"{where}.{self.text_ext}: {why}", sample)
    rng = np.random.default_rng([self.seed, sample["__item__"],
                                 zlib.crc32(sample["__key__"].encode())])
    extra = {}
    try:
      with Image.open(io.BytesIO(sample[ext])) as im:
        if self.naflex:
          patches, extra["image_grid"] = naflex_lib.train_view(
              np.asarray(im.convert("RGB")), *self.naflex[:2], native=self.naflex[2], rng=rng,
              crop_scale_min=self.scale_min if self.augment else 1.0, flip=self.flip)
          views = [patches]
        else:
          views = [self._view(im, rng, draft=self.views == 1)]
        if self.views == 2:
          views.append(self._view(im, rng, draft=False))
    except _IMAGE_ERRORS as e:
      return _skip("image", f"{where}.{ext}: {type(e).__name__}: {e}", sample)
    if self.audio_exts:
      aext = next((e for e in self.audio_exts if e in sample), None)
      if aext is None:
        return _skip("image", f"{where}: no audio ({';'.join(self.audio_exts)})", sample)
      try:
        extra["audio"] = decode_wav(sample[aext], sample_rate=self.audio_rate,
                                    length=self.audio_len)
      except ValueError as e:
        return _skip("image", f"{where}.{aext}: {e}", sample)
    out = {"image": views[0], "text": self.tokenizer.encode([text], self.text_len)[0],
           "__epoch__": sample["__item__"] / sample["__n__"], **extra}
    if self.views == 2:
      out["image2"] = views[1]
    for key, field in self.caption_fields.items():
      out[key] = field(text)
    if self.region_fields:
      if self.regions_ext not in sample:
        return _skip("caption", f"{where}: no .{self.regions_ext} member (its regions, "
                     "config.data.regions_ext)", sample)
      regions = sample[self.regions_ext].decode("utf-8", "replace")
      for key, field in self.region_fields.items():
        out[key] = field(regions)
    return out


class _OwnState(grain.IterDataset):
  """Its parent's samples and state, unchanged; set_state hands the parent a copy. grain
  0.2.18's window shuffle passes its parent the very state it keeps as its window's start, and
  the interleave keeps that state's list of open shards as its own and updates it as it opens
  the next ones: a state saved before the window ends would name shards other than the ones
  its offsets belong to, and a second resume would read the wrong shards."""

  def __iter__(self):
    return _OwnStateIterator(self._parent.__iter__())


class _OwnStateIterator(grain.DatasetIterator):
  def __next__(self):
    return next(self._parent)

  def get_state(self):
    return self._parent.get_state()

  def set_state(self, state):
    self._parent.set_state(copy.deepcopy(state))


# --- batching with skips ------------------------------------------------------------------

class _SkipBatchIterator(grain.DatasetIterator):
  """Pulls until `size` good examples: a batch of them plus '_skipped' int64 [len(KINDS)]
  (the markers pulled meanwhile), '_where' (the first of each kind, '' for none) and
  '_epoch' (the furthest shard-sequence position, in epochs). Its state is its parent's: a
  batch boundary leaves nothing half-read."""

  def __init__(self, parent, size: int, give_up: int):
    super().__init__(parent)
    self.size, self.give_up = size, give_up

  def __next__(self) -> dict:
    good, skipped, where, epoch = [], np.zeros(len(KINDS), np.int64), [""] * len(KINDS), 0.0
    while len(good) < self.size:
      ex = next(self._parent)
      epoch = max(epoch, ex["__item__"] / ex["__n__"] if "__item__" in ex else ex["__epoch__"])
      if "__skip__" in ex:
        k = KINDS.index(ex["__skip__"])
        skipped[k] += 1
        where[k] = where[k] or ex["__where__"]
        if skipped.sum() > self.give_up:
          raise DataError(f"{skipped.sum()} bad samples and shards in a row while filling one "
                          f"batch of {self.size}: " + _kinds_line(skipped, where))
        continue
      good.append(ex)
    out = {k: np.stack([ex[k] for ex in good]) for k in good[0] if not k.startswith("__")}
    out.update(_skipped=skipped, _where=tuple(where), _epoch=np.float64(epoch))
    return out

  def get_state(self):
    return self._parent.get_state()

  def set_state(self, state):
    self._parent.set_state(state)


class _SkipBatch(grain.IterDataset):
  def __init__(self, parent, size: int, give_up: int):
    super().__init__(parent)
    self.size, self.give_up = size, give_up

  def __iter__(self):
    return _SkipBatchIterator(self._parent.__iter__(), self.size, self.give_up)


def _kinds_line(counts, where) -> str:
  return ", ".join(f"{kind} {int(n)} (first: {w})" if n else f"{kind} 0"
                   for kind, n, w in zip(KINDS, counts, where))


def _concat(batches: tuple) -> dict:
  """The streams' batches of one step, in stream order, as one batch."""
  out = {k: np.concatenate([b[k] for b in batches]) for k in batches[0] if not k.startswith("_")}
  out["_skipped"] = sum(b["_skipped"] for b in batches)
  out["_where"] = tuple(next((w for w in ws if w), "") for ws in zip(*(b["_where"] for b in batches)))
  out["_epoch"] = np.float64(max(b["_epoch"] for b in batches))
  return out


# --- the train iterator -------------------------------------------------------------------

class TrainIterator:
  """The local batches of one process (numpy dicts: 'image' uint8 [b, S, S, 3], 'text' int32
  [b, L]), with get_state/set_state (grain's state and the skip counts) and `metrics()`
  (data/epoch, data/skipped_<kind>). Raises DataError when more than max_skip_fraction of
  the samples and shards read so far were bad."""

  def __init__(self, ds, *, max_skip_fraction: float, process_index: int, process_count: int,
               layout: dict | None = None):
    self.it = iter(ds)
    self.layout = layout or {}
    self.max_skip_fraction = max_skip_fraction
    self.who = f"process {process_index}: " if process_count > 1 else ""
    self.good, self.skipped, self.first = 0, np.zeros(len(KINDS), np.int64), [""] * len(KINDS)
    self.epoch = 0.0

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    batch = next(self.it)
    self.good += len(batch["text"])
    self.epoch = max(self.epoch, float(batch["_epoch"]))
    for k, (n, w) in enumerate(zip(batch["_skipped"], batch["_where"])):
      if n and not self.skipped[k]:
        self.first[k] = w
        tqdm.tqdm.write(f"mmjax: warning: {self.who}skipped a bad {KINDS[k]}: {w}; further "
                        f"ones are counted in data/skipped_{KINDS[k]} (warned once)")
    self.skipped += batch["_skipped"]
    bad = int(self.skipped.sum())
    if bad > self.max_skip_fraction * (bad + self.good):
      raise DataError(
          f"config.data.max_skip_fraction={self.max_skip_fraction}: {self.who}{bad} of the "
          f"{bad + self.good} samples and shards read were bad ({bad / (bad + self.good):.0%}): "
          f"{_kinds_line(self.skipped, self.first)}; the run stops here, its checkpoints stay")
    return {k: v for k, v in batch.items() if not k.startswith("_")}

  def metrics(self) -> dict:
    out = {"data/epoch": self.epoch}
    out.update({f"data/skipped_{k}": int(n) for k, n in zip(KINDS, self.skipped)})
    return out

  def get_state(self) -> dict:
    return {"grain": self.it.get_state(), "layout": self.layout, "good": self.good,
            "epoch": self.epoch,
            "skipped": [int(n) for n in self.skipped], "first": list(self.first)}

  def set_state(self, state: dict) -> None:
    """Raises ValueError naming the config field when the saved position was read with
    other shards, streams or workers (it would not resume the same batches)."""
    saved = state.get("layout", {})
    for key, field in (("shards", "config.data.shards"), ("streams", "config.data.streams"),
                       ("workers", "config.data.num_workers"), ("batch", "config.batch_size")):
      if key in saved and saved[key] != self.layout.get(key):
        raise ValueError(f"{field}: the checkpoint's data position was read with {key} "
                         f"{saved[key]}, this run has {self.layout.get(key)}; resume with the "
                         "same value (or start a new --workdir)")
    self.it.set_state(state["grain"])
    self.good, self.epoch = int(state["good"]), float(state["epoch"])
    self.skipped = np.asarray(state["skipped"], np.int64)
    self.first = list(state["first"])

  def close(self) -> None:
    if hasattr(self.it, "close"):
      self.it.close()


def stream_layout(n_shards: int, streams: int, process_count: int) -> tuple[int, str | None]:
  """(streams, a line to say or None): 0 means one stream per process; the streams must split
  evenly over the processes."""
  streams = streams or process_count
  if streams % process_count:
    raise ValueError(f"config.data.streams={streams} is not a multiple of the {process_count} "
                     "processes (each process reads streams / processes of them)")
  note = None
  if n_shards % streams:
    lo = n_shards // streams
    note = (f"{n_shards} shards over {streams} streams: each epoch {n_shards % streams} of them "
            f"read {lo + 1} shards and the others {lo} (which ones changes per epoch)")
  return streams, note


def make_train_iterator(paths: list[str], data, *, tokenizer, global_batch_size: int,
                        seed: int, process_index: int = 0, process_count: int = 1,
                        views: int = 1, caption_fields=None,
                        naflex: tuple[int, int, bool] | None = None,
                        region_fields=None) -> TrainIterator:
  """This process's share of each global batch from the shards `paths`: 'image' uint8
  [b, S, S, 3], 'text' int32 [b, L], 'image2' for views=2, 'audio' float32 [b, T] with
  data.audio_ext (T = audio_rate * audio_seconds), and caption_fields' keys
  ({key: a picklable caption -> array function}, as mmjax.data.pipeline's); with naflex,
  'image' patches and 'image_grid' as mmjax.data.pipeline.make_train_iterator's.

  data: config.data (image_size, text_len, augment, crop_scale_min, flip, image_ext, text_ext,
  audio_ext, audio_rate, audio_seconds, streams, shuffle_buffer, shard_cycle, num_workers,
  max_skip_fraction). The batches depend on the seed, the shards, `streams` and
  `num_workers`; not on the number of processes (when it divides `streams`).
  """
  streams, note = stream_layout(len(paths), data.streams, process_count)
  if global_batch_size % streams:
    raise ValueError(f"config.batch_size={global_batch_size} is not divisible by "
                     f"config.data.streams={streams}")
  if note and process_index == 0:
    print(f"mmjax: {note}", flush=True)
  for key in ("shuffle_buffer", "shard_cycle"):
    if not isinstance(data[key], int) or data[key] <= 0:
      raise ValueError(f"config.data.{key} must be a positive int; got {data[key]!r}")
  if not 0 <= data.max_skip_fraction <= 1:
    raise ValueError(f"config.data.max_skip_fraction must be in [0, 1]; "
                     f"got {data.max_skip_fraction!r}")
  per = global_batch_size // streams
  decode = Decode(tokenizer=tokenizer, image_size=data.image_size, text_len=data.text_len,
                  image_ext=data.image_ext, text_ext=data.text_ext, seed=seed,
                  augment=data.augment, crop_scale_min=data.crop_scale_min, flip=data.flip,
                  views=views, caption_fields=caption_fields, naflex=naflex,
                  region_fields=region_fields, regions_ext=data.regions_ext,
                  audio_ext=data.audio_ext, audio_rate=data.audio_rate,
                  audio_seconds=data.audio_seconds)
  order = ShardOrder(paths, seed)
  local = streams // process_count
  parts = []
  for k in range(process_index * local, (process_index + 1) * local):
    ds = grain.experimental.InterleaveIterDataset(order[k::streams], cycle_length=data.shard_cycle)
    ds = grain.experimental.WindowShuffleIterDataset(
        _OwnState(ds), window_size=data.shuffle_buffer, seed=(seed * 7919 + k * 1_000_003) % 2 ** 31)
    parts.append(_SkipBatch(ds.map(decode), per, give_up=100 * per + 1000))
  ds = grain.experimental.ZipIterDataset(parts).map(_concat)
  if data.num_workers > 0:
    # grain 0.2.18's mp_prefetch reads an absl flag (google/grain#1355)
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=data.num_workers))
  else:   # a reader thread: decoding overlaps the step (XLA releases the GIL)
    ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=2)
  layout = {"shards": len(paths), "streams": streams, "workers": data.num_workers,
            "batch": global_batch_size}
  return TrainIterator(ds, max_skip_fraction=data.max_skip_fraction,
                       process_index=process_index, process_count=process_count, layout=layout)


# --- random access: evaluation sets and the probes' / tokenizer's train samples -------------

class DecodedShards:
  """A ShardIndex as a source of records {'image': uint8 [H, W, 3], 'text': str, 'label': int}
  (the ones the samples have: `text` from text_ext, `label` from label_ext). audio_ext (None:
  no audio): `audio(i)` decodes sample i's WAV as training does, float32 [audio_len]."""

  def __init__(self, index: wds.ShardIndex, *, image_ext: str = "jpg;png;webp;jpeg",
               text_ext: str = "txt", label_ext: str = "cls",
               keys: tuple[str, str, str] = ("image", "text", "label"),
               audio_ext: str | None = None, audio_rate: int = 16000, audio_len: int = 0):
    self.index = index
    self.image_exts, self.text_ext = _exts(image_ext, "image_ext"), _exts(text_ext, "text_ext")[0]
    self.label_ext = label_ext
    self.image_key, self.text_key, self.label_key = keys
    self.audio_exts = _exts(audio_ext, "audio_ext") if audio_ext else ()
    self.audio_rate, self.audio_len = audio_rate, audio_len

  def __len__(self) -> int:
    return len(self.index)

  def meta(self, i: int) -> dict:
    """Record i without its image (nothing decoded): the text and label fields."""
    return self._meta(self.index[i], self.index.where(i))

  def _meta(self, sample: dict, where: str) -> dict:
    out = {}
    if self.text_ext in sample:
      out[self.text_key] = sample[self.text_ext].decode("utf-8", "replace").strip()
    if self.label_ext and self.label_ext in sample:
      try:
        out[self.label_key] = int(sample[self.label_ext].decode().strip())
      except ValueError:
        raise ValueError(f"{where}.{self.label_ext}: not a class index "
                         f"({sample[self.label_ext][:40]!r})") from None
    return out

  def record(self, sample: dict, where: str) -> dict:
    ext = next((e for e in self.image_exts if e in sample), None)
    if ext is None:
      raise ValueError(f"{where}: no image ({';'.join(self.image_exts)})")
    try:
      with Image.open(io.BytesIO(sample[ext])) as im:
        image = np.asarray(im.convert("RGB"), np.uint8)
    except _IMAGE_ERRORS as e:
      raise ValueError(f"{where}.{ext}: the image does not decode ({e})") from None
    return {self.image_key: image, **self._meta(sample, where)}

  def __getitem__(self, i: int) -> dict:
    return self.record(self.index[i], self.index.where(i))

  def audio(self, i: int) -> np.ndarray:
    """Sample i's waveform, float32 [audio_len] (decode_wav: cut or zero-padded); ValueError
    naming the sample when it has no audio member or it does not decode (evaluation shards
    must be whole)."""
    sample, where = self.index[i], self.where(i)
    ext = next((e for e in self.audio_exts if e in sample), None)
    if ext is None:
      raise ValueError(f"{where}: no audio ({';'.join(self.audio_exts)})")
    try:
      return decode_wav(sample[ext], sample_rate=self.audio_rate, length=self.audio_len)
    except ValueError as e:
      raise ValueError(f"{where}.{ext}: {e}") from None

  def where(self, i: int) -> str:
    """Sample i as 'shard PATH, sample KEY' (its __key__), for errors."""
    shard, _, key = self.index.items[i]
    return f"shard {self.index.paths[shard]}, sample {key!r}"

  def keys(self, i: int) -> set:
    """The fields record i has, without decoding its image."""
    return {self.image_key} | set(self.meta(i))


def read_lines(path: str) -> list[str]:
  with open(path, encoding="utf-8") as f:
    return [line.strip() for line in f if line.strip()]


def read_class_names(path: str) -> list[str]:
  """One class name a line, in label order, stripped; trailing blank lines dropped. A blank
  line before the last name is refused naming the file and line: dropping it would give every
  later class the label of the one before."""
  with open(path, encoding="utf-8") as f:
    names = [line.strip() for line in f]
  while names and not names[-1]:
    names.pop()
  if "" in names:
    raise ValueError(f"{path}: line {names.index('') + 1} is blank (one class name a line, "
                     "in label order)")
  return names


def find_beside(paths: list[str], name: str) -> str | None:
  """`name` in the folder of the first shard or its parent (CLIP_benchmark's layout:
  classnames.txt and zeroshot_classification_templates.txt beside test/*.tar)."""
  d = os.path.dirname(os.path.abspath(paths[0]))
  for folder in (d, os.path.dirname(d)):
    if os.path.isfile(os.path.join(folder, name)):
      return os.path.join(folder, name)
  return None


def shards_id(paths: list[str]) -> str:
  """A short stable name for a shard list (the trained tokenizer's cache folder)."""
  return "wds-" + hashlib.sha1("\n".join(os.path.abspath(p) for p in paths).encode()).hexdigest()[:12]


class WdsDataset:
  """config.data's shards (config.data.name='wds'), opened once, in the shape the launcher
  reads a TFDS dataset in: `features`, `source(eval_split)` (the evaluation shards, decoded),
  `class_names(label_key)`, `templates`; and `train_paths`.

  Class names: config.data.classnames (a file, one name per line in label order), else a
  classnames.txt beside the evaluation shards or in their parent folder (CLIP_benchmark's
  layout); templates: a zeroshot_classification_templates.txt found the same way.
  """

  def __init__(self, data):
    self.name, self.data = "wds", data
    if not data.shards:
      raise ValueError("config.data.shards: config.data.name='wds' reads webdataset shards; "
                       "set e.g. --config.data.shards='/data/cc3m/{00000..00331}.tar'")
    if not data.eval_shards:
      raise ValueError("config.data.eval_shards: the evaluation set of a 'wds' run (shards "
                       "with captions, and class labels for zero-shot) is not set")
    self.train_paths = wds.expand_shards(data.shards, field="config.data.shards")
    self.eval_paths = wds.expand_shards(data.eval_shards, field="config.data.eval_shards")
    names = data.classnames or find_beside(self.eval_paths, "classnames.txt")
    if data.classnames and not os.path.isfile(os.path.expanduser(data.classnames)):
      raise ValueError(f"config.data.classnames={data.classnames!r} does not exist")
    self.names_path = os.path.expanduser(names) if names else None   # errors name it
    self.names = read_class_names(self.names_path) if names else None
    temps = find_beside(self.eval_paths, "zeroshot_classification_templates.txt")
    self.templates = read_lines(temps) if temps else None
    self.features = {data.image_key: "image", data.text_key: "text"}
    if self.names:
      self.features[data.label_key or "label"] = "label"

  def train_samples(self, limit: int, *, decode: bool = True) -> "DecodedShards":
    """The first `limit` train samples with a caption and an image (decode: one that
    decodes) for the probes' train set or a trained tokenizer's captions, random access;
    `.index.skipped` counts the ones left out."""
    check = self.decoded(None)

    def keep(sample) -> bool:
      try:
        rec = (check.record(sample, sample["__key__"]) if decode
               else {**check._meta(sample, sample["__key__"]),
                     check.image_key: any(e in sample for e in check.image_exts) or None})
      except ValueError:
        return False
      return bool(rec.get(check.text_key)) and rec.get(check.image_key) is not None
    return self.decoded(wds.ShardIndex(self.train_paths, limit=limit, keep=keep))

  def decoded(self, index: wds.ShardIndex) -> "DecodedShards":
    d = self.data
    return DecodedShards(index, image_ext=d.image_ext, text_ext=d.text_ext, label_ext=d.label_ext,
                         keys=(d.image_key, d.text_key, d.label_key or "label"),
                         audio_ext=d.audio_ext, audio_rate=d.audio_rate,
                         audio_len=int(round(d.audio_rate * d.audio_seconds)))

  def source(self, split: str):
    if split != self.data.eval_split:
      raise ValueError(f"split {split!r}: a 'wds' run evaluates on config.data.eval_shards "
                       f"(config.data.eval_split={self.data.eval_split!r})")
    return self.decoded(wds.ShardIndex(self.eval_paths))

  def class_names(self, label_key: str | None) -> list[str] | None:
    return self.names if label_key else None
