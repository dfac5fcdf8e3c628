"""python -m experiments.export: a tiny CLIP run fine-tuned through the launcher from a
transformers CLIPModel (with a weight EMA) exported to Hugging Face (transformers' model and
processor, experiments.evaluate) and open_clip (a model built from the written JSON), their
embeddings against mmjax's of the run; a tiny SigLIP run to big_vision (read back to the same
params); the EMA; one-line refusals that write nothing."""

import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from experiments import evaluate, export as cli
from mmjax import convert
from mmjax.convert import common
from mmjax.data.tokenizers import get_tokenizer
from mmjax.models import two_tower
from mmjax.train import export, loop
from tests.configs import tiny_config
from tests.open_clip_peer import import_open_clip, import_transformers, save_tiny_hf_clip

CAPTION = "a handwritten seven"


def clip_config(data_dir, hf, **overrides):
  """A CLIP run started from a tiny transformers CLIPModel (`hf`, its folder)."""
  return tiny_config(data_dir, **{"loss": "clip", "init_from.checkpoint": f"hf:{hf}",
                                  "batch_size": 8, **overrides})


@pytest.fixture(scope="module")
def hf_clip(tmp_path_factory):
  return save_tiny_hf_clip(tmp_path_factory.mktemp("hf_clip"))


@pytest.fixture(scope="module")
def clip_run(tmp_path_factory, data_dir, hf_clip):
  """3 steps, weight EMA kept."""
  run = tmp_path_factory.mktemp("clip_run") / "run"
  loop.train(clip_config(data_dir, hf_clip, **{"total_steps": 3, "checkpoint.every": 3,
                                               "optim.warmup_steps": 1, "ema_decay": 0.5}),
             str(run))
  return run


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory, data_dir, hf_clip):
  """1 step, no EMA."""
  run = tmp_path_factory.mktemp("plain_run") / "run"
  loop.train(clip_config(data_dir, hf_clip, **{"total_steps": 1, "checkpoint.every": 1,
                                               "optim.warmup_steps": 0}), str(run))
  return run


@pytest.fixture(scope="module")
def hf_siglip(tmp_path_factory):
  """A small random transformers SiglipModel's folder."""
  from tests.test_convert_hf import random_hf
  path = tmp_path_factory.mktemp("hf_siglip")
  random_hf("siglip").save_pretrained(path)
  return path


@pytest.fixture
def image(rng):
  return Image.fromarray(rng.integers(0, 256, size=(37, 51, 3), dtype=np.uint8))


def mmjax_embeddings(ckpt, image):
  """mmjax's unit-norm embeddings of `image` and CAPTION, with the checkpoint's own
  preprocessing and tokenizer: ([1, d], [1, d])."""
  model = two_tower.Model(**ckpt.config)
  ids = get_tokenizer(ckpt.tokenizer).encode([CAPTION], ckpt.config["text"]["max_len"])
  return (np.asarray(model.apply(ckpt.variables, ckpt.preprocess(np.asarray(image))[None],
                                 method="encode_image")),
          np.asarray(model.apply(ckpt.variables, ids, method="encode_text")))


def unit(x) -> np.ndarray:
  x = x.detach().numpy()
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def run_cli(*args) -> int:
  return cli.main(list(map(str, args)))


