"""big_vision two-tower .npz checkpoints (SigLIP, SigLIP 2 and its NaFlex, LiT) <-> mmjax.

  ckpt = from_big_vision("webli_en_b16_224_63724782.npz", tokenizer="c4_en.model")
  model = two_tower.Model(**ckpt.config)
  zimg = model.apply({"params": ckpt.params}, ckpt.preprocess(image)[None], method="encode_image")

  to_big_vision(ckpt.config, ckpt.params, "out.npz")              # scan=True: the scanned layout

Everything is read off the arrays' names and shapes: widths, depths, heads
(big_vision stores attention kernels as [width, heads, head_dim]), MLP sizes,
patch and image size, the pooling (a MAPHead_0, a cls token, or neither: mean
pooling) and the heads (projections). Both block layouts convert: one
`encoderblock_{i}` per layer, or the scanned `encoderblock` with a leading
depth axis. big_vision's towers use the tanh GELU and LayerNorm eps 1e-6, and
its text tower attends bidirectionally with no padding mask. The arrays map one
to one (mmjax's ViT keeps big_vision's param layout), so both directions are
exact.

SigLIP 2's fixed-resolution files have SigLIP's layout (vit.py + two_towers.py; a
256,000-token Gemma vocabulary). Its NaFlex files (image_model
'proj.image_text.naflex_vit') differ in the image stem only: 'img/embedding' is a
Dense on flattened patches, kernel [p*p*3, width] whose rows run over (row,
column, channel) of a patch (tf.image.extract_patches' order, mmjax's), and
'img/pos_embedding' is the learned table [G, G, width], (row, column) first;
the encoder ('img/Transformer/...') and 'img/MAPHead_0' are vit.py's. A 2-d
'img/embedding/kernel' picks mmjax's NaFlex tower (tower='naflex').
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

import numpy as np

from mmjax.convert import common
from mmjax.convert.common import Converted, Rule
from mmjax.data.preprocess import ImagePrep
from mmjax.models import vit

_BLOCK = {   # big_vision's names inside an encoder block -> mmjax's
    "LayerNorm_0": ("ln1",), "LayerNorm_1": ("ln2",),
    "MultiHeadDotProductAttention_0": ("attn",), "MlpBlock_0": ("mlp",)}
_BLOCK_LEAVES = ("LayerNorm_0/scale", "LayerNorm_0/bias", "LayerNorm_1/scale",
                 "LayerNorm_1/bias", *[f"MultiHeadDotProductAttention_0/{n}/{p}"
                                       for n in ("query", "key", "value", "out")
                                       for p in ("kernel", "bias")],
                 *[f"MlpBlock_0/Dense_{i}/{p}" for i in (0, 1) for p in ("kernel", "bias")])
_MAP_LEAVES = ("probe", "LayerNorm_0/scale", "LayerNorm_0/bias",
               *[f"MultiHeadDotProductAttention_0/{n}/{p}" for n in ("query", "key", "value",
                                                                    "out")
                 for p in ("kernel", "bias")],
               *[f"MlpBlock_0/Dense_{i}/{p}" for i in (0, 1) for p in ("kernel", "bias")])


def _mm(leaf: str, names: Mapping[str, tuple]) -> tuple[str, ...]:
  first, _, rest = leaf.partition("/")
  return (*names[first], *rest.split("/")) if rest else names[first]


def _stacked(src: str, dst: tuple[tuple, ...]) -> Rule:
  """A scanned leaf [depth, ...] <-> one param per block."""
  def fwd(x):
    return tuple(x[i] for i in range(x.shape[0]))

  def back(*xs):
    return (common._xp(xs[0]).stack(xs),)
  return Rule((src,), dst, fwd, back)


def _encoder(prefix: str, dst: tuple, depth: int, scan: bool) -> list[Rule]:
  """big_vision's vit.Encoder under `prefix` ('img/Transformer/', 'txt/Encoder_0/')."""
  rules = []
  for leaf in _BLOCK_LEAVES:
    mm = _mm(leaf, _BLOCK)
    if scan:
      rules.append(_stacked(f"{prefix}encoderblock/{leaf}",
                            tuple((*dst, "encoder", f"block{i}", *mm) for i in range(depth))))
    else:
      rules += [common.same(f"{prefix}encoderblock_{i}/{leaf}",
                            (*dst, "encoder", f"block{i}", *mm)) for i in range(depth)]
  return rules + [common.same(f"{prefix}encoder_norm/{p}", (*dst, "encoder", "ln_final", p))
                  for p in ("scale", "bias")]


