"""webdataset shards: the writer from a captions file, read back by the webdataset library
itself; the shard specs (brace ranges, globs, list files); errors."""

import csv
import io

import numpy as np
import pytest
from PIL import Image

from mmjax.data import wds


def captions_folder(root, rng, n=11, broken=None):
  """n images (PNG and JPEG, random sizes) and a captions.csv with a split column."""
  root.mkdir(parents=True, exist_ok=True)
  rows = []
  for i in range(n):
    name = f"img_{i}.{'png' if i % 3 else 'jpeg'}"
    h, w = rng.integers(8, 40, size=2)
    Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).save(root / name)
    rows.append({"image": name, "caption": f"picture {i}, née ünïcode" if i == 4 else
                 f"picture {i}", "split": "test" if i in (2, 7) else "train"})
  if broken is not None:
    (root / rows[broken]["image"]).write_bytes(b"not an image")
  with open(root / "captions.csv", "w", newline="") as f:
    w = csv.DictWriter(f, ["image", "caption", "split"])
    w.writeheader()
    w.writerows(rows)
  return root / "captions.csv", rows


def test_shards_read_back_with_webdataset(rng, tmp_path):
  """Every sample in its split's shards, in row order, shard_size per shard: the image file's
  bytes, the caption and the json, as the webdataset library reads them."""
  from tests.open_clip_peer import _patch_torchvision
  _patch_torchvision()   # webdataset imports torch where it is installed
  webdataset = pytest.importorskip("webdataset")
  captions, rows = captions_folder(tmp_path / "pics", rng)
  shards = wds.write_shards(str(captions), str(tmp_path / "shards"), shard_size=4)
  assert [len(shards["train"]), len(shards["test"])] == [3, 1]   # 9 train rows, 2 test rows
  for split, want_rows in (("train", [i for i in range(11) if i not in (2, 7)]),
                           ("test", [2, 7])):
    got = list(webdataset.WebDataset(shards[split], shardshuffle=False, empty_check=False))
    assert [int(s["__key__"]) for s in got] == want_rows
    for s, i in zip(got, want_rows):
      ext = "png" if i % 3 else "jpg"
      assert s[ext] == (tmp_path / "pics" / rows[i]["image"]).read_bytes()
      assert s["txt"].decode() == rows[i]["caption"]
      meta = __import__("json").loads(s["json"])
      assert meta == {"image": rows[i]["image"], "caption": rows[i]["caption"], "row": i}
      assert Image.open(io.BytesIO(s[ext])).size[0] > 0
  # The same inputs write the same bytes.
  again = wds.write_shards(str(captions), str(tmp_path / "again"), shard_size=4)
  for a, b in zip(shards["train"] + shards["test"], again["train"] + again["test"]):
    assert open(a, "rb").read() == open(b, "rb").read()


def test_shard_specs(rng, tmp_path):
  captions, _ = captions_folder(tmp_path / "pics", rng)
  train = wds.write_shards(str(captions), str(tmp_path / "s"), shard_size=3)["train"]
  assert len(train) == 3
  d = tmp_path / "s" / "train"
  assert wds.expand_shards(str(d / "{00000..00002}.tar")) == train
  assert wds.expand_shards(str(d / "*.tar")) == train
  assert wds.expand_shards(str(d / "{00002,00000}.tar")) == [train[2], train[0]]
  listing = tmp_path / "s" / "train.txt"
  listing.write_text("# the training shards\ntrain/00001.tar\n\n" + train[0] + "  # absolute\n")
  assert wds.expand_shards(str(listing)) == [train[1], train[0]]
  with pytest.raises(ValueError, match=r"shards=.*1 of 4 shards do not exist, e.g. .*00003.tar"):
    wds.expand_shards(str(d / "{00000..00003}.tar"))
  with pytest.raises(ValueError, match=r"config.data.shards=.*matches no file"):
    wds.expand_shards(str(tmp_path / "none" / "*.tar"), field="config.data.shards")


def test_writer_errors_name_the_row_and_write_nothing(rng, tmp_path):
  captions, _ = captions_folder(tmp_path / "pics", rng, broken=5)
  with pytest.raises(ValueError, match=r"captions.csv: row 6: cannot read image 'img_5.png'"):
    wds.write_shards(str(captions), str(tmp_path / "s"))
  assert not (tmp_path / "s").exists()
  good, _ = captions_folder(tmp_path / "good", rng)
  wds.write_shards(str(good), str(tmp_path / "t"))
  with pytest.raises(ValueError, match=r"t/test exists; pass overwrite=True"):
    wds.write_shards(str(good), str(tmp_path / "t"))
  assert wds.write_shards(str(good), str(tmp_path / "t"), overwrite=True)["train"]
  with pytest.raises(ValueError, match="shard_size=0 must be a positive int"):
    wds.write_shards(str(good), str(tmp_path / "u"), shard_size=0)
