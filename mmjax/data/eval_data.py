"""Evaluation datasets, streamed: a prepared TFDS dataset or an image folder in ImageNet's
`val/<class>/<image>` layout, read in fixed-size batches by grain (bounded prefetch: memory
does not grow with the dataset), with the class names and templates zero-shot needs.

  ds = open_eval_set("folder:/data/imagenet/val")            # or "tfds:cifar10", split "test"
  for batch in eval_batches(ds, ImagePrep(224), batch_size=64):
    batch["image"]   # float32 [64, 224, 224, 3]; batch["label"] int32 [64]; batch["valid"] bool [64]
"""

from __future__ import annotations

import importlib.resources
import os
import re
from typing import Iterator, NamedTuple, Sequence

import grain
import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from mmjax.data import pipeline, prompts, wds, wds_pipeline
from mmjax.data.preprocess import ImagePrep

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
TEMPLATE_SETS = {"openai": "openai_imagenet_templates.txt",   # OpenAI's 80 ImageNet templates
                 "simple": "simple_imagenet_templates.txt"}   # their 7-template subset
_WNID = re.compile(r"n\d{8}")


def _data_lines(name: str) -> list[str]:
  text = importlib.resources.files("mmjax.data").joinpath(name).read_text(encoding="utf-8")
  return [line for line in text.splitlines() if line]


def imagenet_classnames() -> list[str]:
  """ImageNet-1k's 1000 class names in class-index (sorted WordNet id) order (OpenAI's)."""
  return _data_lines("imagenet_classnames.txt")


def load_templates(spec: str) -> list[str]:
  """'openai' (80), 'simple' (7) or a text file with one template per line, each naming the
  class as '{c}' (CLIP_benchmark's) or '{}' (mmjax.evaluate.prompts.template_problem)."""
  if spec in TEMPLATE_SETS:
    out = _data_lines(TEMPLATE_SETS[spec])
  elif os.path.isfile(os.path.expanduser(spec)):
    with open(os.path.expanduser(spec), encoding="utf-8") as f:
      out = [line.strip() for line in f if line.strip()]
  else:
    raise ValueError(f"templates={spec!r}: not one of {sorted(TEMPLATE_SETS)} and not a file")
  bad = [(i + 1, t, prompts.template_problem(t)) for i, t in enumerate(out)
         if prompts.template_problem(t)]
  if not out or bad:
    raise ValueError(f"templates={spec!r}: each template names the class as '{{c}}' or '{{}}'; "
                     f"bad lines (line, template, why): {bad[:3] or 'the file is empty'}")
  return out


def readable_names(names: Sequence[str]) -> list[str]:
  """Dataset label names as prompts want them: ImageNet's WordNet ids -> its class names,
  underscores -> spaces."""
  if len(names) == 1000 and all(_WNID.fullmatch(n) for n in names):
    if list(names) != sorted(names):
      raise ValueError("1000 WordNet-id classes not in sorted order: cannot map them to "
                       "ImageNet's class names")
    return imagenet_classnames()
  return [n.replace("_", " ") for n in names]


class ImageFolder:
  """root/<class>/<image>: classes in sorted order (label = index), images sorted per class.

  A random-access source: `len`, `[i] -> {'image': path, 'label': int}`.
  """

  def __init__(self, root: str):
    root = os.path.expanduser(root)
    if not os.path.isdir(root):
      raise ValueError(f"dataset folder {root!r} does not exist")
    self.root = root
    self.classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    if not self.classes:
      raise ValueError(f"dataset folder {root!r} has no class subfolders (expected "
                       "<root>/<class>/<image>, ImageNet's val/ layout)")
    self.items = []
    for label, c in enumerate(self.classes):
      files = sorted(f for f in os.listdir(os.path.join(root, c))
                     if f.lower().endswith(IMAGE_SUFFIXES))
      self.items += [(os.path.join(root, c, f), label) for f in files]
    if not self.items:
      raise ValueError(f"dataset folder {root!r}: its {len(self.classes)} class folders hold no "
                       f"images ({', '.join(IMAGE_SUFFIXES)})")

  def __len__(self) -> int:
    return len(self.items)

  def __getitem__(self, i: int) -> dict:
    path, label = self.items[i]
    return {"image": path, "label": label}


