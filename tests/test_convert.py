"""open_clip <-> mmjax: embeddings of converted random open_clip models (against open_clip in
float64), exact round trips, files, errors."""

import copy
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import convert
from mmjax.models import text, two_tower, vit
from tests.open_clip_peer import import_open_clip
from tests.reference import assert_close

open_clip = import_open_clip()
import torch  # noqa: E402  (after the skip above)


def random_open_clip(name: str):
  """open_clip's random init, with every vector (LayerNorms, biases, class token,
  logit scale) moved off its init, so that a swapped or dropped one shows up."""
  model = open_clip.create_model(name, pretrained=None).eval()
  with torch.no_grad():
    for p in model.parameters():
      if p.ndim <= 1:
        p.add_(0.2 * torch.randn_like(p))
  return model


def random_tokens(rng, n: int, context: int = 77) -> np.ndarray:
  """SOT, random ids (some 0, which is '!' and not padding), EOT, zeros; one row full length."""
  tokens = np.zeros((n, context), np.int64)
  lengths = np.r_[context, rng.integers(3, context, size=n - 1)]
  for row, length in zip(tokens, lengths):
    row[0], row[length - 1] = 49406, 49407
    row[1:length - 1] = rng.integers(0, 49406, size=length - 2)
    row[rng.integers(1, length - 1, size=2)] = 0
  return tokens


@pytest.fixture(scope="module")
def b32():
  torch.manual_seed(0)   # module-scoped, so fixed-seeded; per-test torch draws use `torch_seed`
  return random_open_clip("ViT-B-32")


def features(config, params, images_nchw: np.ndarray, tokens: np.ndarray):
  """Projected, unnormalised image and text features [n, embed_dim] and the logit scale."""
  model = two_tower.Model(**config)
  params = jax.device_put(params)
  project = lambda tower: lambda m, x: getattr(m, f"{tower}_proj")(getattr(m, tower)(x)[0])
  img = jax.jit(lambda p, x: model.apply({"params": p}, x, method=project("img")))
  txt = jax.jit(lambda p, t: model.apply({"params": p}, t, method=project("txt")))
  zimg = img(params, jnp.asarray(images_nchw.transpose(0, 2, 3, 1)))
  ztxt = txt(params, jnp.asarray(tokens, jnp.int32))
  return np.asarray(zimg), np.asarray(ztxt), float(np.exp(params["t"]))


# ViT-B-16, ViT-L-14, ... convert by the same rules as ViT-B-32, their numbers from the table
# (test_table_matches_open_clip_configs checks it against open_clip's configs); their float64
# forwards (B-16 ~20 s, L-14 ~100 s and 3.4 GB) exercised no other code path.
@pytest.mark.parametrize("name,n_images", [("ViT-B-32", 2), ("ViT-B-32-quickgelu", 2),
                                           ("ViT-S-32-alt", 2)])
def test_embeddings_match_open_clip(name, n_images, b32, rng, torch_seed):
  """mmjax in float32 on the converted float32 weights within the float32 tolerance of
  open_clip in float64 on the same weights (the tanh GELU in place of the erf one fails)."""
  oc = b32 if name == "ViT-B-32" else random_open_clip(name)
  size = convert.get_spec(name).image_size
  images = rng.normal(size=(n_images, 3, size, size)).astype(np.float32)
  tokens = random_tokens(rng, 2)
  config, params, prep, tok = convert.from_open_clip(oc.state_dict(), name)[:4]
  assert (prep.size, prep.resize, tok) == (convert.get_spec(name).image_size, "crop", "clip")
  zimg, ztxt, scale = features(config, params, images, tokens)
  del params
  # The float64 reference: the same (float32) weights, exactly, in float64.
  oc = copy.deepcopy(oc).double() if oc is b32 else oc.double()
  with torch.no_grad():
    want_img = oc.encode_image(torch.from_numpy(images).double()).numpy()
    want_txt = oc.encode_text(torch.from_numpy(tokens)).numpy()
    want_scale = oc.logit_scale.exp().item()
  assert want_img.dtype == want_txt.dtype == np.float64
  assert_close([zimg, ztxt, scale], [want_img, want_txt, want_scale], dtype=jnp.float32,
               name=[f"{name} image features", f"{name} text features", "logit scale"])