def _map_head(prefix: str, dst: tuple) -> list[Rule]:
  names = {"probe": ("probe",), "LayerNorm_0": ("ln",),
           "MultiHeadDotProductAttention_0": ("attn",), "MlpBlock_0": ("mlp",)}
  return [common.same(f"{prefix}MAPHead_0/{leaf}", (*dst, "map_head", *_mm(leaf, names)))
          for leaf in _MAP_LEAVES]


def _head(prefix: str, dst: str, proj: str) -> list[Rule]:
  if proj == "none":
    return []
  parts = ("kernel", "bias") if proj == "dense_bias" else ("kernel",)
  return [common.same(f"{prefix}head/{p}", (dst, p)) for p in parts]


def _stem(prefix: str, img: Mapping) -> list[Rule]:
  """The patch and position embeddings. Both towers keep big_vision's layouts: ViT's conv
  kernel [p, p, 3, width] and rows [1, n, width]; NaFlex's Dense kernel [p*p*3, width]
  (bias always) and table [G, G, width]."""
  naflex = img.get("tower") == "naflex"
  out = [common.same(f"{prefix}embedding/kernel", ("img", "embedding", "kernel"))]
  if naflex or img.get("patch_bias", True):
    out.append(common.same(f"{prefix}embedding/bias", ("img", "embedding", "bias")))
  if naflex or img.get("posemb", "sincos2d") == "learn":
    out.append(common.same(f"{prefix}pos_embedding", ("img", "pos_embedding")))
  return out


def rules(config: Mapping, *, scan: bool = False, root: str = "params/") -> list[Rule]:
  """The key map of the big_vision two-tower checkpoint `config` describes."""
  img, txt = config["image"], config["text"]
  i, t = f"{root}img/", f"{root}txt/"
  out = [*_encoder(f"{i}Transformer/", ("img",), img["depth"], scan),
         *_encoder(f"{t}Encoder_0/", ("txt",), txt["depth"], scan),
         *_stem(i, img),
         common.same(f"{t}Embed_0/embedding", ("txt", "token_embedding", "embedding")),
         common.same(f"{t}pos_embedding", ("txt", "pos_embedding")),
         *_head(i, "img_proj", config.get("image_proj", "dense")),
         *_head(t, "txt_proj", config.get("text_proj", "dense")),
         common.scalar(f"{root}t", ("t",), (1,))]
  if img.get("pool_type", "map") == "tok":
    out.append(common.same(f"{i}cls", ("img", "cls")))
  if img.get("pool_type", "map") == "map":
    out += _map_head(i, ("img",))
  if txt.get("pool_type", "last") == "map":
    out += _map_head(t, ("txt",))
  if config.get("loss", "siglip") == "siglip":
    out.append(common.scalar(f"{root}b", ("b",), (1,)))
  return out


def read_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
  path = common.require_file(path, "npz_path")
  try:
    with np.load(path, allow_pickle=False) as f:
      return {k: f[k] for k in f.files}
  except (ValueError, OSError) as e:
    raise ValueError(f"npz_path={path!r} is not a readable .npz file ({e})") from None


def _root(keys) -> str:
  return "params/" if any(k.startswith("params/") for k in keys) else ""


def _vit_stem(image: dict, shape, has, where: str, image_size: int | None) -> int:
  """Adds vit.py's stem and pooling fields to `image`; returns the image size."""
  ph, pw = shape("img/embedding/kernel")[:2]
  image.update(patch_size=(ph, pw), patch_bias=has("img/embedding/bias"),
               posemb="learn" if has("img/pos_embedding") else "sincos2d",
               pool_type="map" if has("img/MAPHead_0/probe") else
               "tok" if has("img/cls") else "gap")
  if image["posemb"] != "learn":
    return image_size or 224
  n = shape("img/pos_embedding")[1]
  side = int(round(np.sqrt(n)))
  if side * side != n or ph != pw:
    raise ValueError(f"{where}pos_embedding holds {n} positions with patch {(ph, pw)}; "
                     "mmjax converts square grids")
  if image_size not in (None, side * ph):
    raise ValueError(f"image_size={image_size}: the checkpoint's position embeddings are "
                     f"for {side * ph}")
  return side * ph


