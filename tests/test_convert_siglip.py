"""SigLIP checkpoints: open_clip's SigLIP models (timm trunk) and big_vision .npz files (both
block layouts, read by open_clip's own big_vision reader) against open_clip in float64; exact
round trips; the SigLIP table against open_clip's configs and timm's models."""

import copy
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import convert
from mmjax.models import two_tower
from tests.open_clip_peer import import_open_clip
from tests.reference import assert_close

open_clip = import_open_clip()
import torch  # noqa: E402  (after the skip above)

NAME = "ViT-B-16-SigLIP-2layers"   # ViT-B-16-SigLIP cut to 2 + 2 blocks (speed; same code paths)
DEPTH = 2
TRUNK = "mmjax-test-vit_base_patch16_siglip_224-2blocks"


@pytest.fixture(scope="module")
def siglip():
  """open_clip's random ViT-B-16-SigLIP with its first DEPTH blocks per tower, every vector
  moved off its init (module-scoped, so fixed-seeded; per-test draws use `rng`)."""
  torch.manual_seed(0)
  model = open_clip.create_model("ViT-B-16-SigLIP", pretrained=None).eval()
  model.visual.trunk.blocks = model.visual.trunk.blocks[:DEPTH]
  model.text.transformer.resblocks = model.text.transformer.resblocks[:DEPTH]
  with torch.no_grad():
    for p in model.parameters():
      if p.ndim <= 1 or p.shape[:2] == (1, 1):   # vectors, logit scale/bias, the MAP latent
        p.add_(0.2 * torch.randn_like(p))
  return model


@pytest.fixture(scope="module")
def siglip_name(tmp_path_factory):
  """A .json path for `siglip`: open_clip's ViT-B-16-SigLIP.json with DEPTH text blocks and
  the trunk TRUNK, its timm trunk with DEPTH blocks, in TIMM_SIGLIP_TRUNKS while this module
  runs."""
  from mmjax.convert import common, openclip
  cfg = common.read_json(openclip._json_config_path("ViT-B-16-SigLIP"))
  cfg["vision_cfg"]["timm_model_name"], cfg["text_cfg"]["layers"] = TRUNK, DEPTH
  path = tmp_path_factory.mktemp("siglip") / f"{NAME}.json"
  path.write_text(json.dumps(cfg))
  full = convert.TIMM_SIGLIP_TRUNKS["vit_base_patch16_siglip_224"]
  with pytest.MonkeyPatch.context() as mp:
    mp.setitem(convert.TIMM_SIGLIP_TRUNKS, TRUNK, full._replace(vision=(768, DEPTH, 12, 3072)))
    yield str(path)


def big_vision_config(config):
  """The open_clip SigLIP config with big_vision's tanh GELU in both towers."""
  return dict(config, image=dict(config["image"], act="gelu"),
              text=dict(config["text"], act="gelu"))


def features(config, params, images_nchw, tokens):
  """Projected, unnormalised image and text features [n, embed_dim]."""
  model = two_tower.Model(**config)
  project = lambda tower: lambda m, x: getattr(m, f"{tower}_proj")(getattr(m, tower)(x)[0])
  img = jax.jit(lambda p, x: model.apply({"params": p}, x, method=project("img")))
  txt = jax.jit(lambda p, t: model.apply({"params": p}, t, method=project("txt")))
  return (np.asarray(img(params, jnp.asarray(images_nchw.transpose(0, 2, 3, 1)))),
          np.asarray(txt(params, jnp.asarray(tokens, jnp.int32))))


def open_clip_features(model, images_nchw, tokens):
  """open_clip in float64 on the same (float32) weights, unnormalised."""
  model = copy.deepcopy(model).double()
  with torch.no_grad():
    img = model.encode_image(torch.from_numpy(images_nchw).double()).numpy()
    txt = model.encode_text(torch.from_numpy(tokens)).numpy()
  assert img.dtype == txt.dtype == np.float64
  return img, txt


def tanh_gelus(model):
  """big_vision's towers use the tanh GELU (flax's default); open_clip's ViT-B-16-SigLIP
  the erf one: swap its activations so that it computes big_vision's model."""
  tanh = torch.nn.GELU(approximate="tanh")
  for block in model.visual.trunk.blocks:
    block.mlp.act = tanh
  model.visual.trunk.attn_pool.mlp.act = tanh
  for block in model.text.transformer.resblocks:
    block.mlp.gelu = tanh
  return model


def inputs(rng, n=2):
  images = rng.normal(size=(n, 3, 224, 224)).astype(np.float32)
  tokens = rng.integers(0, 32000, size=(n, 64)).astype(np.int64)
  return images, tokens


