"""webdataset shards: the writer from a captions file, read back by the webdataset library
itself; the shard specs (brace ranges, globs, list files); errors."""

import csv
import io
import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from mmjax.data import wds
from tests.wds_digits import write_tar


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
      meta = json.loads(s["json"])
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


def _tree(root):
  """{relative path: bytes} of every file under root (None for a folder)."""
  out = {}
  for dirpath, dirs, files in os.walk(root):
    out.update({os.path.relpath(os.path.join(dirpath, d), root): None for d in dirs})
    for f in files:
      with open(os.path.join(dirpath, f), "rb") as fh:
        out[os.path.relpath(fh.name, root)] = fh.read()
  return out


def test_writer_refuses_split_names_that_are_not_plain_folder_names(rng, tmp_path):
  """A split is a folder under out_dir: '..', '../x', an absolute path, 'a/b', '.', '' (beside
  rows with a split), surrounding spaces or a non-string raise one ValueError naming the split,
  the row and the file; overwrite=True then deletes nothing, inside out_dir or beside it. A bad
  label with overwrite=True deletes nothing either (rows are checked before any rmtree)."""
  root = tmp_path / "root"
  out = root / "out"
  captions, rows = captions_folder(tmp_path / "pics", rng, n=5)
  wds.write_shards(str(captions), str(out), shard_size=2)
  (root / "keep.txt").write_text("a sibling of out_dir")
  (root / "x").mkdir()
  (root / "x" / "keep.txt").write_text("in a sibling folder")
  (root / "abs").mkdir()
  (root / "abs" / "keep.txt").write_text("named by an absolute split")
  before = _tree(root)
  bad = ["..", "../x", str(root / "abs"), "a/b", ".", "", " train", "train\n", 3]
  for split in bad:
    edited = [{**r, "split": split} if i == 2 else r for i, r in enumerate(rows)]
    f = tmp_path / "pics" / "bad.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in edited))
    want = rf"bad.jsonl: row 3: split {re.escape(repr(split))} is not a plain"
    with pytest.raises(ValueError, match=want):
      wds.write_shards(str(f), str(out), shard_size=2, overwrite=True)
    assert _tree(root) == before, split
  edited = [{**r, "label": "cat"} if i == 3 else r for i, r in enumerate(rows)]
  f = tmp_path / "pics" / "label.jsonl"
  f.write_text("".join(json.dumps(r) + "\n" for r in edited))
  with pytest.raises(ValueError, match=r"label.jsonl: row 4: label 'cat' is not a class index"):
    wds.write_shards(str(f), str(out), shard_size=2, overwrite=True)
  assert _tree(root) == before
  assert sorted(os.listdir(out)) == ["test", "train"]


def test_writer_refuses_images_the_reader_skips(rng, tmp_path):
  """A .bmp or .gif image (or one without an extension) would become a `KEY.bmp` member that
  config.data.image_ext's default skips: one ValueError naming the row, the image and the
  extensions read; nothing is written. The writer's extensions are all read by default."""
  captions, rows = captions_folder(tmp_path / "pics", rng, n=4)
  for ext in ("bmp", "gif", ""):
    name = f"odd.{ext}" if ext else "odd"
    Image.fromarray(rng.integers(0, 256, size=(9, 7, 3), dtype=np.uint8)).save(
        tmp_path / "pics" / name, format=ext or "png")
    f = tmp_path / "pics" / f"odd_{ext}.csv"
    with open(f, "w", newline="") as fh:
      w = csv.DictWriter(fh, ["image", "caption", "split"])
      w.writeheader()
      w.writerows([{**r, "image": name} if i == 1 else r for i, r in enumerate(rows)])
    with pytest.raises(ValueError, match=rf"odd_{ext}.csv: row 2: image '{name}' .*"
                       r"jpg, png, webp"):
      wds.write_shards(str(f), str(tmp_path / "s"))
    assert not (tmp_path / "s").exists()
  from mmjax.data import wds_pipeline
  from mmjax.train import config
  exts = wds_pipeline._exts(config.defaults().data.image_ext, "image_ext")
  assert set(wds.IMAGE_EXTS) <= set(exts)


# --- reading ------------------------------------------------------------------------------

def _jpeg(rng, h, w):
  """A smooth (photo-like) JPEG: a random gradient, so draft decoding is well defined."""
  y, x = np.mgrid[0:h, 0:w] / max(h, w)
  a = rng.uniform(0, 255, size=(3, 3))
  img = np.stack([a[c, 0] * x + a[c, 1] * y + a[c, 2] * x * y for c in range(3)], -1)
  buf = io.BytesIO()
  Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=95)
  return buf.getvalue()


