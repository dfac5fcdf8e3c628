"""Hugging Face SiglipModel / CLIPModel directories <-> mmjax: embeddings against transformers
in float64 on random models built from small configs, exact round trips, files, errors."""

import json
import string

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import convert
from mmjax.convert import hf as hf_lib
from mmjax.models import two_tower
from tests.open_clip_peer import import_transformers
from tests.reference import assert_close

transformers = import_transformers()
import torch  # noqa: E402  (after the skip above)

# Widths whose head_dim (16) and token counts (25 patches, 13 tokens) are multiples of nothing.
_VISION = dict(hidden_size=48, intermediate_size=100, num_hidden_layers=2, num_attention_heads=3,
               image_size=40, patch_size=8)
_TEXT = dict(vocab_size=300, hidden_size=32, intermediate_size=72, num_hidden_layers=2,
             num_attention_heads=2, max_position_embeddings=13)


def hf_config(kind: str):
  if kind == "siglip":
    return transformers.SiglipConfig(
        vision_config=_VISION, text_config=dict(_TEXT, projection_size=48))
  # Different activations per tower (erf GELU text, quick GELU image), EOS the last id.
  return transformers.CLIPConfig(
      vision_config=dict(_VISION, hidden_act="quick_gelu"),
      text_config=dict(_TEXT, hidden_act="gelu", eos_token_id=299, bos_token_id=298,
                       pad_token_id=0),
      projection_dim=24)


def random_hf(kind: str):
  """transformers' random init with every vector moved off it (LayerNorms and biases start
  at 1 / 0, where a swapped or dropped one would not show)."""
  cls = transformers.SiglipModel if kind == "siglip" else transformers.CLIPModel
  model = cls(hf_config(kind)).eval()
  with torch.no_grad():
    for p in model.parameters():
      if p.ndim <= 1 or p.shape[:2] == (1, 1):   # vectors, logit scale/bias, the MAP probe
        p.add_(0.2 * torch.randn_like(p))
  return model


def hf_features(model, kind: str, pixels: np.ndarray, ids: np.ndarray):
  """Projected, unnormalised image and text features (float64 when the model is)."""
  with torch.no_grad():
    px, tok = torch.from_numpy(pixels).to(model.dtype), torch.from_numpy(ids)
    img = model.vision_model(pixel_values=px).pooler_output
    txt = model.text_model(input_ids=tok).pooler_output
    if kind == "clip":
      img, txt = model.visual_projection(img), model.text_projection(txt)
  return img.numpy(), txt.numpy()


def mmjax_features(config, params, images_nhwc, ids):
  model = two_tower.Model(**config)
  project = lambda tower: lambda m, x: getattr(m, f"{tower}_proj")(getattr(m, tower)(x)[0])
  img = model.apply({"params": params}, jnp.asarray(images_nhwc), method=project("img"))
  txt = model.apply({"params": params}, jnp.asarray(ids, jnp.int32), method=project("txt"))
  return np.asarray(img), np.asarray(txt)


def random_ids(rng, kind: str, n: int = 3, length: int = 13) -> np.ndarray:
  """CLIP: BOS, random ids below the EOS, EOS, padding (one row full length); SigLIP: any ids."""
  if kind == "siglip":
    return rng.integers(0, 300, size=(n, length)).astype(np.int64)
  ids = np.zeros((n, length), np.int64)
  for row, end in zip(ids, np.r_[length, rng.integers(3, length, size=n - 1)]):
    row[0], row[end - 1] = 298, 299
    row[1:end - 1] = rng.integers(0, 298, size=end - 2)
  return ids


@pytest.mark.parametrize("kind", ["siglip", "clip"])
def test_embeddings_match_transformers(kind, rng, torch_seed, tmp_path):
  """from_hf on a save_pretrained directory: mmjax in float32 within the float32 tolerance of
  transformers in float64 on the same weights; logit scale (and bias) too."""
  hf = random_hf(kind)
  hf.save_pretrained(tmp_path)
  ckpt = convert.from_hf(tmp_path)
  assert ckpt.config["loss"] == kind and ckpt.preprocess.size == 40
  assert ckpt.tokenizer is None    # no tokenizer files saved here
  pixels = rng.normal(size=(2, 3, 40, 40)).astype(np.float32)
  ids = random_ids(rng, kind)
  got = mmjax_features(ckpt.config, ckpt.params, pixels.transpose(0, 2, 3, 1), ids)
  hf = hf.double()
  want = hf_features(hf, kind, pixels.astype(np.float64), ids)
  assert want[0].dtype == np.float64
  scales = [float(np.exp(ckpt.params["t"])), hf.logit_scale.exp().item()]
  assert_close([*got, scales[0]], [*want, scales[1]], dtype=jnp.float32,
               name=[f"{kind} image features", f"{kind} text features", "logit scale"])
  if kind == "siglip":
    np.testing.assert_array_equal(ckpt.params["b"], np.float32(hf.logit_bias.item()))


