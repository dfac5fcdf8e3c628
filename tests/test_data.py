"""Embedded digits, image-folder builder, tokenizer and the grain pipeline (no TensorFlow)."""

import csv
import json
import os
import sys
import time

import numpy as np
import pytest
from PIL import Image

from mmjax.data import digits, image_folder, pipeline
from mmjax.data.tokenizers import EOS, PAD, TrainedTokenizer, get_tokenizer, trained_spec


@pytest.fixture(scope="module")
def sources(data_dir):
  return {s: pipeline.get_source("mmjax_digits", s, data_dir=data_dir) for s in ("train", "test")}


@pytest.fixture(scope="module")
def tok(sources, data_dir):
  return get_tokenizer(trained_spec(data_dir, "mmjax_digits", 512),
                       train_texts=lambda: pipeline.iter_texts(sources["train"]))


def test_no_tensorflow_imported(sources):
  assert "tensorflow" not in sys.modules


def test_digits_splits_images_and_captions(sources):
  from sklearn.datasets import load_digits
  ref = load_digits()
  train, test = sources["train"], sources["test"]
  assert len(train) + len(test) == len(ref.target) == 1797
  assert len(test) == 10 * digits.TEST_PER_CLASS
  labels = np.array([test[i]["label"] for i in range(len(test))])
  np.testing.assert_array_equal(np.bincount(labels), [digits.TEST_PER_CLASS] * 10)
  captions = set()
  for src in (train, test):
    for i in range(0, len(src), 7):
      ex = src[i]
      img, cap = ex["image"], ex["text"].decode()
      assert img.shape == (32, 32, 3) and img.dtype == np.uint8
      label = int(ex["label"])
      words = cap.replace(",", " ").split()
      assert digits.CLASS_NAMES[label] in words or str(label) in words, cap
      others = [w for c, w in enumerate(digits.CLASS_NAMES) if c != label]
      assert not set(others) & set(words), cap
      captions.add(cap.replace(digits.CLASS_NAMES[label], "W").replace(str(label), "N"))
  assert len(captions) >= 8          # the templates vary
  img = train[0]["image"]
  assert img.min() < 40 and img.max() > 215


def test_digits_test_split_is_fixed():
  from sklearn.datasets import load_digits
  labels = load_digits().target
  a, b = digits.split_indices(labels), digits.split_indices(labels)
  np.testing.assert_array_equal(a[1], b[1])
  assert not set(a[0]) & set(a[1])


def test_digits_images_match_the_sklearn_scans(sources):
  """The stored image, shrunk back to 8x8, is the original scan (ink dark)."""
  from sklearn.datasets import load_digits
  ref = load_digits()
  train_idx, _ = digits.split_indices(ref.target)
  ex = sources["train"][0]
  candidates = [i for i in train_idx if ref.target[i] == ex["label"]]
  small = np.asarray(Image.fromarray(ex["image"][..., 0]).resize((8, 8), Image.BOX), float)
  errs = [np.abs(small - (255 - ref.images[i] * 255 / 16)).mean() for i in candidates]
  assert min(errs) < 20


def test_tokenizer_round_trip_eos_padding_truncation(tok):
  texts = ["a handwritten seven", "the digit 7 written by hand", "Ünïcode €"]
  ids = tok.encode(texts, 16)
  assert ids.shape == (3, 16) and ids.dtype == np.int32
  for row in ids:
    n = int((row != PAD).sum())
    assert row[n - 1] == EOS and (row[n:] == PAD).all()
  assert tok.decode(ids) == [t.lower() for t in texts]
  short = tok.encode(texts, 4)
  assert (short[:, -1] == EOS).all()
  assert 260 < tok.vocab_size <= 512
  with pytest.raises(ValueError, match="sequence"):
    tok.encode("one string", 8)