class EvalSet(NamedTuple):
  """A dataset to evaluate on: its random-access source and what the task needs."""
  name: str
  source: object              # len() and [i] -> {'image': uint8 array or path, ...}
  class_names: list[str] | None   # readable, in label order; None: no labels
  image_key: str = "image"
  label_key: str | None = "label"
  text_key: str | None = None     # captions (retrieval)
  templates: list[str] | None = None   # the dataset's own zero-shot templates, if it ships any


def open_eval_set(spec: str, *, split: str = "test", data_dir: str | None = None,
                  image_key: str = "image", label_key: str = "label",
                  text_key: str = "text") -> EvalSet:
  """'tfds:NAME' (a prepared array_record TFDS dataset under data_dir), 'folder:/path' or a
  directory path (an image folder), or 'wds:SHARDS' (webdataset shards: a folder in
  CLIP_benchmark's layout, <dir>/<split>/*.tar with classnames.txt and
  zeroshot_classification_templates.txt in <dir>, or a shard spec: brace range, glob, list
  file). A TFDS dataset with a ClassLabel `label_key` is a classification set; one with a Text
  `text_key` and no labels, a retrieval set; shards with 'cls' labels and class names are a
  classification set, shards with 'txt' captions a retrieval set."""
  kind, sep, rest = spec.partition(":")
  if not sep and os.path.isdir(os.path.expanduser(spec)):
    kind, rest = "folder", spec
  if kind == "folder":
    folder = ImageFolder(rest)
    return EvalSet(f"folder:{folder.root}", folder, readable_names(folder.classes))
  if kind == "wds" and rest:
    return _open_shards(spec, rest, split)
  if kind != "tfds" or not rest:
    raise ValueError(f"dataset={spec!r}: expected 'tfds:NAME', 'folder:/path', 'wds:SHARDS' or "
                     "an existing directory")
  data_dir = os.path.expanduser(data_dir or os.environ.get("MMJAX_DATA_DIR")
                                or "~/.cache/mmjax/datasets")
  try:
    builder = pipeline._builder(rest, data_dir)
  except ValueError as e:
    raise ValueError(f"dataset={spec!r}: {e}") from None
  features = dict(builder.info.features)
  if not isinstance(features.get(image_key), tfds.features.Image):
    raise ValueError(f"dataset={spec!r} has no Image feature {image_key!r}; its features: "
                     f"{sorted(features)}")
  if split not in builder.info.splits:
    raise ValueError(f"dataset={spec!r} has no split {split!r}; splits: "
                     f"{list(builder.info.splits)}")
  source = builder.as_data_source(split=split)
  label = features.get(label_key)
  if isinstance(label, tfds.features.ClassLabel):
    return EvalSet(f"tfds:{rest}", source, readable_names(label.names), image_key, label_key)
  if isinstance(features.get(text_key), tfds.features.Text):
    return EvalSet(f"tfds:{rest}", source, None, image_key, None, text_key)
  raise ValueError(f"dataset={spec!r} has neither a ClassLabel {label_key!r} nor a Text "
                   f"{text_key!r} feature; its features: {sorted(features)}")