@pytest.mark.parametrize("kind", ["siglip", "clip"])
def test_round_trips_are_exact(kind, rng, torch_seed, tmp_path):
  """HF -> mmjax -> HF (strict load, bitwise) and mmjax -> HF -> mmjax (bitwise)."""
  hf = random_hf(kind)
  hf.save_pretrained(tmp_path / "a")
  ckpt = convert.from_hf(tmp_path / "a")
  convert.to_hf(ckpt.config, ckpt.params, tmp_path / "b")
  cls = type(hf)
  back, info = cls.from_pretrained(tmp_path / "b", output_loading_info=True)
  assert not any(info.values()), info      # no missing, unexpected or mismatched keys
  want = hf.state_dict()
  for k, v in back.state_dict().items():
    np.testing.assert_array_equal(v.numpy(), want[k].numpy(), err_msg=k)

  shapes = jax.eval_shape(two_tower.Model(**ckpt.config).init, jax.random.PRNGKey(0),
                          jnp.zeros((1, 40, 40, 3)), jnp.zeros((1, 13), jnp.int32))["params"]
  params = jax.tree.map(lambda s: rng.standard_normal(s.shape, np.float32), shapes)
  convert.to_hf(ckpt.config, params, tmp_path / "c")
  again = convert.from_hf(tmp_path / "c")
  assert again.config == ckpt.config
  assert jax.tree.structure(again.params) == jax.tree.structure(params)
  jax.tree.map(np.testing.assert_array_equal, again.params, params)


def test_reads_shards_bin_and_the_preprocessor(rng, torch_seed, tmp_path):
  hf = random_hf("siglip")
  hf.save_pretrained(tmp_path / "one")
  hf.save_pretrained(tmp_path / "shards", max_shard_size="100KB")
  assert (tmp_path / "shards" / "model.safetensors.index.json").exists()
  torch.save(hf.state_dict(), tmp_path / "one" / "pytorch_model.bin")
  want = convert.from_hf(tmp_path / "one").params
  jax.tree.map(np.testing.assert_array_equal, convert.from_hf(tmp_path / "shards").params, want)
  (tmp_path / "one" / "model.safetensors").unlink()
  jax.tree.map(np.testing.assert_array_equal, convert.from_hf(tmp_path / "one").params, want)

  # The image processor's saved settings become the ImagePrep; on an image already at the
  # model's size (no resize) its pixels are transformers'.
  transformers.CLIPImageProcessor(size={"shortest_edge": 40}, crop_size=40, resample=2,
                                  image_mean=[0.1, 0.2, 0.3], image_std=[0.5, 0.6, 0.7],
                                  do_convert_rgb=True).save_pretrained(tmp_path / "one")
  prep = convert.from_hf(tmp_path / "one").preprocess
  assert prep == (40, "crop", "bilinear", (0.1, 0.2, 0.3), (0.5, 0.6, 0.7), "floor")
  image = rng.integers(0, 256, size=(40, 40, 3), dtype=np.uint8)
  proc = transformers.CLIPImageProcessor.from_pretrained(tmp_path / "one")
  want = proc(images=image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
  np.testing.assert_allclose(prep(image), want, rtol=0, atol=1e-5)


def test_bad_directories_are_named(tmp_path, torch_seed):
  with pytest.raises(ValueError, match="has no config.json"):
    convert.from_hf(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
  with pytest.raises(ValueError, match=r"model_type='bert'; mmjax converts \['clip', 'siglip', 'siglip2'\]"):
    convert.from_hf(tmp_path)
  cfg = hf_config("clip").to_dict()
  cfg["text_config"]["eos_token_id"] = 5
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ValueError, match=r"eos_token_id=5; .*vocab_size - 1 \(299\)"):
    convert.from_hf(tmp_path)
  cfg["text_config"]["eos_token_id"] = 299
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ValueError, match="has no model.safetensors"):
    convert.from_hf(tmp_path)

  hf = random_hf("clip")
  hf.save_pretrained(tmp_path / "d")
  from safetensors.numpy import load_file, save_file
  sd = load_file(tmp_path / "d" / "model.safetensors")
  sd["text_model.embeddings.token_embedding.weight"] = np.zeros((301, 32), np.float32)
  del sd["vision_model.pre_layrnorm.bias"]
  save_file(sd, tmp_path / "d" / "model.safetensors")
  with pytest.raises(ValueError, match=r"missing keys: \['vision_model.pre_layrnorm.bias'\]; "
                                       r"wrong shapes: \['text_model.embeddings.token_embedding"
                                       r".weight: \(301, 32\) \(want \(300, 32\)\)'\]"):
    convert.from_hf(tmp_path / "d")

  config = hf_lib.mmjax_config(hf_config("siglip").to_dict())[0]
  with pytest.raises(ValueError, match=r"config\['image'\]\['ln_pre'\]=True; the HF "
                                       r"SiglipModel layout needs False"):
    convert.to_hf(dict(config, image=dict(config["image"], ln_pre=True)), {}, tmp_path / "e",
                  image_size=40)
  with pytest.raises(ValueError, match=r"config\['text_proj'\]='dense'; the HF SiglipModel "
                                       r"layout needs 'dense_bias'"):
    convert.to_hf(dict(config, text_proj="dense"), {}, tmp_path / "e", image_size=40)

  hf.save_pretrained(tmp_path / "f")
  ckpt = convert.from_hf(tmp_path / "f")
  with pytest.raises(ValueError, match=r"tokenizer='clip' has 49408 ids; the text tower embeds "
                                       r"300"):
    convert.to_hf(ckpt.config, ckpt.params, tmp_path / "g", tokenizer="clip")
  with pytest.raises(ValueError, match=r"tokenizer: tokenizer spec 'bert': unknown kind"):
    convert.to_hf(ckpt.config, ckpt.params, tmp_path / "g", tokenizer="bert")
  with pytest.raises(ValueError, match=r"ImagePrep.resize='pad' is not one of"):
    convert.to_hf(ckpt.config, ckpt.params, tmp_path / "g", preprocess=(40, "pad"))