def test_every_digits_caption_and_prompt_fits_the_default_text_len(tok):
  """A caption longer than data.text_len loses its last words, here the digit."""
  from mmjax.data.digits import CAPTION_TEMPLATES, CLASS_NAMES, ZEROSHOT_TEMPLATES
  from mmjax.train.config import defaults
  text_len = defaults().data.text_len
  texts = [t.format(w=w, n=n) for t in CAPTION_TEMPLATES for n, w in enumerate(CLASS_NAMES)]
  texts += [t.format(w) for t in ZEROSHOT_TEMPLATES for w in CLASS_NAMES]
  lengths = {t: tok.num_tokens(t) for t in texts}
  assert max(lengths.values()) <= text_len, max(lengths.items(), key=lambda kv: kv[1])
  for t in texts[:5]:
    assert int((tok.encode([t], 64)[0] != PAD).sum()) == lengths[t]


def test_truncated_captions_are_reported(tok, capsys, data_dir):
  from mmjax.train import loop
  from tests.configs import tiny_config
  config = tiny_config(data_dir, **{"data.text_len": 3})
  source = [{"text": b"a handwritten seven"}, {"text": b"one"}]
  loop._warn_truncation(source, tok, config)
  assert "1 of the first 2 training captions are longer than config.data.text_len=3" in (
      capsys.readouterr().out)


def test_tokenizer_is_deterministic_and_cached(tok, tmp_path, data_dir):
  texts = [f"caption number {i} of a handwritten digit" for i in range(50)]
  a, b = (TrainedTokenizer.train(texts, vocab_size=300) for _ in range(2))
  np.testing.assert_array_equal(a.encode(texts, 12), b.encode(texts, 12))
  a.save(str(tmp_path / "t.model"))
  c = TrainedTokenizer.from_file(str(tmp_path / "t.model"))
  np.testing.assert_array_equal(a.encode(texts, 12), c.encode(texts, 12))
  assert os.path.exists(os.path.join(data_dir, "mmjax_digits", "tokenizer-bpe-v512.model"))
  assert tok.spec == f"trained:{data_dir}/mmjax_digits/tokenizer-bpe-v512.model?vocab_size=512"


def test_the_loop_opens_the_trained_tokenizer_from_its_config(tok, tmp_path, data_dir):
  """config.data.tokenizer_path: that file (missing: a ValueError naming the field); else the
  BPE cached under the data dir for config.data.name and vocab_size; config.data.tokenizer
  wins over both."""
  from mmjax.train import loop
  from tests.configs import tiny_config
  texts = ["a handwritten seven", "Ünïcode €", "the digit 7 " * 9]
  cached = f"{data_dir}/mmjax_digits/tokenizer-bpe-v512.model"
  for fields, spec in [({}, f"trained:{cached}?vocab_size=512"),
                       ({"data.tokenizer_path": cached}, f"trained:{cached}")]:
    _, _, got = loop._open_data(tiny_config(data_dir, **fields), data_dir)
    assert got.spec == spec
    np.testing.assert_array_equal(got.encode(texts, 16), tok.encode(texts, 16))
  missing = str(tmp_path / "missing.model")
  with pytest.raises(ValueError, match=r"^config.data.tokenizer_path: tokenizer spec 'trained:.*"
                                       r"missing.model'.* is not a file"):
    loop._open_data(tiny_config(data_dir, **{"data.tokenizer_path": missing}), data_dir)
  config = tiny_config(data_dir, **{"data.tokenizer_path": missing, "data.tokenizer": "clip"})
  assert loop._open_data(config, data_dir)[2].spec == "clip"


def data_config(**fields):
  """config.data with fields overridden (the pipeline takes config.data whole)."""
  from mmjax.train.config import defaults
  d = defaults().data
  d.update(fields)
  return d


def _iterator(src, tok, **kw):
  """kw: config.data fields and make_train_iterator's own arguments."""
  fields = {"image_size": 32, "text_len": 12}
  fields.update({k: kw.pop(k) for k in list(kw) if k in data_config()})
  args = dict(tokenizer=tok, global_batch_size=8, seed=3)
  return pipeline.make_train_iterator(src, data_config(**fields), **{**args, **kw})


def test_pipeline_batches(sources, tok):
  b = next(_iterator(sources["train"], tok))
  # uint8 on the host (normalised once, on the device): the scans' dark ink and white paper.
  assert b["image"].shape == (8, 32, 32, 3) and b["image"].dtype == np.uint8
  assert b["image"].min() < 64 and b["image"].max() > 192
  assert b["text"].shape == (8, 12) and b["text"].dtype == np.int32
  assert b["label"].shape == (8,)
  it_a, it_b = _iterator(sources["train"], tok), _iterator(sources["train"], tok, seed=4)
  a, c = next(it_a), next(it_b)
  assert not np.array_equal(a["text"], c["text"])
  np.testing.assert_array_equal(a["image"], next(_iterator(sources["train"], tok))["image"])