def test_round_trips_are_exact(b32, rng, torch_seed):
  """mmjax -> open_clip (strict load) -> mmjax, and open_clip -> mmjax -> open_clip, bitwise."""
  config = convert.open_clip_config("ViT-B-32")
  model = two_tower.Model(**config)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)),
                          jnp.zeros((1, 77), jnp.int32))["params"]
  params = jax.tree.map(lambda s: rng.standard_normal(s.shape, np.float32), shapes)

  sd = convert.to_open_clip(config, params, as_torch=True)
  oc = open_clip.create_model("ViT-B-32", pretrained=None)
  oc.load_state_dict(sd)   # strict: every key present, none extra, shapes checked
  config2, params2, *_ = convert.from_open_clip(oc.state_dict(), "ViT-B-32")
  assert config2 == config
  assert jax.tree.structure(params2) == jax.tree.structure(params)
  jax.tree.map(np.testing.assert_array_equal, params2, params)

  want = {k: v.numpy() for k, v in b32.state_dict().items()}
  back = convert.to_open_clip(*convert.from_open_clip(want, "ViT-B-32")[:2])
  assert back.keys() == want.keys()
  for k, v in want.items():
    assert back[k].dtype == np.float32 and back[k].flags.c_contiguous, k
    np.testing.assert_array_equal(back[k], v, err_msg=k)


def test_reads_files(b32, tmp_path):
  """.safetensors, and a .pt training checkpoint ({'state_dict'} with DDP's 'module.' prefix)."""
  from safetensors.torch import save_file
  sd = b32.state_dict()
  want = convert.from_open_clip(sd, "ViT-B-32").params
  save_file(sd, tmp_path / "model.safetensors")
  torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in sd.items()}},
             tmp_path / "epoch_3.pt")
  for path in (tmp_path / "model.safetensors", str(tmp_path / "epoch_3.pt")):
    got = convert.from_open_clip(path, "ViT-B-32").params
    jax.tree.map(np.testing.assert_array_equal, got, want)


def test_bad_inputs_are_named(b32):
  sd = {k: v.numpy() for k, v in b32.state_dict().items()}
  with pytest.raises(ValueError, match=r"model_name='ViT-B-33'.*supported: \[.*'ViT-B-32'"):
    convert.from_open_clip(sd, "ViT-B-33")
  with pytest.raises(ValueError, match=r"missing keys: \['visual.ln_pre.weight'\]"):
    convert.from_open_clip({k: v for k, v in sd.items() if k != "visual.ln_pre.weight"}, "ViT-B-32")
  with pytest.raises(ValueError, match=r"unexpected keys: \['visual.attn_pool.probe'\]"):
    convert.from_open_clip({**sd, "visual.attn_pool.probe": np.zeros(3)}, "ViT-B-32")
  with pytest.raises(ValueError, match=r"wrong shapes: \['visual.conv1.weight: \(768, 3, 32, 32\) "
                                       r"\(want \(768, 3, 16, 16\)\)'"):
    convert.from_open_clip(sd, "ViT-B-16")
  with pytest.raises(ValueError, match="is not a file"):
    convert.from_open_clip("/nonexistent/model.safetensors", "ViT-B-32")

  config, params, *_ = convert.from_open_clip(sd, "ViT-B-32")
  with pytest.raises(ValueError, match=r"config\['loss'\]='mae'"):
    convert.to_open_clip(dict(config, loss="mae"), params)
  with pytest.raises(ValueError, match=r"config\['image_proj'\]='dense'; open_clip's "
                                       r"ViT-.*-SigLIP.* needs 'none'"):
    convert.to_open_clip(dict(config, loss="siglip"), params)
  mapped = dict(config, image=dict(config["image"], pool_type="map"))
  with pytest.raises(ValueError, match=r"config\['image'\]\['pool_type'\]='map'"):
    convert.to_open_clip(mapped, params)
  mixed = dict(config, text=dict(config["text"], act="quick_gelu"))
  with pytest.raises(ValueError, match="both 'gelu_exact'"):
    convert.to_open_clip(mixed, params)
  with pytest.raises(ValueError, match=r"params lack \['img/ln_pre/scale'"):
    convert.to_open_clip(config, {**params, "img": {k: v for k, v in params["img"].items()
                                                     if k != "ln_pre"}})