# Exports with the tokenizer and image processor files: transformers' processors against mmjax.

TEXTS = ["a photo of a cat.", "Hello world!", "A DOG, 3.5 kg", "", "two  dogs on the grass " * 9]


def hf_processor(directory):
  """AutoProcessor on the PIL backend (transformers' default with torchvision, resizes with
  torch's bicubic: up to ~1/255 off PIL's, which mmjax follows), after AutoTokenizer and
  AutoImageProcessor load the directory alone."""
  transformers.AutoTokenizer.from_pretrained(directory)
  transformers.AutoImageProcessor.from_pretrained(directory)
  return transformers.AutoProcessor.from_pretrained(directory, backend="pil")


def check_pixels(proc, prep, rng):
  for h, w in ((37, 51), (64, 29)):
    image = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    got = proc(images=image, return_tensors="np")["pixel_values"][0]
    np.testing.assert_allclose(got, prep(image).transpose(2, 0, 1), rtol=0, atol=1e-5)


def test_clip_export_loads_in_auto_processor(rng, torch_seed, tmp_path):
  """tokenizer='clip': CLIPTokenizer's ids are mmjax's up to the padding (transformers pads
  with <|endoftext|>, mmjax with 0); CLIPImageProcessor's pixels are the ImagePrep's;
  from_hf reads both back."""
  from mmjax.data.tokenizers import get_tokenizer
  from tests.open_clip_peer import save_tiny_hf_clip
  ckpt = convert.from_hf(save_tiny_hf_clip(tmp_path / "a"))
  prep = ckpt.preprocess._replace(resample="bilinear", mean=(0.1, 0.2, 0.3))
  out = convert.to_hf(ckpt.config, ckpt.params, tmp_path / "b", tokenizer="clip",
                      preprocess=prep)
  assert sorted(p.name for p in (tmp_path / "b").iterdir()) == [
      "config.json", "merges.txt", "model.safetensors", "preprocessor_config.json",
      "tokenizer_config.json", "vocab.json"]
  proc = hf_processor(out)
  max_len = ckpt.config["text"]["max_len"]
  got = proc.tokenizer(TEXTS, padding="max_length", max_length=max_len, truncation=True)
  ids, mask = np.array(got["input_ids"]), np.array(got["attention_mask"], bool)
  want = get_tokenizer("clip").encode(TEXTS, max_len)
  np.testing.assert_array_equal(np.where(mask, ids, 0), want)
  assert (ids[~mask] == 49407).all() and (mask.sum(1) == (want != 0).sum(1)).all()
  check_pixels(proc, prep, rng)
  back = convert.from_hf(out)
  assert (back.preprocess, back.tokenizer) == (prep, "clip")


