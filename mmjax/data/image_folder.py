"""A TFDS builder for your own data: a folder of images plus a captions file.

The captions file is CSV (header with `image,caption[,split]`) or JSONL
(`{"image": ..., "caption": ...[, "split": ...]}` per line); image paths are
relative to the captions file's folder. Without a split column a seeded
`test_fraction` of the rows is held out as 'test'. The result is an
array_record dataset that mmjax reads without TensorFlow:

  name = build_image_text_folder("pets/captions.csv", data_dir="~/data", name="pets")
  # then train with --config.data.name=pets --config.data.data_dir=~/data
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import types

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from mmjax.data import pipeline


_HEADER = "expected image,caption[,split]"
_FINGERPRINT = "mmjax_fingerprint.txt"   # next to the prepared data: sha256 of the inputs


def _decode(captions_file: str) -> str:
  """The file's text (UTF-8, an optional BOM dropped); ValueError naming the first bad line."""
  with open(captions_file, "rb") as f:
    data = f.read()
  try:
    return data.decode("utf-8-sig")
  except UnicodeDecodeError:
    for i, line in enumerate(data.splitlines(keepends=True), 1):
      try:
        line.decode("utf-8-sig" if i == 1 else "utf-8")
      except UnicodeDecodeError as e:
        raise ValueError(f"{captions_file}: line {i} is not UTF-8 ({e.reason} at byte {e.start}): "
                         f"{line.rstrip()[:200]!r}; save the file as UTF-8") from None
    raise


def _read_rows(captions_file: str) -> list[dict]:
  """The rows of a captions file, each a dict with non-blank string image and caption."""
  if not os.path.isfile(captions_file):
    raise ValueError(f"captions file {captions_file!r} does not exist")
  text = _decode(captions_file)
  if captions_file.endswith(".jsonl"):
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
      if line.strip():
        try:
          rows.append(json.loads(line))
        except json.JSONDecodeError as e:
          raise ValueError(f"{captions_file}: row {i} is not JSON ({e})") from None
        if not isinstance(rows[-1], dict):
          raise ValueError(f"{captions_file}: row {i} is not a JSON object; got {line.strip()!r}")
  else:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if reader.fieldnames is not None and not {"image", "caption"} <= set(reader.fieldnames):
      raise ValueError(f"{captions_file}: header is {reader.fieldnames}; {_HEADER}")
    rows = list(reader)
  if not rows:
    raise ValueError(f"captions file {captions_file!r} has no rows")
  for i, row in enumerate(rows, 1):
    for col in ("image", "caption"):
      if col not in row:
        raise ValueError(f"{captions_file}: row {i} has no '{col}' field; got keys "
                         f"{sorted(row)} ({_HEADER})")
      if row[col] is None:
        raise ValueError(f"{captions_file}: row {i} has no {col}; got {row}")
      if not isinstance(row[col], str):
        raise ValueError(f"{captions_file}: row {i}: {col} must be a string; got "
                         f"{type(row[col]).__name__} {row[col]!r}")
      if not row[col].strip():
        raise ValueError(f"{captions_file}: row {i}: {col} is empty or whitespace only; "
                         f"got {row[col]!r}")
  return rows


def _square(path: str, size: int) -> Image.Image:
  """Center crop to a square, resize to size x size, RGB."""
  img = Image.open(path).convert("RGB")
  w, h = img.size
  s = min(w, h)
  img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
  return img.resize((size, size), Image.BICUBIC)


class _ImageTextFolder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Images + captions; subclassed per dataset name by build_image_text_folder."""

  VERSION = tfds.core.Version("1.0.0")
  ROWS: list = []
  ROOT: str = ""
  IMAGE_SIZE: int = 224

  def _info(self) -> tfds.core.DatasetInfo:
    s = self.IMAGE_SIZE
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(s, s, 3)), "text": tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    del dl_manager
    splits = sorted({r["split"] for r in self.ROWS})
    return {s: self._generate_examples(s) for s in splits}

  def _generate_examples(self, split):
    for i, row in enumerate(self.ROWS):
      if row["split"] == split:
        yield i, {"image": _square(os.path.join(self.ROOT, row["image"]), self.IMAGE_SIZE),
                  "text": row["caption"]}


def _fingerprint(rows: list[dict], image_digests: list[str], image_size: int) -> str:
  """sha256 of everything a build depends on: each row's image, caption and split (which
  test_fraction and seed decide), the images' sha256 and image_size."""
  used = [[r["image"], r["caption"], r["split"]] for r in rows]
  return hashlib.sha256(json.dumps([used, image_digests, image_size,
                                    str(_ImageTextFolder.VERSION)]).encode()).hexdigest()


