"""NaFlex ViT (issue 31): transformers' Siglip2Model (NaFlex) directories convert both ways and
give its image and text embeddings (float64 reference; grids that are not the table's, larger
and smaller, so the position table is both stretched and shrunk), and a packed batch (several
images a sequence, kept apart by segment ids) gives the embeddings of its images one by one,
in every attention impl."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import convert
from mmjax.models import naflex, two_tower
from tests.open_clip_peer import import_transformers
from tests.reference import assert_close

transformers = import_transformers()
import torch  # noqa: E402

P = 4          # patch side
GRIDS = [(5, 7), (2, 3), (8, 4), (1, 1), (6, 6)]   # (rows, cols) of each image's patches
L = 41         # padded sequence length (>= the largest, 36)


def hf_model():
  """A random Siglip2Model with a 6 x 6 position table, every vector moved off its init."""
  cfg = transformers.Siglip2Config(
      vision_config=dict(hidden_size=48, intermediate_size=100, num_hidden_layers=2,
                         num_attention_heads=3, patch_size=P, num_patches=36),
      text_config=dict(vocab_size=300, hidden_size=32, intermediate_size=72,
                       num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=13,
                       projection_size=48))
  model = transformers.Siglip2Model(cfg).eval()
  with torch.no_grad():
    for p in model.parameters():
      if p.ndim <= 1 or p.shape[:2] == (1, 1):
        p.add_(0.2 * torch.randn_like(p))
  return model


def padded(rng):
  """One image a row: patches [b, L, P*P*3], mask [b, L], grids [b, 2], positions [b, L, 2]."""
  b = len(GRIDS)
  patches = rng.normal(size=(b, L, P * P * 3)).astype(np.float32)
  mask = np.zeros((b, L), np.int32)
  positions = np.zeros((b, L, 2), np.int32)
  for i, (h, w) in enumerate(GRIDS):
    mask[i, :h * w] = 1
    positions[i, :h * w] = np.stack(np.divmod(np.arange(h * w), w), -1)
  patches[mask == 0] = rng.normal(size=patches[mask == 0].shape)   # padding is not zero
  return patches, mask, np.asarray(GRIDS, np.int32), positions


def mm_inputs(patches, mask, grids, positions):
  return {"patches": jnp.asarray(patches), "segment_ids": jnp.asarray(mask),
          "positions": jnp.asarray(positions), "shapes": jnp.asarray(grids)[:, None]}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  torch.manual_seed(0)
  model = hf_model()
  path = tmp_path_factory.mktemp("siglip2")
  model.save_pretrained(path)
  return model, convert.from_hf(path), path


def test_embeddings_match_transformers_siglip2(converted, rng):
  hf, ckpt, _ = converted
  assert ckpt.config["image"]["tower"] == "naflex" and ckpt.config["image"]["posemb_grid"] == 6
  patches, mask, grids, positions = padded(rng)
  ids = rng.integers(0, 300, size=(3, 13))
  model = two_tower.Model(**ckpt.config)
  project = lambda tower: lambda m, x: getattr(m, f"{tower}_proj")(getattr(m, tower)(x)[0])
  got_img = model.apply({"params": ckpt.params}, mm_inputs(patches, mask, grids, positions),
                        method=project("img"))
  got_txt = model.apply({"params": ckpt.params}, jnp.asarray(ids, jnp.int32),
                        method=project("txt"))
  ref = hf.double()
  with torch.no_grad():
    want_img = ref.vision_model(pixel_values=torch.from_numpy(patches).double(),
                                pixel_attention_mask=torch.from_numpy(mask),
                                spatial_shapes=torch.from_numpy(grids).long()).pooler_output
    want_txt = ref.text_model(input_ids=torch.from_numpy(ids)).pooler_output
  hf.float()
  assert_close([np.asarray(got_img), np.asarray(got_txt)],
               [want_img.numpy(), want_txt.numpy()], dtype=jnp.float32,
               name=["siglip2 image features", "siglip2 text features"])


def test_round_trip_loads_in_transformers(converted, tmp_path):
  from mmjax.data.naflex import NaflexPrep
  hf, ckpt, _ = converted
  prep = NaflexPrep(P, 20, (0.4, 0.5, 0.6), (0.3, 0.2, 0.1))
  convert.to_hf(ckpt.config, ckpt.params, tmp_path, preprocess=prep)
  back = convert.from_hf(tmp_path)
  jax.tree.map(np.testing.assert_array_equal, back.params, ckpt.params)
  assert back.preprocess == prep
  proc = transformers.AutoImageProcessor.from_pretrained(tmp_path)
  assert (proc.patch_size, proc.max_num_patches) == (P, 20)
  again = transformers.Siglip2Model.from_pretrained(tmp_path).eval()
  for (name, a), (_, b) in zip(sorted(hf.state_dict().items()),
                               sorted(again.state_dict().items())):
    np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=name)


def _pack(patches, mask, grids, rows):
  """The images placed in `rows` (lists of image indices) of one sequence each."""
  k = max(map(len, rows))
  out_p = np.zeros((len(rows), L, patches.shape[-1]), np.float32)
  seg = np.zeros((len(rows), L), np.int32)
  pos = np.zeros((len(rows), L, 2), np.int32)
  shapes = np.zeros((len(rows), k, 2), np.int32)
  for r, images in enumerate(rows):
    at = 0
    for s, i in enumerate(images):
      h, w = grids[i]
      out_p[r, at:at + h * w] = patches[i, :h * w]
      seg[r, at:at + h * w] = s + 1
      pos[r, at:at + h * w] = np.stack(np.divmod(np.arange(h * w), w), -1)
      shapes[r, s] = (h, w)
      at += h * w
    assert at <= L, f"row {r} holds {at} tokens > {L}"
  return {"patches": jnp.asarray(out_p), "segment_ids": jnp.asarray(seg),
          "positions": jnp.asarray(pos), "shapes": jnp.asarray(shapes)}


@pytest.mark.parametrize("impl", ["xla", "blockwise", "auto"])
@pytest.mark.parametrize("pool_type", ["map", "gap"])
def test_packed_batch_equals_images_one_by_one(rng, impl, pool_type):
  """Five images in three rows (a row of three, two rows of one, room left in each):
  each slot's pooled output equals the image alone in its padded row."""
  tower = naflex.Model("mu/4", depth=3, pool_type=pool_type, posemb_grid=6,
                       attention_impl=impl)
  patches, mask, grids, positions = padded(rng)
  single = mm_inputs(patches, mask, grids, positions)
  params = tower.init(jax.random.PRNGKey(1), single)
  params = jax.tree.map(lambda x: x + 0.1 * jnp.asarray(rng.normal(size=x.shape), x.dtype),
                        params)
  want, _ = tower.apply(params, single)                      # [5, width]
  rows = [[1, 3, 2], [0], [4]]
  got, _ = tower.apply(params, _pack(patches, mask, grids, rows))   # [3, 3, width]
  assert got.shape == (3, 3, want.shape[-1])
  for r, images in enumerate(rows):
    for s, i in enumerate(images):
      np.testing.assert_allclose(got[r, s], want[i], rtol=2e-5, atol=2e-5,
                                 err_msg=f"row {r} slot {s} (image {i})")