def test_table_matches_open_clip_configs():
  for name, spec in convert.OPEN_CLIP_MODELS.items():
    c = open_clip.get_model_config(name)
    v, t = c["vision_cfg"], c["text_cfg"]
    plain = {"image_size", "layers", "width", "patch_size", "head_width", "mlp_ratio"}
    assert set(v) <= plain, name
    assert set(t) <= {"context_length", "vocab_size", "width", "heads", "layers"}, name
    got = (spec.embed_dim, spec.image_size, spec.patch_size, spec.vision_width,
           spec.vision_layers, spec.vision_heads, spec.vision_mlp, spec.text_width,
           spec.text_layers, spec.text_heads, spec.quick_gelu, spec.context_length,
           spec.vocab_size)
    want = (c["embed_dim"], v["image_size"], v["patch_size"], v["width"], v["layers"],
            v["width"] // v.get("head_width", 64), int(v["width"] * v.get("mlp_ratio", 4.0)),
            t["width"], t["layers"], t["heads"], c.get("quick_gelu", False),
            t["context_length"], t["vocab_size"])
    assert got == want, name


def test_clip_layout_options_are_checked():
  init = lambda model: jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))
  with pytest.raises(ValueError, match="posemb_cls=True needs posemb='learn' and pool_type='tok'"):
    init(vit.Model(variant="mu/8", posemb_cls=True, pool_type="map", posemb="learn"))
  with pytest.raises(ValueError, match="act='relu'"):
    init(vit.Model(variant="mu/8", act="relu"))
  with pytest.raises(ValueError, match="pad_id=None is not allowed"):   # checked when built
    text.Model(vocab_size=8, max_len=4, variant="mu", pool_type="eos", pad_id=None)


def test_mmjax_does_not_import_torch():
  code = ("import sys, mmjax.convert, mmjax.data.clip_tokenizer, mmjax.models.two_tower; "
          "assert 'torch' not in sys.modules, 'torch imported'")
  subprocess.run([sys.executable, "-c", code], check=True)


def _open_clip_configs() -> list[str]:
  folder = os.path.join(os.path.dirname(open_clip.__file__), "model_configs")
  return sorted(f[:-5] for f in os.listdir(folder) if f.endswith(".json"))


def _shortened(cfg: dict) -> dict:
  """cfg with its open_clip text tower, and a ViT image tower, cut to 2 blocks (open_clip's
  model creation is slow for the big ones; the depth maps one to one). A timm trunk's and a
  ResNet's depths stay: the meta device builds them at no cost."""
  cfg["text_cfg"]["layers"] = 2
  vision = cfg["vision_cfg"]
  if isinstance(vision.get("layers"), int) and "timm_model_name" not in vision:
    vision["layers"] = 2
  return cfg


def test_open_clips_own_json_configs_convert_without_a_table_entry(tmp_path):
  """Every ViT CLIP, SigLIP (timm trunk) and ModifiedResNet config open_clip ships (its
  model_configs/*.json, found by mmjax without importing open_clip), in and outside mmjax's
  table (ViT-S-32, ViT-M-16, ViT-e-14, RN50x64, ViT-gopt-16-SigLIP2-384, ...), `_shortened`:
  mmjax's state dict has every key and shape of open_clip's model built from the same file
  (a SigLIP's text keys without open_clip's 'text.' prefix, as from_open_clip reads them).
  Every other config is refused in one line naming the file and a field it does not take."""
  from mmjax.convert import common, openclip
  read, refused = [], []
  for name in _open_clip_configs():
    path = openclip._json_config_path(name)
    cfg = common.read_json(path)
    try:
      openclip.spec_from_json(cfg, path)
    except ValueError as e:
      assert str(e).startswith(f"{path}: open_clip config field") and "\n" not in str(e)
      refused.append(name)
      continue
    read.append(name)
    short = tmp_path / f"{name}-short.json"
    short.write_text(json.dumps(_shortened(cfg)))
    open_clip.add_model_config(str(short))
    with torch.device("meta"):   # shapes only, no memory
      oc = open_clip.create_model(short.stem, pretrained=None, device="meta")
    want = {k.removeprefix("text."): tuple(v.shape) for k, v in oc.state_dict().items()
            if k != "attn_mask" and not k.endswith("num_batches_tracked")}
    spec = convert.get_spec(str(short))
    got = common.checkpoint_shapes(openclip.rules(openclip.spec_config(spec)),
                                   openclip.spec_config(spec), spec.image_size)
    assert got == want, name
  assert len(read) == 66, (len(read), read)   # 31 ViT, 25 SigLIP, 10 ResNet
  assert {"ViT-S-32", "ViT-M-16", "ViT-e-14", "ViT-L-16-320", "RN50x64-quickgelu",
          "ViT-gopt-16-SigLIP2-384", "ViT-SO400M-16-SigLIP-i18n-256"} <= set(read), read
  assert {"EVA01-g-14", "coca_ViT-B-32", "convnext_base", "nllb-clip-base-siglip",
          "vit_medium_patch16_gap_256", "ViT-SO400M-14-SigLIP-384"} <= set(refused), refused
  assert convert.get_spec("ViT-M-16") == openclip.spec_from_json(   # by name, from the file
      common.read_json(openclip._json_config_path("ViT-M-16")), "")
  with pytest.raises(ValueError, match=r"not a .json file, not one of the installed open_clip"):
    convert.get_spec("ViT-Q-99")


