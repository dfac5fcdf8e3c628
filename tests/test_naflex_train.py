"""NaFlex training through the launcher (issue 31): digits at random aspect ratios in
webdataset shards (webdataset's TarWriter), a NaFlex SigLIP trained on packed batches (several
images a row) and on padded ones (one a row), evaluated at the end; the batch assembly
(mmjax.data.naflex.Batches) keeps every image and its order; resume is exact."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from tests.configs import tiny_config

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def _digit_png(image8: np.ndarray, rng) -> bytes:
  """An 8 x 8 digit stretched to a random size and aspect ratio (16-48 px a side)."""
  h, w = (int(v) for v in rng.integers(16, 49, size=2))
  im = Image.fromarray((image8 * 255 / 16).astype(np.uint8)).convert("RGB").resize((w, h))
  buf = io.BytesIO()
  im.save(buf, "PNG")
  return buf.getvalue()


def _write(path, rows, rng):
  import webdataset
  with webdataset.TarWriter(str(path)) as w:
    for i, (image, label) in enumerate(rows):
      w.write({"__key__": f"s{i:06d}", "png": _digit_png(image, rng),
               "txt": f"a photo of the digit {NAMES[label]}", "cls": int(label)})


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
  from sklearn.datasets import load_digits
  digits = load_digits()
  rng = np.random.default_rng(0)
  root = tmp_path_factory.mktemp("naflex_shards")
  (root / "test").mkdir()
  pairs = list(zip(digits.images, digits.target))
  for s in range(3):
    _write(root / f"train-{s}.tar", pairs[s * 300:(s + 1) * 300], rng)
  _write(root / "test" / "0.tar", pairs[1500:1620], rng)
  (root / "test" / "classnames.txt").write_text("\n".join(NAMES) + "\n")
  return root


def naflex_config(data_dir, shards, mode, **overrides):
  return tiny_config(data_dir, **{
      "data.name": "wds", "data.shards": str(shards / "train-{0..2}.tar"),
      "data.eval_shards": str(shards / "test" / "0.tar"), "data.vocab_size": 300,
      "model.image.tower": "naflex", "model.image.variant": "mu/4", "model.image.posemb_grid": 8,
      "data.naflex.mode": mode, "data.naflex.max_patches": 64, "data.naflex.seq_len": 128,
      "data.naflex.rows": 6, "data.naflex.max_per_seq": 6, "total_steps": 30,
      "checkpoint.every": 30, **overrides})


@pytest.mark.parametrize("mode", ["pack", "pad"])
def test_a_naflex_siglip_trains_from_shards_and_evaluates(data_dir, shards, tmp_path, mode):
  from mmjax.train import loop
  run = tmp_path / "run"
  results = loop.train(naflex_config(data_dir, shards, mode), str(run))
  rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
  losses = [r["loss"] for r in rows if "loss" in r]
  assert len(losses) == 30 and np.all(np.isfinite(losses))
  assert np.mean(losses[-5:]) < np.mean(losses[:5]), losses   # it learns
  padding = [r["data/padding_share"] for r in rows if "data/padding_share" in r]
  if mode == "pack":   # 16 images of at most 64 patches in 6 rows of 128 tokens
    assert max(padding) < 0.2, padding
  assert 0.0 <= results["zeroshot_top1"] <= 1.0 and "retrieval_i2t_r1" in results, results
  card = json.loads((run / "model.json").read_text())
  assert card["preprocess"]["max_patches"] == 64


def test_batches_keep_every_image_in_order(rng):
  """Packed rows hold each input image once, and `index` points at its slot; images that do
  not fit are shrunk, never dropped."""
  from mmjax.data import naflex
  images = [rng.integers(0, 256, size=tuple(rng.integers(8, 60, size=2)) + (3,), dtype=np.uint8)
            for _ in range(12)]
  views = [naflex.train_view(im, 4, 48, native=True) for im in images]
  for im, (_, grid) in zip(images, views):   # at most its own patch count, and the cap
    assert grid.prod() <= min(48, naflex.native_patches(*im.shape[:2], 4)), (im.shape, grid)
  small = np.zeros((9, 14, 3), np.uint8)       # 3 x 4 patches of its own
  assert tuple(naflex.train_view(small, 4, 48, native=True)[1]) == (3, 4)
  assert naflex.train_view(small, 4, 48, native=False)[1].prod() > 30   # filled to the cap
  batch = {"image": np.stack([v[0] for v in views]), "image_grid": np.stack([v[1] for v in views]),
           "text": np.arange(12)}
  packer = naflex.Batches("pack", 4, 96, rows=4, max_per_seq=5, first_row=2)
  out = packer(dict(batch))
  img = out["image"]
  assert img["patches"].shape == (4, 96, 48) and img["shapes"].shape == (4, 5, 2)
  assert np.array_equal(out["text"], np.arange(12))
  for i, flat in enumerate(img["index"]):
    row, slot = divmod(int(flat), 5)
    row -= 2   # this process's rows come after two of another's
    assert 0 <= row < 4, (i, flat)
    h, w = img["shapes"][row, slot]
    seg = img["segment_ids"][row] == slot + 1
    assert seg.sum() == h * w > 0
    if (h, w) == tuple(views[i][1]):   # not shrunk: exactly its patches
      np.testing.assert_array_equal(img["patches"][row][seg], views[i][0][:h * w])
  assert packer.shrunk > 0   # 12 images of up to 48 patches do not all fit 4 rows of 96


def test_naflex_config_mistakes_are_one_line(data_dir, shards, tmp_path):
  from mmjax.train import loop
  cases = [({"data.naflex.mode": None}, r"config\.data\.naflex\.mode=None with config\.model"),
           ({"data.naflex.mode": "packed"}, r"config\.data\.naflex\.mode must be 'pad' or"),
           ({"data.naflex.max_patches": 200}, r"max_patches=200 > seq_len=128"),
           ({"data.naflex.rows": 0}, r"config\.data\.naflex\.rows must be a positive int")]
  for overrides, message in cases:
    with pytest.raises(ValueError, match=message) as e:
      loop.train(naflex_config(data_dir, shards, "pack", **overrides), str(tmp_path / "r"))
    assert "\n" not in str(e.value)


def test_a_packed_naflex_run_resumes_exactly(data_dir, shards, tmp_path):
  """Cut back to its step-2 checkpoint and resumed, a packed NaFlex run repeats the
  uninterrupted run's losses (the batch assembly is a function of the data position)."""
  import shutil
  from mmjax.train import loop
  from tests.test_resume import _cut_back, _losses
  config = naflex_config(data_dir, shards, "pack", **{
      "total_steps": 6, "checkpoint.every": 2, "checkpoint.keep": 3, "evaluate.probes": False,
      "data.label_key": "", "evaluate.retrieval_match": "pair"})
  whole, part = tmp_path / "whole", tmp_path / "part"
  loop.train(config, str(whole))
  shutil.copytree(whole, part)
  _cut_back(str(part), 2)
  loop.train(config, str(part))
  want, got = dict(_losses(str(whole))), dict(_losses(str(part)))
  assert [got[s] for s in range(3, 7)] == [want[s] for s in range(3, 7)], (got, want)


