"""webdataset shards: the list a shard spec names, and a writer from your image folder.

A shard is a plain tar file whose members are `KEY.EXT`, the members of one sample sharing
its KEY (img2dataset's layout: `KEY.jpg`, `KEY.txt`, `KEY.json`):

  paths = expand_shards("/data/cc3m/{00000..00331}.tar")      # or a glob, or a list file
  shards = write_shards("my_pics/captions.csv", "~/shards/my_pics", shard_size=1000)
  shards["train"]   # ['~/shards/my_pics/train/00000.tar', ...]

  for sample, resume_at in read_shard(paths[0]):   # {'__key__', 'jpg': bytes, 'txt': bytes, ...}
    ...
  index = ShardIndex(paths)          # random access (evaluation sets): len(index), index[i]

Training reads them through grain (mmjax.data.wds_pipeline); a shard that cannot be read, or
ends early, yields one `bad_tar` marker instead of raising, so a broken shard costs its
remaining samples and never the run.
"""

from __future__ import annotations

import glob
import io
import json
import os
import re
import shutil
import tarfile
from typing import Iterator

from braceexpand import UnbalancedBracesError, braceexpand

from mmjax.data import image_folder

_GLOB = set("*?[")


def expand_shards(spec: str, *, field: str = "shards") -> list[str]:
  """Shard paths, in order, from brace ranges ('{00000..00012}.tar', '{a,b}.tar'), globs
  ('/data/*.tar', sorted) or a text file listing one path per line (relative paths are
  relative to the file; '#' starts a comment). ValueError naming `field` when the spec names
  no shard, has unbalanced braces or a named shard does not exist."""
  spec = os.path.expanduser(str(spec))
  if os.path.isfile(spec) and not spec.endswith(".tar"):
    base = os.path.dirname(os.path.abspath(spec))
    with open(spec, encoding="utf-8") as f:
      lines = [line.split("#", 1)[0].strip() for line in f]
    patterns = [p if os.path.isabs(p) else os.path.join(base, p) for p in lines if p]
  else:
    try:
      patterns = list(braceexpand(spec))
    except UnbalancedBracesError:
      raise ValueError(f"{field}={spec!r} has unbalanced braces; a range is "
                       "'{00000..00010}.tar', a list '{a,b}.tar'") from None
  paths = []
  for p in patterns:
    p = os.path.expanduser(p)
    if _GLOB & set(p):
      found = sorted(glob.glob(p))
      if not found:
        raise ValueError(f"{field}={spec!r}: the pattern {p!r} matches no file")
      paths += found
    else:
      paths.append(p)
  if not paths:
    raise ValueError(f"{field}={spec!r} names no shard")
  missing = [p for p in paths if not os.path.isfile(p)]
  if missing:
    raise ValueError(f"{field}={spec!r}: {len(missing)} of {len(paths)} shards do not exist, "
                     f"e.g. {missing[0]!r}")
  return paths


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
  info = tarfile.TarInfo(name)
  info.size, info.mtime, info.mode = len(data), 0, 0o644   # fixed: the same inputs, the same bytes
  tar.addfile(info, io.BytesIO(data))


# The image members write_shards writes: those config.data.image_ext's default reads
# ("jpg;png;webp;jpeg"); another would be written and then skipped by the trainer.
IMAGE_EXTS = ("jpg", "png", "webp")


def _ext(path: str) -> str:
  ext = os.path.splitext(path)[1].lower().lstrip(".")
  return {"jpeg": "jpg", "tiff": "tif"}.get(ext, ext)


def _check_row(captions_file: str, i: int, row: dict) -> None:
  """ValueError naming the row: a label that is not a class index, an image the reader skips."""
  label = str(row.get("label") or "").strip()
  if label and not re.fullmatch(r"\d+", label):
    raise ValueError(f"{captions_file}: row {i}: label {row['label']!r} is not a class index "
                     "(a non-negative integer)")
  ext = os.path.splitext(row["image"])[1]
  if _ext(row["image"]) not in IMAGE_EXTS:
    what = f"is a {ext} file" if ext else "has no extension"
    raise ValueError(f"{captions_file}: row {i}: image {row['image']!r} {what}; the shard reader "
                     f"takes {', '.join(IMAGE_EXTS)} (and jpeg) images; convert it first")