@pytest.mark.parametrize("field,value,message", [
    ("vision_cfg.timm_model_name", "convnext_base", "vision_cfg.timm_model_name='convnext_base'"),
    ("vision_cfg.timm_pool", "avg", "vision_cfg.timm_pool='avg'"),
    ("text_cfg.no_causal_mask", False, "text_cfg.no_causal_mask=False"),
    ("text_cfg.pool_type", "argmax", "text_cfg.pool_type='argmax'"),
    ("vision_cfg.image_size", 256, r"vision_cfg.image_size=256 \(timm's trunk is 224 px\)"),
    ("text_cfg.act_kwargs", {"approximate": "none"}, "text_cfg.act_kwargs="),
    ("vision_cfg.width", 64, r"\['vision_cfg.width'\] are")])
def test_a_siglip_config_mmjax_cannot_build_is_named(tmp_path, field, value, message):
  """A SigLIP config changed in one layout field is refused naming the file and the field."""
  from mmjax.convert import common, openclip
  cfg = common.read_json(openclip._json_config_path("ViT-B-16-SigLIP"))
  part, key = field.split(".")
  cfg[part][key] = value
  path = tmp_path / "odd.json"
  path.write_text(json.dumps(cfg))
  with pytest.raises(ValueError, match=f"^{path}: open_clip config fields? .*{message}"):
    convert.get_spec(str(path))


def test_a_json_config_path_converts(tmp_path, rng, torch_seed):
  """A config file of one's own (model_name a .json path): open_clip builds the model from
  the same file; mmjax converts its state dict and gives open_clip's float64 features."""
  cfg = {"embed_dim": 24, "vision_cfg": {"image_size": 32, "layers": 2, "width": 48,
                                         "patch_size": 8, "head_width": 16, "mlp_ratio": 2.0},
         "text_cfg": {"context_length": 12, "vocab_size": 64, "width": 32, "heads": 2,
                      "layers": 2, "mlp_ratio": 3.0}}
  path = tmp_path / "Tiny-ViT.json"
  path.write_text(json.dumps(cfg))
  open_clip.add_model_config(str(path))
  oc = random_open_clip("Tiny-ViT").double()
  ckpt = convert.from_open_clip(oc.state_dict(), str(path))
  assert ckpt.config["image"]["mlp_dim"] == 96 and ckpt.config["text"]["mlp_dim"] == 96
  images = rng.normal(size=(2, 3, 32, 32))
  tokens = np.zeros((2, 12), np.int64)   # SOT 62, ids below it, EOT 63 (the argmax pools it)
  for row, n in zip(tokens, (12, 7)):
    row[0], row[1:n - 1], row[n - 1] = 62, rng.integers(0, 62, size=n - 2), 63
  zimg, ztxt, _ = features(ckpt.config, jax.tree.map(np.float32, ckpt.params),
                           images.astype(np.float32), tokens)
  with torch.no_grad():
    want_img = oc.encode_image(torch.from_numpy(images)).numpy()
    want_txt = oc.encode_text(torch.from_numpy(tokens)).numpy()
  assert_close([zimg, ztxt], [want_img, want_txt], dtype=jnp.float32, name=["image", "text"])