def test_pipeline_process_shards_are_disjoint(sources, tok):
  src = sources["test"]  # 360 examples: 3 processes x 120
  seen = []
  for p in range(3):
    it = _iterator(src, tok, global_batch_size=24, process_index=p, process_count=3,
                   augment=False)
    ids = set()
    for _ in range(15):   # 15 x 8 = 120 = one epoch of this shard
      b = next(it)
      ids.update(map(bytes, np.concatenate([b["image"].reshape(8, -1), b["text"]], 1).view(np.uint8)))
    seen.append(ids)
  assert not (seen[0] & seen[1]) and not (seen[1] & seen[2])


def test_pipeline_resumes_exactly_across_epochs(sources, tok):
  src = sources["test"]
  it = _iterator(src, tok, global_batch_size=64)   # 5 batches an epoch
  for _ in range(4):
    next(it)
  state = it.get_state()
  json.dumps(state)
  want = [next(it) for _ in range(4)]               # crosses the epoch boundary
  resumed = _iterator(src, tok, global_batch_size=64)
  resumed.set_state(state)
  for w in want:
    got = next(resumed)
    for k in w:
      np.testing.assert_array_equal(got[k], w[k])


def test_pipeline_errors(sources, tok, data_dir):
  with pytest.raises(ValueError, match="batch_size"):
    _iterator(sources["train"], tok, global_batch_size=9, process_count=2)
  with pytest.raises(ValueError, match="data.text_key"):
    pipeline.get_source("mmjax_digits", "train", data_dir=data_dir, text_key="caption")
  with pytest.raises(ValueError, match="data.image_key"):
    pipeline.get_source("mmjax_digits", "train", data_dir=data_dir, image_key="label")
  with pytest.raises(ValueError, match="data.name"):
    pipeline.get_source("not_a_dataset", "train", data_dir=data_dir)


