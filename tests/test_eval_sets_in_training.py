"""Evaluation during training on a list of evaluation sets (issue 30 item 2): a run trained from
webdataset shards evaluates a CLIP_benchmark-layout classification set and a multi-caption
retrieval set, each on its own schedule and with its own templates (the weight EMA's beside); each set's metrics land in
metrics.jsonl, TensorBoard and results.json under '<entry>/...', and equal what
`python -m experiments.evaluate` reports for the run's checkpoint on the same files."""

import json

import numpy as np
import pytest

from tests.configs import tiny_config
from tests.test_wds_evalsets import _png, _shards

CLASSES = ["zero", "one", "two"]


def _cb_set(root, rng, n, *, retrieval=False, shard_size=5):
  """CLIP_benchmark's layout written with webdataset's TarWriter: test/{0..}.tar, nshards.txt;
  classnames.txt or dataset_type.txt ('retrieval', several captions a sample)."""
  import webdataset
  (root / "test").mkdir(parents=True)
  shards = range(0, n, shard_size)
  for s, start in enumerate(shards):
    with webdataset.TarWriter(str(root / "test" / f"{s}.tar")) as w:
      for i in range(start, min(n, start + shard_size)):
        sample = {"__key__": f"s{i:07d}", "png": _png(rng)}
        if retrieval:
          sample["txt"] = "\n".join(f"a photo of {CLASSES[(i + k) % 3]} number {i} {k}"
                                    for k in range(1 + i % 3))
        else:
          sample["cls"] = i % 3
        w.write(sample)
  (root / "test" / "nshards.txt").write_text(f"{len(shards)}\n")
  if retrieval:
    (root / "dataset_type.txt").write_text("retrieval\n")
  else:
    (root / "classnames.txt").write_text("\n".join(CLASSES) + "\n")
  return f"wds:{root}"


def _events(path):
  """The Event records of a TensorBoard file (TFRecord framing: length, its CRC, data, CRC)."""
  import struct
  from tensorboardX.proto import event_pb2
  data, i, out = path.read_bytes(), 0, []
  while i < len(data):
    (n,) = struct.unpack("<Q", data[i:i + 8])
    out.append(event_pb2.Event.FromString(data[i + 12:i + 12 + n]))
    i += 12 + n + 4
  return out


def _rows(workdir):
  with open(workdir / "metrics.jsonl") as f:
    return [json.loads(line) for line in f]


def test_a_run_evaluates_a_list_of_sets_each_on_its_schedule(data_dir, rng, tmp_path):
  from experiments import evaluate
  from mmjax.train import loop
  overrides = _shards(rng, tmp_path)
  cls_set = _cb_set(tmp_path / "wds_cls", rng, 13)
  ret_set = _cb_set(tmp_path / "wds_coco", rng, 11, retrieval=True)
  templates = tmp_path / "templates.txt"
  templates.write_text("a photo of {c}.\nart of the {c}\n")
  overrides.update({"total_steps": 4, "checkpoint.every": 4, "ema_decay": 0.5, "evals": {
      "cls": dict(type="zeroshot", dataset=cls_set, every=2, templates=str(templates)),
      "coco": dict(type="retrieval", dataset=ret_set, every=3, batch_size=4),
      "cls_bare": dict(type="zeroshot", dataset=cls_set, every=0, templates=("{c}",))}})
  run = tmp_path / "run"
  loop.train(tiny_config(data_dir, **overrides), str(run))

  by_step = {}
  for row in _rows(run):
    by_step.setdefault(row["step"], {}).update(row)
  has = lambda step, key: key in by_step.get(step, {})
  assert has(2, "cls/zeroshot_top1") and not has(2, "coco/retrieval_i2t_r1"), by_step.get(2)
  assert has(3, "coco/retrieval_i2t_r1") and not has(3, "cls/zeroshot_top1"), by_step.get(3)
  assert has(2, "ema_cls/zeroshot_top1") and has(3, "ema_coco/retrieval_i2t_r1")   # the EMA too
  assert not any(has(s, "cls_bare/zeroshot_top1") for s in (1, 2, 3))   # every=0: the end
  for key in ("cls/zeroshot_top1", "coco/retrieval_t2i_r5", "cls_bare/zeroshot_top1"):
    assert has(4, key), (key, by_step.get(4))
  with open(run / "results.json") as f:
    results = json.load(f)
  assert not any(k.startswith(("zeroshot", "retrieval")) for k in results), results

  tags = {v.tag for path in (run / "tensorboard").glob("events.*")
          for e in _events(path) for v in e.summary.value}
  assert {"cls/zeroshot_top1", "coco/retrieval_i2t_r1"} <= tags, sorted(tags)

  # The same numbers from the command line on the run's checkpoint and the same files.
  def cli(dataset, *extra):
    out = tmp_path / "cli.json"
    assert evaluate.main(["--checkpoint", f"workdir:{run}", "--dataset", dataset,
                          "--output", str(out), "--no_progress", *extra]) == 0
    return json.loads(out.read_text())["metrics"]
  got = cli(cls_set, "--templates", str(templates))
  assert results["cls/zeroshot_top1"] == pytest.approx(got["acc1"], abs=1e-9)
  bare = tmp_path / "bare.txt"
  bare.write_text("{c}\n")
  got = cli(cls_set, "--templates", str(bare))
  assert results["cls_bare/zeroshot_top1"] == pytest.approx(got["acc1"], abs=1e-9)
  got = cli(ret_set)
  for k in (1, 5, 10):
    assert results[f"coco/retrieval_i2t_r{k}"] == pytest.approx(
        got[f"text_retrieval_recall@{k}"], abs=1e-9)
    assert results[f"coco/retrieval_t2i_r{k}"] == pytest.approx(
        got[f"image_retrieval_recall@{k}"], abs=1e-9)
  assert 0 < results["coco/retrieval_t2i_r5"] < 1, results   # a score that could differ