def test_open_clip_siglip_matches(siglip, siglip_name, rng):
  ckpt = convert.from_open_clip(siglip.state_dict(), siglip_name)
  assert ckpt.config["image_proj"] == "none" and ckpt.config["text_proj"] == "dense_bias"
  assert ckpt.tokenizer is None and ckpt.preprocess.resize == "squash"
  images, tokens = inputs(rng)
  got = features(ckpt.config, ckpt.params, images, tokens)
  want = open_clip_features(siglip, images, tokens)
  assert_close(got, want, dtype=jnp.float32, name=["image features", "text features"])
  np.testing.assert_array_equal(ckpt.params["t"], siglip.logit_scale.detach().numpy())
  np.testing.assert_array_equal(ckpt.params["b"], siglip.logit_bias.detach().numpy())


def test_big_vision_npz_matches_open_clips_reader(siglip, siglip_name, rng, tmp_path):
  """mmjax params written as .npz in both layouts: open_clip.convert.load_big_vision_weights
  reads each into the same state dict, from_big_vision reads each into the same params,
  whose embeddings are open_clip's (with big_vision's tanh GELU) in float64."""
  config, params, *_ = convert.from_open_clip(siglip.state_dict(), siglip_name)
  config = big_vision_config(config)
  params = jax.tree.map(lambda x: x + 0.01 * rng.standard_normal(x.shape, np.float32), params)
  loaded = {}
  for scan in (False, True):
    path = convert.to_big_vision(config, params, tmp_path / f"scan{scan}.npz", scan=scan)
    keys = set(np.load(path).files)
    assert ("params/img/Transformer/encoderblock/LayerNorm_0/scale" in keys) == scan
    assert ("params/txt/Encoder_0/encoderblock_1/LayerNorm_0/scale" in keys) == (not scan)
    model = tanh_gelus(copy.deepcopy(siglip))
    open_clip.convert.load_big_vision_weights(model, path)
    loaded[scan] = (model, convert.from_big_vision(path))
  (oc0, ck0), (oc1, ck1) = loaded[False], loaded[True]
  for k, v in oc1.state_dict().items():
    np.testing.assert_array_equal(v.numpy(), oc0.state_dict()[k].numpy(), err_msg=k)
  jax.tree.map(np.testing.assert_array_equal, ck1.params, ck0.params)
  jax.tree.map(np.testing.assert_array_equal, ck0.params, params)
  assert ck0.config == ck1.config
  assert ck0.preprocess == (224, "squash", "bilinear", (0.5,) * 3, (0.5,) * 3, "floor")
  images, tokens = inputs(rng)
  got = features(ck1.config, ck1.params, images, tokens)
  want = open_clip_features(oc1, images, tokens)
  assert_close(got, want, dtype=jnp.float32, name=["image features", "text features"])


def test_round_trips_are_exact(siglip, siglip_name, tmp_path):
  """open_clip SigLIP -> mmjax -> open_clip (strict load, bitwise); npz -> mmjax -> npz in
  each layout (the same keys and arrays)."""
  want = siglip.state_dict()
  ckpt = convert.from_open_clip(want, siglip_name)
  back = convert.to_open_clip(ckpt.config, ckpt.params, as_torch=True)
  fresh = copy.deepcopy(siglip)
  fresh.load_state_dict(back)   # strict
  assert back.keys() == want.keys()
  for k, v in want.items():
    np.testing.assert_array_equal(back[k].numpy(), v.numpy(), err_msg=k)
  config = big_vision_config(ckpt.config)
  for scan in (False, True):
    a = convert.to_big_vision(config, ckpt.params, tmp_path / "a.npz", scan=scan)
    again = convert.from_big_vision(a)
    b = convert.to_big_vision(again.config, again.params, tmp_path / "b.npz", scan=scan)
    with np.load(a) as fa, np.load(b) as fb:
      assert sorted(fa.files) == sorted(fb.files)
      for k in fa.files:
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


