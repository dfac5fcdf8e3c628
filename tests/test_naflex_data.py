"""mmjax.data.naflex: the NaFlex resize and patches against transformers' Siglip2 image processor
(PIL backend, built in code), and the invariants of padding and packing images into sequences.

The reference for size_for_budget is transformers' own get_image_size_for_max_num_patches; for
prepare, Siglip2ImageProcessorPil's pixel_values, spatial_shapes and pixel_attention_mask. The
packing checks unpack each row by its segment ids, independently of how mmjax wrote it.
"""

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from mmjax.data import naflex
from tests.open_clip_peer import import_transformers


def siglip2_pil_module():
  import_transformers()
  return pytest.importorskip("transformers.models.siglip2.image_processing_pil_siglip2",
                             reason="needs transformers 5's Siglip2 PIL-backend image processor")


def random_sides(rng, n):
  """n (height, width) pairs: log-uniform sides 1..20000 px, a third of them with aspect
  ratios up to 1:2000, a few tiny ones."""
  sides = np.exp(rng.uniform(0, np.log(20000), size=(n, 2))).astype(int)
  extreme = rng.random(n) < 1 / 3
  sides[extreme, 0] = rng.integers(1, 12, size=extreme.sum())
  sides[extreme] = np.where(rng.random((extreme.sum(), 1)) < 0.5, sides[extreme],
                            sides[extreme][:, ::-1])
  return np.maximum(sides, 1)


def test_size_for_budget_equals_transformers(rng):
  reference = siglip2_pil_module().get_image_size_for_max_num_patches
  sides = random_sides(rng, 1500)
  patches = rng.choice([1, 8, 14, 16, 32], size=len(sides))
  budgets = rng.integers(16, 1025, size=len(sides))
  fixed = [(1, 1, 16, 1024), (1, 20000, 16, 16), (20000, 1, 14, 1024), (224, 224, 16, 196),
           (256, 256, 16, 256), (3, 5, 16, 16), (10**6, 10**6, 16, 1024), (1, 1, 16, 1)]
  for h, w, p, budget in fixed + list(zip(sides[:, 0], sides[:, 1], patches, budgets)):
    args = (int(h), int(w), int(p), int(budget))
    got = naflex.size_for_budget(*args)
    assert got == tuple(reference(*args)), args
    assert got[0] % p == 0 and got[1] % p == 0 and (got[0] // p) * (got[1] // p) <= budget, args


def random_image(rng, height, width, mode="RGB"):
  channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
  pixels = rng.integers(0, 256, size=(height, width, channels), dtype=np.uint8)
  return Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode)