def test_packed_naflex_on_two_devices_matches_one(data_dir, shards, tmp_path):
  """The packed rows split over the data axis, each image's slot gathered back to its place:
  the per-step losses of one device."""
  from mmjax.train import loop
  from tests.test_resume import _losses
  cheap = {"total_steps": 4, "checkpoint.every": 4, "evaluate.probes": False,
           "data.label_key": "", "evaluate.retrieval_match": "pair"}
  loop.train(naflex_config(data_dir, shards, "pack", **cheap), str(tmp_path / "one"))
  got = loop.train(naflex_config(data_dir, shards, "pack", num_devices=2, **cheap),
                   str(tmp_path / "two"))
  assert got["devices"] == 2
  np.testing.assert_allclose([l for _, l in _losses(str(tmp_path / "two"))],
                             [l for _, l in _losses(str(tmp_path / "one"))], rtol=2e-4, atol=2e-5)


def test_naflex_patches_are_normalised_once_per_channel(rng):
  """images_to_float on a NaFlex batch: (x / 255 - mean) / std per channel of the
  channels-last patches; the other keys untouched."""
  import jax.numpy as jnp
  from mmjax.train.state import images_to_float
  patches = rng.integers(0, 256, size=(2, 5, 4 * 4 * 3), dtype=np.uint8)
  image = {"patches": jnp.asarray(patches), "segment_ids": jnp.ones((2, 5), jnp.int32)}
  mean, std = (0.1, 0.5, 0.9), (0.2, 0.3, 0.4)
  got = images_to_float({"image": image, "text": jnp.zeros((2, 3), jnp.int32)}, (mean, std))
  want = ((patches.reshape(2, 5, 16, 3) / 255.0 - np.array(mean)) / np.array(std))
  np.testing.assert_allclose(got["image"]["patches"], want.reshape(2, 5, 48), rtol=1e-5, atol=1e-6)
  assert got["image"]["segment_ids"] is image["segment_ids"]
  got = images_to_float({"image": image}, None)["image"]["patches"]
  np.testing.assert_allclose(got, patches / 127.5 - 1.0, rtol=1e-5, atol=1e-6)