def _make_folder(tmp_path, rng, n=6, fmt="csv"):
  rows = []
  for i in range(n):
    Image.fromarray(rng.integers(0, 255, (20 + i, 30, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    rows.append({"image": f"{i}.png", "caption": f"random picture {i}"})
  if fmt == "csv":
    path = tmp_path / "captions.csv"
    with open(path, "w", newline="") as f:
      w = csv.DictWriter(f, ["image", "caption"])
      w.writeheader()
      w.writerows(rows)
  else:
    path = tmp_path / "captions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(path), rows


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_image_folder_builder(tmp_path, fmt, rng):
  path, rows = _make_folder(tmp_path, rng, fmt=fmt)
  ddir = str(tmp_path / "tfds")
  name = image_folder.build_image_text_folder(path, data_dir=ddir, name=f"my_{fmt}",
                                              image_size=16, test_fraction=0.34)
  srcs = {s: pipeline.get_source(name, s, data_dir=ddir) for s in ("train", "test")}
  assert len(srcs["train"]) == 4 and len(srcs["test"]) == 2
  caps = sorted(srcs[s][i]["text"].decode() for s in srcs for i in range(len(srcs[s])))
  assert caps == sorted(r["caption"] for r in rows)
  assert srcs["train"][0]["image"].shape == (16, 16, 3)


def test_image_folder_bad_inputs(tmp_path, rng):
  path, _ = _make_folder(tmp_path, rng)
  ddir = str(tmp_path / "tfds")
  with pytest.raises(ValueError, match="missing.csv"):
    image_folder.build_image_text_folder(str(tmp_path / "missing.csv"), data_dir=ddir)
  bad = tmp_path / "nocap.csv"
  bad.write_text("image,text\n0.png,hello\n")
  with pytest.raises(ValueError, match="caption"):
    image_folder.build_image_text_folder(str(bad), data_dir=ddir)
  gone = tmp_path / "gone.csv"
  gone.write_text("image,caption\n0.png,fine\nnot_there.png,broken\n")
  with pytest.raises(ValueError, match=r"not_there\.png.*row 2|row 2.*not_there\.png"):
    image_folder.build_image_text_folder(str(gone), data_dir=ddir)


def _built_captions(name, ddir):
  srcs = [pipeline.get_source(name, s, data_dir=ddir) for s in ("train", "test")]
  return sorted(src[i]["text"].decode() for src in srcs for i in range(len(src)))


def test_image_folder_rebuild_needs_overwrite(tmp_path, rng, monkeypatch):
  path, rows = _make_folder(tmp_path, rng, n=4)
  ddir = str(tmp_path / "tfds")
  build = lambda **kw: image_folder.build_image_text_folder(
      path, data_dir=ddir, name="pics", image_size=8, test_fraction=0.25, **kw)
  build()
  with monkeypatch.context() as m:   # the same inputs again: reused, nothing is read or written
    m.setattr(image_folder, "_square", lambda *a: pytest.fail("rebuilt the same inputs"))
    assert build() == "pics" and build(overwrite=True) == "pics"
  with open(path, "w", newline="") as f:
    f.write("image,caption\n" + "".join(f"{r['image']},new {r['caption']}\n" for r in rows))
  with pytest.raises(ValueError, match=r"tfds.*pics.*overwrite=True"):
    build()
  with pytest.raises(ValueError, match="overwrite=True"):
    image_folder.build_image_text_folder(path, data_dir=ddir, name="pics", image_size=16,
                                         test_fraction=0.25)
  assert _built_captions("pics", ddir) == sorted(r["caption"] for r in rows)   # left as it was
  build(overwrite=True)
  assert _built_captions("pics", ddir) == sorted(f"new {r['caption']}" for r in rows)
  Image.fromarray(np.zeros((9, 9, 3), np.uint8)).save(tmp_path / "0.png")   # same captions
  with pytest.raises(ValueError, match="overwrite=True"):
    build()


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_image_folder_bad_text_names_file_and_row(tmp_path, rng, fmt):
  _make_folder(tmp_path, rng, n=2)
  ddir = str(tmp_path / "tfds")
  f = tmp_path / f"c.{fmt}"
  line = (lambda i, cap: f"{i}.png,{cap}\n") if fmt == "csv" else (
      lambda i, cap: json.dumps({"image": f"{i}.png", "caption": cap}, ensure_ascii=False) + "\n")
  head = "image,caption\n" if fmt == "csv" else ""
  f.write_bytes((head + line(0, "fine")).encode() + line(1, "café").encode("latin-1"))
  n = 3 if fmt == "csv" else 2
  with pytest.raises(ValueError, match=rf"c\.{fmt}: line {n} is not UTF-8 .*caf\\xe9"):
    image_folder.build_image_text_folder(str(f), data_dir=ddir)
  f.write_text(head + line(0, "fine") + line(1, " \t "))
  with pytest.raises(ValueError, match=rf"c\.{fmt}: row 2: caption is empty or whitespace"):
    image_folder.build_image_text_folder(str(f), data_dir=ddir)


def test_image_folder_wrong_header_is_shown(tmp_path, rng):
  _make_folder(tmp_path, rng, n=1)
  f = tmp_path / "captions.csv"
  f.write_text("img,text\n0.png,hello\n")
  with pytest.raises(ValueError, match=r"captions\.csv: header is \['img', 'text'\]; "
                                       r"expected image,caption\[,split\]$"):
    image_folder.build_image_text_folder(str(f), data_dir=str(tmp_path / "tfds"))
  f.write_text('{"image": "0.png", "text": "hello"}\n')
  f.rename(tmp_path / "c.jsonl")
  with pytest.raises(ValueError, match=r"c\.jsonl: row 1 has no 'caption' field; "
                                       r"got keys \['image', 'text'\]"):
    image_folder.build_image_text_folder(str(tmp_path / "c.jsonl"), data_dir=str(tmp_path / "tfds"))


# ---------------------------------------------------------------- the pipeline against its source
#
# A dataset whose pixels name the example: image i is 32x32, red and green uniform over the whole
# image and encoding i (8 levels each), blue 40 on the left half and 215 on the right. A crop or a
# bicubic resize keeps red and green (uniform), so i survives any augmentation; the blue columns
# tell a mirrored image (bright on the left) and a crop (one half only, or an off-centre edge).

N_COLOURS = 61      # prime: not a multiple of any batch size or process count below
_DARK, _BRIGHT = 40, 215


def _colour_image(i: int) -> np.ndarray:
  img = np.empty((32, 32, 3), np.uint8)
  img[..., 0], img[..., 1] = 16 + 32 * (i // 8), 16 + 32 * (i % 8)
  img[:, :16, 2], img[:, 16:, 2] = _DARK, _BRIGHT
  return img


def _colour_caption(i: int) -> str:
  return f"colour card {i}"


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
  """The train split of N_COLOURS colour cards built by build_image_text_folder, all in 'train'."""
  root = tmp_path_factory.mktemp("colours")
  with open(root / "captions.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["image", "caption"])
    for i in range(N_COLOURS):
      Image.fromarray(_colour_image(i)).save(root / f"{i}.png")
      w.writerow([f"{i}.png", _colour_caption(i)])
  ddir = str(root / "tfds")
  name = image_folder.build_image_text_folder(str(root / "captions.csv"), data_dir=ddir,
                                              name="colour_cards", image_size=32, test_fraction=0)
  return pipeline.get_source(name, "train", data_dir=ddir)


def _uint8(images: np.ndarray) -> np.ndarray:
  """int64 levels of the train pipeline's uint8 images, or of the evaluation arrays' floats
  in [-1, 1] (back to the uint8 levels they came from)."""
  if images.dtype == np.uint8:
    return images.astype(np.int64)
  return np.round((images.astype(np.float64) + 1) * 127.5).astype(np.int64)


def _card_index(image: np.ndarray) -> int:
  """Which colour card a (possibly cropped, flipped, resized) pipeline image shows."""
  u = _uint8(image)
  a, b = (int(np.round((np.median(u[..., c]) - 16) / 32)) for c in (0, 1))
  assert 0 <= a < 8 and 0 <= b < 8 and np.abs(u[..., 0] - (16 + 32 * a)).max() <= 2, "not a card"
  return 8 * a + b


def _orientation(image: np.ndarray) -> str:
  """'upright' (dark left, bright right), 'mirrored', or 'one half' (a crop inside one half)."""
  blue = _uint8(image)[..., 2].mean(0)
  if blue[-1] - blue[0] > 100:
    return "upright"
  if blue[0] - blue[-1] > 100:
    return "mirrored"
  return "one half"


def _batches(it, n):
  return [next(it) for _ in range(n)]


def test_pipeline_keeps_each_caption_with_its_image_under_flip_and_crop(colours, tok, rng):
  """Every augmented image still shows the card its caption names; flips and crops do happen."""
  want_text = tok.encode([_colour_caption(i) for i in range(N_COLOURS)], 12)
  seed = int(rng.integers(2**31))
  it = _iterator(colours, tok, global_batch_size=16, image_size=16, flip=True, augment=True,
                 crop_scale_min=0.05, seed=seed)
  seen, kinds, bright_share = [], [], []
  for b in _batches(it, 8):           # 128 examples: two whole epochs and a bit
    assert b["image"].shape == (16, 16, 16, 3) and "label" not in b
    for image, text in zip(b["image"], b["text"]):
      i = _card_index(image)
      np.testing.assert_array_equal(text, want_text[i], err_msg=f"card {i} has another caption")
      seen.append(i)
      kinds.append(_orientation(image))
      bright_share.append(float((_uint8(image)[..., 2] > 127).mean()))
  assert set(seen) == set(range(N_COLOURS))       # positions 0..121 are two whole epochs
  assert kinds.count("upright") >= 10 and kinds.count("mirrored") >= 10, kinds   # ~55 each
  assert kinds.count("one half") >= 1, kinds       # a crop inside one half (about 14 in 128)
  off_centre = [s for s in bright_share if 0 < s < 1 and abs(s - 0.5) > 0.1]
  assert len(off_centre) >= 10, bright_share       # crops across the edge, off the centre (~60)
  # Without augmentation every card is upright, its edge exactly in the middle.
  b = next(_iterator(colours, tok, global_batch_size=16, image_size=16, augment=False, seed=seed))
  assert [_orientation(x) for x in b["image"]] == ["upright"] * 16
  np.testing.assert_array_equal((_uint8(b["image"])[..., 2] > 127).mean((1, 2)), 0.5)
  for image, text in zip(b["image"], b["text"]):
    np.testing.assert_array_equal(text, want_text[_card_index(image)])


def test_pipeline_workers_give_the_same_batches(colours, tok, rng):
  """data.num_workers=1 (a grain worker process) yields bitwise the batches of num_workers=0, in a
  process whose absl flags were never parsed (a notebook, a script: grain's mp_prefetch reads one).

  One worker, not two: each spawned worker imports JAX and TFDS, 10 s or more apiece on a busy
  2-core machine."""
  kw = dict(global_batch_size=16, image_size=16, flip=True, augment=True, crop_scale_min=0.2,
            seed=int(rng.integers(2**31)))
  want = _batches(_iterator(colours, tok, num_workers=0, **kw), 3)
  it = _iterator(colours, tok, num_workers=1, **kw)
  try:
    got = [{k: np.array(v) for k, v in b.items()} for b in _batches(it, 3)]  # out of shared memory
  finally:
    it.close()
    del it
  for t, (g, w) in enumerate(zip(got, want)):
    assert sorted(g) == sorted(w)
    for k in w:
      np.testing.assert_array_equal(g[k], w[k], err_msg=f"batch {t} {k!r}")


class _Prefix:
  """The first n records of a source (a source of its own: len and [i])."""

  def __init__(self, source, n):
    self.source, self.n = source, n

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    if not 0 <= i < self.n:
      raise IndexError(i)
    return self.source[i]


def _eval_reference(source, tok, image_size, text_len):
  """Each record on its own: PIL bicubic resize to image_size, x * 2/255 - 1 in float64,
  its caption tokenised alone."""
  images, texts, labels = [], [], []
  for i in range(len(source)):
    ex = source[i]
    img = np.asarray(ex["image"])
    if img.shape[:2] != (image_size, image_size):
      img = np.asarray(Image.fromarray(img).resize((image_size, image_size), Image.BICUBIC))
    images.append(img.astype(np.float64) / 127.5 - 1)
    texts.append(tok.encode([ex["text"].decode()], text_len)[0])
    if "label" in ex:
      labels.append(int(ex["label"]))
  return np.stack(images), np.stack(texts), labels


@pytest.mark.parametrize("which", ["digits", "colours"])
def test_make_eval_arrays_matches_the_source(which, sources, colours, tok):
  """Row k of every array is record k of the split, preprocessed alone; none dropped (97 and 61
  records: no batch size divides them)."""
  from tests.reference import assert_close
  if which == "digits":   # 32x32 stored, resized to 24; with labels
    src, size, n = _Prefix(sources["test"], 97), 24, 97
  else:                   # 32x32 stored, kept at 32; no label feature
    src, size, n = colours, 32, N_COLOURS
  got = pipeline.make_eval_arrays(src, data_config(image_size=size, text_len=12), tokenizer=tok)
  images, texts, labels = _eval_reference(src, tok, size, 12)
  assert got["image"].shape == (n, size, size, 3) and got["image"].dtype == np.float32
  assert got["text"].shape == (n, 12) and got["text"].dtype == np.int32
  assert_close(got["image"], images, dtype="float32", name="image")
  np.testing.assert_array_equal(got["text"], texts)
  if which == "digits":
    assert got["label"].dtype == np.int32
    np.testing.assert_array_equal(got["label"], labels)
  else:
    assert "label" not in got
    # TFDS stores the records in its own order; each row is the card its record's caption names,
    # as the builder was given it (32x32, kept as is), and every card is there once.
    cards = [int(src[k]["text"].decode().split()[-1]) for k in range(n)]
    assert sorted(cards) == list(range(N_COLOURS))
    assert [_card_index(x) for x in got["image"]] == cards
    given = np.stack([_colour_image(i) for i in cards]).astype(np.float64) / 127.5 - 1
    np.testing.assert_array_equal(images, given)


def test_pipeline_global_batch_is_the_same_for_1_2_and_4_processes(colours, tok, rng):
  """Global batch t is the same array for 1, 2 and 4 processes: the processes' batches stacked
  in process order (the loop's make_array_from_process_local_data) are bitwise the one-process
  batch, rows, order and augmentations."""
  kw = dict(global_batch_size=16, image_size=16, flip=True, augment=True, crop_scale_min=0.2,
            seed=int(rng.integers(2**31)))
  steps = 6                                   # 96 examples: crosses the epoch boundary at 61
  want = _batches(_iterator(colours, tok, **kw), steps)
  for count in (2, 4):
    local = [_batches(_iterator(colours, tok, process_index=p, process_count=count, **kw), steps)
             for p in range(count)]
    for t in range(steps):
      parts = [local[p][t] for p in range(count)]
      for k in want[t]:
        assert all(part[k].shape[0] == 16 // count for part in parts)
        np.testing.assert_array_equal(np.concatenate([part[k] for part in parts]), want[t][k],
                                      err_msg=f"{count} processes, batch {t}, {k!r}")


@pytest.mark.parametrize("count", [2, 3, 4])
def test_pipeline_process_shards_are_disjoint_and_cover_each_epoch(count, colours, tok, rng):
  """Over each of two epochs the processes' examples are pairwise disjoint and together the
  whole split. The stream is endless, so drop_remainder drops nothing: process p's k-th example
  is global position (k // local) * global_batch + p * local + k % local, and a batch that
  straddles the epoch end holds the end of one epoch and the start of the next."""
  text_index = {tok.encode([_colour_caption(i)], 12)[0].tobytes(): i for i in range(N_COLOURS)}
  global_batch, local = 12, 12 // count
  n_batches = -(-2 * N_COLOURS // global_batch)          # enough for positions < 2 * N
  epochs = [[[] for _ in range(count)] for _ in range(2)]
  seed = int(rng.integers(2**31))
  for p in range(count):
    it = _iterator(colours, tok, global_batch_size=global_batch, process_index=p,
                   process_count=count, augment=False, seed=seed)
    k = 0
    for b in _batches(it, n_batches):
      assert b["image"].shape[0] == b["text"].shape[0] == local
      for image, text in zip(b["image"], b["text"]):
        i = text_index[text.tobytes()]
        assert _card_index(image) == i
        epoch = ((k // local) * global_batch + p * local + k % local) // N_COLOURS
        if epoch < 2:
          epochs[epoch][p].append(i)
        k += 1
  for e, shards in enumerate(epochs):
    for p, shard in enumerate(shards):
      positions = range(e * N_COLOURS, (e + 1) * N_COLOURS)
      mine = sum((x % global_batch) // local == p for x in positions)
      assert len(shard) == mine == len(set(shard)), (e, p)
      for q in range(p):
        assert not set(shard) & set(shards[q]), f"epoch {e}: processes {q} and {p} overlap"
    assert sorted(i for shard in shards for i in shard) == list(range(N_COLOURS)), e


def test_pipeline_batch_larger_than_the_dataset_spans_reshuffled_epochs(colours, tok, rng,
                                                                          capsys):
  """A global batch of 128 over the 61 cards (GradCache's 16,384 over the 1,437 digits): the
  stream runs on through the epochs, each of 61 consecutive positions a permutation of all the
  cards, reshuffled each epoch, every image with its own caption; one line says so."""
  text_index = {tok.encode([_colour_caption(i)], 12)[0].tobytes(): i for i in range(N_COLOURS)}
  it = _iterator(colours, tok, global_batch_size=128, augment=False,
                 seed=int(rng.integers(2**31)))
  assert "larger than the dataset (61 examples)" in capsys.readouterr().out
  stream = []
  for b in _batches(it, 2):                   # positions 0..255: four whole epochs and a bit
    assert b["image"].shape == (128, 32, 32, 3) and b["text"].shape == (128, 12)
    for image, text in zip(b["image"], b["text"]):
      stream.append(text_index[text.tobytes()])
      assert _card_index(image) == stream[-1]
  epochs = [stream[e * N_COLOURS:(e + 1) * N_COLOURS] for e in range(4)]
  for e, order in enumerate(epochs):
    assert sorted(order) == list(range(N_COLOURS)), f"epoch {e} is not a permutation"
  assert len({tuple(order) for order in epochs}) == 4, "an epoch repeats another's order"


class _CountingSource(_Prefix):
  """The whole source, counting the records read."""

  def __init__(self, source):
    super().__init__(source, len(source))
    self.reads = 0

  def __getitem__(self, i):
    self.reads += 1
    return super().__getitem__(i)


def test_pipeline_reads_ahead_a_few_batches_not_a_few_per_example(colours, tok):
  """The read-ahead counts whole local batches: 2 of them (prefetch_batches), not 2 x local
  batches, which at a batch of 16,384 would be 32,768 batches held in memory."""
  src = _CountingSource(colours)
  it = _iterator(src, tok, global_batch_size=8, augment=False)
  next(it)
  deadline = time.time() + 3
  while time.time() < deadline and src.reads < 3 * 8:    # the two read-ahead batches
    time.sleep(0.05)
  time.sleep(0.5)                                        # time to read more, were it allowed
  assert 3 * 8 <= src.reads <= 4 * 8, src.reads          # 2 x 8 read-ahead batches: 136


def test_lazy_eval_images_are_the_stacked_ones_one_slice_at_a_time(rng, tok):
  """make_eval_arrays(lazy_images=True) (what the launcher's evaluator reads): every slice,
  index and np.asarray equal the stacked array bitwise, with a converted checkpoint's
  normalisation too; walking it in batches of 8 allocates about one batch, not the split."""
  import tracemalloc
  n, size = 300, 40
  src = [{"image": rng.integers(0, 256, size=(32, 24 + i % 9, 3), dtype=np.uint8),
          "text": f"card {i}".encode(), "label": i % 7} for i in range(n)]
  for normalize in (None, ((0.1, 0.2, 0.3), (0.5, 0.25, 0.125))):
    cfg = data_config(image_size=size, text_len=8)
    eager = pipeline.make_eval_arrays(src, cfg, tokenizer=tok, normalize=normalize)
    lazy = pipeline.make_eval_arrays(src, cfg, tokenizer=tok, normalize=normalize,
                                     lazy_images=True)
    x = lazy["image"]
    assert isinstance(x, pipeline.EvalImages) and len(x) == n and x.shape == eager["image"].shape
    for sl in (slice(0, 7), slice(290, 400), slice(5, 5)):
      np.testing.assert_array_equal(x[sl], eager["image"][sl])
    np.testing.assert_array_equal(x[-1], eager["image"][-1])
    np.testing.assert_array_equal(np.asarray(x), eager["image"])
    np.testing.assert_array_equal(lazy["text"], eager["text"])
    np.testing.assert_array_equal(lazy["label"], eager["label"])
  with pytest.raises(IndexError):
    x[n]
  # A converted checkpoint's preprocessing (CLIP's centre crop and mean/std), as
  # experiments.evaluate applies it; the crop is not the square resize.
  from mmjax.data.preprocess import OPENAI_MEAN, OPENAI_STD, ImagePrep
  prep = ImagePrep(size, "crop", "bicubic", OPENAI_MEAN, OPENAI_STD)
  cropped = pipeline.make_eval_arrays(src, cfg, tokenizer=tok, lazy_images=True, prep=prep)
  np.testing.assert_array_equal(np.asarray(cropped["image"]),
                                np.stack([prep(e["image"]) for e in src]))
  squashed = ImagePrep(size, "squash", "bicubic", OPENAI_MEAN, OPENAI_STD)
  assert not np.array_equal(cropped["image"][1:2], squashed(src[1]["image"])[None])
  with pytest.raises(ValueError, match="image_size=40 but the checkpoint's preprocessing makes "
                                       "32 px"):
    pipeline.make_eval_arrays(src, cfg, tokenizer=tok, prep=ImagePrep(32))
  tracemalloc.start()
  for i in range(0, n, 8):
    x[i:i + 8].sum()
  peak = tracemalloc.get_traced_memory()[1]
  tracemalloc.stop()
  assert peak < 0.1 * eager["image"].nbytes, (peak, eager["image"].nbytes)
