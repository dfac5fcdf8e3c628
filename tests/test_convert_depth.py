"""The converters past ten blocks (12 image, 13 text), at tiny widths, against the reference
libraries' own forward passes in float64, in both directions: a checkpoint read by mmjax
computes what the library computes (per-layer and scanned, Converted.with_scan), and mmjax
params (a scanned model's tree) written for the library compute in it what they compute in
mmjax. Round trips cannot see a layout mistake made alike both ways; these can.

open_clip: CLIP (nn.MultiheadAttention resblocks) from open_clip.create_model with a small
model config, SigLIP (a timm trunk, created with small sizes). big_vision .npz (both block
layouts) read by open_clip's own big_vision reader. transformers: CLIPModel and SiglipModel
from small configs with num_hidden_layers >= 12."""

import copy
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import convert
from mmjax.convert.openclip import OpenClipSpec, TimmTrunk
from mmjax.models import two_tower
from mmjax.models.scan import stack_blocks
from tests.open_clip_peer import import_open_clip, import_transformers
from tests.reference import assert_close
from tests.test_convert_siglip import features as _mmjax, open_clip_features as _open_clip

open_clip = import_open_clip()
transformers = import_transformers()
import timm  # noqa: E402  (after the skips above)
import torch  # noqa: E402

V_DEPTH, T_DEPTH = 12, 13
# Image: width 24, 3 heads of 8 (h != d, so a [h, d] read as [d, h] fails); text: 16, 2 heads.
SIZE, PATCH, VW, VH, TW, TH, VOCAB, CTX = 16, 4, 24, 3, 16, 2, 64, 8
CLIP_NAME, SIGLIP_NAME = "mmjax-test-deep-clip", "mmjax-test-deep-siglip"
SIGLIP_TRUNK = "mmjax-test-tiny-siglip-trunk"   # timm's ViT-B/16 SigLIP built small


def _perturb_vectors(model):
  """Every vector (LayerNorms, biases, class token, logit scale, MAP probe) off its init, where
  a swapped or dropped one would not show; every block then differs from the others."""
  with torch.no_grad():
    for p in model.parameters():
      if p.ndim <= 1 or p.shape[:2] == (1, 1):
        p.add_(0.2 * torch.randn_like(p))
  return model.eval()


