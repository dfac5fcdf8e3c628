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
