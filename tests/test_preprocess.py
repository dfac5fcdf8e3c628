"""A converted Hugging Face checkpoint's eval preprocessing (mmjax.convert.from_hf(...).preprocess,
and the evaluation pipeline that applies it) against transformers' own image processors, saved
with save_pretrained beside a tiny model and applied to random images of odd, non-square sizes:
the resize (size, filter, rounding), the centre crop, the rescale, mean and std, channel order.

The reference is the PIL backend of transformers' processors (SiglipImageProcessorPil,
CLIPImageProcessorPil; transformers 4's SiglipImageProcessor / CLIPImageProcessor): the same PIL
filters as mmjax, so the pixels agree to float32 round-off. transformers 5's default torchvision
backend resamples differently by design (up to 15 grey levels on these images), as open_clip's
torchvision transforms do.
"""

import numpy as np
import pytest
from PIL import Image

from mmjax import convert
from tests.open_clip_peer import import_open_clip, import_transformers

SIZE = 40   # the tiny models' image size (patch 8)

# (kind, processor settings): the defaults, and a bilinear filter with a mean and std that
# differ per channel (a swapped channel order, or mean and std swapped, shows).
CASES = {
    "siglip_default": ("siglip", {}),
    "siglip_bilinear_mean_std": ("siglip", dict(resample=2, image_mean=[0.2, 0.5, 0.7],
                                                image_std=[0.3, 0.6, 0.9])),
    "clip_default": ("clip", {}),
    "clip_bilinear_mean_std": ("clip", dict(resample=2, image_mean=[0.1, 0.45, 0.8],
                                            image_std=[0.25, 0.5, 0.75])),
}


def processor_class(transformers, kind):
  name = {"siglip": "SiglipImageProcessor", "clip": "CLIPImageProcessor"}[kind]
  return getattr(transformers, name + "Pil", None) or getattr(transformers, name)


def save_tiny_hf(path, kind, processor_kwargs):
  """A random 1-layer SiglipModel / CLIPModel (SIZE px images) and its image processor, both
  written by save_pretrained into `path`; returns the processor class."""
  transformers = import_transformers()
  import torch
  torch.manual_seed(0)
  vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                image_size=SIZE, patch_size=8)
  text = dict(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
              num_attention_heads=2, max_position_embeddings=8)
  if kind == "siglip":
    model = transformers.SiglipModel(transformers.SiglipConfig(vision_config=vision,
                                                               text_config=text))
    size = dict(size={"height": SIZE, "width": SIZE})
  else:
    model = transformers.CLIPModel(transformers.CLIPConfig(
        vision_config=vision, text_config=dict(text, eos_token_id=49, bos_token_id=48,
                                               pad_token_id=0), projection_dim=16))
    size = dict(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE})
  model.save_pretrained(path)
  cls = processor_class(transformers, kind)
  cls(**size, **processor_kwargs).save_pretrained(path)
  return cls


def random_images(rng, n=14):
  """RGB images of odd sizes, portrait and landscape, smaller and larger than SIZE (up- and
  down-sampling); one SIZE x SIZE (no resize), one with its shorter side SIZE (CLIP: crop only),
  an odd square, and a greyscale one."""
  shapes = [(SIZE, SIZE), (SIZE, 2 * SIZE + 7), (3 * SIZE + 3, SIZE), (41, 41), (9, 23)]
  while len(shapes) < n:
    h, w = (2 * rng.integers(4, 64, size=2) + 1).tolist()
    if h != w:
      shapes.append((h, w))
  images = [Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))
            for h, w in shapes]
  return images + [Image.fromarray(rng.integers(0, 256, size=(27, 51), dtype=np.uint8), "L")]


