"""Digit scenes (mmjax.data.scenes): layouts checked against the pixels, captions parsed back and
checked against the boxes, the held-out split's digits, the TFDS dataset read by mmjax's reader
and trained on, and the webdataset shards read by webdataset."""

import json
import re

import numpy as np
import pytest

from mmjax.data import digits, scenes
from tests.configs import tiny_config

NAME = "mmjax_digit_scenes"
RELATIONS = ("left of", "right of", "above", "below")


@pytest.fixture(scope="module")
def dataset(data_dir):
  from mmjax.data import pipeline
  return pipeline.Dataset(NAME, data_dir=data_dir)


@pytest.fixture(scope="module")
def sklearn_digits():
  from sklearn.datasets import load_digits
  d = load_digits()
  train, test = digits.split_indices(d.target)
  return d, set(train.tolist()), set(test.tolist())


def _records(source, n=None):
  """(class_map [H, W], caption, label, regions list) of the first n records."""
  for i in range(len(source) if n is None else n):
    ex = source[i]
    yield (np.asarray(ex["image"]), np.asarray(ex["class_map"]), ex["text"].decode(),
           int(ex["label"]), json.loads(ex["regions"]))


def _pixel_box(box, h, w):
  """Normalised (x0, y0, x1, y1) -> integer pixel edges; they must be whole pixels."""
  px = np.asarray(box) * [w, h, w, h]
  assert np.allclose(px, np.round(px), atol=1e-3), (box, h, w)
  return tuple(int(v) for v in np.round(px))


def test_same_seed_same_scenes_other_seed_others():
  a, b = list(scenes.generate("test", 25)), list(scenes.generate("test", 25))
  c = list(scenes.generate("test", 25, seed=scenes.SEED + 1))
  for x, y in zip(a, b):
    assert x.caption == y.caption and x.regions == y.regions
    assert x.image.tobytes() == y.image.tobytes() and x.class_map.tobytes() == y.class_map.tobytes()
  assert any(x.image.shape != z.image.shape or x.caption != z.caption for x, z in zip(a, c))
  shapes = {x.image.shape[:2] for x in a}
  assert len(shapes) > 10 and all(24 <= h <= 40 and 24 <= w <= 64 for h, w in shapes)
  assert {len(x.regions) for x in a} == {1, 2, 3, 4}


def test_boxes_are_the_tight_boxes_of_each_digits_ink_and_never_overlap(dataset):
  for split, n in (("test", None), ("train", 300)):
    for image, class_map, _, label, regions in _records(dataset.source(split), n):
      h, w = class_map.shape
      assert image.shape == (h, w, 3)
      assert label == regions[0]["label"]
      covered = np.zeros((h, w), bool)
      boxes = [_pixel_box(r["box"], h, w) for r in regions]
      for r, (x0, y0, x1, y1) in zip(regions, boxes):
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
        name = digits.CLASS_NAMES[r["label"]]
        assert r["text"] == f"{'an' if name == 'eight' else 'a'} {name}"
        inside = class_map[y0:y1, x0:x1]
        assert set(np.unique(inside)) <= {0, r["label"] + 1}
        rows, cols = np.nonzero(inside)   # the digit's ink touches all four sides of its box
        assert (rows.min(), cols.min(), rows.max(), cols.max()) == (0, 0, y1 - y0 - 1, x1 - x0 - 1)
        covered[y0:y1, x0:x1] = True
      assert not np.any(class_map[~covered]), "ink outside every box"
      assert np.all(image[class_map > 0] >= scenes.INK)   # the map marks bright ink
      for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
          overlap_x = min(a[2], b[2]) - max(a[0], b[0])
          overlap_y = min(a[3], b[3]) - max(a[1], b[1])
          assert overlap_x <= 0 or overlap_y <= 0, (a, b)


def _parse(caption):
  """'a three left of a seven, above an eight and a one' -> ('three', [(rel, name), ...])."""
  m = re.fullmatch(r"a single (\w+)", caption)
  if m:
    return m.group(1), []
  m = re.fullmatch(r"(a|an) (\w+) (.+)", caption)
  assert m, caption
  assert m.group(1) == ("an" if m.group(2) == "eight" else "a"), caption
  parts, rel, out = re.split(r", | and ", m.group(3)), None, []
  for part in parts:
    pm = re.fullmatch(r"(?:(left of|right of|above|below) )?(a|an) (\w+)", part)
    assert pm, (caption, part)
    rel = pm.group(1) or rel
    assert rel is not None and pm.group(2) == ("an" if pm.group(3) == "eight" else "a"), caption
    out.append((rel, pm.group(3)))
  return m.group(2), out


def _relation_in_pixels(a, b):
  """Where box a is relative to box b, from their centres (the dominant axis)."""
  dx, dy = (a[0] + a[2] - b[0] - b[2]) / 2, (a[1] + a[3] - b[1] - b[3]) / 2
  if abs(dx) >= abs(dy):
    return "left of" if dx < 0 else "right of"
  return "above" if dy < 0 else "below"