def test_read_shard_resumes_at_every_sample_and_reports_damage(rng, tmp_path):
  """read_shard's resume offsets continue exactly after each sample; a truncated shard gives
  its intact samples then one 'tar' marker (never an exception), at every cut point; so do a
  file that is not a tar, a corrupt header and a missing file."""
  samples = [(f"k{i:03d}", {"jpg": rng.bytes(int(rng.integers(100, 900))),
                            "txt": f"caption {i}".encode()}) for i in range(6)]
  path = write_tar(tmp_path / "a.tar", samples)
  got = list(wds.read_shard(path))
  assert [s["__key__"] for s, _ in got] == [k for k, _ in samples]
  assert all(s["jpg"] == m["jpg"] and s["txt"] == m["txt"] for (s, _), (_, m) in zip(got, samples))
  assert got[-1][1] is None
  for i, (_, resume_at) in enumerate(got[:-1]):
    assert [s["__key__"] for s, _ in wds.read_shard(path, resume_at)] == [
        k for k, _ in samples[i + 1:]]
  data = open(path, "rb").read()
  nxt = [off for _, off in got[:-1]]     # where the sample after each one starts
  import tarfile
  with tarfile.open(path) as t:
    t.getmembers()
    marker = t.offset                    # the end-of-archive blocks (zero padding follows)
  for cut in sorted(set(int(c) for c in rng.integers(1, marker + 1024, size=12))):
    (tmp_path / "cut.tar").write_bytes(data[:cut])
    out = list(wds.read_shard(str(tmp_path / "cut.tar")))
    keys = [s["__key__"] for s, _ in out[:-1]]
    assert out[-1][0]["__skip__"] == "tar" and out[-1][1] is None, (cut, out[-1])
    # An intact prefix: no sample the cut reaches, every one whose successor's header is whole.
    assert keys == [k for k, _ in samples[:len(keys)]]
    assert all(nxt[i] <= cut for i in range(len(keys))), (cut, keys)
    assert len(keys) >= sum(n + 512 <= cut for n in nxt), (cut, keys)
  bad = bytearray(data)
  bad[got[2][1]:got[2][1] + 64] = rng.bytes(64)     # the header of sample 3
  (tmp_path / "bad.tar").write_bytes(bytes(bad))
  out = list(wds.read_shard(str(tmp_path / "bad.tar")))
  assert [s.get("__key__") for s, _ in out[:-1]] == ["k000", "k001"]
  assert "corrupt header" in out[-1][0]["__where__"]
  (tmp_path / "noise.tar").write_bytes(rng.bytes(3000))
  for name in ("noise.tar", "missing.tar"):
    (marker, resume_at), = wds.read_shard(str(tmp_path / name))
    assert marker["__skip__"] == "tar" and name in marker["__where__"] and resume_at is None