# (height, width, patch, max_patches): odd sizes, extreme aspect ratios, up- and downscaling.
PARITY_CASES = [(37, 101, 16, 64), (301, 7, 16, 256), (5, 5, 8, 100), (123, 457, 14, 196),
                (640, 480, 16, 1024), (19, 2000, 16, 32), (257, 255, 32, 16), (97, 61, 16, 1)]


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_prepare_equals_siglip2_processor(rng, mode):
  """Patches normalised (x / 255 - 0.5) / 0.5 are pixel_values row for row; the grid is
  spatial_shapes; the padding of `pad` is pixel_attention_mask. A grey image is converted to
  RGB by both (transformers with do_convert_rgb=True)."""
  module = siglip2_pil_module()
  for height, width, patch, budget in PARITY_CASES:
    image = random_image(rng, height, width, mode)
    processor = module.Siglip2ImageProcessorPil(patch_size=patch, max_num_patches=budget,
                                                do_convert_rgb=mode != "RGB")
    want = processor(images=[image], return_tensors="np")
    got = naflex.prepare(image, patch, budget)
    h, w = got.grid
    assert got.patches.dtype == np.uint8 and got.patches.shape == (h * w, patch * patch * 3)
    assert tuple(want["spatial_shapes"][0]) == (h, w), (height, width, patch, budget)
    normalised = (got.patches / 255.0 - 0.5) / 0.5
    np.testing.assert_allclose(want["pixel_values"][0, :h * w], normalised, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(want["pixel_values"][0, h * w:], 0)
    padded = naflex.pad([got], budget)
    np.testing.assert_array_equal(want["pixel_attention_mask"][0], padded["segment_ids"][0])


def test_prepare_array_equals_pil_and_rgba_is_converted(rng):
  """A uint8 array gives the PIL image's patches; RGBA and grey PIL images are converted with
  .convert('RGB') (open_clip's conversion: the alpha is dropped, not composited)."""
  rgba = random_image(rng, 45, 77, "RGBA")
  rgb = np.asarray(rgba.convert("RGB"))
  from_array = naflex.prepare(rgb, 16, 40)
  from_rgba = naflex.prepare(rgba, 16, 40)
  np.testing.assert_array_equal(from_array.patches, from_rgba.patches)
  np.testing.assert_array_equal(from_array.patches, naflex.prepare(Image.fromarray(rgb), 16, 40)
                                .patches)


def test_patchify_order():
  """Token k of a 2 x 3 grid of 2 x 2 patches holds pixel (2 * (k // 3) + i, 2 * (k % 3) + j),
  channel c at index (i * 2 + j) * 3 + c."""
  pixels = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
  out = naflex.patchify(pixels, 2)
  assert out.shape == (6, 12)
  for k in range(6):
    for i in range(2):
      for j in range(2):
        for c in range(3):
          assert out[k, (i * 2 + j) * 3 + c] == pixels[2 * (k // 3) + i, 2 * (k % 3) + j, c]


def random_naflex_images(rng, counts_low, counts_high, n, patch_dim=12):
  """n NaflexImages with random grids of counts_low..counts_high patches and random content."""
  images = []
  for _ in range(n):
    count = int(rng.integers(counts_low, counts_high + 1))
    divisors = [d for d in range(1, count + 1) if count % d == 0]
    h = int(rng.choice(divisors))
    patches = rng.integers(0, 256, size=(count, patch_dim), dtype=np.uint8)
    images.append(naflex.NaflexImage(patches, (h, count // h)))
  return images


def grid_positions(h, w):
  """int [h * w, 2]: (row, col) of a grid's cells in row-major order."""
  return np.stack(np.indices((h, w)), axis=-1).reshape(-1, 2)


def check_row_layout(batch, row, expected_images):
  """Row `row` holds `expected_images` (in slot order) as contiguous segments 1..k from token 0,
  then padding; each segment's patches, positions and shape are the image's."""
  seg = batch["segment_ids"][row]
  k = len(expected_images)
  boundaries = np.flatnonzero(np.diff(np.concatenate([[-1], seg, [-1]])))
  runs = [(seg[s], e - s) for s, e in zip(boundaries[:-1], boundaries[1:])]
  real = [r for r in runs if r[0] != 0]
  assert [r[0] for r in real] == list(range(1, k + 1)), f"row {row}: segments {runs}"
  assert all(r[0] == 0 for r in runs[k:]) and len(runs) <= k + 1, f"row {row}: {runs}"
  for slot, image in enumerate(expected_images):
    (idx,) = np.nonzero(seg == slot + 1)
    h, w = image.grid
    np.testing.assert_array_equal(batch["patches"][row, idx], image.patches)
    np.testing.assert_array_equal(batch["positions"][row, idx], grid_positions(h, w))
    np.testing.assert_array_equal(batch["shapes"][row, slot], (h, w))
  np.testing.assert_array_equal(batch["shapes"][row, k:], 0)
  pad_idx = seg == 0
  assert not batch["patches"][row, pad_idx].any() and not batch["positions"][row, pad_idx].any()


def test_pad_layout(rng):
  images = random_naflex_images(rng, 1, 30, 5)
  batch = naflex.pad(images, 30)
  assert batch["patches"].shape == (5, 30, 12) and batch["patches"].dtype == np.uint8
  assert batch["segment_ids"].dtype == batch["positions"].dtype == batch["shapes"].dtype == np.int32
  assert batch["positions"].shape == (5, 30, 2) and batch["shapes"].shape == (5, 1, 2)
  for row, image in enumerate(images):
    check_row_layout(batch, row, [image])


@pytest.mark.parametrize("max_per_seq", [1, 3, 16])
def test_pack_invariants(rng, max_per_seq):
  """Every image placed once, rows within seq_len and max_per_seq, segments contiguous and in
  slot order, positions row-major, each segment's patches the image's exactly."""
  seq_len = 64
  images = random_naflex_images(rng, 1, seq_len, 60)
  batch, placement = naflex.pack(images, seq_len, max_per_seq)
  rows = batch["patches"].shape[0]
  assert placement.shape == (60, 2) and placement.dtype == np.int32
  assert batch["shapes"].shape == (rows, max_per_seq, 2)
  assert len({tuple(p) for p in placement}) == 60, "two images in one slot"
  assert (placement[:, 0] >= 0).all() and (placement[:, 0] < rows).all()
  assert (placement[:, 1] >= 0).all() and (placement[:, 1] < max_per_seq).all()
  for row in range(rows):
    in_row = np.flatnonzero(placement[:, 0] == row)
    assert 0 < len(in_row) <= max_per_seq
    assert sorted(placement[in_row, 1]) == list(range(len(in_row)))
    by_slot = [images[i] for i in in_row[np.argsort(placement[in_row, 1])]]
    assert sum(im.patches.shape[0] for im in by_slot) <= seq_len
    check_row_layout(batch, row, by_slot)
  again, placement_again = naflex.pack(images, seq_len, max_per_seq)
  np.testing.assert_array_equal(placement, placement_again)
  for key in batch:
    np.testing.assert_array_equal(batch[key], again[key])


def test_pack_first_fit_decreasing_by_hand():
  """Counts 3, 5, 2, 4 into rows of 8: 5 opens row 0, 4 opens row 1, 3 joins row 0, 2 row 1."""
  images = [naflex.NaflexImage(np.full((c, 3), c, np.uint8), (1, c)) for c in (3, 5, 2, 4)]
  batch, placement = naflex.pack(images, 8, 3)
  np.testing.assert_array_equal(placement, [[0, 1], [0, 0], [1, 1], [1, 0]])
  np.testing.assert_array_equal(batch["segment_ids"], [[1] * 5 + [2] * 3, [1] * 4 + [2] * 2 + [0] * 2])
  # max_per_seq binds before seq_len: ten 1-patch images, at most 4 a row -> rows of 4, 4, 2.
  ones = [naflex.NaflexImage(np.zeros((1, 3), np.uint8), (1, 1))] * 10
  batch, placement = naflex.pack(ones, 8, 4)
  assert batch["segment_ids"].shape == (3, 8)
  np.testing.assert_array_equal((batch["segment_ids"] > 0).sum(1), [4, 4, 2])


def test_pack_padding_share_small(rng):
  """Patch counts 16..256 into rows of 1024 waste under 5% of the tokens; `pad` would waste
  most of them."""
  images = random_naflex_images(rng, 16, 256, 400, patch_dim=3)
  batch, _ = naflex.pack(images, 1024, 32)
  share = naflex.padding_share(batch)
  expected = 1 - sum(im.patches.shape[0] for im in images) / batch["segment_ids"].size
  assert share == pytest.approx(expected)
  assert share < 0.05, share
  assert naflex.padding_share(naflex.pad(images, 1024)) > 0.7


def test_bad_inputs(rng):
  image = rng.integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
  with pytest.raises(ValueError, match="^patch must be an int >= 1; got 0$"):
    naflex.prepare(image, 0, 16)
  with pytest.raises(ValueError, match="^patch must be an int >= 1; got -16$"):
    naflex.size_for_budget(20, 30, -16, 16)
  with pytest.raises(ValueError, match="^max_patches must be an int >= 1; got 0$"):
    naflex.prepare(image, 16, 0)
  with pytest.raises(ValueError, match=r"^image must be uint8 \[H, W, 3\].*got uint8 \[20, 30, 4\]$"):
    naflex.prepare(rng.integers(0, 256, size=(20, 30, 4), dtype=np.uint8), 16, 16)
  with pytest.raises(ValueError, match=r"^image must be uint8 \[H, W, 3\].*got uint8 \[20, 30, 2\]$"):
    naflex.prepare(rng.integers(0, 256, size=(20, 30, 2), dtype=np.uint8), 16, 16)
  with pytest.raises(ValueError, match=r"^image must be uint8 .*got float32 \[20, 30, 3\]$"):
    naflex.prepare(image.astype(np.float32), 16, 16)
  images = [naflex.prepare(image, 4, 16), naflex.prepare(image, 4, 40)]
  with pytest.raises(ValueError, match=r"^images\[1\] has 40 patches \(grid 5 x 8\) > seq_len=32$"):
    naflex.pad(images, 32)
  with pytest.raises(ValueError, match=r"^images\[1\] has 40 patches \(grid 5 x 8\) > seq_len=32$"):
    naflex.pack(images, 32, 4)
  with pytest.raises(ValueError, match="^max_per_seq must be an int >= 1; got 0$"):
    naflex.pack(images, 64, 0)
  with pytest.raises(ValueError, match="^images is empty$"):
    naflex.pack([], 64, 2)
  mixed = [images[0], naflex.prepare(image, 2, 16)]
  with pytest.raises(ValueError, match=r"^images\[1\]\.patches must be uint8 \[h \* w, 48\]"):
    naflex.pad(mixed, 64)


def test_importable_without_jax():
  code = ("import sys; sys.modules['jax'] = None; sys.modules['flax'] = None\n"
          "import mmjax.data.naflex as n; print(n.size_for_budget(10, 20, 16, 4))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "(16, 32)"