def test_hf_export_loads_in_transformers_and_evaluates(clip_run, image, rng, tmp_path, capsys):
  """AutoModel and AutoProcessor load the folder; transformers' embeddings of the processor's
  pixel_values and input_ids are the run's; experiments.evaluate gives the run's numbers."""
  transformers = import_transformers()
  out = tmp_path / "hf"
  assert run_cli("--checkpoint", f"workdir:{clip_run}", "--to", f"hf:{out}") == 0
  said = capsys.readouterr().out
  assert said.startswith(f"mmjax: wrote hf:{out} (") and said.count("\n") == 1
  assert {"config.json", "model.safetensors", "preprocessor_config.json", "vocab.json",
          "merges.txt", "tokenizer_config.json"} <= set(os.listdir(out))
  assert not list(tmp_path.glob("*.tmp*"))
  model = transformers.AutoModel.from_pretrained(out).eval()
  proc = transformers.AutoProcessor.from_pretrained(out, backend="pil")
  ckpt = export.load(f"workdir:{clip_run}")
  got = proc(text=[CAPTION], images=image, return_tensors="pt", padding="max_length",
             max_length=ckpt.config["text"]["max_len"])
  import torch
  with torch.no_grad():
    both = model(**got)   # image_embeds, text_embeds: projected, unit norm
  img, txt = unit(both.image_embeds), unit(both.text_embeds)
  want_img, want_txt = mmjax_embeddings(ckpt, image)
  np.testing.assert_allclose(img, want_img, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(txt, want_txt, rtol=1e-5, atol=1e-5)

  from tests.test_evaluate_cli import image_folder
  root = image_folder(tmp_path / "val", rng, [2, 1, 1, 2, 1, 1])
  results = []
  for spec in (f"hf:{out}", f"workdir:{clip_run}"):
    assert evaluate.main(["--checkpoint", spec, "--dataset", f"folder:{root}", "--templates",
                          "simple", "--batch_size", "4", "--no_progress", "--num_threads",
                          "1"]) == 0
    results.append(json.loads(capsys.readouterr().out))
  assert results[0]["metrics"]["n"] == 8
  assert results[0]["metrics"] == pytest.approx(results[1]["metrics"], abs=1e-12)


def test_open_clip_export_builds_from_its_json(clip_run, image, tmp_path, capsys):
  """open_clip.add_model_config(NAME.json) + create_model(NAME, pretrained=the safetensors),
  and create_model('local-dir:DIR'): encode_image / encode_text (open_clip's tokenizer) are the
  run's embeddings."""
  open_clip = import_open_clip()
  import torch
  out = tmp_path / "tiny-clip-ft"
  assert run_cli("--checkpoint", f"workdir:{clip_run}", "--to", f"open_clip:{out}") == 0
  assert "open_clip model name 'tiny-clip-ft'" in capsys.readouterr().out
  ckpt = export.load(f"workdir:{clip_run}")
  want_img, want_txt = mmjax_embeddings(ckpt, image)
  open_clip.add_model_config(out / "tiny-clip-ft.json")
  named = open_clip.create_model("tiny-clip-ft", pretrained=str(out / cli.OPEN_CLIP_WEIGHTS))
  local = open_clip.create_model(f"local-dir:{out}")
  pixels = torch.from_numpy(ckpt.preprocess(np.asarray(image)).transpose(2, 0, 1)[None].copy())
  tokens = open_clip.get_tokenizer("tiny-clip-ft")([CAPTION])
  for model in (named, local):
    with torch.no_grad():
      np.testing.assert_allclose(unit(model.eval().encode_image(pixels)), want_img,
                                 rtol=1e-5, atol=1e-5)
      np.testing.assert_allclose(unit(model.encode_text(tokens)), want_txt, rtol=1e-5,
                                 atol=1e-5)
  assert local.visual.preprocess_cfg["mean"] == list(ckpt.preprocess.mean)


def test_big_vision_export_reads_back_to_the_same_params(hf_siglip, tmp_path, capsys):
  """A SigLIP checkpoint (a transformers SiglipModel's folder) -> .npz: from_big_vision reads
  back its layout and its params, bitwise. (mmjax's own text tower masks padding, which
  big_vision's does not: a run from scratch is refused, as a CLIP run is.)"""
  out = tmp_path / "bv" / "siglip.npz"
  assert run_cli("--checkpoint", f"hf:{hf_siglip}", "--to", f"big_vision:{out}") == 0
  assert capsys.readouterr().out.startswith(f"mmjax: wrote big_vision:{out} (")
  ckpt = convert.from_hf(hf_siglip)
  back = convert.from_big_vision(out)
  assert common.layout_mismatches(back.config, ckpt.config, "the source's") == []
  assert jax.tree.structure(back.params) == jax.tree.structure(ckpt.params)
  jax.tree.map(np.testing.assert_array_equal, back.params, ckpt.params)
  assert os.listdir(out.parent) == ["siglip.npz"]


def test_ema_exports_the_weight_average(clip_run, plain_run, tmp_path, capsys):
  """--ema writes TrainState.params_ema (read here from the orbax checkpoint itself), which
  differs from the params; a run without EMA, or a converter's spec, is refused in one line."""
  import orbax.checkpoint as ocp
  with ocp.CheckpointManager(clip_run / "checkpoints") as manager:
    state = manager.restore(manager.latest_step(), args=ocp.args.Composite(
        state=ocp.args.StandardRestore()))["state"]
  out = tmp_path / "ema"
  assert run_cli("--checkpoint", f"workdir:{clip_run}", "--ema", "--to", f"hf:{out}") == 0
  assert "from the weight EMA of workdir:" in capsys.readouterr().out
  got = convert.from_hf(out).params
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=0), got,
               state["params_ema"])
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(got),
                                                      jax.tree.leaves(state["params"])))
  for spec, message in ((f"workdir:{plain_run}", "has no weight EMA"),
                        (f"hf:{out}", "only a training run")):
    assert run_cli("--checkpoint", spec, "--ema", "--to", f"hf:{tmp_path / 'x'}") == 1
    err = capsys.readouterr().err
    assert err.startswith("mmjax: error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "x").exists()


def test_refusals_are_one_line_and_write_nothing(clip_run, hf_siglip, tmp_path, capsys,
                                                 monkeypatch):
  """A missing workdir, an unknown --to kind, an occupied target without --overwrite and
  layouts the target cannot express: `mmjax: error: ...`, exit 1, nothing new on disk. A
  write failing half-way leaves no temporary files and the old target as it was; --overwrite
  replaces; '~' is the home folder."""
  taken = tmp_path / "taken"
  taken.mkdir()
  (taken / "keep.txt").write_text("mine")
  cases = [
      (f"workdir:{tmp_path / 'nowhere'}", f"hf:{tmp_path / 'a'}", "cannot read it"),
      (f"workdir:{clip_run}", f"onnx:{tmp_path / 'a'}", "expected hf:/out_dir"),
      (f"workdir:{clip_run}", f"hf:{taken}", "exists and is not empty; pass --overwrite"),
      (f"workdir:{clip_run}", f"big_vision:{tmp_path / 'a.npz'}", "img/pos_embedding holds 17"),
      (f"hf:{hf_siglip}", f"open_clip:{tmp_path / 'a'}", "a SigLIP model"),
  ]
  for spec, to, message in cases:
    assert run_cli("--checkpoint", spec, "--to", to) == 1, to
    err = capsys.readouterr().err
    assert err.startswith("mmjax: error: ") and message in err and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"], to
  assert (taken / "keep.txt").read_text() == "mine"

  def disk_full(*args, **kwargs):   # after the tokenizer files and config.json are written
    raise OSError(28, "No space left on device")
  from mmjax.convert import hf as hf_lib
  with monkeypatch.context() as m:
    m.setattr(hf_lib, "save_file", disk_full)
    assert run_cli("--checkpoint", f"workdir:{clip_run}", "--to", f"hf:{taken}",
                   "--overwrite") == 1
  err = capsys.readouterr().err
  assert err.startswith("mmjax: error: ") and "No space left" in err and err.count("\n") == 1
  assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
  assert os.listdir(taken) == ["keep.txt"]
  monkeypatch.setenv("HOME", str(tmp_path))
  assert run_cli("--checkpoint", f"workdir:{clip_run}", "--to", "open_clip:~/taken",
                 "--overwrite") == 0
  assert sorted(os.listdir(taken)) == sorted([cli.OPEN_CLIP_WEIGHTS, cli.OPEN_CLIP_CONFIG,
                                              "taken.json"])
  assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