@pytest.mark.parametrize("entry, message", [
    (dict(type="zeroshot", dataset="wds:/nonexistent/x"), r"config\.evals\.e\.dataset='wds:"),
    (dict(type="zeroshot", split="val"), r"config\.evals\.e: split and limit choose part of a"),
    (dict(type="zeroshot", dataset="cifar10"), r"config\.evals\.e\.dataset must be a dataset"),
    (dict(type="zeroshot", dataset="wds:X", limit=0), r"config\.evals\.e\.limit must be None"),
    (dict(type="probe", dataset="CLS"), r"config\.evals\.e\.type='probe' on dataset="),
    (dict(type="zeroshot", dataset="CLS", templates="/no/such/file"),
     r"config\.evals\.e\.templates: templates='/no/such/file'"),
])
def test_bad_eval_set_entries_are_one_line(data_dir, rng, tmp_path, entry, message):
  from mmjax.train import loop
  cls_set = _cb_set(tmp_path / "wds_cls", rng, 4)
  entry = {k: (cls_set if v == "CLS" else v) for k, v in entry.items()}
  with pytest.raises(ValueError, match=message) as e:
    loop.train(tiny_config(data_dir, total_steps=3, evals={"e": entry}), str(tmp_path / "run"))
  assert "\n" not in str(e.value)
  assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_finetuned_run_exports_and_every_tool_gives_its_scores(data_dir, rng, tmp_path,
                                                                monkeypatch):
  """Issue 30's loop end to end: a CLIP model (transformers' save_pretrained) fine-tuned on
  webdataset shards with a classification and a retrieval set evaluated during training;
  exported by `python -m experiments.export` to a Hugging Face directory (transformers'
  AutoModel and AutoProcessor load it; experiments.evaluate on it gives the run's scores) and
  to open_clip (CLIP_benchmark's own command line on it gives the run's scores)."""
  from experiments import evaluate, export
  from mmjax.train import loop
  from tests.open_clip_peer import import_transformers, save_tiny_hf_clip
  from tests.test_clip_benchmark import _clip_benchmark, open_clip
  transformers = import_transformers()
  hf = save_tiny_hf_clip(tmp_path / "hf", seed=int(rng.integers(1000)))
  overrides = _shards(rng, tmp_path)
  del overrides["data.vocab_size"]   # the checkpoint's tokenizer
  cls_set = _cb_set(tmp_path / "wds_cls", rng, 13)
  (tmp_path / "wds_cls" / "zeroshot_classification_templates.txt").write_text(
      "a photo of {c}.\na drawing of the number {c}\n")
  ret_set = _cb_set(tmp_path / "wds_coco", rng, 11, retrieval=True)
  overrides.update({"loss": "clip", "init_from.checkpoint": f"hf:{hf}", "batch_size": 8,
                    "total_steps": 2, "checkpoint.every": 2, "evals": {
                        "cls": dict(type="zeroshot", dataset=cls_set, every=0),
                        "coco": dict(type="retrieval", dataset=ret_set, every=0)}})
  run = tmp_path / "run"
  loop.train(tiny_config(data_dir, **overrides), str(run))
  results = json.loads((run / "results.json").read_text())

  out = tmp_path / "export_hf"
  assert export.main(["--checkpoint", f"workdir:{run}", "--to", f"hf:{out}"]) == 0
  transformers.AutoModel.from_pretrained(out)
  transformers.AutoProcessor.from_pretrained(out)

  def mmjax_cli(dataset):
    path = tmp_path / "cli.json"
    assert evaluate.main(["--checkpoint", f"hf:{out}", "--dataset", dataset, "--output",
                          str(path), "--no_progress"]) == 0
    return json.loads(path.read_text())["metrics"]

  oc = tmp_path / "oc_export"
  assert export.main(["--checkpoint", f"workdir:{run}", "--to", f"open_clip:{oc}"]) == 0
  open_clip.add_model_config(str(oc / "oc_export.json"))
  weights = str(oc / "open_clip_model.safetensors")

  def benchmark(root, *extra):
    return _clip_benchmark(monkeypatch, tmp_path, root, weights, *extra, model="oc_export")

  got, cb = mmjax_cli(cls_set), benchmark(tmp_path / "wds_cls")
  assert results["cls/zeroshot_top1"] == pytest.approx(got["acc1"], abs=1e-9)
  assert cb["acc1"] == pytest.approx(got["acc1"], abs=1e-6)
  assert cb["mean_per_class_recall"] == pytest.approx(got["mean_per_class_recall"], abs=1e-6)
  got = mmjax_cli(ret_set)
  cb = benchmark(tmp_path / "wds_coco", "--task", "zeroshot_retrieval")
  for k in (1, 5, 10):
    assert results[f"coco/retrieval_i2t_r{k}"] == pytest.approx(
        got[f"text_retrieval_recall@{k}"], abs=1e-9)
    for side in ("image", "text"):
      key = f"{side}_retrieval_recall@{k}"
      assert cb[key] == pytest.approx(got[key], abs=1e-6), (key, cb, got)
  assert 0 < results["cls/zeroshot_top1"] < 1 or 0 < results["coco/retrieval_t2i_r1"] < 1