@pytest.fixture(scope="module")
def deep_clip():
  """open_clip.create_model on a small CLIP model config (and mmjax's table row for it)."""
  cfg = dict(embed_dim=16,
             vision_cfg=dict(image_size=SIZE, patch_size=PATCH, width=VW, layers=V_DEPTH,
                             head_width=VW // VH, mlp_ratio=2),
             text_cfg=dict(context_length=CTX, vocab_size=VOCAB, width=TW, heads=TH,
                           layers=T_DEPTH))   # mlp 4 x width, as every open_clip CLIP text tower
  spec = OpenClipSpec(16, SIZE, PATCH, VW, V_DEPTH, VH, 2 * VW, TW, T_DEPTH, TH,
                      context_length=CTX, vocab_size=VOCAB)
  with pytest.MonkeyPatch.context() as mp:
    mp.setitem(open_clip.factory._MODEL_CONFIGS, CLIP_NAME, cfg)
    mp.setitem(convert.OPEN_CLIP_MODELS, CLIP_NAME, spec)
    torch.manual_seed(0)
    model = open_clip.create_model(CLIP_NAME, pretrained=None)
    assert len(model.visual.transformer.resblocks) == V_DEPTH
    yield _perturb_vectors(model)


@pytest.fixture(scope="module")
def deep_siglip(tmp_path_factory):
  """open_clip's SigLIP layout (timm 'map' trunk, bidirectional text pooled last, text
  projection with bias) with big_vision's tanh GELU, so the same model reads .npz files."""
  cfg = dict(embed_dim=VW, init_logit_bias=-10, custom_text=True,
             vision_cfg=dict(image_size=SIZE, timm_model_name=SIGLIP_TRUNK,
                             timm_model_pretrained=False, timm_pool="map", timm_proj="none"),
             text_cfg=dict(context_length=CTX, vocab_size=VOCAB, width=TW, heads=TH,
                           layers=T_DEPTH, mlp_ratio=2, no_causal_mask=True, proj_bias=True,
                           pool_type="last", norm_kwargs={"eps": 1e-6},
                           act_kwargs={"approximate": "tanh"}))
  trunk = TimmTrunk(PATCH, SIZE, (VW, V_DEPTH, VH, 2 * VW), "gelu")
  create = timm.create_model
  small = dict(img_size=SIZE, patch_size=PATCH, embed_dim=VW, depth=V_DEPTH, num_heads=VH,
               mlp_ratio=2, act_layer="gelu_tanh")
  with pytest.MonkeyPatch.context() as mp:
    mp.setitem(open_clip.factory._MODEL_CONFIGS, SIGLIP_NAME, cfg)
    mp.setattr(timm, "create_model", lambda name, **kw: create(
        "vit_base_patch16_siglip_224", **{**kw, **small}))
    torch.manual_seed(1)
    model = open_clip.create_model(SIGLIP_NAME, pretrained=None)
    mp.undo()
    # mmjax reads the same config from a file, its trunk's numbers from TIMM_SIGLIP_TRUNKS
    mp.setitem(convert.TIMM_SIGLIP_TRUNKS, SIGLIP_TRUNK, trunk)
    (path := tmp_path_factory.mktemp("deep") / f"{SIGLIP_NAME}.json").write_text(json.dumps(cfg))
    model.mmjax_name = str(path)
    assert len(model.visual.trunk.blocks) == V_DEPTH
    yield _perturb_vectors(model)


def _tokens(rng, n=3, eot=None):
  """[n, CTX] ids below VOCAB - 1; with eot, CLIP's: SOT, ids, EOT (the largest id), zeros."""
  ids = rng.integers(1, VOCAB - 2, size=(n, CTX)).astype(np.int64)
  if eot is not None:
    for row, end in zip(ids, np.r_[CTX, rng.integers(3, CTX, size=n - 1)]):
      row[0], row[end - 1], row[end:] = VOCAB - 2, eot, 0
  return ids


def _images(rng, n=3):
  return rng.normal(size=(n, 3, SIZE, SIZE)).astype(np.float32)


def _scanned(config):
  return {**config, **{t: {**config[t], "scan": True} for t in ("image", "text")}}


def _random_params(config, rng, scale=0.1):
  """The scanned model's tree (Encoder scan=True) of `config`: its init, every leaf moved."""
  model = two_tower.Model(**_scanned(config))
  init = jax.jit(model.init)(jax.random.PRNGKey(2), jnp.zeros((1, SIZE, SIZE, 3)),
                             jnp.zeros((1, CTX), jnp.int32))["params"]
  assert init["img"]["encoder"]["blocks"]["ln1"]["scale"].shape == (V_DEPTH, VW)
  return jax.tree.map(lambda x: np.asarray(x + scale * rng.standard_normal(x.shape), np.float32),
                      init)


def _check(got, want, what):
  assert want[0].dtype == np.float64
  assert_close(got, want, dtype=jnp.float32, name=[f"{what} image", f"{what} text"])


def _from_both(ckpt, images, tokens):
  """Features of the converted checkpoint per-layer and scanned (Converted.with_scan)."""
  scanned = ckpt.with_scan(True)
  assert scanned.params["txt"]["encoder"]["blocks"]["ln1"]["scale"].shape == (T_DEPTH, TW)
  return {"per-layer": _mmjax(ckpt.config, ckpt.params, images, tokens),
          "scanned": _mmjax(scanned.config, scanned.params, images, tokens)}


# ---------------------------------------------------------------- open_clip CLIP

def test_open_clip_clip_import_depth12_matches_open_clip(deep_clip, rng):
  ckpt = convert.from_open_clip(deep_clip.state_dict(), CLIP_NAME)
  assert ckpt.config["image"]["depth"] == V_DEPTH and ckpt.config["text"]["depth"] == T_DEPTH
  images, tokens = _images(rng), _tokens(rng, eot=VOCAB - 1)
  want = _open_clip(deep_clip, images, tokens)
  for what, got in _from_both(ckpt, images, tokens).items():
    _check(got, want, f"open_clip CLIP import, {what}")


def test_open_clip_clip_export_depth12_matches_open_clip(deep_clip, rng):
  """Scanned mmjax params -> to_open_clip -> open_clip (strict load): open_clip's features are
  mmjax's."""
  config = convert.open_clip_config(CLIP_NAME)
  params = _random_params(config, rng)
  scanned = _scanned(config)
  oc = copy.deepcopy(deep_clip)
  oc.load_state_dict(convert.to_open_clip(scanned, params, as_torch=True))   # strict
  images, tokens = _images(rng), _tokens(rng, eot=VOCAB - 1)
  _check(_mmjax(scanned, params, images, tokens), _open_clip(oc, images, tokens),
         "open_clip CLIP export")


# ---------------------------------------------------------------- open_clip SigLIP, big_vision

def test_open_clip_siglip_import_depth12_matches_open_clip(deep_siglip, rng):
  ckpt = convert.from_open_clip(deep_siglip.state_dict(), deep_siglip.mmjax_name)
  images, tokens = _images(rng), _tokens(rng)
  want = _open_clip(deep_siglip, images, tokens)
  for what, got in _from_both(ckpt, images, tokens).items():
    _check(got, want, f"open_clip SigLIP import, {what}")


def test_open_clip_siglip_export_depth12_matches_open_clip(deep_siglip, rng):
  config = convert.open_clip_config(deep_siglip.mmjax_name)
  params = _random_params(config, rng)
  oc = copy.deepcopy(deep_siglip)
  oc.load_state_dict(convert.to_open_clip(_scanned(config), params, as_torch=True))   # strict
  images, tokens = _images(rng), _tokens(rng)
  _check(_mmjax(_scanned(config), params, images, tokens), _open_clip(oc, images, tokens),
         "open_clip SigLIP export")


@pytest.mark.parametrize("scan", [False, True])
def test_big_vision_npz_depth12_matches_open_clips_reader(deep_siglip, rng, tmp_path, scan):
  """Scanned mmjax params -> to_big_vision (encoderblock_{i} or one stacked encoderblock) ->
  open_clip.convert.load_big_vision_weights: open_clip's features are mmjax's; from_big_vision
  reads the file back into the same params."""
  config = convert.open_clip_config(deep_siglip.mmjax_name)
  params = _random_params(config, rng)
  path = convert.to_big_vision(_scanned(config), params, tmp_path / "m.npz", scan=scan)
  with np.load(path) as f:
    keys = set(f.files)
  assert ("params/txt/Encoder_0/encoderblock_12/LayerNorm_0/scale" in keys) == (not scan)
  oc = copy.deepcopy(deep_siglip)
  open_clip.convert.load_big_vision_weights(oc, path)
  images, tokens = _images(rng), _tokens(rng)
  want = _open_clip(oc, images, tokens)
  _check(_mmjax(_scanned(config), params, images, tokens), want, f"big_vision export scan={scan}")
  ckpt = convert.from_big_vision(path)
  assert ckpt.config["image"]["depth"] == V_DEPTH and ckpt.config["text"]["depth"] == T_DEPTH
  for what, got in _from_both(ckpt, images, tokens).items():
    _check(got, want, f"big_vision import scan={scan}, {what}")


# ---------------------------------------------------------------- transformers

def _hf_model(kind: str):
  vision = dict(hidden_size=VW, intermediate_size=40, num_hidden_layers=V_DEPTH,
                num_attention_heads=VH, image_size=SIZE, patch_size=PATCH)
  txt = dict(vocab_size=VOCAB, hidden_size=TW, intermediate_size=36, num_hidden_layers=T_DEPTH,
             num_attention_heads=TH, max_position_embeddings=CTX)
  if kind == "siglip":
    cfg = transformers.SiglipConfig(vision_config=vision,
                                    text_config=dict(txt, projection_size=VW))
    model = transformers.SiglipModel(cfg)
  else:
    cfg = transformers.CLIPConfig(
        vision_config=dict(vision, hidden_act="quick_gelu"),
        text_config=dict(txt, hidden_act="gelu", eos_token_id=VOCAB - 1, bos_token_id=VOCAB - 2,
                         pad_token_id=0), projection_dim=12)
    model = transformers.CLIPModel(cfg)
  return _perturb_vectors(model)


def _hf(model, kind, images_nchw, tokens):
  """transformers in float64 on the same weights: projected, unnormalised features."""
  model = copy.deepcopy(model).double()
  with torch.no_grad():
    img = model.vision_model(pixel_values=torch.from_numpy(images_nchw).double()).pooler_output
    txt = model.text_model(input_ids=torch.from_numpy(tokens)).pooler_output
    if kind == "clip":
      img, txt = model.visual_projection(img), model.text_projection(txt)
  return img.numpy(), txt.numpy()


@pytest.mark.parametrize("kind", ["siglip", "clip"])
def test_hf_depth12_both_directions_match_transformers(kind, rng, tmp_path):
  """from_hf of a save_pretrained directory (per-layer and scanned) and to_hf of scanned mmjax
  params (from_pretrained, strict) each compute transformers' features."""
  torch.manual_seed(int(rng.integers(2**31)))
  hf = _hf_model(kind)
  hf.save_pretrained(tmp_path / "a")
  ckpt = convert.from_hf(tmp_path / "a")
  assert ckpt.config["image"]["depth"] == V_DEPTH and ckpt.config["text"]["depth"] == T_DEPTH
  images = _images(rng)
  tokens = _tokens(rng) if kind == "siglip" else _tokens(rng, eot=VOCAB - 1)
  want = _hf(hf, kind, images, tokens)
  for what, got in _from_both(ckpt, images, tokens).items():
    _check(got, want, f"HF {kind} import, {what}")

  params = _random_params(ckpt.config, rng)
  scanned = _scanned(ckpt.config)
  convert.to_hf(scanned, params, tmp_path / "b")
  back, info = type(hf).from_pretrained(tmp_path / "b", output_loading_info=True)
  assert not any(info.values()), info
  _check(_mmjax(scanned, params, images, tokens), _hf(back, kind, images, tokens),
         f"HF {kind} export")


def test_scanned_params_export_like_per_layer(deep_clip):
  """A scanned tree and its per-layer twin write the same open_clip state dict, key by key."""
  ckpt = convert.from_open_clip(deep_clip.state_dict(), CLIP_NAME)
  scanned = ckpt.with_scan(True)
  a = convert.to_open_clip(ckpt.config, ckpt.params)
  b = convert.to_open_clip(scanned.config, scanned.params)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(b[k], a[k], err_msg=k)
  jax.tree.map(np.testing.assert_array_equal, scanned.params, stack_blocks(ckpt.params))
