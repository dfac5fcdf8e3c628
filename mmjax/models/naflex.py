"""NaFlex ViT (SigLIP 2): each image at its own aspect ratio and patch count, as a sequence of
patches; several images may share one sequence (NaViT's patch n' pack), kept apart by segment
ids in every attention and pooled one by one.

The input is a dict (mmjax.data.naflex builds it on the host):
  'patches'      [b, L, p*p*3] float: each patch's pixels in (row, column, channel) order,
                 normalised;
  'segment_ids'  [b, L] int: 0 for padding, s = 1..k for the tokens of the sequence's s-th image;
  'positions'    [b, L, 2] int: a token's (row, column) in its image's grid of patches;
  'shapes'       [b, k, 2] int: each image's grid (rows, columns); (0, 0) for an empty slot.
The learned position table [G, G, width] is resized to each image's grid (a separable
triangle filter, antialiased when shrinking: bilinear resizing as jax.image.resize(...,
antialias=True) and transformers' Siglip2 do it) and picked by position.

Output: pooled [b, width] when k == 1 (one image a sequence, SigLIP 2's padded batches), else
[b, k, width] (an empty slot's row is meaningless: the caller drops it by its shape); with
'index' int [n] in the input (a training batch: image i in flat slot index[i] of the b * k),
[n, width] in the images' order; and {'encoded': [b, L, width]}.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models import vit
from mmjax.nn.attention import Segments
from mmjax.nn.layers import Encoder, MAPHead
from mmjax.nn.linear import Dense
from mmjax.nn.partitioning import constrain

POOL_TYPES = ("map", "gap", "none")
KEYS = ("patches", "segment_ids", "positions", "shapes")


def config(variant: str | None = None, **fields) -> dict[str, Any]:
  """Complete, checked NaFlexViT fields from a ViT variant ('B/16') and overrides; every
  ValueError starts with the field."""
  if fields.pop("patch_dropout", 0.0):
    raise ValueError("patch_dropout: a NaFlex tower drops no patches")
  names = {f for f in NaFlexViT.__dataclass_fields__} - {"parent", "name"}
  unknown = sorted(set(fields) - names)
  if unknown:
    raise ValueError(f"{unknown[0]}: not a NaFlexViT field")
  patch = fields.pop("patch_size", None)
  if patch is not None:
    patch = tuple(int(p) for p in jnp.broadcast_to(jnp.asarray(patch), 2).tolist())
  out = vit.dims(variant, width=fields.pop("width", None), depth=fields.pop("depth", None),
                 mlp_dim=fields.pop("mlp_dim", None), num_heads=fields.pop("num_heads", None),
                 patch_size=patch)
  if "patch_size" not in out:
    raise ValueError(f"patch_size: none given; use a variant 'X/<patch>' (variant={variant!r})")
  if out["patch_size"][0] != out["patch_size"][1]:
    raise ValueError(f"patch_size={out['patch_size']}: NaFlex patches are square")
  out.update(fields)
  if out.get("pool_type", "map") not in POOL_TYPES:
    raise ValueError(f"pool_type={out['pool_type']!r} is not one of {POOL_TYPES}")
  grid = out.get("posemb_grid", 16)
  if not isinstance(grid, int) or grid < 1:
    raise ValueError(f"posemb_grid={grid!r} must be a positive int")
  return out


def Model(variant: str | None = None, **fields) -> "NaFlexViT":  # noqa: N802
  """NaFlexViT(**config(variant, **fields))."""
  name = fields.pop("name", None)
  return NaFlexViT(**config(variant, **fields), name=name)


def example_input(fields: dict, image_size: int | None) -> dict:
  """One image of image_size x image_size as the tower takes it (zeros; initialisation);
  image_size None (a NaFlex checkpoint's preparation has no fixed size): one patch."""
  p = fields["patch_size"][0]
  side = max(1, (image_size or p) // p)
  n = side * side
  return {"patches": jnp.zeros((1, n, p * p * 3)), "segment_ids": jnp.ones((1, n), jnp.int32),
          "positions": jnp.stack(jnp.divmod(jnp.arange(n), side), -1)[None].astype(jnp.int32),
          "shapes": jnp.full((1, 1, 2), side, jnp.int32)}


def _triangle_weights(index: jax.Array, size: jax.Array, grid: int) -> jax.Array:
  """[..., grid] float32: the weights of the table's `grid` rows for output row `index` of a
  table resized to `size` rows (a triangle filter of half-width max(1, grid / size),
  normalised; shrinking is antialiased)."""
  scale = grid / size.astype(jnp.float32)
  support = jnp.maximum(scale, 1.0)
  center = (index.astype(jnp.float32) + 0.5) * scale - 0.5
  source = jnp.arange(grid, dtype=jnp.float32)
  w = jnp.maximum(0.0, 1.0 - jnp.abs(source - center[..., None]) / support[..., None])
  return w / w.sum(-1, keepdims=True)


def resized_posemb(table: jax.Array, positions: jax.Array, grids: jax.Array) -> jax.Array:
  """Each token's position embedding from the table resized to its image's grid.

  table: [G, G, width]; positions: [b, L, 2] int (row, column); grids: [b, L, 2] int, the
  token's image grid (rows, columns), >= 1. Returns [b, L, width] float32.
  """
  g = table.shape[0]
  rows = _triangle_weights(positions[..., 0], grids[..., 0], g)     # [b, L, G]
  cols = _triangle_weights(positions[..., 1], grids[..., 1], g)
  weights = (rows[..., :, None] * cols[..., None, :]).reshape(*rows.shape[:-1], g * g)
  return weights @ table.reshape(g * g, -1).astype(jnp.float32)


def token_grids(segment_ids: jax.Array, shapes: jax.Array) -> jax.Array:
  """[b, L, 2] int: each token's image grid (shapes[b, s - 1] for segment s; (1, 1) for
  padding, whose embedding is never read)."""
  slot = jnp.clip(segment_ids - 1, 0, shapes.shape[1] - 1)
  grid = jnp.take_along_axis(shapes, slot[..., None], axis=1)
  return jnp.where((segment_ids > 0)[..., None], jnp.maximum(grid, 1), 1)


def check_inputs(image) -> None:
  """ValueError naming the key of a NaFlex input dict that is missing or misshapen."""
  if not isinstance(image, dict) or any(k not in image for k in KEYS):
    got = sorted(image) if isinstance(image, dict) else type(image).__name__
    raise ValueError(f"a NaFlex image tower takes a dict with keys {KEYS}; got {got}")
  b, n = image["patches"].shape[:2]
  want = {"patches": 3, "segment_ids": 2, "positions": 3, "shapes": 3}
  for k, ndim in want.items():
    x = image[k]
    if x.ndim != ndim or x.shape[0] != b or (k != "shapes" and x.shape[1] != n) or (
        k in ("positions", "shapes") and x.shape[-1] != 2):
      raise ValueError(f"image[{k!r}] has shape {x.shape}; with patches {image['patches'].shape}"
                       f" it must be {'[b, L, 2]' if k == 'positions' else '[b, k, 2]' if k == 'shapes' else '[b, L]'}")


def valid_tokens(image) -> jax.Array | None:
  """A NaFlex input's non-padding tokens, bool [b, L] (segment id > 0); None for an image
  array [b, H, W, 3] (every token of a ViT is an image's)."""
  return jnp.asarray(image["segment_ids"]) > 0 if isinstance(image, dict) else None


def _grid_order(positions: jax.Array, valid: jax.Array, cols: jax.Array) -> jax.Array:
  """[L] int: the token holding row-major grid cell i at index i (then the padding): one
  image's positions [L, 2], valid [L] bool, its grid's column count []."""
  cell = positions[:, 0] * cols + positions[:, 1]
  return jnp.argsort(jnp.where(valid, cell, positions.shape[0] + jnp.arange(valid.shape[0])))


def crop_grid(image: dict, rng: jax.Array, share: float) -> dict:
  """A random contiguous sub-grid of each image's patch grid, as a new NaFlex input: a smaller
  image at the same pixel scale (SILC's local view of a NaFlex image).

  image: NaFlex input of one image a row ('pad'): patches [b, L, D], segment_ids [b, L],
  positions [b, L, 2], shapes [b, 1, 2]. Row i's grid (h, w) gives a crop of h' x w' patches,
  h' = max(1, round(share * h)) (half to even), w' likewise, at a uniform random offset
  (y0 in [0, h - h'], x0 in [0, w - w']). Returns the same keys and shapes: the crop's patches
  row-major in tokens 0 .. h' w' - 1, positions (0..h'-1, 0..w'-1), segment id 1, shapes
  (h', w'); zeros elsewhere (padding). Other keys ('index') are dropped.
  """
  if image["shapes"].shape[1] != 1:
    raise ValueError(f"crop_grid takes one image a row; shapes is {image['shapes'].shape}")

  def one(key, patches, seg, pos, shape):
    h, w = jnp.maximum(shape[0, 0], 1), jnp.maximum(shape[0, 1], 1)
    ch = jnp.maximum(1, jnp.round(share * h)).astype(jnp.int32)
    cw = jnp.maximum(1, jnp.round(share * w)).astype(jnp.int32)
    ky, kx = jax.random.split(key)
    y0 = jax.random.randint(ky, (), 0, h - ch + 1)
    x0 = jax.random.randint(kx, (), 0, w - cw + 1)
    t = jnp.arange(seg.shape[0])
    r, c = t // cw, t % cw
    keep = t < ch * cw
    src = _grid_order(pos, seg > 0, w)[jnp.where(keep, (y0 + r) * w + x0 + c, 0)]
    return (jnp.where(keep[:, None], patches[src], 0).astype(patches.dtype),
            keep.astype(seg.dtype),
            jnp.where(keep[:, None], jnp.stack([r, c], -1), 0).astype(pos.dtype),
            jnp.stack([ch, cw])[None].astype(shape.dtype))

  keys = jax.random.split(rng, image["patches"].shape[0])
  out = jax.vmap(one)(keys, *(jnp.asarray(image[k]) for k in KEYS))
  return dict(zip(KEYS, out))


class NaFlexViT(nn.Module):
  """A ViT over NaFlex inputs (the module docstring): image dict -> (pooled, {'encoded'}).

  Its params: 'embedding' (Dense p*p*3 -> width), 'pos_embedding' [G, G, width], 'encoder'
  (mmjax.nn.layers.Encoder, its final LayerNorm before pooling) and 'map_head': the same
  blocks as ViT's, so checkpoints map one to one.
  """
  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  patch_size: tuple[int, int]
  posemb_grid: int = 16      # the learned table's side G
  pool_type: str = "map"     # POOL_TYPES
  dropout: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  remat: bool = False
  remat_policy: str | None = None
  scan: bool = False
  attention_impl: str = "xla"
  act: str = "gelu"
  ln_eps: float = 1e-6
  mask_token: bool = False   # a learned 'mask_token' for masked patches (TIPS: `mask=`), as ViT's

  @nn.compact
  def __call__(self, image: dict, *, train: bool = False, mask: jax.Array | None = None):
    """mask: bool [b, L], True where a token's patch embedding is replaced by the learned mask
    token before the position embedding is added; needs mask_token=True."""
    check_inputs(image)
    seg = jnp.asarray(image["segment_ids"], jnp.int32)
    shapes = jnp.asarray(image["shapes"], jnp.int32)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = Dense(self.width, name="embedding", **kw)(image["patches"].astype(self.dtype))
    if self.mask_token:
      token = self.param("mask_token", nn.initializers.normal(0.02), (self.width,),
                         self.param_dtype)
      if mask is not None:
        if mask.shape != seg.shape:
          raise ValueError(f"mask {mask.shape} must be [batch, tokens] = {seg.shape}")
        x = jnp.where(mask[..., None], token.astype(x.dtype), x)
    elif mask is not None:
      raise ValueError("mask= needs a NaFlex tower with mask_token=True (its learned mask token)")
    g = self.posemb_grid
    table = self.param("pos_embedding", nn.initializers.normal(self.width ** -0.5),
                       (g, g, self.width), self.param_dtype)
    pe = resized_posemb(table, jnp.asarray(image["positions"], jnp.int32),
                        token_grids(seg, shapes))
    x = constrain(x + pe.astype(x.dtype), "batch", "seq", "embed")
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    x = Encoder(depth=self.depth, num_heads=self.num_heads, mlp_dim=self.mlp_dim,
                dropout=self.dropout, attention_impl=self.attention_impl, remat=self.remat,
                remat_policy=self.remat_policy, scan=self.scan, act=self.act,
                ln_eps=self.ln_eps, name="encoder", **kw)(x, mask=Segments(seg, seg),
                                                            train=train)
    k = shapes.shape[1]
    slots = jnp.broadcast_to(jnp.arange(1, k + 1, dtype=jnp.int32), (x.shape[0], k))
    if self.pool_type == "map":
      pooled = MAPHead(self.num_heads, self.mlp_dim, attention_impl=self.attention_impl,
                       act=self.act, ln_eps=self.ln_eps, name="map_head", **kw)(
                           x, mask=Segments(slots, seg))
    elif self.pool_type == "gap":
      member = (seg[:, :, None] == slots[:, None, :]).astype(jnp.float32)   # [b, L, k]
      total = jnp.einsum("blk,bld->bkd", member, x.astype(jnp.float32))
      pooled = (total / jnp.maximum(member.sum(1), 1.0)[..., None]).astype(x.dtype)
    else:
      return x, {"encoded": x}
    if "index" in image:   # a training batch's images in their order (mmjax.data.naflex.Batches)
      return pooled.reshape(-1, pooled.shape[-1])[image["index"]], {"encoded": x}
    return (pooled[:, 0] if k == 1 else pooled), {"encoded": x}