def write_shards(captions_file: str, out_dir: str, *, shard_size: int = 1000,
                 test_fraction: float = 0.1, seed: int = 0,
                 overwrite: bool = False) -> dict[str, list[str]]:
  """Writes the rows of a captions file (the input of
  `image_folder.build_image_text_folder`: CSV or JSONL, image paths relative to it) as
  webdataset shards, one folder per split: `out_dir/<split>/00000.tar`, ... with
  `shard_size` samples each; returns {split: [shard paths]}.

  Each sample: `KEY.<ext>` (the image file's bytes, not re-encoded; .jpg, .jpeg, .png or
  .webp files, the ones the reader takes), `KEY.txt` (the caption),
  `KEY.json` ({'image', 'caption', 'row'}), and `KEY.cls` (the class index as text) for rows with
  a non-blank 'label' column; KEY is the row number, 9 digits. Every row and image
  is checked first (a ValueError names the row: a split must be a plain folder name) and
  nothing is written or deleted until all pass; an
  existing out_dir/<split> raises unless overwrite=True. The shards are byte-for-byte the same
  for the same inputs.
  """
  if not isinstance(shard_size, int) or shard_size <= 0:
    raise ValueError(f"shard_size={shard_size!r} must be a positive int")
  captions_file = os.path.expanduser(captions_file)
  rows, _, images = image_folder.read_checked(captions_file, test_fraction=test_fraction,
                                              seed=seed)
  for i, row in enumerate(rows, 1):
    _check_row(captions_file, i, row)
  out_dir = os.path.expanduser(out_dir)
  splits = sorted({r["split"] for r in rows})   # plain folder names: read_checked checks them
  for split in splits:
    d = os.path.join(out_dir, split)
    if os.path.exists(d):
      if not overwrite:
        raise ValueError(f"{d} exists; pass overwrite=True to replace its shards")
      shutil.rmtree(d)
  out = {}
  for split in splits:
    members = [(i, r, img) for i, (r, img) in enumerate(zip(rows, images)) if r["split"] == split]
    d = os.path.join(out_dir, split)
    os.makedirs(d, exist_ok=True)
    out[split] = []
    for n, lo in enumerate(range(0, len(members), shard_size)):
      path = os.path.join(d, f"{n:05d}.tar")
      tmp = f"{path}.tmp{os.getpid()}"
      with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for i, row, data in members[lo:lo + shard_size]:
          key = f"{i:09d}"
          _member(tar, f"{key}.{_ext(row['image'])}", data)
          _member(tar, f"{key}.txt", row["caption"].encode("utf-8"))
          if str(row.get("label") or "").strip():
            _member(tar, f"{key}.cls", str(row["label"]).strip().encode("utf-8"))
          meta = {"image": row["image"], "caption": row["caption"], "row": i}
          _member(tar, f"{key}.json", json.dumps(meta, ensure_ascii=False).encode("utf-8"))
      os.replace(tmp, path)
      out[split].append(path)
  return out


# Reading. A sample is the run of consecutive members sharing a key: the member name up to the
# first '.' of its base name (webdataset's rule: 'a/b.c.jpg' -> key 'a/b', extension 'c.jpg').
_KEY = re.compile(r"^((?:.*/)?[^./][^/]*?)\.([^/]*)$")
_END = 2 * tarfile.BLOCKSIZE       # a tar ends with two zero blocks


def bad_tar(path: str, why: str) -> dict:
  """The marker a shard yields in place of the samples it could not read."""
  return {"__skip__": "tar", "__where__": f"{path}: {why}"}


