"""CLIP_benchmark parity (issue 30): its own writer (clip_benchmark.webdataset_builder) makes a
classification set (`{c}` templates, several shards, nshards.txt) and a retrieval set
(dataset_type.txt, several captions per image), its own command line evaluates a random
open_clip model on them, and `python -m experiments.evaluate` on the same weights and files
must report the same acc1, acc5, mean per-class recall and recall@1/5/10."""

import json
import sys

import numpy as np
import pytest
from PIL import Image

from tests.open_clip_peer import import_open_clip

open_clip = import_open_clip()
import torch  # noqa: E402  (after open_clip_peer's torchvision patch)

cb_cli = pytest.importorskip("clip_benchmark.cli", reason="pip install -e '.[test]'")
from clip_benchmark import webdataset_builder  # noqa: E402
from clip_benchmark.metrics import zeroshot_classification  # noqa: E402

CLASSES = ["red fox", "tabby cat", "golden retriever", "fire truck", "sunflower", "bicycle"]
TEMPLATES = ["a photo of a {c}.", "a blurry photo of the {c}.", "{c}, a drawing of {c}"]
WORDS = "a an the dog cat red blue small large photo of on in with two people car tree".split()


class _List(torch.utils.data.Dataset):
  """(image bytes, target) rows, with the attributes CLIP_benchmark's writer reads."""

  def __init__(self, rows, classes=None, templates=None):
    self.rows, self.classes, self.templates = rows, classes, templates

  def __len__(self):
    return len(self.rows)

  def __getitem__(self, i):
    return self.rows[i]


def _image(rng) -> Image.Image:
  """A smooth random picture of a random size and aspect ratio (resize and crop matter)."""
  h, w = rng.integers(24, 72, size=2)
  coarse = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
  return Image.fromarray(coarse).resize((int(w), int(h)), Image.BILINEAR)


def _model(tmp_path, rng):
  """A random open_clip model from a config of its own, saved where both tools read it."""
  cfg = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 48,
                                         "patch_size": 8, "head_width": 24},
         "text_cfg": {"context_length": 20, "vocab_size": 49408, "width": 32, "heads": 2,
                      "layers": 2}}
  path = tmp_path / "Tiny-CB.json"
  path.write_text(json.dumps(cfg))
  open_clip.add_model_config(str(path))
  torch.manual_seed(int(rng.integers(2**31)))
  model = open_clip.create_model("Tiny-CB", pretrained=None)
  weights = tmp_path / "tiny.pt"
  torch.save(model.state_dict(), weights)
  return f"open_clip:{path}:{weights}", str(weights)


def _topk_accuracy(output, target, topk=(1,)):
  """clip_benchmark 1.6.2's zeroshot_classification.accuracy with its count taken by .item():
  its float() of a 1-element 1-d array is an error from numpy 2.4 on."""
  pred = output.topk(max(topk), 1, True, True)[1].t()
  correct = pred.eq(target.view(1, -1).expand_as(pred))
  return [correct[:k].float().sum().item() / len(target) for k in topk]


def _clip_benchmark(monkeypatch, tmp_path, root, weights, *extra, model="Tiny-CB") -> dict:
  """CLIP_benchmark's command line (`clip_benchmark eval`) on the webdataset folder `root`
  with open_clip's `model` and its `weights` file; its metrics."""
  out = tmp_path / "cb.json"
  monkeypatch.setattr(zeroshot_classification, "accuracy", _topk_accuracy)
  monkeypatch.setattr(sys, "argv", [
      "clip_benchmark", "eval", "--dataset", "wds/tiny", "--dataset_root", str(root),
      "--model", model, "--pretrained", weights, "--no_amp", "--num_workers", "0",
      "--batch_size", "8", "--recall_k", "1", "5", "10", "--output", str(out), "--quiet",
      *extra])
  torch.set_num_threads(1)
  cb_cli.main()
  return json.loads(out.read_text())["metrics"]


def _mmjax(tmp_path, spec, root, *extra) -> dict:
  from experiments import evaluate
  out = tmp_path / "mmjax.json"
  assert evaluate.main(["--checkpoint", spec, "--dataset", f"wds:{root}", "--batch_size", "5",
                        "--output", str(out), "--no_progress", *extra]) == 0
  return json.loads(out.read_text())


@pytest.mark.parametrize("prompts", ["dataset", "per_class"])
def test_classification_equals_clip_benchmark(tmp_path, rng, monkeypatch, prompts):
  """The set's own {c} templates, or per-class prompts (CuPL's kind) from a JSON template file
  under the dataset's name, as CLIP_benchmark's --custom_template_file takes them."""
  spec, weights = _model(tmp_path, rng)
  rows = [(webdataset_builder.PIL_to_bytes("webp")(_image(rng)), int(rng.integers(6)))
          for _ in range(29)]
  root = tmp_path / "wds_tiny"
  webdataset_builder.convert_dataset(_List(rows, CLASSES, TEMPLATES), "test", str(root),
                                     max_count=8, verbose=False)
  assert (root / "test" / "nshards.txt").read_text().strip() == "4"
  extra = ()
  if prompts == "per_class":
    per_class = {c: [" ".join(rng.choice(WORDS, size=4)) + f" {c}"
                     for _ in range(int(rng.integers(1, 4)))] for c in CLASSES}
    (tmp_path / "cupl.json").write_text(json.dumps({"tiny": per_class}))
    extra = ("--custom_template_file", str(tmp_path / "cupl.json"))
  want = _clip_benchmark(monkeypatch, tmp_path, root, weights, *extra)
  got = _mmjax(tmp_path, spec, root, *(("--templates",) + extra[1:] if extra else ()))
  assert got["num_templates"] == (len(TEMPLATES) if prompts == "dataset" else None), got
  m = got["metrics"]
  for key in ("acc1", "acc5", "mean_per_class_recall"):
    assert m[key] == pytest.approx(want[key], abs=1e-6), (key, m, want)   # torch averages in float32
  assert 0 < want["acc5"] < 1, want   # a score that could differ


def test_retrieval_with_several_captions_equals_clip_benchmark(tmp_path, rng, monkeypatch):
  spec, weights = _model(tmp_path, rng)
  caption = lambda: " ".join(rng.choice(WORDS, size=int(rng.integers(3, 9))))
  rows = [(webdataset_builder.PIL_to_bytes("png")(_image(rng)),
           [caption() for _ in range(int(rng.integers(1, 5)))]) for _ in range(23)]
  root = tmp_path / "wds_tiny"
  webdataset_builder.convert_retrieval_dataset(_List(rows), "test", str(root), max_count=6,
                                               image_format="png", verbose=False)
  want = _clip_benchmark(monkeypatch, tmp_path, root, weights, "--task", "zeroshot_retrieval")
  got = _mmjax(tmp_path, spec, root)
  assert got["task"] == "zeroshot_retrieval", got
  m = got["metrics"]
  for k in (1, 5, 10):
    for side in ("image", "text"):
      key = f"{side}_retrieval_recall@{k}"
      assert m[key] == pytest.approx(want[key], abs=1e-6), (key, m, want)   # torch averages in float32
  assert 0 < want["image_retrieval_recall@5"] < 1, want   # a score that could differ
