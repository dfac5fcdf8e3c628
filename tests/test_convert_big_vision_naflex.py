"""big_vision's SigLIP 2 .npz files: NaFlex ones (naflex_vit's image tower) convert to mmjax's
NaFlex tower and give transformers' Siglip2Model features on grids that are not the position
table's; from_big_vision -> to_big_vision gives back the same arrays in both block layouts;
fixed-resolution SigLIP 2 files (SigLIP's layout, Gemma's 256,000-token vocabulary) convert
too; a malformed NaFlex file is refused in one line naming the key.

big_vision is not installed (it needs TensorFlow), so the files come from `write_npz`, which
names the arrays as big_vision's modules do.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import convert
from mmjax.models import two_tower
from tests.open_clip_peer import import_transformers
from tests.reference import assert_close

transformers = import_transformers()
import torch  # noqa: E402

P, G = 4, 6                          # patch side, position table side
IMG = dict(width=48, heads=3, mlp=100, depth=2)
TXT = dict(width=32, heads=2, mlp=72, depth=2, vocab=300, len=13)
GRIDS = [(5, 7), (2, 3), (8, 4), (1, 1)]   # (rows, cols): stretch and shrink the table
L = 36                               # padded sequence length (>= 5 * 7)


def _block(rng, w, heads, mlp):
  """One encoder block's arrays, named as naflex_vit.Encoder1DBlock (and vit.py's) create
  them: LayerNorm_0, MultiHeadDotProductAttention_0 (flax's [w, h, d] q/k/v kernels,
  [h, d, w] out), LayerNorm_1, MlpBlock_0 (vit.MlpBlock: Dense_0, Dense_1)."""
  d = w // heads
  n = lambda *s: rng.normal(size=s).astype(np.float32) * 0.3
  out = {f"LayerNorm_{i}/{p}": (1.0 if p == "scale" else 0.0) + n(w)
         for i in (0, 1) for p in ("scale", "bias")}
  for name in ("query", "key", "value"):
    out[f"MultiHeadDotProductAttention_0/{name}/kernel"] = n(w, heads, d)
    out[f"MultiHeadDotProductAttention_0/{name}/bias"] = n(heads, d)
  out.update({"MultiHeadDotProductAttention_0/out/kernel": n(heads, d, w),
              "MultiHeadDotProductAttention_0/out/bias": n(w),
              "MlpBlock_0/Dense_0/kernel": n(w, mlp), "MlpBlock_0/Dense_0/bias": n(mlp),
              "MlpBlock_0/Dense_1/kernel": n(mlp, w), "MlpBlock_0/Dense_1/bias": n(w)})
  return out


def _encoder(rng, prefix, c, scan):
  """naflex_vit.Encoder / vit.Encoder: encoderblock_{i} (scan=False) or one `encoderblock`
  with a leading depth axis (nn.scan, variable_axes={'params': 0}); encoder_norm."""
  blocks = [_block(rng, c["width"], c["heads"], c["mlp"]) for _ in range(c["depth"])]
  if scan:
    out = {f"{prefix}encoderblock/{k}": np.stack([b[k] for b in blocks]) for k in blocks[0]}
  else:
    out = {f"{prefix}encoderblock_{i}/{k}": v for i, b in enumerate(blocks) for k, v in b.items()}
  w = c["width"]
  out[f"{prefix}encoder_norm/scale"] = 1 + 0.3 * rng.normal(size=w).astype(np.float32)
  out[f"{prefix}encoder_norm/bias"] = 0.3 * rng.normal(size=w).astype(np.float32)
  return out


def write_npz(path, rng, *, scan=False, naflex=True, vocab=TXT["vocab"], txt_width=None):
  """A random big_vision SigLIP 2 two-tower .npz with 'params/' keys.

  Names follow big_vision (git HEAD 0127fb6): models/proj/image_text/naflex_vit.py
  `_Model.__call__` (img/embedding: nn.Dense on flattened patches; img/pos_embedding
  [nposemb, nposemb, width]; img/Transformer; img/MAPHead_0 from its `MAPHead`: probe
  [1, 1, w], MultiHeadDotProductAttention_0, LayerNorm_0, MlpBlock_0), or for naflex=False
  models/vit.py `_Model.__call__` (img/embedding: nn.Conv [p, p, 3, w]; img/pos_embedding
  [1, n, w]); models/proj/image_text/text_transformer.py `_Model.__call__` (txt/Embed_0,
  txt/pos_embedding, txt/Encoder_0, txt/head); two_towers.py `Model.__call__` (t, b [1]).
  SigLIP 2's image tower has no head (out_dim=[None, d] in its demo colab).
  """
  t = dict(TXT, width=txt_width or TXT["width"])
  w, n = IMG["width"], lambda *s: rng.normal(size=s).astype(np.float32) * 0.3
  img = {"embedding/bias": n(w)}
  if naflex:
    img.update({"embedding/kernel": n(P * P * 3, w), "pos_embedding": n(G, G, w)})
  else:
    img.update({"embedding/kernel": n(P, P, 3, w), "pos_embedding": n(1, G * G, w)})
  img.update(_encoder(rng, "Transformer/", IMG, scan))
  img.update({f"MAPHead_0/{k}": v for k, v in _block(rng, w, IMG["heads"], IMG["mlp"]).items()
              if not k.startswith("LayerNorm_1")})
  img["MAPHead_0/probe"] = n(1, 1, w)
  txt = {"Embed_0/embedding": n(vocab, t["width"]), "pos_embedding": n(1, t["len"], t["width"]),
         "head/kernel": n(t["width"], w), "head/bias": n(w)}
  txt.update(_encoder(rng, "Encoder_0/", t, scan))
  arrays = {**{f"params/img/{k}": v for k, v in img.items()},
            **{f"params/txt/{k}": v for k, v in txt.items()},
            "params/t": np.array([2.3], np.float32), "params/b": np.array([-10.0], np.float32)}
  np.savez(path, **arrays)
  return arrays


def naflex_inputs(rng):
  """Images of GRIDS patchified as big_vision's ops_naflex `patchify` (tf.image.extract_patches:
  each patch's pixels in (row, column, channel) order, patches row-major), padded to L:
  patches [b, L, P*P*3], mask [b, L], grids [b, 2], positions [b, L, 2]."""
  b = len(GRIDS)
  patches = rng.normal(size=(b, L, P * P * 3)).astype(np.float32)   # padding is not zero
  mask, positions = np.zeros((b, L), np.int32), np.zeros((b, L, 2), np.int32)
  for i, (h, w) in enumerate(GRIDS):
    image = rng.uniform(-1, 1, size=(h * P, w * P, 3)).astype(np.float32)
    patches[i, :h * w] = image.reshape(h, P, w, P, 3).transpose(0, 2, 1, 3, 4).reshape(h * w, -1)
    mask[i, :h * w] = 1
    positions[i, :h * w] = np.stack(np.divmod(np.arange(h * w), w), -1)
  return patches, mask, np.asarray(GRIDS, np.int32), positions


def hand_mapped(arrays):
  """Some of transformers' Siglip2Model keys taken from the npz by hand (independently of
  mmjax.convert): the patch Linear, the G * G position rows (row-major), one query."""
  img = lambda k: arrays[f"params/img/{k}"]
  q = img("Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query/kernel")
  return {"vision_model.embeddings.patch_embedding.weight": img("embedding/kernel").T,
          "vision_model.embeddings.patch_embedding.bias": img("embedding/bias"),
          "vision_model.embeddings.position_embedding.weight":
              np.stack([img("pos_embedding")[r, c] for r in range(G) for c in range(G)]),
          "vision_model.encoder.layers.0.self_attn.q_proj.weight":
              q.reshape(q.shape[0], -1).T}


def features(ckpt, image, ids):
  """mmjax's (image embedding, text embedding) of a converted checkpoint, unnormalised."""
  model = two_tower.Model(**ckpt.config)
  project = lambda tower: lambda m, x: getattr(m, f"{tower}_proj")(getattr(m, tower)(x)[0])
  return [np.asarray(model.apply({"params": ckpt.params}, x, method=project(tower)))
          for tower, x in (("img", image), ("txt", jnp.asarray(ids, jnp.int32)))]


