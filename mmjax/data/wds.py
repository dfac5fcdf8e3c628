"""webdataset shards: the list a shard spec names, and a writer from your image folder.

A shard is a plain tar file whose members are `KEY.EXT`, the members of one sample sharing
its KEY (img2dataset's layout: `KEY.jpg`, `KEY.txt`, `KEY.json`):

  paths = expand_shards("/data/cc3m/{00000..00331}.tar")      # or a glob, or a list file
  shards = write_shards("my_pics/captions.csv", "~/shards/my_pics", shard_size=1000)
  shards["train"]   # ['~/shards/my_pics/train/00000.tar', ...]

Reading them into training is not wired up yet (issue 16).
"""

from __future__ import annotations

import glob
import io
import json
import os
import shutil
import tarfile

from mmjax.data import image_folder

_GLOB = set("*?[")


def expand_shards(spec: str, *, field: str = "shards") -> list[str]:
  """Shard paths, in order, from brace ranges ('{00000..00012}.tar', '{a,b}.tar'), globs
  ('/data/*.tar', sorted) or a text file listing one path per line (relative paths are
  relative to the file; '#' starts a comment). ValueError naming `field` when the spec names
  no shard or a named shard does not exist."""
  from braceexpand import braceexpand
  spec = os.path.expanduser(str(spec))
  if os.path.isfile(spec) and not spec.endswith(".tar"):
    base = os.path.dirname(os.path.abspath(spec))
    with open(spec, encoding="utf-8") as f:
      lines = [line.split("#", 1)[0].strip() for line in f]
    patterns = [p if os.path.isabs(p) else os.path.join(base, p) for p in lines if p]
  else:
    patterns = list(braceexpand(spec))
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


def _ext(path: str) -> str:
  ext = os.path.splitext(path)[1].lower().lstrip(".")
  return {"jpeg": "jpg", "tiff": "tif"}.get(ext, ext) or "img"


def write_shards(captions_file: str, out_dir: str, *, shard_size: int = 1000,
                 test_fraction: float = 0.1, seed: int = 0,
                 overwrite: bool = False) -> dict[str, list[str]]:
  """Writes the rows of a captions file (the input of
  `image_folder.build_image_text_folder`: CSV or JSONL, image paths relative to it) as
  webdataset shards, one folder per split: `out_dir/<split>/00000.tar`, ... with
  `shard_size` samples each; returns {split: [shard paths]}.

  Each sample: `KEY.<ext>` (the image file's bytes, not re-encoded), `KEY.txt` (the caption),
  `KEY.json` ({'image', 'caption', 'row'}); KEY is the row number, 9 digits. Every row and image
  is checked first (a ValueError names the row) and nothing is written until all pass; an
  existing out_dir/<split> raises unless overwrite=True. The shards are byte-for-byte the same
  for the same inputs.
  """
  if not isinstance(shard_size, int) or shard_size <= 0:
    raise ValueError(f"shard_size={shard_size!r} must be a positive int")
  captions_file = os.path.expanduser(captions_file)
  rows, _, images = image_folder.read_checked(captions_file, test_fraction=test_fraction,
                                              seed=seed)
  out_dir = os.path.expanduser(out_dir)
  splits = sorted({r["split"] for r in rows})
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
          meta = {"image": row["image"], "caption": row["caption"], "row": i}
          _member(tar, f"{key}.json", json.dumps(meta, ensure_ascii=False).encode("utf-8"))
      os.replace(tmp, path)
      out[split].append(path)
  return out
