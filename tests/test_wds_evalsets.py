"""Evaluation shard sets (issue 30): a classification set (image + cls, no captions) in the
launcher; a retrieval set with a sample lacking its caption, fewer class names than labels and
unbalanced braces in a shard spec, in the launcher and in `python -m experiments.evaluate`:
one line naming the file, the sample or the field."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from tests.configs import tiny_config
from tests.wds_digits import write_tar

NAMES = ["zero", "one", "two"]


def _png(rng) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(rng.integers(0, 256, size=(20, 20, 3), dtype=np.uint8)).save(buf, "PNG")
  return buf.getvalue()


def _sample(rng, i, *, txt=True, cls=True) -> tuple:
  m = {"png": _png(rng)}
  if txt:
    m["txt"] = f"a photo of {NAMES[i % 3]} number {i}".encode()
  if cls:
    m["cls"] = str(i % 3).encode()
  return f"{i:06d}", m


def _shards(rng, tmp_path, *, eval_txt=False, names=NAMES, eval_cls=lambda i: i % 3,
            drop_txt=None):
  """train/0.tar (png, txt, cls) and test/0.tar (png, cls[, txt]), classnames.txt in test/."""
  (tmp_path / "train").mkdir()
  (tmp_path / "test").mkdir()
  write_tar(tmp_path / "train" / "0.tar", [_sample(rng, i) for i in range(24)])
  test = []
  for i in range(9):
    key, m = _sample(rng, i, txt=eval_txt)
    m["cls"] = str(eval_cls(i)).encode()
    if i == drop_txt:
      del m["txt"]
    test.append((key, m))
  write_tar(tmp_path / "test" / "0.tar", test)
  (tmp_path / "test" / "classnames.txt").write_text("\n".join(names) + "\n")
  return {"data.name": "wds", "data.shards": str(tmp_path / "train" / "*.tar"),
          "data.eval_shards": str(tmp_path / "test" / "*.tar"), "total_steps": 2,
          "checkpoint.every": 2, "optim.warmup_steps": 1, "data.vocab_size": 300}


def test_launcher_evaluates_zeroshot_on_a_classification_set_and_skips_retrieval(
    data_dir, rng, tmp_path, capsys):
  from mmjax.train import loop
  overrides = _shards(rng, tmp_path)
  loop.train(tiny_config(data_dir, **overrides), str(tmp_path / "run"))
  with open(tmp_path / "run" / "results.json") as f:
    results = json.load(f)
  flat = json.dumps(results)
  assert "zeroshot_top1" in flat and "retrieval" not in flat, results
  out = capsys.readouterr().out
  assert sum("retrieval is skipped" in line for line in out.splitlines()) == 1, out


def test_launcher_names_classnames_and_largest_label(data_dir, rng, tmp_path):
  from mmjax.train import loop
  overrides = _shards(rng, tmp_path, eval_cls=lambda i: i % 5)
  with pytest.raises(ValueError) as e:
    loop.train(tiny_config(data_dir, **overrides), str(tmp_path / "run"))
  msg = str(e.value)
  assert str(tmp_path / "test" / "classnames.txt") in msg and "label 4" in msg, msg
  assert "\n" not in msg


def test_launcher_names_the_shard_and_key_of_a_sample_lacking_its_caption(data_dir, rng,
                                                                           tmp_path):
  from mmjax.train import loop
  overrides = _shards(rng, tmp_path, eval_txt=True, drop_txt=4)
  with pytest.raises(ValueError) as e:
    loop.train(tiny_config(data_dir, **overrides), str(tmp_path / "run"))
  msg = str(e.value)
  assert str(tmp_path / "test" / "0.tar") in msg and "'000004'" in msg and "\n" not in msg, msg


def test_launcher_names_the_field_for_unbalanced_braces(data_dir, rng, tmp_path):
  from mmjax.train import loop
  overrides = _shards(rng, tmp_path)
  overrides["data.shards"] = str(tmp_path / "train" / "{0..1.tar")
  with pytest.raises(ValueError) as e:
    loop.train(tiny_config(data_dir, **overrides), str(tmp_path / "run"))
  msg = str(e.value)
  assert msg.startswith("config.data.shards=") and "brace" in msg and "\n" not in msg, msg


def test_expand_shards_unbalanced_braces_names_the_field():
  from mmjax.data import wds
  for spec in ("/data/{00000..00010.tar", "/data/00000..00010}.tar"):
    with pytest.raises(ValueError, match=r"^config\.data\.shards='/data/.*unbalanced brace"):
      wds.expand_shards(spec, field="config.data.shards")


@pytest.fixture(scope="module")
def hf_clip(tmp_path_factory):
  from tests.open_clip_peer import save_tiny_hf_clip
  return save_tiny_hf_clip(tmp_path_factory.mktemp("hf_clip"))


def _cli(hf_clip, dataset, capsys):
  from experiments import evaluate as cli
  code = cli.main(["--checkpoint", f"hf:{hf_clip}", "--dataset", dataset, "--no_progress",
                   "--batch_size", "4"])
  return code, capsys.readouterr().err


def test_cli_retrieval_set_with_a_sample_lacking_its_caption(hf_clip, rng, tmp_path, capsys):
  samples = [_sample(rng, i, cls=False) for i in range(6)]
  del samples[3][1]["txt"]
  shard = write_tar(tmp_path / "cap.tar", samples)
  code, err = _cli(hf_clip, f"wds:{shard}", capsys)
  assert code == 1 and err.count("\n") == 1, err
  assert err.startswith("mmjax: error: ") and shard in err and "'000003'" in err, err
  assert "txt" in err, err


def test_cli_fewer_class_names_than_labels(hf_clip, rng, tmp_path, capsys):
  _shards(rng, tmp_path, eval_cls=lambda i: i % 5)
  code, err = _cli(hf_clip, f"wds:{tmp_path / 'test' / '0.tar'}", capsys)
  assert code == 1 and err.count("\n") == 1, err
  assert str(tmp_path / "test" / "classnames.txt") in err and "label 4" in err, err


def test_cli_unbalanced_braces_name_the_dataset_argument(hf_clip, tmp_path, capsys):
  code, err = _cli(hf_clip, f"wds:{tmp_path}/{{0..3.tar", capsys)
  assert code == 1 and err.count("\n") == 1, err
  assert err.startswith("mmjax: error: --dataset=") and "brace" in err, err


def _cb_layout(tmp_path, rng, *, shards=3, per=4, txt=None, cls=True, kind=None, names=NAMES,
               nshards=None):
  """CLIP_benchmark's layout: <root>/test/{0..}.tar + nshards.txt, classnames.txt and
  dataset_type.txt in <root>; txt(i) -> the sample's .txt text or None."""
  import webdataset
  root = tmp_path / "wds_set"
  (root / "test").mkdir(parents=True)
  for s in range(shards):
    with webdataset.TarWriter(str(root / "test" / f"{s}.tar")) as w:
      for j in range(per):
        i = s * per + j
        sample = {"__key__": f"s{i:07d}", "png": _png(rng)}
        if cls:
          sample["cls"] = i % len(names)
        if txt is not None and txt(i) is not None:
          sample["txt"] = txt(i)
        w.write(sample)
  (root / "test" / "nshards.txt").write_text(f"{shards if nshards is None else nshards}\n")
  (root / "classnames.txt").write_text("\n".join(names) + "\n")
  if kind:
    (root / "dataset_type.txt").write_text(kind + "\n")
  return root


