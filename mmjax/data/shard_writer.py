"""Writing webdataset shards with webdataset's own TarWriter (the digit scenes', the spoken
digits'): one split's samples cut into numbered tars, CLIP_benchmark's layout."""

from __future__ import annotations

import os
from typing import Iterable


def tar_split(directory: str, samples: Iterable[dict], *, shard_size: int) -> list[str]:
  """samples (webdataset dicts, each with its '__key__') written by webdataset's TarWriter as
  directory/0.tar, 1.tar, ... of shard_size samples each (mtime 0: the same samples give the
  same bytes), and directory/nshards.txt (CLIP_benchmark's count); returns the shard paths."""
  try:
    import webdataset   # imports torch (~1 s) and is a test extra: only the writers need it
  except ImportError:
    raise ImportError("writing webdataset shards needs webdataset: pip install webdataset") from None
  if shard_size < 1:
    raise ValueError(f"shard_size={shard_size} must be >= 1")
  os.makedirs(directory, exist_ok=True)
  paths, writer = [], None
  for i, sample in enumerate(samples):
    if i % shard_size == 0:
      if writer is not None:
        writer.close()
      paths.append(os.path.join(directory, f"{len(paths)}.tar"))
      writer = webdataset.TarWriter(paths[-1], mtime=0)
    writer.write(sample)
  if writer is not None:
    writer.close()
  with open(os.path.join(directory, "nshards.txt"), "w") as f:
    f.write(f"{len(paths)}\n")
  return paths