def test_naflex_npz_matches_transformers_siglip2(rng, tmp_path):
  arrays = write_npz(tmp_path / "naflex.npz", rng)
  ckpt = convert.from_big_vision(tmp_path / "naflex.npz")
  img = ckpt.config["image"]
  assert (img["tower"], img["patch_size"], img["posemb_grid"], img["pool_type"]) == (
      "naflex", (P, P), G, "map")
  assert ckpt.config["image_proj"] == "none" and ckpt.config["text_proj"] == "dense_bias"
  hf_dir = convert.to_hf(ckpt.config, ckpt.params, tmp_path / "hf")
  hf = transformers.Siglip2Model.from_pretrained(hf_dir).eval().double()
  sd = hf.state_dict()
  for k, v in hand_mapped(arrays).items():
    np.testing.assert_array_equal(sd[k].float().numpy(), v, err_msg=k)
  patches, mask, grids, positions = naflex_inputs(rng)
  ids = rng.integers(0, TXT["vocab"], size=(3, TXT["len"]))
  got = features(ckpt, {"patches": jnp.asarray(patches), "segment_ids": jnp.asarray(mask),
                        "positions": jnp.asarray(positions),
                        "shapes": jnp.asarray(grids)[:, None]}, ids)
  with torch.no_grad():
    want_img = hf.vision_model(pixel_values=torch.from_numpy(patches).double(),
                               pixel_attention_mask=torch.from_numpy(mask),
                               spatial_shapes=torch.from_numpy(grids).long()).pooler_output
    want_txt = hf.text_model(input_ids=torch.from_numpy(ids)).pooler_output
  assert_close(got, [want_img.numpy(), want_txt.numpy()], dtype=jnp.float32,
               name=["naflex image features", "text features"])


