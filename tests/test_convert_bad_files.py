"""Broken checkpoint files (issue 30): a truncated model.safetensors, a config.json of the wrong
shape or values, garbage .pt / .bin files. Each is one ValueError line naming the file (and the
field), and through `python -m experiments.evaluate` one `mmjax: error:` line, exit 1."""

import json
import os
import pickle
import shutil

import pytest
from PIL import Image

from experiments import evaluate as cli
from mmjax import convert
from tests.open_clip_peer import import_transformers, save_tiny_hf_clip

import_transformers()
import torch  # noqa: E402  (after the skip above)


@pytest.fixture(scope="module")
def hf_clip(tmp_path_factory):
  return save_tiny_hf_clip(tmp_path_factory.mktemp("hf_clip"))


def one_line(fn, *args, match: str) -> str:
  with pytest.raises(ValueError) as e:
    fn(*args)
  msg = str(e.value)
  assert "\n" not in msg and match in msg, msg
  return msg


def cli_error(spec: str, dataset: str, *extra: str) -> str:
  """`mmjax: error:` line of the CLI on checkpoint `spec` (exit 1, nothing else on stderr)."""
  import contextlib
  import io
  err = io.StringIO()
  with contextlib.redirect_stderr(err):
    code = cli.main(["--checkpoint", spec, "--dataset", dataset, "--no_progress", *extra])
  text = err.getvalue()
  assert code == 1 and text.startswith("mmjax: error: ") and text.count("\n") == 1, text
  return text


def copy(src, dst):
  shutil.copytree(src, dst)
  return dst