def _naflex_stem(image: dict, shape, has, where: str, image_size: int | None) -> int:
  """Adds naflex_vit.py's fields to `image` (its Dense stem [p*p*3, width] and table
  [G, G, width]); returns image_size or p * G (the square image whose grid is the table's,
  for fixed-size evaluation)."""
  rows, width = shape("img/embedding/kernel")
  p = int(round(np.sqrt(rows / 3)))
  if 3 * p * p != rows:
    raise ValueError(f"{where}embedding/kernel is {(rows, width)}; a NaFlex patch embedding "
                     "takes p * p * 3 pixels (square RGB patches)")
  if not has("img/pos_embedding"):
    raise ValueError(f"{where}pos_embedding is missing; a NaFlex image tower (a 2-d "
                     "embedding/kernel) needs its position table [G, G, width]")
  table = shape("img/pos_embedding")
  if len(table) != 3 or table[0] != table[1] or table[2] != image["width"]:
    raise ValueError(f"{where}pos_embedding is {table}; a NaFlex position table is "
                     f"[G, G, {image['width']}]")
  image.update(tower="naflex", patch_size=(p, p), posemb_grid=table[0],
               pool_type="map" if has("img/MAPHead_0/probe") else "gap")
  return image_size or p * table[0]


def infer_config(arrays: Mapping[str, Any], *, image_size: int | None = None,
                 text_pool: str | None = None, where: str = "npz") -> tuple[dict, int, bool]:
  """(two_tower kwargs, image size, scanned?) read off a big_vision checkpoint's arrays."""
  root = _root(arrays)
  shape = lambda k: tuple(np.shape(arrays[f"{root}{k}"]))
  has = lambda k: f"{root}{k}" in arrays
  for k in ("img/embedding/kernel", "txt/Embed_0/embedding", "t"):
    if not has(k):
      raise ValueError(f"{where}: no {root}{k}; not a big_vision two-tower checkpoint "
                       "(img + txt towers)")

  def encoder(prefix: str, tower: str) -> tuple[dict, bool]:
    scan = has(f"{prefix}encoderblock/LayerNorm_0/scale")
    if scan:
      depth = shape(f"{prefix}encoderblock/LayerNorm_0/scale")[0]
      q = shape(f"{prefix}encoderblock/MultiHeadDotProductAttention_0/query/kernel")[1:]
      mlp = shape(f"{prefix}encoderblock/MlpBlock_0/Dense_0/kernel")[-1]
    else:
      pat = re.compile(re.escape(f"{root}{prefix}encoderblock_") + r"(\d+)/")
      ids = {int(m.group(1)) for k in arrays if (m := pat.match(k))}
      if not ids or ids != set(range(len(ids))):
        raise ValueError(f"{where}: {tower} tower: encoder blocks {sorted(ids)[:8]} under "
                         f"{root}{prefix}; expected encoderblock_0 .. encoderblock_(depth-1) "
                         "or one scanned encoderblock")
      depth = len(ids)
      q = shape(f"{prefix}encoderblock_0/MultiHeadDotProductAttention_0/query/kernel")
      mlp = shape(f"{prefix}encoderblock_0/MlpBlock_0/Dense_0/kernel")[-1]
    width, heads = q[0], q[1]
    return dict(width=width, depth=depth, num_heads=heads, mlp_dim=mlp, act="gelu",
                ln_eps=1e-6), scan

  image, scan_i = encoder("img/Transformer/", "image")
  text, scan_t = encoder("txt/Encoder_0/", "text")
  if scan_i != scan_t:
    raise ValueError(f"{where}: one tower is scanned and the other is not")
  stem = _naflex_stem if len(shape("img/embedding/kernel")) == 2 else _vit_stem
  size = stem(image, shape, has, f"{where}: {root}img/", image_size)
  vocab, _ = shape("txt/Embed_0/embedding")
  text.update(vocab_size=vocab, max_len=shape("txt/pos_embedding")[1], causal=False,
              pad_id=None, pool_type=text_pool or ("map" if has("txt/MAPHead_0/probe")
                                                   else "last"))
  projs = {}
  for tower, key, width in (("image", "img", image["width"]), ("text", "txt", text["width"])):
    if has(f"{key}/head/kernel"):
      projs[tower] = ("dense_bias" if has(f"{key}/head/bias") else "dense",
                      shape(f"{key}/head/kernel")[-1])
    else:
      projs[tower] = ("none", width)
  if projs["image"][1] != projs["text"][1]:
    raise ValueError(f"{where}: the image tower's output is {projs['image'][1]} wide and the "
                     f"text tower's {projs['text'][1]}")
  config = dict(image=image, text=text, embed_dim=projs["image"][1],
                loss="siglip" if has("b") else "clip", image_proj=projs["image"][0],
                text_proj=projs["text"][0])
  return config, size, scan_i