@pytest.mark.parametrize("case", sorted(CASES))
def test_hf_checkpoint_preprocessing_equals_transformers_processor(case, rng, tmp_path):
  """from_hf(dir).preprocess(image) == the saved processor's pixel_values (NCHW -> NHWC) within
  float32 round-off, on PIL images and on the same pixels as uint8 arrays."""
  transformers = import_transformers()
  kind, kwargs = CASES[case]
  cls = save_tiny_hf(tmp_path, kind, kwargs)
  prep = convert.from_hf(tmp_path).preprocess
  proc = cls.from_pretrained(tmp_path)
  assert isinstance(proc, transformers.image_processing_utils.BaseImageProcessor)
  images = random_images(rng)
  resized, wants = set(), []
  for image in images:
    want = proc(images=image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    got = prep(image)
    assert got.dtype == np.float32 and got.shape == want.shape == (SIZE, SIZE, 3)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5, err_msg=f"{case} {image.size}")
    if image.mode == "RGB":
      np.testing.assert_array_equal(prep(np.asarray(image)), got)
    resized.add(image.size != (SIZE, SIZE))
    wants.append(want)
  assert resized == {True, False}
  # The data are informative: spread-out values, channels that differ (RGB images), and a
  # greyscale image whose channels differ only by the mean and std.
  want = np.stack(wants)
  assert np.std(want) > 0.3 and not np.allclose(want[:-1, ..., 0], want[:-1, ..., 1])
  grey = want[-1] * np.float32(prep.std) + np.float32(prep.mean)
  np.testing.assert_allclose(grey[..., 1:], grey[..., :1].repeat(2, -1), atol=1e-5)


def test_eval_batches_apply_the_checkpoints_preprocessing(rng, tmp_path):
  """An image folder read by eval_batches with a converted CLIP checkpoint's preprocessing (as
  `experiments/evaluate.py` reads it): each valid row equals transformers' processor on that
  file, the labels are the folders' indices, and the padding rows are marked invalid."""
  from mmjax.data import eval_data
  cls = save_tiny_hf(tmp_path / "ckpt", "clip", CASES["clip_bilinear_mean_std"][1])
  ckpt = convert.from_hf(tmp_path / "ckpt")
  proc = cls.from_pretrained(tmp_path / "ckpt")
  root = tmp_path / "val"
  files = []
  for label, name in enumerate(["ant", "bee"]):
    (root / name).mkdir(parents=True)
    for i, image in enumerate(random_images(rng, n=6)[1:] if label else random_images(rng, n=6)):
      path = root / name / f"{i}.png"
      image.save(path)
      files.append((path, label))
  ds = eval_data.open_eval_set(f"folder:{root}")
  batches = list(eval_data.eval_batches(ds, ckpt.preprocess, batch_size=5, num_threads=1))
  images = np.concatenate([b["image"][b["valid"]] for b in batches])
  labels = np.concatenate([b["label"][b["valid"]] for b in batches])
  assert len(files) % 5 and sum(int(b["valid"].sum()) for b in batches) == len(files)
  np.testing.assert_array_equal(labels, [label for _, label in files])
  for got, (path, _) in zip(images, files):
    with Image.open(path) as image:
      want = proc(images=image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5, err_msg=str(path))


@pytest.mark.parametrize("model_name", ["ViT-B-32", "RN50", "ViT-B-16-SigLIP"])
def test_open_clip_preprocessing_equals_open_clips_transform(model_name, rng):
  """mmjax.convert.openclip.preprocess(name) against open_clip's own eval transform built from
  the model's pretrained config (its mean, std, filter, resize mode), on images whose centre
  crop excess d has d % 4 == 3: torchvision's CenterCrop starts at round(d / 2), half to even,
  one pixel after d // 2 (transformers' rule)."""
  from mmjax.convert import openclip
  oc = import_open_clip()
  cfg = oc.get_pretrained_cfg(model_name, oc.list_pretrained_tags_by_model(model_name)[0])
  want_fn = oc.image_transform(224, is_train=False, mean=cfg["mean"], std=cfg["std"],
                               resize_mode=cfg["resize_mode"], interpolation=cfg["interpolation"])
  prep = openclip.preprocess(model_name)
  # (w, h): unresized with an excess of 3 (rows) and 7 (columns); resized (the long side to
  # 224 * long // short) with excesses 7 and 11; then 1 and 5 (half to even, not half up),
  # 2 and 0 (the rules agree).
  for w, h in [(224, 227), (231, 224), (448, 462), (231, 243), (225, 224), (224, 229),
               (226, 224), (300, 300)]:
    img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    want = want_fn(img).numpy().transpose(1, 2, 0)
    np.testing.assert_allclose(prep(img), want, atol=2e-5, err_msg=f"{model_name} {w}x{h}")
