"""Regions (mmjax.data.regions) and the dense probe: per-patch labels against the scenes'
pixel class maps and a per-patch loop, the evaluator's two accuracies on features whose answer
is known, and SigLIP (the contrastive objective) getting a dense probe on the scenes."""

import json

import numpy as np
import pytest

from mmjax.data import regions, scenes
from tests.configs import tiny_config


def _loop_labels(boxes, grid):
  """The reference: per patch centre, in a Python loop over patches and regions."""
  out = []
  for i in range(grid):
    for j in range(grid):
      y, x = (i + 0.5) / grid, (j + 0.5) / grid
      label = 0
      for lab, x0, y0, x1, y1 in boxes:
        if lab >= 0 and x0 <= x < x1 and y0 <= y < y1:
          label = int(lab) + 1
          break
      out.append(label)
  return out


def test_patch_labels_match_a_loop_and_the_scenes_ink(rng):
  for grid in (3, 7, 10):
    boxes = np.zeros((5, regions.MAX_REGIONS, 5), np.float32)
    corners = np.sort(rng.uniform(0, 1, (5, regions.MAX_REGIONS, 2, 2)), axis=-1)
    boxes[..., 1], boxes[..., 3] = corners[..., 0, 0], corners[..., 0, 1]
    boxes[..., 2], boxes[..., 4] = corners[..., 1, 0], corners[..., 1, 1]
    boxes[..., 0] = rng.integers(-1, 10, (5, regions.MAX_REGIONS))   # overlapping, some unlabelled
    got = regions.patch_labels(boxes, grid)
    assert got.shape == (5, grid * grid)
    for b in range(5):
      assert list(got[b]) == _loop_labels(boxes[b], grid), (grid, b)
  # On real scenes: a patch whose centre falls inside an ink pixel gets that digit's class
  # (centres on a pixel edge are left out: the JSON boxes are rounded to 6 decimals).
  checked = 0
  for s in scenes.generate("test", 40):
    h, w = s.class_map.shape
    grid = 12
    labels = regions.patch_labels(
        regions.region_boxes(scenes.regions_json(s.regions)), grid).reshape(grid, grid)
    for i in range(grid):
      for j in range(grid):
        y, x = (i + 0.5) * h / grid, (j + 0.5) * w / grid
        ink = s.class_map[int(y), int(x)]
        if ink and y % 1 and x % 1:
          assert labels[i, j] == ink, (s.caption, i, j)
          checked += 1
  assert checked > 100


def test_region_boxes_and_bad_regions():
  text = json.dumps([{"box": [0.1, 0.2, 0.3, 0.4], "text": "a", "label": 3},
                     {"box": [0.5, 0.5, 0.9, 1.0], "text": "b"}])
  got = regions.region_boxes(text.encode(), max_regions=3)
  np.testing.assert_allclose(got, [[3, 0.1, 0.2, 0.3, 0.4], [-1, 0.5, 0.5, 0.9, 1.0],
                                   [-1, 0, 0, 0, 0]], rtol=1e-6)
  for bad in ('{"box": 1}', '[{"box": [0, 0, 1]}]', '[{"text": "x"}]', "not json",
              '[{"box": [0, 0, 1, 1], "label": "seven"}]'):
    with pytest.raises(ValueError, match=r"^regions JSON: a list of"):
      regions.region_boxes(bad)


def test_dense_probe_counts_background_and_foreground_patches(rng):
  """Features that carry the patch's class: both accuracies 1; features that carry nothing:
  the probe answers background, all-patch accuracy is the background share, foreground 0."""
  from mmjax.evaluate import evaluators
  from mmjax.evaluate.streaming import Embedded, Split
  grid, n = 4, 60
  boxes = np.full((n, 2, 5), -1, np.float32)
  boxes[:, 0] = [0, 0, 0, 0.5, 0.5]                    # the top-left quarter
  boxes[:, 0, 0] = rng.integers(0, 3, n)               # of class 0, 1 or 2
  labels = regions.patch_labels(boxes, grid)           # [n, 16]
  informative = np.eye(4)[labels] + 0.01 * rng.normal(size=(n, grid * grid, 4))
  blank = rng.normal(size=(n, grid * grid, 4))

  def probe(features):
    split = Split.from_arrays({"image": features, "region_boxes": boxes})
    emb = lambda: Embedded(split, lambda v, x: x, 16)
    return evaluators.DenseProbe(emb(), emb()).run(None)

  assert probe(informative) == {"dense_probe_top1": 1.0, "dense_probe_fg_top1": 1.0}
  got = probe(blank)
  assert got["dense_probe_fg_top1"] < 0.5 and got["dense_probe_top1"] >= 0.7, got
  with pytest.raises(ValueError, match="not a square grid"):
    probe(informative[:, :15])


def test_siglip_gets_a_dense_probe_on_the_scenes(data_dir, tmp_path, capsys):
  """The contrastive objective's patch features (a tok-pooled ViT: the class token left out)
  and the scenes' regions give dense_probe metrics at step 0 (total_steps=0 evaluates). The
  trained tokenizer learnt the zero-shot prompts with the captions: each fits text_len (one
  trained on the captions alone spells 'handwritten' letter by letter and cuts the class
  name off), and the run says nothing about truncated prompts."""
  from mmjax.data import tokenizers
  from mmjax.train import loop
  config = tiny_config(data_dir, **{"loss": "siglip", "data.name": "mmjax_digit_scenes",
                                    "total_steps": 0, "evaluate.probes": True,
                                    "evaluate.probe_train_examples": 60,
                                    "evaluate.probe_shots": (),
                                    "model.image.pool_type": "tok"})
  built = loop.build(config)
  prompts = [t.format(n) for t in scenes.ZEROSHOT_TEMPLATES for n in scenes.NAMES]
  tok = tokenizers.get_tokenizer(built.tokenizer_spec)
  assert max(tok.num_tokens(p) for p in prompts) <= config.data.text_len
  results = loop.run(built, str(tmp_path / "run"))
  assert "zero-shot prompts are longer" not in capsys.readouterr().out
  assert 0.0 < results["dense_probe_top1"] <= 1.0
  assert 0.0 <= results["dense_probe_fg_top1"] < results["dense_probe_top1"]


def test_a_prompt_longer_than_text_len_is_a_warning(capsys):
  """Zero-shot prompts that do not fit text_len are named in one warning line (their class
  names would be cut off); captions that fit say nothing."""
  import ml_collections
  from mmjax.train import loop

  class Tok:
    def num_tokens(self, text):
      return len(text.split()) + 1

  class Src:
    def __len__(self):
      return 2

    def __getitem__(self, i):
      return {"text": b"a one"}

  config = ml_collections.ConfigDict({"data": {"text_len": 4, "text_key": "text"}})
  loop._warn_truncation(Src(), Tok(), config, ["a photo of a seven", "a seven"])
  out = capsys.readouterr().out.strip().splitlines()
  assert len(out) == 1 and "1 of the 2 zero-shot prompts are longer than " \
      "config.data.text_len=4" in out[0] and "'a photo of a seven': 6 tokens" in out[0], out
