"""Evaluation datasets, streamed: a prepared TFDS dataset or an image folder in ImageNet's
`val/<class>/<image>` layout, read in fixed-size batches by grain (bounded prefetch: memory
does not grow with the dataset), with the class names and templates zero-shot needs.

  ds = open_eval_set("folder:/data/imagenet/val")            # or "tfds:cifar10", split "test"
  for batch in eval_batches(ds, ImagePrep(224), batch_size=64):
    batch["image"]   # float32 [64, 224, 224, 3]; batch["label"] int32 [64]; batch["valid"] bool [64]
"""

from __future__ import annotations

import importlib.resources
import json
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


def load_templates(spec: str, *, class_names: Sequence[str] | None = None,
                   dataset: Sequence[str] = ()) -> list[str] | dict[str, list[str]]:
  """Zero-shot prompts: 'openai' (80), 'simple' (7), a text file with one template per line
  naming the class as '{c}' (CLIP_benchmark's) or '{}' (mmjax.data.prompts.template_problem),
  or a JSON file as CLIP_benchmark's --custom_template_file takes it: a list of templates,
  per-class prompts {class name: [prompt, ...]} (CuPL's), or either of those under a dataset
  key (`dataset`'s names tried in order, then CLIP_benchmark's fallback 'imagenet1k').

  Returns a list of templates, or {class name: prompts} for the `class_names` (all needed)."""
  path = os.path.expanduser(spec)
  if spec in TEMPLATE_SETS:
    return _checked_templates(spec, _data_lines(TEMPLATE_SETS[spec]))
  if not os.path.isfile(path):
    raise ValueError(f"templates={spec!r}: not one of {sorted(TEMPLATE_SETS)} and not a file")
  if path.endswith(".json"):
    return _json_templates(spec, _read_json(spec), class_names, tuple(dataset))
  with open(path, encoding="utf-8") as f:
    return _checked_templates(spec, [line.strip() for line in f if line.strip()])


def _checked_templates(spec: str, out) -> list[str]:
  bad = [(i + 1, t, prompts.template_problem(t)) for i, t in enumerate(out)
         if prompts.template_problem(t)]
  if not out or bad:
    raise ValueError(f"templates={spec!r}: each template names the class as '{{c}}' or '{{}}'; "
                     f"bad lines (line, template, why): {bad[:3] or 'the file is empty'}")
  return list(out)


def _read_json(spec: str):
  try:
    with open(os.path.expanduser(spec), encoding="utf-8") as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"templates={spec!r}: not JSON ({e})") from None


def _json_templates(spec, data, class_names, dataset):
  if isinstance(data, list):
    return _checked_templates(spec, data)
  if not isinstance(data, dict):
    raise ValueError(f"templates={spec!r}: a JSON list of templates or a dict; got "
                     f"{type(data).__name__}")
  if class_names and all(c in data for c in class_names):
    bad = [c for c in class_names if not _prompt_list(data[c])]
    if bad:
      raise ValueError(f"templates={spec!r}: class {bad[0]!r} needs a non-empty list of "
                       f"prompt strings; got {data[bad[0]]!r}"[:300])
    return {c: list(data[c]) for c in class_names}
  for key in (*dataset, "imagenet1k"):
    if key in data:
      return _json_templates(f"{spec}[{key!r}]", data[key], class_names, ())
  missing = [c for c in class_names or () if c not in data]
  raise ValueError(f"templates={spec!r}: neither a list of templates nor prompts for every "
                   f"class (missing {missing[:3]}) nor an entry for the dataset (keys tried: "
                   f"{[*dataset, 'imagenet1k']})")


def _prompt_list(x) -> bool:
  return isinstance(x, list) and bool(x) and all(isinstance(t, str) and t for t in x)


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
  """CLIP_benchmark's webdataset layout as its build_wds_dataset reads it: <dir>/<split>/
  {0..N-1}.tar with N in <dir>/<split>/nshards.txt (else the folder's *.tar), and in <dir>
  dataset_type.txt ('classification', the default, or 'retrieval'), classnames.txt and
  zeroshot_classification_templates.txt; or a shard spec, its metadata beside the shards."""
  path = os.path.expanduser(rest)
  paths = (_split_shards(path, split) if os.path.isdir(path)
           else wds.expand_shards(path, field="--dataset"))   # its own line: spec and field
  try:
    source = wds_pipeline.DecodedShards(wds.ShardIndex(paths))
  except ValueError as e:
    raise ValueError(f"--dataset={spec!r}: {e}") from None
  beside = lambda name: (os.path.join(path, name) if os.path.isdir(path)
                         and os.path.isfile(os.path.join(path, name))
                         else wds_pipeline.find_beside(paths, name))
  kind = _dataset_type(beside("dataset_type.txt"), source)
  if kind == "retrieval":
    empty = [i for i, t in _every(source, "text", "txt", "a caption").items() if not captions(t)]
    if empty:
      raise ValueError(f"{source.where(empty[0])}: its .txt holds no caption, and a "
                       f"retrieval sample needs one ({len(empty)} samples have none)")
    return EvalSet(f"wds:{rest}", source, None, label_key=None, text_key="text")
  names = beside("classnames.txt")
  if not names:
    raise ValueError(f"dataset={spec!r}: a classification set (dataset_type.txt says so, or "
                     "its samples have .cls labels) needs classnames.txt beside the shards or "
                     "in their parent folder, one class name per line in label order")
  class_names = wds_pipeline.read_class_names(names)
  top = max(_every(source, "label", "cls", "a class label").values())
  if top >= len(class_names):
    raise ValueError(f"{names}: {len(class_names)} class names, but the shards have label "
                     f"{top} (labels index the names: 0..{len(class_names) - 1})")
  temps = beside("zeroshot_classification_templates.txt")
  # The names as written (CLIP_benchmark's files hold readable names: no '_' replaced).
  return EvalSet(f"wds:{rest}", source, class_names,
                 templates=load_templates(temps) if temps else None)