def read_shard(path: str, offset: int = 0) -> Iterator[tuple[dict, int | None]]:
  """(sample, resume_at) for each sample of one tar shard from byte `offset` on: sample is
  {'__key__': key, '__shard__': path, ext: bytes, ...} (extensions lower-case);
  `read_shard(path, resume_at)` continues after it (None: nothing is left).

  Never raises for a bad shard: an unreadable file, a file that is not a tar, a corrupt
  header or a truncated end yield one `bad_tar(path, why)` marker (resume_at None) after the
  samples read intact; the sample being read when it happened is dropped.
  """
  try:
    f = open(path, "rb")
  except OSError as e:
    yield bad_tar(path, f"cannot open ({e.strerror or e})"), None
    return
  with f:
    size = os.fstat(f.fileno()).st_size
    try:
      f.seek(offset)
      tar = tarfile.open(fileobj=f, mode="r:")
    except (tarfile.TarError, OSError) as e:
      yield bad_tar(path, f"not a readable tar at byte {offset} ({e})"), None
      return
    group, start = None, offset
    while True:
      try:
        member = tar.next()
        if member is None:
          f.seek(tar.offset)
          tail = f.read(_END)
          if len(tail) < _END or tail.count(0) != _END:
            what = "truncated" if size - tar.offset < _END else "corrupt header"
            raise tarfile.ReadError(f"{what} at byte {tar.offset} of {size}")
          break
        if not member.isfile():
          continue
        m = _KEY.match(member.name)
        if m is None:
          continue                       # no extension, or a hidden file
        key, ext = m.group(1), m.group(2).lower()
        if group is not None and key != group["__key__"]:
          yield group, member.offset
          group = None
        try:
          data = tar.extractfile(member).read()
        except tarfile.ReadError:
          data = b""
        if len(data) != member.size:
          raise tarfile.ReadError(f"{member.name} truncated at byte {size}")
        if group is None:
          group, start = {"__key__": key, "__shard__": path}, member.offset
        group[ext] = data
      except (tarfile.TarError, OSError, EOFError) as e:
        where = f"sample {group['__key__']!r} (byte {start}): " if group else ""
        yield bad_tar(path, f"{where}{e}"), None
        return
    if group is not None:
      yield group, None


class ShardIndex:
  """Random access to the samples of a list of shards: `len`, `[i] -> sample` (read_shard's
  dicts, read from disk on access: memory holds offsets only), `where(i)`. Each shard is read
  once, here. limit: the first `limit` samples only (later shards are not read).

  keep=None (evaluation sets): a shard that cannot be read whole raises ValueError naming it
  (an evaluation on part of a set would report a wrong score). keep=fn: samples with
  fn(sample) False and unreadable shards' remains are left out, counted in `skipped`.
  """

  def __init__(self, paths: list[str], *, limit: int | None = None, keep=None):
    self.paths, self.items, self.skipped = list(paths), [], 0   # items: (shard, offset, key)
    for shard, path in enumerate(self.paths):
      if limit is not None and len(self.items) >= limit:
        break
      before, start = len(self.items), 0
      for sample, resume_at in read_shard(path):
        if "__skip__" in sample and keep is None:
          raise ValueError(f"evaluation shard {sample['__where__']}")
        if "__skip__" in sample or (keep is not None and not keep(sample)):
          self.skipped += 1
        elif limit is None or len(self.items) < limit:
          self.items.append((shard, start, sample["__key__"]))
        start = resume_at
      if len(self.items) == before and keep is None:
        raise ValueError(f"evaluation shard {path} holds no sample")

  def __len__(self) -> int:
    return len(self.items)

  def __getitem__(self, i: int) -> dict:
    shard, start, key = self.items[i]
    sample, _ = next(read_shard(self.paths[shard], start))
    if sample.get("__key__") != key:
      raise ValueError(f"shard {self.paths[shard]} changed since it was indexed: sample "
                       f"{key!r} at byte {start} reads as {sample.get('__where__', sample.get('__key__'))!r}")
    return sample

  def where(self, i: int) -> str:
    shard, _, key = self.items[i]
    return f"{self.paths[shard]}:{key}"