def test_captions_name_every_digit_and_agree_with_the_layout(dataset):
  seen = set()
  for _, class_map, caption, _, regions in _records(dataset.source("test")):
    h, w = class_map.shape
    names = [digits.CLASS_NAMES[r["label"]] for r in regions]
    subject, others = _parse(caption)
    assert [subject] + [n for _, n in others] == names, caption
    boxes = [_pixel_box(r["box"], h, w) for r in regions]
    for (rel, _), box in zip(others, boxes[1:]):
      assert rel == _relation_in_pixels(boxes[0], box), (caption, boxes)
      seen.add(rel)
    assert all(n in caption for n in names)
  assert seen == set(RELATIONS)


def test_held_out_scenes_use_only_held_out_digits_and_draw_them(dataset, sklearn_digits):
  d, train, test = sklearn_digits
  for split, allowed, n in (("test", test, None), ("train", train, 200)):
    used, sizes = set(), []
    for _, class_map, _, _, regions in _records(dataset.source(split), n):
      h, w = class_map.shape
      for r in regions:
        assert r["digit"] in allowed, (split, r)
        assert r["label"] == d.target[r["digit"]]
        used.add(r["digit"])
        # the recorded digit is the one drawn: its ink at some size is the box's map
        x0, y0, x1, y1 = _pixel_box(r["box"], h, w)
        drawn = class_map[y0:y1, x0:x1] > 0
        fits = [s for s in range(scenes.SIZES[0], scenes.SIZES[1] + 1)
                if _ink_crop(d.images[r["digit"]], s).shape == drawn.shape
                and np.array_equal(_ink_crop(d.images[r["digit"]], s), drawn)]
        assert fits, r
        sizes.append(max(fits))
      assert sizes[0] == max(sizes), (sizes, regions)   # the label's digit is the largest
      sizes.clear()
    assert len(used) > 100


def _ink_crop(img8, size):
  ink = scenes.render_digit(img8, size) >= scenes.INK
  rows, cols = np.nonzero(ink)
  return ink[rows.min():rows.max() + 1, cols.min():cols.max() + 1]


def test_tfds_dataset_through_the_launchers_source_matches_the_generator(data_dir):
  from mmjax.data import sources
  config = tiny_config(data_dir, **{"data.name": NAME})
  src = sources.open(config.data, data_dir)
  assert src.class_names("label") == digits.CLASS_NAMES
  assert src.templates == scenes.ZEROSHOT_TEMPLATES
  assert len(src.train_records()) == scenes.SPLIT_SIZES["train"]
  ev = src.eval_source()
  assert len(ev) == scenes.SPLIT_SIZES["test"]
  for (image, class_map, caption, label, regions), s in zip(_records(ev, 20),
                                                            scenes.generate("test", 20)):
    assert np.array_equal(image, s.image) and np.array_equal(class_map, s.class_map)
    assert caption == s.caption and label == s.regions[0].label
    assert regions == json.loads(scenes.regions_json(s.regions))


def test_siglip_trains_and_evaluates_zero_shot_on_scenes(data_dir, tmp_path):
  from mmjax.train import loop
  config = tiny_config(data_dir, **{"data.name": NAME, "data.augment": False,
                                    "total_steps": 3, "checkpoint.every": 3})
  results = loop.train(config, str(tmp_path))
  assert results["steps"] == 3
  assert 0.0 <= results["zeroshot_top1"] <= 1.0
  assert "retrieval_i2t_r1" in results


def test_webdataset_shards_read_back_with_webdataset(tmp_path):
  import webdataset as wds
  sizes = {"train": 9, "test": 23}
  shards = scenes.write_scene_shards(str(tmp_path / "a"), sizes=sizes, shard_size=10)
  again = scenes.write_scene_shards(str(tmp_path / "b"), sizes=sizes, shard_size=10)
  assert [len(shards[s]) for s in ("train", "test")] == [1, 3]
  for p, q in zip(shards["test"], again["test"]):
    assert open(p, "rb").read() == open(q, "rb").read()
  assert (tmp_path / "a" / "classnames.txt").read_text().split("\n")[:10] == digits.CLASS_NAMES
  assert (tmp_path / "a" / "test" / "nshards.txt").read_text().strip() == "3"
  for split in sizes:
    read = list(wds.WebDataset(shards[split], shardshuffle=False).decode("rgb8"))
    assert len(read) == sizes[split]
    for sample, s in zip(read, scenes.generate(split, sizes[split])):
      assert np.array_equal(sample["png"], s.image)   # rgb8: uint8 [H, W, 3]
      assert np.array_equal(sample["map.png"], np.repeat(s.class_map[..., None], 3, -1))
      assert sample["txt"] == s.caption and int(sample["cls"]) == s.regions[0].label
      assert sample["json"] == json.loads(scenes.regions_json(s.regions))
  templates = (tmp_path / "a" / "zeroshot_classification_templates.txt").read_text().split("\n")
  assert all("{c}" in t for t in templates if t)


def test_caption_rejects_mismatched_layouts():
  with pytest.raises(ValueError, match="labels"):
    scenes.caption([1, 2], [(0, 0, 1, 1)])
  with pytest.raises(ValueError, match="split"):
    next(scenes.generate("val"))