def test_truncated_safetensors_is_named(hf_clip, tmp_path):
  d = copy(hf_clip, tmp_path / "d")
  weights = d / "model.safetensors"
  with open(weights, "r+b") as f:
    f.truncate(os.path.getsize(weights) // 2)
  one_line(convert.from_hf, d, match=f"{weights}: not a readable safetensors file")
  one_line(convert.load, f"hf:{d}", match=f"{weights}: not a readable safetensors file")
  weights.write_bytes(b"")
  one_line(convert.from_hf, d, match=f"{weights}: empty file")
  one_line(convert.load_state_dict, weights, match=f"{weights}: empty file")
  weights.write_bytes(os.urandom(100))
  one_line(convert.load_state_dict, weights, match=f"{weights}: not a readable safetensors")


def write_config(d, cfg):
  (d / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("edit, field", [
    (lambda c: [c], "holds a list, not a JSON object"),
    (lambda c: "x", "holds a str, not a JSON object"),
    (lambda c: {k: v for k, v in c.items() if k != "vision_config"}, "no vision_config"),
    (lambda c: dict(c, vision_config=3), "vision_config=3 is not a JSON object"),
    (lambda c: dict(c, text_config=[1]), "text_config=[1] is not a JSON object"),
    (lambda c: dict(c, projection_dim="big"), "projection_dim='big'"),
])
def test_config_of_the_wrong_shape_is_named(hf_clip, tmp_path, edit, field):
  d = copy(hf_clip, tmp_path / "d")
  write_config(d, edit(json.loads((d / "config.json").read_text())))
  one_line(convert.from_hf, d, match=f"{d / 'config.json'}: {field}")


@pytest.mark.parametrize("tower, key, value, field", [
    ("vision", "hidden_size", "big", "vision_config.hidden_size='big' is not a positive integer"),
    ("vision", "hidden_size", 0, "vision_config.hidden_size=0 is not a positive integer"),
    ("text", "num_hidden_layers", -1, "text_config.num_hidden_layers=-1 is not a positive"),
    ("text", "vocab_size", 2.5, "text_config.vocab_size=2.5 is not a positive integer"),
    ("vision", "num_attention_heads", 5, "vision_config.num_attention_heads=5 does not divide "
                                         "hidden_size=32"),
    ("vision", "patch_size", [8, "x"], "vision_config.patch_size=[8, 'x'] is not a positive"),
    ("vision", "image_size", True, "vision_config.image_size=True is not a positive integer"),
    ("text", "layer_norm_eps", "x", "text_config.layer_norm_eps='x' is not a positive number"),
    ("text", "eos_token_id", "end", "text_config.eos_token_id='end' is not an integer"),
])
def test_config_of_wrong_values_is_named(hf_clip, tmp_path, tower, key, value, field):
  d = copy(hf_clip, tmp_path / "d")
  cfg = json.loads((d / "config.json").read_text())
  cfg[f"{tower}_config"][key] = value
  write_config(d, cfg)
  one_line(convert.from_hf, d, match=f"{d / 'config.json'}: {field}")


def test_config_that_is_not_json_is_named(hf_clip, tmp_path):
  d = copy(hf_clip, tmp_path / "d")
  (d / "config.json").write_text("{not json")
  one_line(convert.from_hf, d, match=f"{d / 'config.json'}: not valid JSON (JSONDecodeError: "
           "Expecting property name enclosed in double quotes: line 1 column 2 (char 1))")
  write_config(d, json.loads((hf_clip / "config.json").read_text()))
  (d / "preprocessor_config.json").write_text("[]")
  one_line(convert.from_hf, d, match=f"{d / 'preprocessor_config.json'}: holds a list")


def garbage_files(tmp_path):
  """(path, what the error says) of files that are not state dicts."""
  out = []
  for suffix in (".pt", ".bin"):
    p = tmp_path / f"random{suffix}"
    p.write_bytes(os.urandom(1000))
    out.append((p, "torch.load(weights_only=True) cannot read it"))
    p = tmp_path / f"empty{suffix}"
    p.write_bytes(b"")
    out.append((p, "empty file"))
  p = tmp_path / "list.pt"
  torch.save([torch.zeros(2), torch.ones(3)], p)
  out.append((p, "holds a list, not a state dict"))
  p = tmp_path / "pickled.bin"   # a plain pickle, not torch.save's zip archive
  p.write_bytes(pickle.dumps({"visual.proj": [1, 2, 3]}))
  out.append((p, "torch.load(weights_only=True) cannot read it (UnpicklingError"))
  p = tmp_path / "zip.pt"
  p.write_bytes(b"PK\x03\x04" + os.urandom(100))
  out.append((p, "torch.load(weights_only=True) cannot read it"))
  return out


def test_garbage_torch_files_are_named(tmp_path):
  for path, what in garbage_files(tmp_path):
    one_line(convert.load_state_dict, path, match=f"{path}: {what}")
    one_line(convert.from_open_clip, path, "ViT-B-32", match=f"{path}: {what}")
    one_line(convert.load, f"open_clip:ViT-B-32:{path}", match=f"{path}: {what}")


def test_a_state_dict_file_of_the_wrong_model_is_named(tmp_path):
  p = tmp_path / "other.pt"
  torch.save({"a.weight": torch.zeros(2)}, p)
  one_line(convert.from_open_clip, p, "ViT-B-32",
           match=f"{p} is not an open_clip 'ViT-B-32' state dict: missing keys")


def test_garbage_pytorch_model_bin_is_named(hf_clip, tmp_path):
  d = copy(hf_clip, tmp_path / "d")
  os.remove(d / "model.safetensors")
  (d / "pytorch_model.bin").write_bytes(os.urandom(500))
  one_line(convert.from_hf, d, match=f"{d / 'pytorch_model.bin'}: torch.load(weights_only=True)")
  torch.save("a string", d / "pytorch_model.bin")
  one_line(convert.from_hf, d, match=f"{d / 'pytorch_model.bin'}: holds a str, not a state dict")
  (d / "model.safetensors.index.json").write_text(json.dumps({"weights": {}}))
  one_line(convert.from_hf, d, match=f"{d / 'model.safetensors.index.json'}: no weight_map")


def image_folder(root):
  for c in ("cat", "dog"):
    (root / c).mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / c / "0.png")
  return f"folder:{root}"


def test_cli_names_the_broken_file(hf_clip, tmp_path):
  data = image_folder(tmp_path / "val")
  d = copy(hf_clip, tmp_path / "d")
  weights = d / "model.safetensors"
  with open(weights, "r+b") as f:
    f.truncate(os.path.getsize(weights) // 2)
  assert f"{weights}: not a readable safetensors file" in cli_error(f"hf:{d}", data)
  e = copy(hf_clip, tmp_path / "e")
  cfg = json.loads((e / "config.json").read_text())
  cfg["vision_config"]["hidden_size"] = "big"
  write_config(e, cfg)
  assert "vision_config.hidden_size='big'" in cli_error(f"hf:{e}", data)
  for path, what in garbage_files(tmp_path):
    assert f"{path}: {what}" in cli_error(f"open_clip:ViT-B-32:{path}", data)


@pytest.mark.parametrize("arg", ["--batch_size", "--limit", "--num_threads"])
@pytest.mark.parametrize("value", ["0", "-3"])
def test_cli_numbers_must_be_positive(arg, value, monkeypatch):
  """Refused before anything is read: the checkpoint and dataset do not exist."""
  monkeypatch.setattr(convert, "load", lambda *a, **k: pytest.fail("loaded a checkpoint"))
  err = cli_error("hf:/nowhere", "/nowhere", arg, value)
  assert err == f"mmjax: error: {arg}={value}: must be a positive integer\n", err
