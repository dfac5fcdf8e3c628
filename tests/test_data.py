"""Embedded digits, image-folder builder, tokenizer and the grain pipeline (no TensorFlow)."""

import csv
import json
import os
import sys

import numpy as np
import pytest
from PIL import Image

from mmjax.data import digits, image_folder, pipeline
from mmjax.data.tokenizer import EOS, PAD, Tokenizer, get_tokenizer


@pytest.fixture(scope="module")
def sources(data_dir):
  return {s: pipeline.get_source("mmjax_digits", s, data_dir=data_dir) for s in ("train", "test")}


@pytest.fixture(scope="module")
def tok(sources, data_dir):
  return get_tokenizer(name="mmjax_digits", data_dir=data_dir, vocab_size=512,
                       train_texts_fn=lambda: pipeline.iter_texts(sources["train"]))


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
  a, b = Tokenizer.train(texts, vocab_size=300), Tokenizer.train(texts, vocab_size=300)
  np.testing.assert_array_equal(a.encode(texts, 12), b.encode(texts, 12))
  a.save(str(tmp_path / "t.model"))
  c = Tokenizer.from_file(str(tmp_path / "t.model"))
  np.testing.assert_array_equal(a.encode(texts, 12), c.encode(texts, 12))
  assert os.path.exists(os.path.join(data_dir, "mmjax_digits", "tokenizer-bpe-v512.model"))
  with pytest.raises(ValueError, match="tokenizer_path"):
    get_tokenizer(name="x", data_dir=data_dir, vocab_size=512, train_texts_fn=list,
                  path=str(tmp_path / "missing.model"))


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
  assert b["image"].shape == (8, 32, 32, 3) and b["image"].dtype == np.float32
  assert -1.0 <= b["image"].min() < -0.5 and 0.5 < b["image"].max() <= 1.0
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
