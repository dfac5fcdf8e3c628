"""open_clip CoCa <-> mmjax: embeddings, image tokens and decoder logits of converted random
open_clip CoCa models against open_clip in float64; exact round trips; layout errors."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import convert
from mmjax.models import coca
from tests.open_clip_peer import import_open_clip
from tests.reference import assert_close

open_clip = import_open_clip()
import torch  # noqa: E402  (after the skip above)

SOT, EOT = 61, 62   # the tiny models' vocabulary: 64 ids, pad 0


def perturb(model):
  """Every vector (LayerNorms, biases, the cls tokens, the logit scale) off its init, so that a
  swapped or dropped one shows up; eval mode."""
  model = model.eval()
  with torch.no_grad():
    # open_clip leaves the decoder's vocabulary projection as torch.empty (its
    # MultimodalTransformer.init_parameters is never called): whatever memory held, NaN too.
    proj = model.text_decoder.text_projection
    proj.copy_(torch.randn_like(proj) * proj.shape[0] ** -0.5)
    for p in model.parameters():
      if p.ndim <= 1:
        p.add_(0.2 * torch.randn_like(p))
      assert torch.isfinite(p).all() and p.abs().max() > 0
  return model


def tiny_open_clip(vision_width: int):
  """open_clip's CoCa class with the structure of coca_ViT-B-32 and tiny widths: 32 px
  images, 8 px patches, 6 pooler queries, text / decoder width 32, 11 tokens, 64 ids."""
  return perturb(open_clip.CoCa(
      embed_dim=32,
      vision_cfg=dict(image_size=32, patch_size=8, width=vision_width, layers=2, head_width=16,
                      attentional_pool=True, attn_pooler_heads=2, attn_pooler_queries=6,
                      output_tokens=True),
      text_cfg=dict(context_length=11, vocab_size=64, width=32, heads=2, layers=2,
                    embed_cls=True, output_tokens=True),
      multimodal_cfg=dict(context_length=11, vocab_size=64, width=32, heads=2, layers=2)))


def tiny_config(vision_width: int) -> dict:
  return convert.coca_config(32, 32, 8, (vision_width, 2, vision_width // 16), 2, (32, 2, 2),
                             (2, 2), n_queries=6, context_length=11, vocab_size=64)


def random_tokens(rng, n: int, length: int, vocab: int, sot: int, eot: int) -> np.ndarray:
  """SOT, random ids (some 0, the pad id, inside the text: open_clip's padding mask reads
  them), EOT, then padding; one row full length."""
  tokens = np.zeros((n, length), np.int64)
  lengths = np.r_[length, rng.integers(3, length, size=n - 1)]
  for row, k in zip(tokens, lengths):
    row[0], row[k - 1] = sot, eot
    row[1:k - 1] = rng.integers(1, min(vocab, sot), size=k - 2)
    row[rng.integers(1, k - 1)] = 0
  return tokens


def mmjax_outputs(config, params, images_nchw, tokens):
  model = coca.Model(**config)
  fn = jax.jit(lambda p, x, t: model.apply({"params": p}, x, t))
  zimg, ztxt, out = fn(jax.device_put(params), jnp.asarray(images_nchw.transpose(0, 2, 3, 1)),
                       jnp.asarray(tokens, jnp.int32))
  return [np.asarray(x) for x in (zimg, ztxt, out["image_tokens"], out["logits"])]


def open_clip_outputs(oc, images_nchw, tokens):
  """The same (float32) weights in float64."""
  oc = copy.deepcopy(oc).double()
  with torch.no_grad():
    out = oc(torch.from_numpy(images_nchw).double(), torch.from_numpy(tokens))
    _, image_embs = oc._encode_image(torch.from_numpy(images_nchw).double())
  got = [out["image_features"], out["text_features"], image_embs, out["logits"]]
  assert all(x.dtype == torch.float64 for x in got)
  return [x.numpy() for x in got]


NAMES = ["image embedding", "text embedding", "image tokens", "decoder logits"]


# vision width 48: the pooler's torch attention has separate q/k/v weights (kdim != embed_dim);
# 32: one packed in_proj, as for a model whose vision width is its embed_dim.
@pytest.mark.parametrize("vision_width", [48, 32])
def test_tiny_coca_matches_open_clip(vision_width, rng, torch_seed):
  oc = tiny_open_clip(vision_width)
  images = rng.normal(size=(3, 3, 32, 32)).astype(np.float32)
  tokens = random_tokens(rng, 3, 11, 64, SOT, EOT)
  config, params, prep, tok = convert.from_open_clip_coca(
      oc.state_dict(), tiny_config(vision_width), image_size=32)[:4]
  assert tok == "clip" and prep.size == 32
  got = mmjax_outputs(config, params, images, tokens)
  want = open_clip_outputs(oc, images, tokens)
  assert got[3].shape == (3, 10, 64)
  assert_close(got, want, dtype=jnp.float32, name=NAMES)
  # A wrong padding mask (the 'correct' one open_clip does not use) fails.
  wrong = dict(config, text=dict(config["text"], correct_cls_mask=True))
  bad = mmjax_outputs(wrong, params, images, tokens)
  with pytest.raises(AssertionError):
    assert_close(bad[1], want[1], dtype=jnp.float32)


def test_coca_b32_matches_open_clip(rng, torch_seed):
  """The full coca_ViT-B-32 (random init, vectors perturbed), one image and two texts."""
  oc = perturb(open_clip.create_model("coca_ViT-B-32", pretrained=None))
  images = rng.normal(size=(1, 3, 224, 224)).astype(np.float32)
  tokens = random_tokens(rng, 2, 76, 49408, 49406, 49407)
  tokens = np.concatenate([tokens[:1], tokens[1:]])
  images = np.repeat(images, 2, axis=0)
  config, params, *_ = convert.from_open_clip(oc.state_dict(), "coca_ViT-B-32")
  assert config == convert.open_clip_coca_config("coca_ViT-B-32")
  got = mmjax_outputs(config, params, images, tokens)
  del params
  assert_close(got, open_clip_outputs(oc, images, tokens), dtype=jnp.float32, name=NAMES)


def test_round_trips_are_exact(rng, torch_seed):
  """open_clip -> mmjax -> open_clip and mmjax -> open_clip (strict load) -> mmjax, bitwise."""
  for width in (48, 32):
    oc = tiny_open_clip(width)
    config = tiny_config(width)
    want = {k: v.numpy() for k, v in oc.state_dict().items()}
    back = convert.to_open_clip(*convert.from_open_clip_coca(want, config, image_size=32)[:2])
    assert back.keys() == want.keys()
    for k, v in want.items():
      assert back[k].dtype == np.float32 and back[k].flags.c_contiguous, k
      np.testing.assert_array_equal(back[k], v, err_msg=k)

    model = coca.Model(**config)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)),
                            jnp.zeros((1, 11), jnp.int32))["params"]
    params = jax.tree.map(lambda s: rng.standard_normal(s.shape, np.float32), shapes)
    fresh = tiny_open_clip(width)
    fresh.load_state_dict(convert.to_open_clip_coca(config, params, as_torch=True))   # strict
    params2 = convert.from_open_clip_coca(fresh.state_dict(), config, image_size=32).params
    assert jax.tree.structure(params2) == jax.tree.structure(params)
    jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_bad_inputs_are_named():
  oc = tiny_open_clip(48)
  sd = {k: v.numpy() for k, v in oc.state_dict().items()}
  config = tiny_config(48)
  with pytest.raises(ValueError, match=r"model_name='coca_ViT-B-99'.*supported"):
    convert.from_open_clip(sd, "coca_ViT-B-99")
  with pytest.raises(ValueError, match=r"missing keys: \['visual.attn_pool.ln_k.weight'\]"):
    convert.from_open_clip_coca({k: v for k, v in sd.items()
                                 if k != "visual.attn_pool.ln_k.weight"}, config, image_size=32)
  with pytest.raises(ValueError, match=r"wrong shapes: \['visual.attn_pool.query: \(6, 32\) "
                                       r"\(want \(5, 32\)\)'"):
    convert.from_open_clip_coca(sd, dict(config, n_queries=5), image_size=32)
  params = convert.from_open_clip_coca(sd, config, image_size=32).params
  with pytest.raises(ValueError, match=r"config\['text'\]\['correct_cls_mask'\]=True"):
    convert.to_open_clip(dict(config, text=dict(config["text"], correct_cls_mask=True)), params)
  with pytest.raises(ValueError, match=r"config\['bos_id'\]=2"):
    convert.to_open_clip(dict(config, bos_id=2), params)


def test_table_matches_open_clip_configs():
  for name, spec in convert.OPEN_CLIP_COCA_MODELS.items():
    c = open_clip.get_model_config(name)
    v, t, m = c["vision_cfg"], c["text_cfg"], c["multimodal_cfg"]
    assert v["attentional_pool"] is True and t["embed_cls"] is True, name
    assert m["width"] == t["width"] and not c.get("quick_gelu", False), name
    got = (spec.embed_dim, spec.image_size, spec.patch_size, spec.vision, spec.pool_heads,
           spec.text, spec.decoder, spec.context_length, spec.vocab_size)
    want = (c["embed_dim"], v["image_size"], v["patch_size"],
            (v["width"], v["layers"], v["width"] // v.get("head_width", 64)),
            v["attn_pooler_heads"], (t["width"], t["layers"], t["heads"]),
            (m["layers"], m["heads"]), t["context_length"], t["vocab_size"])
    assert got == want, name