def _open_shards(spec: str, rest: str, split: str) -> EvalSet:
  path = os.path.expanduser(rest)
  shards = os.path.join(path, split, "*.tar") if os.path.isdir(path) else path
  paths = wds.expand_shards(shards, field="--dataset")   # its own line: the spec, the field
  try:
    source = wds_pipeline.DecodedShards(wds.ShardIndex(paths))
  except ValueError as e:
    raise ValueError(f"--dataset={spec!r}: {e}") from None
  names = wds_pipeline.find_beside(paths, "classnames.txt")
  temps = wds_pipeline.find_beside(paths, "zeroshot_classification_templates.txt")
  keys = source.keys(0)
  if names and "label" in keys:
    class_names = wds_pipeline.read_lines(names)
    top = max(_every(source, "label", "cls", "a class label").values())
    if top >= len(class_names):
      raise ValueError(f"{names}: {len(class_names)} class names, but the shards have label "
                       f"{top} (labels index the names: 0..{len(class_names) - 1})")
    return EvalSet(f"wds:{rest}", source, readable_names(class_names),
                   templates=load_templates(temps) if temps else None)
  if "text" in keys:
    _every(source, "text", "txt", "a caption")
    return EvalSet(f"wds:{rest}", source, None, label_key=None, text_key="text")
  raise ValueError(f"dataset={spec!r}: its samples have neither a 'cls' label (with a "
                   "classnames.txt beside the shards or in their parent folder) nor a 'txt' "
                   "caption")


def _every(source, key: str, ext: str, what: str) -> dict:
  """{i: record i's `key`} over the whole set (its members read, no image decoded);
  ValueError naming the shard and the sample key of the first without one: an evaluation on
  part of a set would report another set's score."""
  out = {}
  for i in range(len(source)):
    meta = source.meta(i)
    if key not in meta:
      raise ValueError(f"{source.where(i)} has no .{ext} member ({what}), and the set's "
                       "other samples do; remove it or add one")
    out[i] = meta[key]
  return out


class _Prepare:
  """An example -> {'image' float32 [S, S, 3], 'label'?, 'text'?}; picklable for grain."""

  def __init__(self, prep: ImagePrep, image_key, label_key, text_key):
    self.prep, self.image_key, self.label_key, self.text_key = prep, image_key, label_key, text_key

  def __call__(self, ex: dict) -> dict:
    image = ex[self.image_key]
    if isinstance(image, (str, bytes)):   # a path (image folders)
      with Image.open(image) as im:
        image = self.prep(im)
    else:
      image = np.asarray(image)
      image = self.prep(np.repeat(image, 3, -1) if image.shape[-1] == 1 else image)
    out = {"image": image}
    if self.label_key:
      out["label"] = np.int32(ex[self.label_key])
    if self.text_key:
      t = ex[self.text_key]
      out["text"] = t.decode() if isinstance(t, bytes) else str(t)
    return out


def eval_batches(ds: EvalSet, prep: ImagePrep, batch_size: int, *, limit: int | None = None,
                 num_threads: int = 4) -> Iterator[dict]:
  """The dataset once, in order, in batches of exactly batch_size (the last one padded by
  repeating its first example, `valid` False there): 'image' float32 [b, S, S, 3],
  'label' int32 [b] (classification), 'text' list of b strings (retrieval), 'valid' bool [b].
  limit: the first `limit` examples only."""
  if batch_size <= 0:
    raise ValueError(f"batch_size={batch_size} must be positive")
  n = len(ds.source) if limit is None else min(limit, len(ds.source))
  data = (grain.MapDataset.source(ds.source)[:n]
          .map(_Prepare(prep.check(), ds.image_key, ds.label_key, ds.text_key)))
  it = iter(data.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                                   prefetch_buffer_size=2 * batch_size)))
  buf = []
  for ex in it:
    buf.append(ex)
    if len(buf) == batch_size:
      yield _stack(buf, batch_size)
      buf = []
  if buf:
    yield _stack(buf, batch_size)


def _stack(examples: list[dict], size: int) -> dict:
  pad = size - len(examples)
  full = examples + [examples[0]] * pad
  out = {"image": np.stack([e["image"] for e in full]),
         "valid": np.arange(size) < len(examples)}
  if "label" in examples[0]:
    out["label"] = np.array([e["label"] for e in full], np.int32)
  if "text" in examples[0]:
    out["text"] = [e["text"] for e in full]
  return out