def test_naflex_batching_puts_each_process_after_the_ones_before(rng):
  """sources.image_batching for a NaFlex tower, as process 1 of 2 builds it: the sources'
  per-example view, an iterator turning their batches into the tower's input with this
  process's rows (pack) or images (pad) after process 0's, the parent's position and
  counters plus the NaFlex ones, and the eval preparation; the mistakes in one line."""
  from mmjax.data import naflex, sources
  from mmjax.data.preprocess import ImageBatching
  from mmjax.train import config as config_lib
  c = config_lib.defaults()
  c.batch_size = 8   # 4 images a process
  c.data.naflex.update(mode="pack", max_patches=16, seq_len=32, rows=4, max_per_seq=3,
                       eval_max_patches=20)
  fields = {"tower": "naflex", "patch_size": (4, 4)}
  views = [naflex.train_view(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8), 4, 16,
                             native=True) for _ in range(4)]

  class Parent:
    state = None

    def __next__(self):
      return {"image": np.stack([v[0] for v in views]),
              "image_grid": np.stack([v[1] for v in views]), "text": np.arange(4)}

    def get_state(self):
      return {"position": 7}

    def set_state(self, state):
      self.state = state

    def metrics(self):
      return {"data/epoch": 0}

  parent = Parent()
  made = sources.image_batching(c, fields, normalize=((0.1,) * 3, (0.2,) * 3), process_index=1,
                                process_count=2)
  assert made.view == {"naflex": (4, 16, True)}
  assert made.prep == naflex.NaflexPrep(4, 20, (0.1,) * 3, (0.2,) * 3)
  it = made.wrap(parent)
  out = next(it)
  rows = out["image"]["index"] // 3   # max_per_seq slots a row; process 0 has rows 0 and 1
  assert out["image"]["patches"].shape == (2, 32, 48) and set(rows) <= {2, 3}, rows
  assert np.array_equal(out["text"], np.arange(4)) and "image_grid" not in out
  assert it.get_state() == {"position": 7}
  it.set_state({"position": 3})
  assert parent.state == {"position": 3}
  assert set(it.metrics()) == {"data/epoch", "data/padding_share", "data/naflex_shrunk"}
  assert 0.0 < it.metrics()["data/padding_share"] < 1.0
  c.data.naflex.mode = "pad"
  made = sources.image_batching(c, fields, process_index=1, process_count=2)
  assert made.view == {"naflex": (4, 16, False)}
  assert made.prep == naflex.NaflexPrep(4, 20)
  np.testing.assert_array_equal(next(made.wrap(parent))["image"]["index"], np.arange(4, 8))
  c.data.naflex.update(mode="pack", rows=3)
  with pytest.raises(ValueError, match=r"^config\.data\.naflex\.rows=3 is not divisible by 2 "
                                       r"processes$"):
    sources.image_batching(c, fields, process_index=0, process_count=2)
  with pytest.raises(ValueError, match=r"^config\.data\.naflex\.mode is set but the image tower "
                                       r"\(the checkpoint's\) is not a NaFlex one$"):
    sources.image_batching(c, {"tower": "vit", "patch_size": (4, 4)})
  c.data.naflex.mode = None
  assert sources.image_batching(c, fields) == ImageBatching()