def _check_variant(variant: str, image: Mapping) -> None:
  want = vit.decode_variant(variant)
  for key, value in want.items():
    got = tuple(image[key]) if key == "patch_size" else image[key]
    if got != value:
      raise ValueError(f"variant={variant!r} has {key}={value}; the checkpoint's image tower "
                       f"has {got}")


def from_big_vision(npz_path: str | os.PathLike, variant: str | None = None, *,
                    tokenizer: str | os.PathLike | None = None, text_pool: str | None = None,
                    image_size: int | None = None, dtype: Any = np.float32) -> Converted:
  """A big_vision two-tower .npz -> Converted(config, params, preprocess, tokenizer).

  Args:
    npz_path: the checkpoint (keys 'params/img/...', 'params/txt/...', 'params/t'
      [, 'params/b']; the 'params/' prefix is optional).
    variant: the image tower's big_vision variant ('B/16', 'So400m/14'), checked
      against the arrays when given (they decide everything either way).
    tokenizer: the sentencepiece .model file the checkpoint was trained with
      (c4_en for SigLIP, Gemma's for SigLIP 2: a 256,000-piece vocabulary picks
      big_vision's Gemma setup); the .npz holds no vocabulary, so without it
      Converted.tokenizer is None.
    text_pool: the text tower's pool_type when it is not 'last' (SigLIP's) and
      has no MAPHead; the arrays cannot tell 'last' from 'first' or 'gap'.
    image_size: for sincos2d towers (no learned position embeddings), and for NaFlex
      ones the size of Converted.preprocess' fixed-size square (default p * G: the
      grid of the position table); others fix it themselves.
    dtype: of the returned params (numpy arrays, host memory).
  """
  arrays = read_npz(npz_path)
  where = os.fspath(npz_path)
  config, size, scan = infer_config(arrays, image_size=image_size, text_pool=text_pool,
                                    where=where)
  if variant is not None:
    _check_variant(variant, config["image"])
  params = common.apply_rules(rules(config, scan=scan, root=_root(arrays)), arrays,
                              config=config, image_size=size, what=where, dtype=dtype)
  spec = None
  if tokenizer is not None:
    path = common.require_file(tokenizer, "tokenizer")
    spec = f"{'gemma' if config['text']['vocab_size'] == 256000 else 'sentencepiece'}:{path}"
  return Converted(config, params, ImagePrep(size, "squash", "bilinear"), spec)


def to_big_vision(config: Mapping, params: Mapping, npz_path: str | os.PathLike, *,
                  scan: bool = False) -> str:
  """Writes (config, params) as a big_vision two-tower .npz ('params/...' keys, float32);
  scan=True stacks each tower's blocks in one `encoderblock` (big_vision's scan=True).
  Returns the path. ValueError naming the first config field big_vision's layout lacks."""
  img = config["image"]
  size = int(np.broadcast_to(img["patch_size"], 2)[0]) * int(round(np.sqrt(
      np.shape(params["img"]["pos_embedding"])[1]))) if img.get("posemb") == "learn" else None
  arrays = common.unapply_rules(rules(config, scan=scan), params)
  arrays = {k: v.astype(np.float32) for k, v in arrays.items()}
  want, _, _ = infer_config(arrays, image_size=size,
                            text_pool=config["text"].get("pool_type", "last"),
                            where="the arrays made from params")
  common.check_layout(config, want, "big_vision's two-tower layout")
  path = os.path.expanduser(os.fspath(npz_path))
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}.npz"
  np.savez(tmp, **arrays)
  os.replace(tmp, path)
  return path