def _check_split(captions_file: str, i: int, split) -> None:
  """A split names a folder (webdataset shards) or a TFDS split: one plain path component."""
  plain = (isinstance(split, str) and split not in ("", ".", "..") and split == split.strip()
           and not any(c in split for c in (os.sep, os.altsep or os.sep, "\0")))
  if not plain:
    raise ValueError(f"{captions_file}: row {i}: split {split!r} is not a plain folder name "
                     "(one non-empty path component, not '.' or '..', no separator or "
                     "surrounding spaces)")


def read_checked(captions_file: str, *, test_fraction: float = 0.1, seed: int = 0
                 ) -> tuple[list[dict], str, list[bytes]]:
  """(rows, the captions file's folder, each row's image bytes): every row checked and every
  image opened, a ValueError naming the row and file otherwise; rows without a split column
  get one ('test' for a seeded test_fraction of them, else 'train'); where any row has a split,
  every row's must be a plain folder name."""
  rows = _read_rows(captions_file)
  root = os.path.dirname(os.path.abspath(captions_file))
  images = []
  for i, row in enumerate(rows, 1):
    path = os.path.join(root, row["image"])
    try:
      with open(path, "rb") as f:
        data = f.read()
      with Image.open(io.BytesIO(data)) as im:
        im.verify()
    except Exception as e:  # PIL raises many kinds
      raise ValueError(f"{captions_file}: row {i}: cannot read image {row['image']!r} ({e})") from None
    images.append(data)
  if any(r.get("split") not in (None, "") for r in rows):
    for i, row in enumerate(rows, 1):
      _check_split(captions_file, i, row.get("split"))
  else:
    if not 0 <= test_fraction < 1:
      raise ValueError(f"test_fraction must be in [0, 1); got {test_fraction}")
    n_test = int(round(len(rows) * test_fraction))
    test = set(np.random.default_rng(seed).permutation(len(rows))[:n_test].tolist())
    rows = [{**r, "split": "test" if i in test else "train"} for i, r in enumerate(rows)]
  return rows, root, images


def build_image_text_folder(captions_file: str, *, data_dir: str,
                            name: str = "image_text_folder", image_size: int = 224,
                            test_fraction: float = 0.1, seed: int = 0,
                            overwrite: bool = False) -> str:
  """Builds `name` into data_dir (array_record) and returns the name.

  Every image is opened first: a missing or unreadable one raises ValueError
  naming the file and row before anything is written. The build keeps a
  fingerprint of its inputs (captions, image bytes, the split of each row,
  image_size) next to the data: called again with the same inputs it reuses the
  build; with other inputs it raises ValueError unless overwrite=True, which
  deletes the old build and makes a new one.
  """
  captions_file = os.path.expanduser(captions_file)
  rows, root, images = read_checked(captions_file, test_fraction=test_fraction, seed=seed)
  image_digests = [hashlib.sha256(data).hexdigest() for data in images]
  fingerprint = _fingerprint(rows, image_digests, image_size)
  attrs = dict(name=name, ROWS=rows, ROOT=root, IMAGE_SIZE=image_size,
               __module__=__name__)
  cls = types.new_class(f"ImageTextFolder_{name}", (_ImageTextFolder,),
                        {"skip_registration": True}, lambda ns: ns.update(attrs))
  make = lambda: cls(data_dir=os.path.expanduser(data_dir), file_format="array_record")
  builder = make()
  stamp = builder.data_path / _FINGERPRINT
  if builder.is_prepared():
    if stamp.exists() and stamp.read_text().strip() == fingerprint:
      return name
    if not overwrite:
      how = "differ" if stamp.exists() else "are unknown (no fingerprint)"
      raise ValueError(
          f"{builder.data_path} already holds a build of {name!r} whose inputs (captions, "
          f"images, splits or image_size) {how}; pass overwrite=True to replace it, "
          "or choose a new name")
    builder.data_path.rmtree()
    builder = make()
  pipeline.prepare(builder)
  stamp.write_text(fingerprint + "\n")
  return name
