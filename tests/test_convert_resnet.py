"""open_clip's ModifiedResNet CLIP models <-> mmjax (resnet.ResNet, norm='frozen_bn'):
embeddings against open_clip in float64 on a random init, exact round trips, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import convert
from mmjax.models import resnet, two_tower
from tests.open_clip_peer import import_open_clip
from tests.reference import assert_close

open_clip = import_open_clip()
import torch  # noqa: E402  (after the skip above)


def random_resnet_clip(name: str):
  """open_clip's random init, `moved_off_init`."""
  return moved_off_init(open_clip.create_model(name, pretrained=None))


def moved_off_init(model):
  """model with every vector (norm scales and biases, projections' biases, the logit scale)
  and the BatchNorm statistics moved off their init, so that a swapped weight / bias or mean /
  var shows up; in eval mode (BatchNorm on its running statistics)."""
  model = model.eval()
  with torch.no_grad():
    for p in model.parameters():
      if p.ndim <= 1:
        p.add_(0.2 * torch.randn_like(p))
    for key, b in model.named_buffers():
      if key.endswith("running_mean"):
        b.copy_(0.2 * torch.randn_like(b))
      elif key.endswith("running_var"):
        b.copy_(0.5 + torch.rand_like(b))
  return model


@pytest.fixture(scope="module")
def rn50():
  torch.manual_seed(0)
  return random_resnet_clip("RN50")


def test_embeddings_match_open_clip(rn50, rng):
  """RN50 image and text features and the logit scale, mmjax float32 on the converted float32
  weights against open_clip float64 on the same weights (1e-5 relative: TOL['float32'])."""
  ckpt = convert.from_open_clip(rn50.state_dict(), "RN50")
  config, params, prep, tok = ckpt.config, ckpt.variables, ckpt.preprocess, ckpt.tokenizer
  assert (prep.size, prep.resize, tok) == (224, "crop", "clip")
  assert set(params) == {"params", "batch_stats"}   # BatchNorm's statistics: not params
  assert config["image"]["norm"] == "frozen_bn" and config["image_proj"] == "none"
  images = rng.normal(size=(2, 3, 224, 224)).astype(np.float32)
  tokens = np.zeros((2, 77), np.int64)
  for row, n in zip(tokens, (77, 9)):
    row[0], row[1:n - 1], row[n - 1] = 49406, rng.integers(0, 49406, size=n - 2), 49407
  model, params = two_tower.Model(**config), jax.device_put(params)
  proj = lambda tower: lambda m, x: getattr(m, f"{tower}_proj")(getattr(m, tower)(x)[0])
  zimg = jax.jit(lambda v, x: model.apply(v, x, method=proj("img")))(
      params, jnp.asarray(images.transpose(0, 2, 3, 1)))
  ztxt = jax.jit(lambda v, t: model.apply(v, t, method=proj("txt")))(
      params, jnp.asarray(tokens, jnp.int32))
  oc = rn50.double()
  try:
    with torch.no_grad():
      want_img = oc.encode_image(torch.from_numpy(images).double()).numpy()
      want_txt = oc.encode_text(torch.from_numpy(tokens)).numpy()
    want_scale = oc.logit_scale.exp().item()
  finally:
    rn50.float()
  assert want_img.dtype == np.float64
  assert_close([zimg, ztxt, float(np.exp(params["params"]["t"]))], [want_img, want_txt, want_scale],
               dtype=jnp.float32, name=["RN50 image features", "RN50 text features", "scale"])