@pytest.mark.parametrize("scan", [False, True])
def test_naflex_round_trip_is_exact(rng, tmp_path, scan):
  arrays = write_npz(tmp_path / "a.npz", rng, scan=scan)
  ckpt = convert.from_big_vision(tmp_path / "a.npz")
  convert.to_big_vision(ckpt.config, ckpt.params, tmp_path / "b.npz", scan=scan)
  with np.load(tmp_path / "b.npz") as back:
    assert sorted(back.files) == sorted(arrays)
    for k, v in arrays.items():
      np.testing.assert_array_equal(back[k], v, err_msg=k)


def test_fixed_resolution_siglip2_npz(rng, tmp_path):
  """SigLIP 2's fixed-resolution layout is SigLIP's: a ViT tower, Gemma's tokenizer picked by
  the 256,000-token vocabulary, transformers' SiglipModel's features, an exact round trip."""
  arrays = write_npz(tmp_path / "fixed.npz", rng, naflex=False, vocab=256000, txt_width=16)
  (tmp_path / "gemma.model").write_bytes(b"stand-in: from_big_vision only names the file")
  ckpt = convert.from_big_vision(tmp_path / "fixed.npz", tokenizer=tmp_path / "gemma.model")
  assert "tower" not in ckpt.config["image"] or ckpt.config["image"]["tower"] == "vit"
  assert ckpt.config["image"]["posemb"] == "learn" and ckpt.preprocess.size == P * G
  assert ckpt.tokenizer == f"gemma:{tmp_path / 'gemma.model'}"
  convert.to_big_vision(ckpt.config, ckpt.params, tmp_path / "back.npz")
  with np.load(tmp_path / "back.npz") as back:
    assert sorted(back.files) == sorted(arrays)
    for k, v in arrays.items():
      np.testing.assert_array_equal(back[k], v, err_msg=k)
  hf = transformers.SiglipModel.from_pretrained(
      convert.to_hf(ckpt.config, ckpt.params, tmp_path / "hf")).eval().double()
  kernel = arrays["params/img/embedding/kernel"]       # [p, p, 3, w] -> torch OIHW
  np.testing.assert_array_equal(
      hf.state_dict()["vision_model.embeddings.patch_embedding.weight"].float().numpy(),
      kernel.transpose(3, 2, 0, 1))
  images = rng.uniform(-1, 1, size=(2, P * G, P * G, 3)).astype(np.float32)
  ids = rng.integers(0, 256000, size=(2, TXT["len"]))
  got = features(ckpt, jnp.asarray(images), ids)
  with torch.no_grad():
    want_img = hf.vision_model(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2))
                               .double()).pooler_output
    want_txt = hf.text_model(input_ids=torch.from_numpy(ids)).pooler_output
  assert_close(got, [want_img.numpy(), want_txt.numpy()], dtype=jnp.float32,
               name=["fixed-resolution image features", "text features"])


def _edited(arrays, path, drop=(), **replace):
  out = {k: v for k, v in arrays.items() if k not in drop}
  out.update({f"params/img/{k.replace('__', '/')}": v for k, v in replace.items()})
  np.savez(path, **out)
  return path


def test_bad_naflex_files_are_refused_naming_the_key(rng, tmp_path):
  arrays = write_npz(tmp_path / "ok.npz", rng)
  w = IMG["width"]
  cases = [
      ({"drop": ["params/img/pos_embedding"]},
       r"params/img/pos_embedding is missing; a NaFlex image tower"),
      ({"pos_embedding": np.zeros((G, G + 1, w), np.float32)},
       r"params/img/pos_embedding is \(6, 7, 48\); a NaFlex position table is \[G, G, 48\]"),
      ({"pos_embedding": np.zeros((G * G, w), np.float32)},
       r"params/img/pos_embedding is \(36, 48\)"),
      ({"embedding__kernel": np.zeros((50, w), np.float32)},
       r"params/img/embedding/kernel is \(50, 48\); a NaFlex patch embedding takes p \* p \* 3"),
      ({"embedding__kernel": np.zeros((P * P * 3, w + 1), np.float32)},
       r"wrong shapes: \['params/img/embedding/kernel: \(48, 49\) \(want \(48, 48\)\)'\]"),
      ({"drop": ["params/img/embedding/bias"]},
       r"missing keys: \['params/img/embedding/bias'\]"),
      ({"patchln_pre__scale": np.ones(P * P * 3, np.float32)},
       r"unexpected keys: \['params/img/patchln_pre/scale'\]"),
  ]
  for i, (edit, message) in enumerate(cases):
    path = _edited(arrays, tmp_path / f"bad{i}.npz", **edit)
    with pytest.raises(ValueError, match=message) as info:
      convert.from_big_vision(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value), str(info.value)