def dataset_keys(name: str) -> tuple[str, ...]:
  """The names a dataset goes by in CLIP_benchmark's template files, most specific first:
  'wds:/data/wds_cifar10' -> ('wds/cifar10', 'cifar10', 'wds_cifar10')."""
  kind, _, rest = name.partition(":")
  base = os.path.basename(os.path.normpath(rest)) if kind in ("wds", "folder") else rest
  short = base[4:] if base.startswith("wds_") else base
  return tuple(dict.fromkeys((f"{kind}/{short}", short, base)))


def _split_shards(folder: str, split: str) -> list[str]:
  """<folder>/<split>/{0..N-1}.tar (N from its nshards.txt), else its *.tar in order."""
  where = os.path.join(folder, split)
  count = os.path.join(where, "nshards.txt")
  if not os.path.isfile(count):
    return wds.expand_shards(os.path.join(where, "*.tar"), field="--dataset")
  with open(count, encoding="utf-8") as f:
    text = f.read().strip()
  if not text.isdigit() or int(text) < 1:
    raise ValueError(f"{count}: must hold a positive shard count; got {text[:40]!r}")
  paths = [os.path.join(where, f"{i}.tar") for i in range(int(text))]
  missing = [p for p in paths if not os.path.isfile(p)]
  if missing:
    raise ValueError(f"{count} says {text} shards, but {len(missing)} are missing, e.g. "
                     f"{missing[0]}")
  return paths


def _dataset_type(path: str | None, source) -> str:
  """'classification' or 'retrieval': dataset_type.txt's word, else what the samples carry
  (a .cls label: classification; only a .txt caption: retrieval)."""
  if path is None:
    keys = source.keys(0)
    if "label" in keys or "text" not in keys:
      return "classification"
    return "retrieval"
  with open(path, encoding="utf-8") as f:
    kind = f.read().strip().lower()
  if kind not in ("classification", "retrieval"):
    raise ValueError(f"{path}: {kind[:40]!r} is not a dataset type mmjax evaluates "
                     "('classification' or 'retrieval'; multi-label sets are not supported)")
  return kind


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


def captions(text: str) -> list[str]:
  """A sample's captions: its text's non-empty lines, stripped (CLIP_benchmark splits a
  retrieval set's .txt into lines: COCO's and Flickr30k's five captions per image)."""
  return [line.strip() for line in text.splitlines() if line.strip()]


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
    if self.text_key:   # CLIP_benchmark's retrieval sets: one caption per line
      t = ex[self.text_key]
      out["text"] = captions(t.decode() if isinstance(t, bytes) else str(t))
    return out


def eval_batches(ds: EvalSet, prep: ImagePrep, batch_size: int, *, limit: int | None = None,
                 num_threads: int = 4) -> Iterator[dict]:
  """The dataset once, in order, in batches of exactly batch_size (the last one padded by
  repeating its first example, `valid` False there): 'image' float32 [b, S, S, 3],
  'label' int32 [b] (classification), 'text' (retrieval) b lists of captions (mmjax.data.
  eval_data.captions: a sample's lines), 'valid' bool [b].
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
  images = [e["image"] for e in full]
  if isinstance(images[0], dict):   # a NaFlex tower's input (mmjax.data.naflex.NaflexPrep)
    image = {k: np.stack([im[k] for im in images]) for k in images[0]}
  else:
    image = np.stack(images)
  out = {"image": image,
         "valid": np.arange(size) < len(examples)}
  if "label" in examples[0]:
    out["label"] = np.array([e["label"] for e in full], np.int32)
  if "text" in examples[0]:
    out["text"] = [e["text"] for e in full]
  return out
