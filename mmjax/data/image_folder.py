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
import json
import os
import types

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image


def _read_rows(captions_file: str) -> list[dict]:
  if not os.path.isfile(captions_file):
    raise ValueError(f"captions file {captions_file!r} does not exist")
  with open(captions_file, newline="", encoding="utf-8") as f:
    if captions_file.endswith(".jsonl"):
      rows = []
      for i, line in enumerate(f, 1):
        if line.strip():
          try:
            rows.append(json.loads(line))
          except json.JSONDecodeError as e:
            raise ValueError(f"{captions_file}: row {i} is not JSON ({e})") from None
    else:
      rows = list(csv.DictReader(f))
  if not rows:
    raise ValueError(f"captions file {captions_file!r} has no rows")
  for i, row in enumerate(rows, 1):
    for col in ("image", "caption"):
      if not isinstance(row, dict) or not row.get(col):
        raise ValueError(f"{captions_file}: row {i} has no '{col}' column/field "
                         "(expected image,caption[,split])")
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


def build_image_text_folder(captions_file: str, *, data_dir: str,
                            name: str = "image_text_folder", image_size: int = 224,
                            test_fraction: float = 0.1, seed: int = 0) -> str:
  """Builds `name` into data_dir (array_record) and returns the name.

  Every image is opened first: a missing or unreadable one raises ValueError
  naming the file and row before anything is written.
  """
  captions_file = os.path.expanduser(captions_file)
  rows = _read_rows(captions_file)
  root = os.path.dirname(os.path.abspath(captions_file))
  for i, row in enumerate(rows, 1):
    path = os.path.join(root, row["image"])
    try:
      with Image.open(path) as im:
        im.verify()
    except Exception as e:  # PIL raises many kinds
      raise ValueError(f"{captions_file}: row {i}: cannot read image {row['image']!r} ({e})") from None
  if not all(r.get("split") for r in rows):
    if not 0 <= test_fraction < 1:
      raise ValueError(f"test_fraction must be in [0, 1); got {test_fraction}")
    n_test = int(round(len(rows) * test_fraction))
    test = set(np.random.default_rng(seed).permutation(len(rows))[:n_test].tolist())
    rows = [{**r, "split": "test" if i in test else "train"} for i, r in enumerate(rows)]
  attrs = dict(name=name, ROWS=rows, ROOT=root, IMAGE_SIZE=image_size,
               __module__=__name__)
  cls = types.new_class(f"ImageTextFolder_{name}", (_ImageTextFolder,),
                        {"skip_registration": True}, lambda ns: ns.update(attrs))
  builder = cls(data_dir=os.path.expanduser(data_dir), file_format="array_record")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      try_download_gcs=False))
  return name