@pytest.mark.filterwarnings("ignore:This sequence already has")   # SiglipTokenizer on "... </s>"
@pytest.mark.parametrize("kind", ["sentencepiece", "trained", "hf"])
def test_siglip_export_with_sentencepiece_loads_in_auto_processor(kind, rng, torch_seed,
                                                                  tmp_path):
  """A sentencepiece model -> spiece.model (SiglipTokenizer), a tokenizers JSON -> tokenizer.json:
  transformers' ids (padded to max_len) are the spec's (a trained: one's on text both read
  alike: lower-case, no punctuation) and those of the spec from_hf gives back;
  SiglipImageProcessor's pixels are the ImagePrep's."""
  from mmjax.data.tokenizers import TrainedTokenizer, get_tokenizer
  from tests.test_tokenizers import EDGE, captions, hf_json, t5_model
  hf = random_hf("siglip")
  hf.save_pretrained(tmp_path / "a")
  ckpt = convert.from_hf(tmp_path / "a")
  texts = EDGE + captions(rng, 20)
  if kind == "sentencepiece":
    spec = f"sentencepiece:{t5_model(tmp_path, rng)[0]}?canonicalize=true"
  elif kind == "hf":
    spec = f"hf:{hf_json(tmp_path, rng)[0]}"
  else:
    TrainedTokenizer.train(captions(rng, 300), vocab_size=300).save(str(tmp_path / "t.model"))
    spec = f"trained:{tmp_path / 't.model'}"
    texts = [" ".join(w for w in t.lower().split() if not set(w) & set(string.punctuation))
             for t in captions(rng, 30)]
  prep = ckpt.preprocess._replace(mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6))
  out = convert.to_hf(ckpt.config, ckpt.params, tmp_path / "b", tokenizer=spec,
                      preprocess=prep)
  files = "tokenizer.json" if kind == "hf" else "spiece.model"
  assert {files, "tokenizer_config.json", "preprocessor_config.json"} <= {
      p.name for p in (tmp_path / "b").iterdir()}
  proc = hf_processor(out)
  max_len = ckpt.config["text"]["max_len"]
  got = proc.tokenizer(texts, padding="max_length", max_length=max_len, truncation=True)
  want = get_tokenizer(spec).encode(texts, max_len)
  np.testing.assert_array_equal(np.array(got["input_ids"]), want)
  check_pixels(proc, prep, rng)
  back = convert.from_hf(out)
  assert back.preprocess == prep
  assert back.tokenizer.startswith(f"hf:{out}/tokenizer.json" if kind == "hf" else
                                   f"sentencepiece:{out}/spiece.model?canonicalize=true")
  np.testing.assert_array_equal(get_tokenizer(back.tokenizer).encode(texts, max_len), want)


def test_evaluate_reads_the_exported_tokenizer(rng, torch_seed, tmp_path):
  """experiments.evaluate on a SigLIP export with its sentencepiece model: no --tokenizer."""
  from experiments import evaluate as cli
  from tests.test_evaluate_cli import image_folder
  from tests.test_tokenizers import t5_model
  random_hf("siglip").save_pretrained(tmp_path / "a")
  ckpt = convert.from_hf(tmp_path / "a")
  with pytest.raises(ValueError, match="--tokenizer: the checkpoint names no tokenizer"):
    cli.evaluate(f"hf:{tmp_path / 'a'}", f"folder:{image_folder(tmp_path / 'v0', rng, [1] * 6)}",
                 progress=False, num_threads=1)
  out = convert.to_hf(ckpt.config, ckpt.params, tmp_path / "b", tokenizer=f"sentencepiece:"
                      f"{t5_model(tmp_path, rng)[0]}", preprocess=ckpt.preprocess)
  root = image_folder(tmp_path / "val", rng, [1, 2, 1, 1, 1, 1])
  templates = tmp_path / "t.txt"
  templates.write_text("a photo of a {}.\n")
  result = cli.evaluate(f"hf:{out}", f"folder:{root}", templates=str(templates), batch_size=4,
                        progress=False, num_threads=1)
  assert (result["num_classes"], result["num_templates"]) == (6, 1)