def test_shard_order_reads_every_shard_once_per_epoch_over_the_streams():
  """ShardOrder[k::K] (stream k): together the streams read each shard once per epoch, each
  epoch in its own seeded order; an uneven split is said, and K must divide by the processes."""
  from mmjax.data import wds_pipeline as wp
  paths = [f"s{i}.tar" for i in range(7)]
  order = wp.ShardOrder(paths, seed=5)
  streams = [order[k::3] for k in range(3)]
  items = sorted((x.item, x.path) for s in streams for x in (s[j] for j in range(10)))
  seen = {}
  for item, path in items:
    seen.setdefault(item // 7, []).append(path)
  assert all(sorted(seen[e]) == sorted(paths) for e in range(4)), seen
  assert seen[0] != seen[1]                      # reshuffled per epoch
  assert [order[j].path for j in range(7)] == [wp.ShardOrder(paths, 5)[j].path for j in range(7)]
  assert [order[j].path for j in range(7)] != [wp.ShardOrder(paths, 6)[j].path for j in range(7)]
  k, note = wp.stream_layout(7, 0, 2)
  assert k == 2 and "7 shards over 2 streams: each epoch 1 of them read 4 shards" in note
  assert wp.stream_layout(8, 4, 2) == (4, None)
  with pytest.raises(ValueError, match="config.data.streams=3 is not a multiple of the 2"):
    wp.stream_layout(8, 3, 2)


def _data(**kw):
  from mmjax.train.config import defaults
  d = defaults().data
  d.update(dict(image_size=24, text_len=6, shuffle_buffer=16, shard_cycle=2, streams=2), **kw)
  return d


class _RowTokenizer:
  """Encodes 'caption N' as [N, N, ...]: a batch's text says which samples it holds."""

  def encode(self, texts, max_len):
    return np.array([[int(t.split()[-1])] * max_len for t in texts], np.int32)


def _shards(rng, tmp_path, n_shards=5, per=9, broken=()):
  """n_shards shards of `per` photo-like JPEG samples 'caption N' (N = global row)."""
  paths = []
  for s in range(n_shards):
    samples = []
    for j in range(per):
      row = s * per + j
      members = {"jpg": _jpeg(rng, *rng.integers(30, 80, size=2)), "txt": f"caption {row}".encode()}
      if ("image", row) in broken:
        members["jpg"] = members["jpg"][:len(members["jpg"]) // 3]     # truncated JPEG
      if ("caption", row) in broken:
        del members["txt"]
      samples.append((f"{row:06d}", members))
    paths.append(write_tar(tmp_path / f"{s:05d}.tar", samples))
  return paths


def _batches(paths, data, n, *, batch=8, process_count=1, state=None, seed=3):
  """n global batches (the processes' local batches stacked in process order), the final
  states and the iterators' metrics."""
  from mmjax.data import wds_pipeline as wp
  its = [wp.make_train_iterator(paths, data, tokenizer=_RowTokenizer(), global_batch_size=batch,
                                seed=seed, process_index=p, process_count=process_count)
         for p in range(process_count)]
  try:
    if state is not None:
      for it, st in zip(its, state):
        it.set_state(st)
    out = []
    for _ in range(n):
      local = [next(it) for it in its]
      out.append({k: np.concatenate([b[k] for b in local]) for k in local[0]})
    return out, [__import__("json").loads(__import__("json").dumps(it.get_state()))
                 for it in its], [it.metrics() for it in its]
  finally:
    for it in its:
      it.close()


def test_global_batches_do_not_depend_on_processes_and_resume_exactly(rng, tmp_path):
  """streams=2 (and 4): one process and two processes give the same global batches (images
  and captions); a JSON round trip of the state after 5 batches resumes with the uninterrupted
  batches, past an epoch boundary (45 samples, 12 batches of 8); images are uint8 at the
  configured size; one epoch holds every sample once."""
  paths = _shards(rng, tmp_path)
  data = _data()
  one, _, _ = _batches(paths, data, 12)
  two, _, _ = _batches(paths, data, 12, process_count=2)
  four, _, _ = _batches(paths, _data(streams=4), 3)
  for a, b in zip(four, _batches(paths, _data(streams=4), 3, process_count=2)[0]):
    np.testing.assert_array_equal(a["text"], b["text"])
  assert one[0]["image"].shape == (8, 24, 24, 3) and one[0]["image"].dtype == np.uint8
  for a, b in zip(one, two):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["text"], b["text"])
  # One stream reading one shard at a time, windows of one shard: the first 45 samples are one
  # epoch, each sample once, shuffled.
  epoch, _, _ = _batches(paths, _data(streams=1, shard_cycle=1, shuffle_buffer=9), 6, batch=9)
  rows = np.concatenate([b["text"][:, 0] for b in epoch])
  assert sorted(rows[:45].tolist()) == list(range(45)) and list(rows[:45]) != sorted(rows[:45])
  _, state, _ = _batches(paths, data, 5)    # inside the second shuffle window
  rest, _, _ = _batches(paths, data, 7, state=state)
  for a, b in zip(one[5:], rest):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["text"], b["text"])
  with pytest.raises(ValueError, match=r"config.data.streams: the checkpoint's data position was "
                     r"read with streams 2, this run has 4"):
    _batches(paths, _data(streams=4), 1, state=state)
  other, _, _ = _batches(paths, data, 2, seed=4)
  assert not np.array_equal(other[0]["text"], one[0]["text"])   # the seed matters


