"""python -m experiments.evaluate: zero-shot classification on a generated image folder and
retrieval on a generated caption dataset, against the same model's embeddings of the whole set
at once and NumPy metrics (float64 class embeddings); the streaming sums; errors."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from experiments import evaluate as cli
from mmjax import convert
from mmjax.data import eval_data
from mmjax.evaluate.zeroshot import ZeroShotCounts
from mmjax.models import two_tower
from tests.open_clip_peer import save_tiny_hf_clip

CLASSES = ["golden_retriever", "tabby cat", "fire truck", "tench", "goose", "zebra"]


@pytest.fixture(scope="module")
def hf_clip(tmp_path_factory):
  return save_tiny_hf_clip(tmp_path_factory.mktemp("hf_clip"))


def image_folder(root, rng, per_class):
  """root/<class>/<i>.png, random sizes and aspect ratios (the preprocessing resizes and crops)."""
  for c, n in zip(CLASSES, per_class):
    (root / c).mkdir(parents=True)
    for i in range(n):
      h, w = rng.integers(20, 60, size=2)
      Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).save(
          root / c / f"{i}.png")
  (root / "notes.txt").write_text("not a class folder")
  return root


def reference_embeddings(ckpt, prepared_images, texts, tok):
  model = two_tower.Model(**ckpt.config)
  img = model.apply({"params": ckpt.params}, jnp.asarray(prepared_images), method="encode_image")
  ids = tok.encode(texts, ckpt.config["text"]["max_len"])
  txt = model.apply({"params": ckpt.params}, jnp.asarray(ids), method="encode_text")
  return np.asarray(img, np.float64), np.asarray(txt, np.float64)


def test_zeroshot_on_an_image_folder_matches_the_whole_set_at_once(hf_clip, rng, tmp_path,
                                                                   capsys):
  per_class = [3, 1, 4, 2, 3, 2]    # 15 images: batches of 4 leave a padded last batch
  root = image_folder(tmp_path / "val", rng, per_class)
  templates = tmp_path / "t.txt"
  templates.write_text("a photo of a {}.\n\nsomething like a {}\n")
  out = tmp_path / "out" / "r.json"
  assert cli.main(["--checkpoint", f"hf:{hf_clip}", "--dataset", f"folder:{root}",
                   "--templates", str(templates), "--batch_size", "4", "--output", str(out),
                   "--no_progress"]) == 0
  result = json.loads(out.read_text())
  assert json.loads(capsys.readouterr().out) == result
  assert (result["task"], result["num_classes"], result["num_templates"]) == (
      "zeroshot_classification", 6, 2)

  # The reference: every image at once, float64 prompt ensembles, ranks by NumPy.
  from mmjax.data import tokenizers
  ckpt = convert.from_hf(hf_clip)
  tok = tokenizers.get_tokenizer("clip")
  folder = eval_data.ImageFolder(root)
  labels = np.array([label for _, label in folder.items])
  images = np.stack([ckpt.preprocess(Image.open(p)) for p, _ in folder.items])
  names = sorted(CLASSES)   # label order: sorted folder names, underscores read as spaces
  prompts = [t.format(n.replace("_", " ")) for n in names
             for t in ("a photo of a {}.", "something like a {}")]
  img, txt = reference_embeddings(ckpt, images, prompts, tok)
  txt /= np.linalg.norm(txt, axis=1, keepdims=True)
  cls = txt.reshape(6, 2, -1).mean(1)
  cls /= np.linalg.norm(cls, axis=1, keepdims=True)
  scores = img @ cls.T
  rank = (scores > scores[np.arange(len(labels)), labels][:, None]).sum(1)
  recall = [np.mean(rank[labels == c] == 0) for c in range(6)]
  want = {"acc1": np.mean(rank == 0), "acc5": np.mean(rank < 5),
          "mean_per_class_recall": np.mean(recall), "n": 15}
  assert result["metrics"] == pytest.approx(want, abs=1e-12)


def test_retrieval_on_a_caption_dataset(hf_clip, rng, tmp_path):
  from mmjax.data.image_folder import build_image_text_folder
  rows = ["image,caption,split"]
  for i in range(7):
    Image.fromarray(rng.integers(0, 256, size=(24, 24, 3), dtype=np.uint8)).save(
        tmp_path / f"{i}.png")
    caption = "a red square" if i in (2, 5) else f"picture number {i}"   # one caption twice
    rows.append(f"{i}.png,{caption},test")
  (tmp_path / "captions.csv").write_text("\n".join(rows) + "\n")
  name = build_image_text_folder(str(tmp_path / "captions.csv"), data_dir=str(tmp_path / "d"),
                                 name="caps", image_size=32)
  result = cli.evaluate(f"hf:{hf_clip}", f"tfds:{name}", data_dir=str(tmp_path / "d"),
                        batch_size=3, progress=False)
  assert result["task"] == "zeroshot_retrieval" and result["metrics"]["n"] == 7

  from mmjax.data import tokenizers
  from mmjax.evaluate.retrieval import retrieval_recall
  ckpt = convert.from_hf(hf_clip)
  ds = eval_data.open_eval_set(f"tfds:{name}", data_dir=str(tmp_path / "d"))
  exs = [ds.source[i] for i in range(len(ds.source))]
  images = np.stack([ckpt.preprocess(e["image"]) for e in exs])
  texts = [e["text"].decode() for e in exs]
  img, txt = reference_embeddings(ckpt, images, texts, tokenizers.get_tokenizer("clip"))
  _, ids = np.unique(texts, return_inverse=True)
  want = retrieval_recall(img, txt, img_ids=ids, txt_ids=ids)
  assert result["metrics"]["image_retrieval_recall@1"] == want["t2i_r1"]
  assert result["metrics"]["text_retrieval_recall@5"] == want["i2t_r5"]
  assert len(set(ids)) == 6


def test_zeroshot_counts_stream_equals_one_batch(rng):
  """Running sums over uneven batches with padding rows == the metrics of all rows at once."""
  scores = rng.normal(size=(50, 7)).astype(np.float32)
  labels = rng.integers(0, 7, size=50)
  labels[:7] = np.arange(7)
  whole = ZeroShotCounts(7)
  whole.update(scores, labels)
  stream = ZeroShotCounts(7)
  for lo, hi in ((0, 13), (13, 14), (14, 50)):
    pad = 5
    s = np.concatenate([scores[lo:hi], rng.normal(size=(pad, 7)).astype(np.float32)])
    lab = np.concatenate([labels[lo:hi], rng.integers(0, 7, size=pad)])
    stream.update(s, lab, valid=np.arange(len(s)) < hi - lo)
  assert stream.result() == whole.result()
  top = np.argsort(-scores, axis=1)
  per_class = [np.mean(top[labels == c, 0] == c) for c in range(7)]
  assert whole.result() == pytest.approx(
      {"acc1": np.mean(top[:, 0] == labels), "acc5": np.mean((top[:, :5] == labels[:, None]).any(1)),
       "mean_per_class_recall": np.mean(per_class), "n": 50})


def test_errors_are_one_line_and_write_nothing(hf_clip, rng, tmp_path, capsys):
  out = tmp_path / "r.json"
  root = image_folder(tmp_path / "val", rng, [1] * 6)
  cases = [
      (["--dataset", str(tmp_path / "nowhere")], "dataset="),
      (["--dataset", f"folder:{root}", "--templates", "fancy"], "templates='fancy': not one of"),
      (["--dataset", f"folder:{tmp_path / 'val' / 'zebra'}"], "has no class subfolders"),
      (["--dataset", f"folder:{root}", "--tokenizer", "nonsense"], "nonsense"),
  ]
  (root / "goose" / "broken.png").write_bytes(b"not a png")
  cases.append((["--dataset", f"folder:{root}"], "broken.png"))
  for args, message in cases:
    code = cli.main(["--checkpoint", f"hf:{hf_clip}", *args, "--output", str(out),
                     "--no_progress"])
    err = capsys.readouterr().err
    assert code == 1 and message in err and err.count("\n") == 1, (args, err)
    assert not out.exists()
  assert eval_data.load_templates("openai")[0].count("{}") == 1
  assert len(eval_data.load_templates("openai")) == 80
  assert len(eval_data.load_templates("simple")) == 7
  names = eval_data.imagenet_classnames()
  assert len(names) == 1000 and names[0] == "tench"
  wnids = [f"n{i:08d}" for i in range(1000)]
  assert eval_data.readable_names(wnids) == names



def test_unwritable_output_keeps_the_result_on_stdout(hf_clip, rng, tmp_path, capsys,
                                                     monkeypatch):
  """--output whose parent is a regular file, or an existing folder: the finished result is on
  stdout, then one line `mmjax: error: --output PATH: reason` and exit 1, no temporary file
  left. '~' in --output is the home folder."""
  root = image_folder(tmp_path / "val", rng, [1] * 6)
  (tmp_path / "afile").write_text("a regular file")
  (tmp_path / "adir").mkdir()
  run = lambda out: cli.main(["--checkpoint", f"hf:{hf_clip}", "--dataset", f"folder:{root}",
                              "--templates", "simple", "--output", out, "--no_progress"])
  for out in (tmp_path / "afile" / "r.json", tmp_path / "adir"):
    code = run(str(out))
    got = capsys.readouterr()
    assert code == 1, out
    assert got.err.startswith(f"mmjax: error: --output {out}: ") and got.err.count("\n") == 1
    result = json.loads(got.out)
    assert result["task"] == "zeroshot_classification" and result["metrics"]["n"] == 6
    assert not list(tmp_path.rglob("*.tmp*")), out
  assert (tmp_path / "afile").read_text() == "a regular file"
  assert list((tmp_path / "adir").iterdir()) == []
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  assert run("~/evals/r.json") == 0
  assert json.loads((tmp_path / "home" / "evals" / "r.json").read_text()) == json.loads(
      capsys.readouterr().out)
  assert not list(tmp_path.rglob("*.tmp*"))


def test_clip_benchmark_webdataset_layout_gives_the_image_folder_result(hf_clip, rng, tmp_path):
  """CLIP_benchmark's webdataset eval layout (<dir>/test/*.tar with KEY.webp and KEY.cls,
  classnames.txt, zeroshot_classification_templates.txt with its '{c}' templates): the same
  images, class names and templates as an image folder (with '{}' templates) give exactly the
  folder's metrics, the dataset's templates by default; a retrieval shard set (txt captions)
  is read as one."""
  import io as io_
  from tests.wds_digits import write_tar
  root = image_folder(tmp_path / "val", rng, [2, 3, 1, 2, 2, 1])
  templates = ["a photo of a {}.", "art of the {}"]
  (tmp_path / "t.txt").write_text("\n".join(templates) + "\n")
  folder = eval_data.ImageFolder(root)
  d = tmp_path / "wds_set"
  (d / "test").mkdir(parents=True)
  (d / "classnames.txt").write_text("\n".join(c.replace("_", " ") for c in folder.classes) + "\n")
  # CLIP_benchmark's own files name the class '{c}' (template.format(c=classname)).
  clip_benchmark_templates = [t.replace("{}", "{c}") for t in templates]
  (d / "zeroshot_classification_templates.txt").write_text(
      "\n".join(clip_benchmark_templates) + "\n")
  items = folder.items
  for s, chunk in enumerate((items[:5], items[5:])):   # two shards
    samples = []
    for i, (path, label) in enumerate(chunk):
      buf = io_.BytesIO()
      Image.open(path).save(buf, "WEBP", lossless=True)
      samples.append((f"s{s}_{i:04d}", {"webp": buf.getvalue(), "cls": str(label).encode()}))
    write_tar(d / "test" / f"{s}.tar", samples)
  common = ["--checkpoint", f"hf:{hf_clip}", "--batch_size", "4", "--no_progress"]
  outs = {}
  for name, args in (("folder", ["--dataset", f"folder:{root}", "--templates",
                                 str(tmp_path / "t.txt")]),
                     ("wds", ["--dataset", f"wds:{d}"])):
    assert cli.main(common + args + ["--output", str(tmp_path / f"{name}.json")]) == 0
    outs[name] = json.loads((tmp_path / f"{name}.json").read_text())
  assert outs["wds"]["metrics"] == outs["folder"]["metrics"]
  assert outs["wds"]["metrics"]["n"] == len(items) and outs["wds"]["templates"] == "dataset"
  ds = eval_data.open_eval_set(f"wds:{d}")
  assert ds.class_names == [c.replace("_", " ") for c in folder.classes]
  assert ds.templates == clip_benchmark_templates
  # Captions instead of labels: a retrieval set, read through a shard spec.
  write_tar(tmp_path / "cap.tar", [(f"{i:04d}", {"png": open(path, "rb").read(),
                                                  "txt": f"caption {i}".encode()})
                                    for i, (path, _) in enumerate(items[:4])])
  ds = eval_data.open_eval_set(f"wds:{tmp_path / 'cap.tar'}")
  assert (ds.class_names, ds.text_key, len(ds.source)) == (None, "text", 4)
  assert ds.source[2]["text"] == "caption 2"
  np.testing.assert_array_equal(ds.source[2]["image"], np.asarray(Image.open(items[2][0]).convert("RGB")))


def test_cli_and_trainer_zeroshot_are_one_code_path(hf_clip, rng, tmp_path, monkeypatch):
  """The same images (the folder, preprocessed as the CLI does), the same params and
  templates: the trainer's Evaluator on in-memory arrays gives the CLI's streamed acc1 / acc5
  as zeroshot_top1 / top5, exactly; both go through evaluators.ZeroShot (counted)."""
  from mmjax.data import tokenizers
  from mmjax.evaluate import Evaluator, evaluators
  from mmjax.objectives import Objective
  import ml_collections
  calls = []
  real = evaluators.ZeroShot.counts
  monkeypatch.setattr(evaluators.ZeroShot, "counts",
                      lambda self, v: calls.append(type(self)) or real(self, v))
  root = image_folder(tmp_path / "val", rng, [3, 2, 4, 1, 3, 2])
  templates = ["a photo of a {}.", "art of the {}"]
  (tmp_path / "t.txt").write_text("\n".join(templates) + "\n")
  result = cli.evaluate(f"hf:{hf_clip}", f"folder:{root}", templates=str(tmp_path / "t.txt"),
                        batch_size=4, progress=False, num_threads=1)
  ckpt = convert.from_hf(hf_clip)
  model = two_tower.Model(**ckpt.config)

  class Towers(Objective):   # the converted model's encoders as an objective's towers
    def features(self, variables, image):
      return model.apply(variables, image, method="encode_image")

    def towers(self):
      return self.features, lambda v, t: model.apply(v, t, method="encode_text")

  folder = eval_data.ImageFolder(root)
  names = [c.replace("_", " ") for c in folder.classes]
  tok = tokenizers.get_tokenizer("clip")
  arrays = {"image": np.stack([ckpt.preprocess(Image.open(p)) for p, _ in folder.items]),
            "text": tok.encode([names[y] for _, y in folder.items], ckpt.config["text"]["max_len"]),
            "label": np.array([y for _, y in folder.items], np.int32)}
  settings = ml_collections.ConfigDict(dict(batch_size=4, retrieval_match="label", knn_k=3,
                                            probe_shots=()))
  ev = Evaluator(Towers(), settings, arrays, tokenizer=tok,
                 text_len=ckpt.config["text"]["max_len"], zeroshot=(names, templates))
  out = ev({"params": ckpt.params})
  assert (out["zeroshot_top1"], out["zeroshot_top5"]) == (result["metrics"]["acc1"],
                                                          result["metrics"]["acc5"])
  assert ev.evaluators["zeroshot"].counts({"params": ckpt.params}).result() == result["metrics"]
  assert calls == [evaluators.ZeroShot] * 3


def test_a_training_run_is_a_checkpoint(data_dir, tmp_path):
  """`--checkpoint workdir:/run` evaluates the run's newest checkpoint with its own tokenizer
  and preprocessing (config.json + model.json): on the run's eval split and templates, the
  command line's acc1 / acc5 are the trainer's final zero-shot numbers; '@STEP' picks an older
  checkpoint (other numbers); a run of an objective without two towers is refused in one line."""
  from mmjax.train import export, loop
  from tests.configs import tiny_config
  run = tmp_path / "run"
  results = loop.train(tiny_config(data_dir, total_steps=6, **{"checkpoint.every": 2,
                                                               "checkpoint.keep": 3}), str(run))
  ckpt = export.load(f"workdir:{run}")
  assert ckpt.tokenizer.startswith("trained:") and ckpt.preprocess.size == 32
  from mmjax.data import digits
  (tmp_path / "t.txt").write_text("\n".join(digits.ZEROSHOT_TEMPLATES) + "\n")   # the run's
  out = cli.evaluate(f"workdir:{run}", "tfds:mmjax_digits", data_dir=data_dir, batch_size=128,
                     templates=str(tmp_path / "t.txt"), progress=False)
  assert out["metrics"]["n"] == 360
  assert (out["metrics"]["acc1"], out["metrics"]["acc5"]) == (
      results["zeroshot_top1"], results["zeroshot_top5"])
  older = export.load(f"workdir:{run}@2")
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(older.params),
                                                      jax.tree.leaves(ckpt.params)))
  mae = tmp_path / "mae"
  loop.train(tiny_config(data_dir, loss="mae", total_steps=3), str(mae))
  with pytest.raises(ValueError, match=r"a config.loss='mae' run; only two-tower runs"):
    export.load(f"workdir:{mae}")
  with pytest.raises(ValueError, match=r"workdir config .*cannot read it"):
    export.load(f"workdir:{tmp_path / 'nothing'}")