def test_big_vision_errors_name_the_array_or_field(siglip, siglip_name, tmp_path):
  ckpt = convert.from_open_clip(siglip.state_dict(), siglip_name)
  config = big_vision_config(ckpt.config)
  with pytest.raises(ValueError, match=r"config\['image'\]\['act'\]='gelu_exact'; big_vision's "
                                       r"two-tower layout needs 'gelu'"):
    convert.to_big_vision(ckpt.config, ckpt.params, tmp_path / "m.npz")
  path = convert.to_big_vision(config, ckpt.params, tmp_path / "m.npz")
  with pytest.raises(ValueError, match=r"variant='L/16' has width=1024; the checkpoint's "
                                       r"image tower has 768"):
    convert.from_big_vision(path, "L/16")
  with pytest.raises(ValueError, match=r"variant='B/16' has depth=12; the checkpoint's "
                                       r"image tower has 2"):
    convert.from_big_vision(path, "B/16")
  with pytest.raises(ValueError, match="npz_path=.* is not a file"):
    convert.from_big_vision(tmp_path / "none.npz")
  with np.load(path) as f:
    arrays = {k: f[k] for k in f.files}
  del arrays["params/txt/Encoder_0/encoderblock_1/MlpBlock_0/Dense_1/bias"]
  arrays["params/img/extra"] = np.zeros(3, np.float32)
  np.savez(tmp_path / "cut.npz", **arrays)
  with pytest.raises(ValueError, match=r"missing keys: \['params/txt/Encoder_0/encoderblock_1/"
                                       r"MlpBlock_0/Dense_1/bias'\]; unexpected keys: "
                                       r"\['params/img/extra'\]"):
    convert.from_big_vision(tmp_path / "cut.npz")
  arrays = {k.replace("encoderblock_1/", "encoderblock_4/") if "/txt/" in k else k: v
            for k, v in arrays.items()}
  np.savez(tmp_path / "gap.npz", **arrays)
  with pytest.raises(ValueError, match=r"encoder blocks \[0, 4\]"):
    convert.from_big_vision(tmp_path / "gap.npz")
  with pytest.raises(ValueError, match=r"config\['image'\]\['ln_pre'\]=True; big_vision's "
                                       r"two-tower layout needs False"):
    convert.to_big_vision(dict(config, image=dict(config["image"], ln_pre=True)),
                          {**ckpt.params, "img": {**ckpt.params["img"], "ln_pre": {
                              "scale": np.ones(768, np.float32),
                              "bias": np.zeros(768, np.float32)}}}, tmp_path / "x.npz")


def test_timm_trunk_table_matches_timm():
  """Every TIMM_SIGLIP_TRUNKS row against the timm model it names (built on the meta device:
  shapes only): patch, size, widths, depth, heads, the GELU of its blocks and its MAP head."""
  import timm
  for name, s in convert.TIMM_SIGLIP_TRUNKS.items():
    if name == TRUNK:   # this module's own row
      continue
    with torch.device("meta"):
      trunk = timm.create_model(name, pretrained=False, num_classes=0, global_pool="map")
    block = trunk.blocks[0]
    gelu = lambda m: {("GELU", "none"): "gelu_exact", ("GELU", "tanh"): "gelu",
                      ("GELUTanh", None): "gelu"}[type(m).__name__, getattr(m, "approximate", None)]
    got = (s.patch_size, s.image_size, s.vision, s.act)
    want = (trunk.patch_embed.patch_size[0], trunk.patch_embed.img_size[0],
            (trunk.embed_dim, len(trunk.blocks), block.attn.num_heads,
             block.mlp.fc1.out_features), gelu(block.mlp.act))
    assert got == want, name
    assert trunk.attn_pool.mlp.fc1.out_features == s.vision[3] and trunk.norm.eps == 1e-6, name
    assert gelu(trunk.attn_pool.mlp.act) == s.act and trunk.cls_token is None, name


def test_a_shrunk_siglip_json_matches_open_clip(tmp_path, rng, torch_seed):
  """open_clip's ViT-B-32-SigLIP2-256.json (its trunk the real timm B/32 at 256 px, which
  the JSON cannot shrink: the name decides it) with a small text tower (width 64, 2 heads, 2
  blocks, mlp_ratio 3, vocab 100, 16 tokens, tanh GELU, projection with bias to 768): built
  by open_clip from the file, converted by mmjax from the same file, the same features."""
  from mmjax.convert import common, openclip
  cfg = common.read_json(openclip._json_config_path("ViT-B-32-SigLIP2-256"))
  cfg["text_cfg"].update(width=64, heads=2, layers=2, mlp_ratio=3.0, vocab_size=100,
                         context_length=16)
  path = tmp_path / "Small-B-32-SigLIP2.json"
  path.write_text(json.dumps(cfg))
  open_clip.add_model_config(str(path))
  model = open_clip.create_model(path.stem, pretrained=None).eval()
  with torch.no_grad():
    for p in model.parameters():
      if p.ndim <= 1 or p.shape[:2] == (1, 1):
        p.add_(0.2 * torch.randn_like(p))
  ckpt = convert.from_open_clip(model.state_dict(), str(path))
  assert ckpt.config["image"]["act"] == ckpt.config["text"]["act"] == "gelu"
  images = rng.normal(size=(2, 3, 256, 256)).astype(np.float32)
  tokens = rng.integers(0, 100, size=(2, 16)).astype(np.int64)
  got = features(ckpt.config, ckpt.params, images, tokens)
  want = open_clip_features(model, images, tokens)
  assert_close(got, want, dtype=jnp.float32, name=["image features", "text features"])