def test_bad_samples_are_skipped_and_counted_per_kind(rng, tmp_path, capsys):
  """Truncated JPEGs, missing captions, a truncated shard and a file that is not a tar: the
  batches hold only good samples, and the counts equal those of a reference walk of the same
  shard sequence (one stream, no shuffle, one shard at a time); each kind is warned once."""
  from mmjax.data import wds_pipeline as wp
  broken = {("image", 1), ("image", 12), ("caption", 3), ("caption", 20), ("image", 30)}
  paths = _shards(rng, tmp_path, n_shards=4, per=9, broken=broken)
  data = open(paths[2], "rb").read()
  open(paths[2], "wb").write(data[:len(data) // 2])     # shard 2 ends half way
  paths.append(str(tmp_path / "zz.tar"))
  (tmp_path / "zz.tar").write_bytes(rng.bytes(2000))    # not a tar
  cfg = _data(streams=1, shuffle_buffer=1, shard_cycle=1, max_skip_fraction=0.9)
  got, _, metrics = _batches(paths, cfg, 6)
  rows = np.concatenate([b["text"][:, 0] for b in got])
  # Reference: the shard sequence in order, each sample classified by how it was broken.
  seq, counts = [], dict.fromkeys(wp.KINDS, 0)
  order = wp.ShardOrder(paths, seed=3)
  for item in range(100):
    for sample, _ in wds.read_shard(order[item].path):
      if "__skip__" in sample:
        seq.append(("tar", None))
        continue
      row = int(sample["__key__"])
      kind = next((k for k, r in broken if r == row), None)
      seq.append((kind, None) if kind else (None, row))
    if sum(r is not None for _, r in seq) >= len(rows):
      break
  n_good = 0
  for kind, row in seq:
    if n_good == len(rows):
      break
    if kind:
      counts[kind] += 1
    else:
      assert row == rows[n_good]
      n_good += 1
  assert metrics[0] == {"data/epoch": pytest.approx(metrics[0]["data/epoch"]),
                        **{f"data/skipped_{k}": counts[k] for k in wp.KINDS}}
  assert counts["image"] > 0 and counts["caption"] > 0 and counts["tar"] > 0, counts
  out = capsys.readouterr().out
  for kind in wp.KINDS:
    assert out.count(f"skipped a bad {kind}:") == 1, out


def test_mostly_broken_data_stops_with_one_line_naming_the_field(rng, tmp_path):
  """More bad than max_skip_fraction allows: DataError naming config.data.max_skip_fraction,
  the share and the first bad sample of each kind."""
  from mmjax.data import wds_pipeline as wp
  broken = {("caption", r) for r in range(36) if r % 3}
  paths = _shards(rng, tmp_path, n_shards=4, per=9, broken=broken)
  with pytest.raises(wp.DataError, match=r"config.data.max_skip_fraction=0.5: \d+ of the \d+ "
                     r"samples and shards read were bad \(\d+%\): image 0, caption \d+ \(first: "
                     r".*\.tar:0000\d\d.txt: missing\)"):
    _batches(paths, _data(max_skip_fraction=0.5), 3)
  _batches(paths, _data(max_skip_fraction=0.7), 3)   # under the limit: trains on


def test_draft_decode_crops_the_same_region_as_a_full_decode(rng):
  """random_resized_crop with JPEG draft mode (decoded at 1/2..1/8 scale) gives nearly the
  image a full-size decode gives for the same crop, and does decode smaller."""
  from mmjax.data import wds_pipeline as wp
  data = _jpeg(rng, 600, 800)
  sizes = []
  real_convert = Image.Image.convert

  def spy(self, *a, **k):
    sizes.append(self.size)
    return real_convert(self, *a, **k)
  seed = int(rng.integers(2 ** 31))
  for draft in (True, False):
    with Image.open(io.BytesIO(data)) as im:
      try:
        Image.Image.convert = spy
        out = wp.random_resized_crop(im, 64, np.random.default_rng(seed), draft=draft)
      finally:
        Image.Image.convert = real_convert
    if draft:
      small = out
  assert sizes[0][0] < 800 and sizes[1] == (800, 600), sizes
  diff = np.abs(small.astype(np.float64) - out.astype(np.float64))
  assert diff.mean() < 2.0 and diff.max() < 24, (diff.mean(), diff.max())


def test_uint8_images_normalise_on_the_device_as_on_the_host(rng):
  """images_to_float (in the jit step) equals the host pipeline's float conversion, for [-1, 1]
  and for a checkpoint's mean/std."""
  import jax
  from mmjax.data import pipeline
  from mmjax.train.state import images_to_float
  x = rng.integers(0, 256, size=(3, 5, 5, 3), dtype=np.uint8)
  norm = ((0.48, 0.45, 0.40), (0.26, 0.26, 0.27))
  for normalize in (None, norm):
    got = jax.jit(lambda b: images_to_float(b, normalize))({"image": x, "text": np.zeros(3)})
    np.testing.assert_allclose(np.asarray(got["image"]), pipeline._to_float(x, normalize),
                               rtol=1e-6, atol=1e-6)