def test_round_trips_are_exact(rn50, rng):
  """mmjax -> open_clip (strict load) -> mmjax and open_clip -> mmjax -> open_clip, bitwise."""
  want = {k: v.numpy() for k, v in rn50.state_dict().items()}
  ckpt = convert.from_open_clip(want, "RN50")
  back = convert.to_open_clip(ckpt.config, ckpt.params, batch_stats=ckpt.batch_stats)
  assert back.keys() == want.keys()
  for k, v in want.items():
    if k.endswith("num_batches_tracked"):
      assert back[k].shape == () and back[k] == 0, k
      continue
    assert back[k].dtype == np.float32 and back[k].flags.c_contiguous, k
    np.testing.assert_array_equal(back[k], v, err_msg=k)

  config = convert.open_clip_config("RN101-quickgelu")
  assert config["text"]["act"] == "quick_gelu" and config["image"]["layers"] == (3, 4, 23, 3)
  shapes = jax.eval_shape(two_tower.Model(**config).init, jax.random.PRNGKey(0),
                          jnp.zeros((1, 224, 224, 3)), jnp.zeros((1, 77), jnp.int32))
  params, stats = (jax.tree.map(lambda s: rng.standard_normal(s.shape, np.float32), shapes[k])
                   for k in ("params", "batch_stats"))
  oc = open_clip.create_model("RN101-quickgelu", pretrained=None)
  oc.load_state_dict(convert.to_open_clip(config, params, batch_stats=stats,
                                          as_torch=True))   # strict
  again = convert.from_open_clip(oc.state_dict(), "RN101-quickgelu")
  assert again.config == config
  jax.tree.map(np.testing.assert_array_equal, again.variables,
               {"params": params, "batch_stats": stats})


def test_json_configs_agree_with_resnet_variants():
  """open_clip's RN*.json read by mmjax give mmjax.models.resnet's variants of the same name."""
  for name in resnet.CLIP_VARIANTS:
    for suffix in ("", "-quickgelu"):
      image = convert.open_clip_config(name + suffix)["image"]
      assert {k: image[k] for k in ("style", "layers", "width", "num_heads")} == (
          resnet.decode_variant(name)), name


def test_a_shrunk_resnet_json_matches_open_clip(tmp_path, rng, torch_seed):
  """open_clip's RN50-quickgelu.json shrunk (stages 1, 2, 1, 1, stem width 16, head_width 128:
  4 pool heads, 64 px, a 24-wide embedding, a 2-block text tower of width 32): built by
  open_clip from the file, converted by mmjax from the same file, the same features."""
  import json
  from mmjax.convert import common, openclip
  cfg = common.read_json(openclip._json_config_path("RN50-quickgelu"))
  cfg["embed_dim"] = 24
  cfg["vision_cfg"].update(layers=[1, 2, 1, 1], width=16, head_width=128, image_size=64)
  cfg["text_cfg"].update(width=32, heads=2, layers=2, vocab_size=64, context_length=12)
  path = tmp_path / "Small-RN50-quickgelu.json"
  path.write_text(json.dumps(cfg))
  open_clip.add_model_config(str(path))
  oc = moved_off_init(open_clip.create_model(path.stem, pretrained=None))
  ckpt = convert.from_open_clip(oc.state_dict(), str(path))
  assert ckpt.config["image"]["num_heads"] == 4 and ckpt.config["text"]["act"] == "quick_gelu"
  images = rng.normal(size=(2, 3, 64, 64)).astype(np.float32)
  tokens = np.zeros((2, 12), np.int64)
  for row, n in zip(tokens, (12, 5)):
    row[0], row[1:n - 1], row[n - 1] = 62, rng.integers(0, 62, size=n - 2), 63
  model = two_tower.Model(**ckpt.config)
  proj = lambda tower: lambda m, x: getattr(m, f"{tower}_proj")(getattr(m, tower)(x)[0])
  zimg = model.apply(ckpt.variables, jnp.asarray(images.transpose(0, 2, 3, 1)), method=proj("img"))
  ztxt = model.apply(ckpt.variables, jnp.asarray(tokens, jnp.int32), method=proj("txt"))
  oc = oc.double()
  with torch.no_grad():
    want_img = oc.encode_image(torch.from_numpy(images).double()).numpy()
    want_txt = oc.encode_text(torch.from_numpy(tokens)).numpy()
  assert_close([zimg, ztxt], [want_img, want_txt], dtype=jnp.float32,
               name=["image features", "text features"])