def test_nshards_txt_picks_the_shards(rng, tmp_path):
  """Only {0..N-1}.tar of nshards.txt are read (a stray 3.tar is not), in numeric order."""
  import shutil
  from mmjax.data import eval_data
  root = _cb_layout(tmp_path, rng, shards=3, nshards=2)
  shutil.copy(root / "test" / "0.tar", root / "test" / "10.tar")
  ds = eval_data.open_eval_set(f"wds:{root}")
  assert len(ds.source) == 8 and ds.class_names == NAMES
  assert [ds.source.meta(i)["label"] for i in range(8)] == [i % 3 for i in range(8)]
  (root / "test" / "nshards.txt").write_text("5\n")
  with pytest.raises(ValueError, match=r"nshards.txt says 5 shards, but 2 are missing"):
    eval_data.open_eval_set(f"wds:{root}")


def test_dataset_type_txt_decides_the_task(rng, tmp_path):
  """'retrieval' with .cls labels and class names beside: still a retrieval set, several
  captions per sample (one per line); 'multilabel' is refused naming the file."""
  from mmjax.data import eval_data
  root = _cb_layout(tmp_path, rng, kind="retrieval",
                    txt=lambda i: "\n".join(f"caption {i} {k}" for k in range(1 + i % 3)))
  ds = eval_data.open_eval_set(f"wds:{root}")
  assert ds.class_names is None and ds.text_key == "text" and ds.label_key is None
  from mmjax.data.preprocess import ImagePrep
  batch = next(eval_data.eval_batches(ds, ImagePrep(16), 5, num_threads=1))
  assert batch["text"][:3] == [["caption 0 0"], ["caption 1 0", "caption 1 1"],
                               ["caption 2 0", "caption 2 1", "caption 2 2"]]
  (root / "dataset_type.txt").write_text("multilabel\n")
  with pytest.raises(ValueError, match=r"dataset_type.txt: 'multilabel' is not a dataset type"):
    eval_data.open_eval_set(f"wds:{root}")