def test_posemb_resize_is_antialiased_bilinear(rng):
  """A grid of the table's size gives the table itself; other grids equal
  jax.image.resize(..., 'bilinear', antialias=True) of it."""
  table = jnp.asarray(rng.normal(size=(6, 6, 5)), jnp.float32)
  for h, w in [(6, 6), (3, 9), (13, 2), (1, 1)]:
    pos = jnp.stack(jnp.divmod(jnp.arange(h * w), w), -1)[None]
    got = naflex.resized_posemb(table, pos, jnp.full((1, h * w, 2), jnp.array([h, w])))
    want = jax.image.resize(table, (h, w, 5), "bilinear", antialias=True).reshape(1, h * w, 5)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=f"grid {(h, w)}")


def test_evaluate_a_siglip2_naflex_directory_as_transformers_would(converted, rng, tmp_path):
  """experiments.evaluate on a Siglip2Model directory: images of any aspect ratio through
  NaflexPrep at the checkpoint's and at a chosen sequence length; the image embeddings equal
  those of transformers' Siglip2 image processor (PIL backend) and model, and the zero-shot
  accuracy the one computed from them, the prompts naming the classes as evaluate does
  (underscores as spaces). With random weights the classes' similarities are close (top-2
  margins down to ~1e-4), so an image whose top two classes are within the float32 error of
  each other may go either way: the accuracy is pinned to [sure hits, possible hits]."""
  from experiments import evaluate as cli
  from mmjax.data.eval_data import readable_names
  from mmjax.data.naflex import NaflexPrep
  from mmjax.data.tokenizers import get_tokenizer
  from tests.test_evaluate_cli import CLASSES, image_folder
  from tests.test_tokenizers import t5_model
  hf, ckpt, path = converted
  assert ckpt.preprocess == NaflexPrep(P, 256)   # no preprocessor_config.json: the defaults
  root = image_folder(tmp_path / "val", rng, [2, 3, 1, 2, 2, 1])
  spec = f"sentencepiece:{t5_model(tmp_path, rng)[0]}"
  templates = tmp_path / "t.txt"
  templates.write_text("a photo of a {c}.\nart of the {c}\n")
  from transformers.models.siglip2.image_processing_pil_siglip2 import Siglip2ImageProcessorPil
  from PIL import Image
  files = sorted((c, f) for c in CLASSES for f in (root / c).glob("*.png"))
  names = [c for c in CLASSES if (root / c).is_dir()]
  labels = np.array([names.index(c) for c, _ in files])
  tok = get_tokenizer(spec)
  # The class names as evaluate reads them off the folders ("golden_retriever": "golden retriever").
  prompts = [t.format(c=c) for c in readable_names(names)
             for t in ("a photo of a {c}.", "art of the {c}")]
  with torch.no_grad():
    txt = hf.text_model(input_ids=torch.from_numpy(np.asarray(tok.encode(prompts, 13)))
                        .long()).pooler_output.numpy()
  txt /= np.linalg.norm(txt, axis=1, keepdims=True)
  cls = txt.reshape(len(names), 2, -1).mean(1)
  cls /= np.linalg.norm(cls, axis=1, keepdims=True)
  model = two_tower.Model(**ckpt.config)
  tol = 1e-5   # float32 error of a similarity (measured: ~1e-7 on the embeddings)
  for max_patches in (None, 20):
    result = cli.evaluate(f"hf:{path}", f"folder:{root}", templates=str(templates),
                          tokenizer=spec, batch_size=4, progress=False, num_threads=1,
                          max_patches=max_patches)
    proc = Siglip2ImageProcessorPil(patch_size=P, max_num_patches=max_patches or 256)
    inputs = proc([Image.open(f).convert("RGB") for _, f in files], return_tensors="pt")
    with torch.no_grad():
      img = hf.vision_model(**inputs).pooler_output.numpy()
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    # The embeddings of the images as evaluate prepares them (its checkpoint's NaflexPrep).
    prep = ckpt.preprocess._replace(max_patches=max_patches or 256)
    prepared = []
    for _, f in files:
      with Image.open(f) as im:
        prepared.append(prep(im))
    got = model.apply(ckpt.variables, {k: jnp.asarray(np.stack([x[k] for x in prepared]))
                                       for k in prepared[0]}, method="encode_image")
    np.testing.assert_allclose(np.asarray(got), img, atol=tol, err_msg=str(max_patches))
    scores = img @ cls.T
    true = scores[np.arange(len(labels)), labels]
    others = np.where(np.eye(len(names), dtype=bool)[labels], -np.inf, scores).max(1)
    sure, possible = int(np.sum(true > others + tol)), int(np.sum(true >= others - tol))
    assert result["max_patches"] == (max_patches or 256)
    n = len(labels)
    assert sure / n - 1e-9 <= result["metrics"]["acc1"] <= possible / n + 1e-9, (
        max_patches, sure, possible, result)


def test_max_patches_on_a_fixed_size_model_is_one_line(tmp_path, rng):
  from experiments import evaluate as cli
  from tests.test_convert_hf import random_hf
  from tests.test_evaluate_cli import image_folder
  random_hf("siglip").save_pretrained(tmp_path / "s")
  with pytest.raises(ValueError, match=r"--max_patches=64: checkpoint .* is not a NaFlex model"):
    cli.evaluate(f"hf:{tmp_path / 's'}", f"folder:{image_folder(tmp_path / 'v', rng, [1] * 6)}",
                 max_patches=64, progress=False)