def test_bad_inputs_are_named(rn50):
  sd = {k: v.numpy() for k, v in rn50.state_dict().items()}
  with pytest.raises(ValueError, match=r"missing keys: \['visual.layer3.6.conv1.weight', "):
    convert.from_open_clip(sd, "RN101")   # 23 blocks in stage 3, RN50 has 6
  del sd["visual.layer3.0.bn2.running_var"]
  with pytest.raises(ValueError, match=r"missing keys: \['visual.layer3.0.bn2.running_var'\]"):
    convert.from_open_clip(sd, "RN50")
  config, params = convert.from_open_clip(rn50.state_dict(), "RN50")[:2]
  with pytest.raises(ValueError, match=r"config\['image'\]\['norm'\]='group'; .* 'frozen_bn'"):
    convert.to_open_clip({**config, "image": {**config["image"], "norm": "group"}}, params)
  with pytest.raises(ValueError, match=r"config\['image_proj'\]='dense'"):
    convert.to_open_clip({**config, "image_proj": "dense"}, params)


def _small_resnet(norm: str):
  """A small open_clip ModifiedResNet (moved off its init) and the same mmjax ResNet with its
  converted params: 4 attention heads, a 24-wide output, one grid cell at 32 .. 63 px."""
  from flax import traverse_util
  from mmjax.convert import common, openclip
  from open_clip.modified_resnet import ModifiedResNet
  oc = moved_off_init(ModifiedResNet(layers=[1, 2, 1, 1], output_dim=24, heads=4,
                                     image_size=32, width=16))
  fields = dict(layers=(1, 2, 1, 1), width=16, num_heads=4, output_dim=24, norm=norm)
  model = resnet.Model(**fields)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 40, 56, 3)))
  shapes = {**{("img", *k): v for k, v in traverse_util.flatten_dict(shapes["params"]).items()},
            **{(common.STATS, "img", *k): v
               for k, v in traverse_util.flatten_dict(shapes["batch_stats"]).items()}}
  sd = {f"visual.{k}": v for k, v in oc.state_dict().items()}
  params, stats = common.split_stats(common.apply_rules(
      openclip._resnet_rules(fields), sd, config={}, image_size=0, what="ModifiedResNet",
      shapes=shapes, ignore=lambda k: k.endswith("num_batches_tracked")))
  return oc, model, {"params": params["img"], "batch_stats": stats["img"]}


def test_odd_sized_images_pool_as_open_clips_resnet(rng, torch_seed):
  """On 40 x 56 px, not multiples of 32, the anti-aliasing average pools drop the same odd
  rows (10 x 14 -> 5 x 7 -> 2 x 3 -> 1 x 1); the pool's output is 24 wide, not its 512 input."""
  oc, model, params = _small_resnet("frozen_bn")
  x = rng.normal(size=(2, 3, 40, 56)).astype(np.float32)
  got = model.apply(params, jnp.asarray(x.transpose(0, 2, 3, 1)))[0]
  with torch.no_grad():
    want = oc.double()(torch.from_numpy(x).double()).numpy()
  assert want.shape == got.shape == (2, 24)
  assert_close(got, want, dtype=jnp.float32, name="ModifiedResNet at 40 x 56")


def test_batch_norm_trains_as_torchs(rng, torch_seed):
  """norm='batch' at train time = torch's BatchNorm2d in train mode: the same features from
  the batch's statistics and the same moved running mean and var as torch keeps (momentum
  0.1, unbiased variance)."""
  oc, model, variables = _small_resnet("batch")
  x = rng.normal(size=(4, 3, 48, 40)).astype(np.float32)
  got, state = model.apply(variables, jnp.asarray(x.transpose(0, 2, 3, 1)), train=True,
                           mutable=["batch_stats"])
  new = state["batch_stats"]
  oc = oc.double().train()
  with torch.no_grad():
    want = oc(torch.from_numpy(x).double()).numpy()
  assert_close(got[0], want, dtype=jnp.float32, name="train-mode features")
  sd = oc.state_dict()
  for src, dst in (("layer2.1.bn2", ("stage2_1", "norm2")), ("bn1", ("stem_norm1",)),
                   ("layer4.0.downsample.1", ("stage4_0", "down_norm"))):
    node = new
    for k in dst:
      node = node[k]
    assert_close([node["mean"], node["var"]],
                 [sd[f"{src}.running_mean"].numpy(), sd[f"{src}.running_var"].numpy()],
                 dtype=jnp.float32, name=[f"{src} running mean", f"{src} running var"])