def test_a_retrieval_sample_without_captions_is_named(rng, tmp_path):
  from mmjax.data import eval_data
  root = _cb_layout(tmp_path, rng, kind="retrieval", cls=False,
                    txt=lambda i: " \n " if i == 5 else f"caption {i}")
  with pytest.raises(ValueError, match=r"1\.tar, sample 's0000005': its .txt holds no caption"):
    eval_data.open_eval_set(f"wds:{root}")


def test_json_template_files_as_clip_benchmark_reads_them(tmp_path):
  """A list, per-class prompts, either under the dataset's names (then 'imagenet1k');
  a class without prompts or a file of neither kind: one line naming the file."""
  from mmjax.data import eval_data
  keys = eval_data.dataset_keys(f"wds:{tmp_path}/wds_tiny")
  assert keys == ("wds/tiny", "tiny", "wds_tiny")
  per_class = {n: [f"a {n}", f"the {n}"] for n in NAMES}
  cases = [([["a {c}"]], ["a {c}"]),
           ({"tiny": per_class, "imagenet1k": ["x {c}"]}, per_class),
           ({"wds/tiny": ["{c}!"], "tiny": per_class}, ["{c}!"]),
           ({"imagenet1k": ["x {c}"]}, ["x {c}"]),
           (per_class, per_class)]
  for i, (data, want) in enumerate(cases):
    path = tmp_path / f"t{i}.json"
    path.write_text(json.dumps(data[0] if isinstance(data, list) else data))
    assert eval_data.load_templates(str(path), class_names=NAMES, dataset=keys) == want, data
  path = tmp_path / "missing.json"
  path.write_text(json.dumps({"zero": ["a zero"], "one": ["a one"]}))
  with pytest.raises(ValueError, match=r"missing.json.*missing \['two'\]"):
    eval_data.load_templates(str(path), class_names=NAMES, dataset=keys)
  path.write_text("{not json")
  with pytest.raises(ValueError, match=r"missing.json.*not JSON"):
    eval_data.load_templates(str(path), class_names=NAMES)


def test_per_class_prompts_average_per_class():
  """Per-class prompts of different counts: each class the normalised mean of its own."""
  from mmjax.evaluate.zeroshot import class_embeddings
  table = {"a": [1.0, 0.0], "b": [0.0, 1.0], "c": [1.0, 1.0], "d": [3.0, -1.0]}
  encode = lambda prompts: np.array([table[p] for p in prompts]) / np.linalg.norm(
      [table[p] for p in prompts], axis=1, keepdims=True)
  got = class_embeddings(encode, ["x", "y"], {"y": ["c"], "x": ["a", "b", "d"]})
  unit = lambda v: np.asarray(v) / np.linalg.norm(v)
  want_x = unit(unit([1, 0]) + unit([0, 1]) + unit([3, -1]))
  np.testing.assert_allclose(got, [want_x, unit([1, 1])], rtol=1e-6)
  with pytest.raises(ValueError, match=r"no prompts for 1 of 2 classes, e.g. \['y'\]"):
    class_embeddings(encode, ["x", "y"], {"x": ["a"]})


def test_identical_captions_go_with_every_image_that_has_them():
  """Several captions per image: caption j goes with image i when image i has one equal to it
  (copies of a caption tie; CLIP_benchmark's top-k would pick one of them arbitrarily)."""
  from mmjax.evaluate.evaluators import caption_match
  got = caption_match([["a dog", "a cat"], ["a cat"], ["a car"]])
  np.testing.assert_array_equal(got, [[1, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 1]])
