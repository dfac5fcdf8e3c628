"""The digits written as webdataset shards, through the writer users have
(`mmjax.data.wds.write_shards`: an image folder plus a captions file)."""

import csv
import io
import os
import tarfile

from PIL import Image


def write_tar(path, samples) -> str:
  """A tar of samples [(key, {ext: bytes})], members in that order (webdataset's layout)."""
  with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as t:
    for key, members in samples:
      for ext, data in members.items():
        info = tarfile.TarInfo(f"{key}.{ext}")
        info.size = len(data)
        t.addfile(info, io.BytesIO(data))
  return str(path)


def write_digits_shards(data_dir: str, out: str, shard_size: int = 250) -> dict:
  """out/folder: every digits image as PNG and captions.csv (image, caption, split, label);
  out/shards/{train,test}/NNNNN.tar, and out/shards/classnames.txt. Returns {split: paths}."""
  from mmjax.data import pipeline, wds
  ds = pipeline.Dataset("mmjax_digits", data_dir=data_dir)
  folder = os.path.join(out, "folder")
  os.makedirs(folder, exist_ok=True)
  rows = []
  for split in ("train", "test"):
    src = ds.source(split)
    for i in range(len(src)):
      ex = src[i]
      name = f"{split}_{i:05d}.png"
      Image.fromarray(ex["image"]).save(os.path.join(folder, name))
      text = ex["text"].decode() if isinstance(ex["text"], bytes) else str(ex["text"])
      rows.append({"image": name, "caption": text, "split": split, "label": int(ex["label"])})
  captions = os.path.join(folder, "captions.csv")
  with open(captions, "w", newline="") as f:
    w = csv.DictWriter(f, ["image", "caption", "split", "label"])
    w.writeheader()
    w.writerows(rows)
  shards = wds.write_shards(captions, os.path.join(out, "shards"), shard_size=shard_size)
  with open(os.path.join(out, "shards", "classnames.txt"), "w") as f:
    f.write("\n".join(ds.class_names("label")) + "\n")
  return shards


def wds_overrides(shards: dict) -> dict:
  """tiny_config overrides that train on the shards and evaluate on their test split."""
  return {"data.name": "wds", "data.shards": shards["train"][0].rsplit("/", 1)[0] + "/*.tar",
          "data.eval_shards": shards["test"][0].rsplit("/", 1)[0] + "/*.tar"}


def corrupt_shards(paths: list[str], *, every: int = 2) -> dict:
  """Damages shards in place, as real data is damaged: in every `every`-th shard the first
  sample's image is cut to a third (a truncated PNG) and the second sample loses its caption;
  the last shard is cut in half; a file that is not a tar joins the shard folder. Returns
  {kind: number of damaged samples or shards}."""
  damaged = {"image": 0, "caption": 0, "tar": 2}
  for n, path in enumerate(paths[:-1]):
    if n % every:
      continue
    with tarfile.open(path) as t:
      members = [(m, t.extractfile(m).read()) for m in t.getmembers()]
    keys = sorted({m.name.split(".")[0] for m, _ in members})
    samples = {}
    for m, data in members:
      key, ext = m.name.split(".", 1)
      if key == keys[0] and ext == "png":
        data = data[:len(data) // 3]
      if key == keys[1] and ext == "txt":
        continue
      samples.setdefault(key, {})[ext] = data
    damaged["image"] += 1
    damaged["caption"] += 1
    write_tar(path, list(samples.items()))
  with open(paths[-1], "rb") as f:
    data = f.read()
  with open(paths[-1], "wb") as f:
    f.write(data[:len(data) // 2])
  with open(os.path.join(os.path.dirname(paths[0]), "zz_not_a_tar.tar"), "wb") as f:
    f.write(b"this is not a tar file" * 100)
  return damaged
