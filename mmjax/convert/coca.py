"""open_clip's CoCa <-> mmjax's (mmjax.models.coca): `coca_ViT-B-32`, `coca_ViT-L-14`.

  ckpt = from_open_clip_coca("open_clip_pytorch_model.bin", "coca_ViT-B-32")
  model = coca.Model(**ckpt.config)
  zimg, ztxt, out = model.apply({"params": ckpt.params}, images, tokens)   # out['logits']
  state_dict = to_open_clip_coca(ckpt.config, ckpt.params)

`convert.from_open_clip(sd, "coca_ViT-B-32")` and `convert.to_open_clip(config, params)` (a
config with a 'decoder') come here too. Text is CLIP BPE with SOT first (open_clip's
tokenizer for these models: 76 tokens, pad 0); the model adds no bos (bos_id=None), and
`coca.make_generate(model, first=49406, eos_id=49407, ...)` captions. Exact both ways
(transposes, reshapes and splits only).
"""

from __future__ import annotations

import os
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from mmjax.convert import common
from mmjax.convert.common import Converted, Rule
from mmjax.data.preprocess import OPENAI_MEAN, OPENAI_STD, ImagePrep
from mmjax.models import coca

_LN_EPS = 1e-5


class CocaSpec(NamedTuple):
  """The numbers of one open_clip CoCa model (model_configs/<name>.json)."""
  embed_dim: int
  image_size: int
  patch_size: int
  vision: tuple[int, int, int]       # width, layers, heads (head width 64, mlp 4x)
  pool_heads: int
  text: tuple[int, int, int]         # width, layers, heads
  decoder: tuple[int, int]           # layers, heads (width = the text's)
  n_queries: int = 256
  context_length: int = 76
  vocab_size: int = 49408


OPEN_CLIP_COCA_MODELS: dict[str, CocaSpec] = {
    "coca_ViT-B-32": CocaSpec(512, 224, 32, (768, 12, 12), 8, (512, 12, 8), (12, 8)),
    "coca_ViT-L-14": CocaSpec(768, 224, 14, (1024, 24, 16), 8, (768, 12, 12), (12, 12)),
}


def open_clip_coca_config(model_name: str) -> dict[str, Any]:
  """The `coca.Model(**config)` keyword arguments of an open_clip CoCa model."""
  if model_name not in OPEN_CLIP_COCA_MODELS:
    raise ValueError(f"model_name={model_name!r} is not a supported open_clip CoCa model; "
                     f"supported: {sorted(OPEN_CLIP_COCA_MODELS)}")
  s = OPEN_CLIP_COCA_MODELS[model_name]
  return coca_config(s.embed_dim, s.image_size, s.patch_size, s.vision, s.pool_heads, s.text,
                     s.decoder, n_queries=s.n_queries, context_length=s.context_length,
                     vocab_size=s.vocab_size)


def coca_config(embed_dim: int, image_size: int, patch_size: int, vision: tuple,
                pool_heads: int, text: tuple, decoder: tuple, *, n_queries: int = 256,
                context_length: int = 76, vocab_size: int = 49408, mlp_ratio: int = 4,
                quick_gelu: bool = False) -> dict[str, Any]:
  """coca.Model kwargs of open_clip's CoCa class with these numbers (any size); `image_size`
  only checks that the patch size divides it."""
  if image_size % patch_size:
    raise ValueError(f"image_size={image_size} is not divisible by patch_size={patch_size}")
  act = "quick_gelu" if quick_gelu else "gelu_exact"
  (vw, vl, vh), (tw, tl, th), (dl, dh) = vision, text, decoder
  image = dict(width=vw, depth=vl, mlp_dim=mlp_ratio * vw, num_heads=vh,
               patch_size=(patch_size, patch_size), pool_type="tok", posemb="learn",
               posemb_cls=True, ln_pre=True, patch_bias=False, act=act, ln_eps=_LN_EPS)
  text_ = dict(vocab_size=vocab_size, max_len=context_length, width=tw, depth=tl,
               mlp_dim=mlp_ratio * tw, num_heads=th, pad_id=0, correct_cls_mask=False,
               act=act, ln_eps=_LN_EPS)
  return dict(image=image, text=text_, decoder=dict(depth=dl, mlp_dim=mlp_ratio * tw,
                                                    num_heads=dh),
              embed_dim=embed_dim, n_queries=n_queries, pool_heads=pool_heads, bos_id=None)


# ------------------------------------------------------------ the key map

def _block(src: str, dst: tuple, heads: int, cross: bool = False) -> list[Rule]:
  """One open_clip ResidualAttentionBlock (packed in_proj) <-> an EncoderBlock / CrossBlock."""
  out = [*common.layer_norm(f"{src}.ln_1", (*dst, "ln1")),
         *common.layer_norm(f"{src}.ln_2", (*dst, "ln2")),
         *common.linear(f"{src}.mlp.c_fc", (*dst, "mlp", "Dense_0")),
         *common.linear(f"{src}.mlp.c_proj", (*dst, "mlp", "Dense_1")),
         *common.fused_in(f"{src}.attn.in_proj_weight", f"{src}.attn.in_proj_bias",
                          (*dst, "attn"), heads),
         *common.heads_out(f"{src}.attn.out_proj", (*dst, "attn", "out"), heads)]
  if cross:
    out += common.layer_norm(f"{src}.ln_1_kv", (*dst, "ln1_kv"))
  return out


def _split_in_proj(src: str, dst: tuple, heads: int) -> list[Rule]:
  """nn.MultiheadAttention with kdim != embed_dim: q/k/v_proj_weight (E, in) each and one
  packed in_proj_bias (3E) <-> query/key/value kernels [in, h, d] and biases [h, d]."""
  out = []
  for name, key in (("q", "query"), ("k", "key"), ("v", "value")):
    out.append(common.same(f"{src}.{name}_proj_weight", (*dst, key, "kernel"),
                           lambda x: x.T.reshape(x.shape[1], heads, -1),
                           lambda x: x.reshape(x.shape[0], -1).T))

  def fwd(b):
    return tuple(x.reshape(heads, -1) for x in common._xp(b).split(b, 3))

  def back(*bs):
    return (common._xp(bs[0]).concatenate([x.reshape(-1) for x in bs]),)

  out.append(Rule((f"{src}.in_proj_bias",), tuple((*dst, k, "bias") for k in
                                                 ("query", "key", "value")), fwd, back))
  return out


def coca_rules(config: Mapping) -> list[Rule]:
  """The key map of the open_clip CoCa model that `config` (coca.Model kwargs) describes."""
  img, txt, dec = config["image"], config["text"], config["decoder"]
  rules = []
  for i in range(img["depth"]):
    rules += _block(f"visual.transformer.resblocks.{i}", ("img", "encoder", f"block{i}"),
                    img["num_heads"])
  for i in range(txt["depth"]):
    rules += _block(f"text.transformer.resblocks.{i}", ("txt", "encoder", f"block{i}"),
                    txt["num_heads"])
  for i in range(dec["depth"]):
    rules += _block(f"text_decoder.resblocks.{i}", ("dec", f"block{i}"), dec["num_heads"])
    rules += _block(f"text_decoder.cross_attn.{i}", ("dec", f"cross{i}"), dec["num_heads"],
                    cross=True)
  p, h, heads = "visual.attn_pool", ("img_pool",), config.get("pool_heads", 8)
  if img["width"] == config["embed_dim"]:   # torch then packs q, k, v in one in_proj
    pool_in = common.fused_in(f"{p}.attn.in_proj_weight", f"{p}.attn.in_proj_bias",
                              (*h, "attn"), heads)
  else:
    pool_in = _split_in_proj(f"{p}.attn", (*h, "attn"), heads)
  return rules + [
      common.conv("visual.conv1.weight", ("img", "embedding", "kernel")),
      common.token("visual.class_embedding", ("img", "cls")),
      common.row("visual.positional_embedding", ("img", "pos_embedding")),
      *common.layer_norm("visual.ln_pre", ("img", "ln_pre")),
      *common.layer_norm(f"{p}.ln_k", ("img", "encoder", "ln_final")),
      common.same(f"{p}.query", (*h, "query")),
      *common.layer_norm(f"{p}.ln_q", (*h, "ln_q")),
      *pool_in,
      *common.heads_out(f"{p}.attn.out_proj", (*h, "attn", "out"), heads),
      *common.layer_norm("visual.ln_post", ("img_ln",)),
      common.same("visual.proj", ("img_proj", "kernel")),                 # already (in, out)
      common.same("text.token_embedding.weight", ("txt", "token_embedding", "embedding")),
      common.token("text.cls_emb", ("txt", "cls")),
      common.row("text.positional_embedding", ("txt", "pos_embedding")),
      *common.layer_norm("text.ln_final", ("txt", "ln_final")),
      common.same("text.text_projection", ("txt_proj", "kernel")),        # already (in, out)
      *common.layer_norm("text_decoder.ln_final", ("dec", "ln_final")),
      common.same("text_decoder.text_projection", ("dec", "head", "kernel")),
      common.scalar("logit_scale", ("t",))]


def _image_size(config: Mapping, image_size: int | None) -> int:
  return image_size or 7 * config["image"]["patch_size"][0]


def model_shapes(config: Mapping, image_size: int) -> dict:
  """{param path: shape} of coca.Model(**config) (per-layer blocks), traced only."""
  c = dict(config)
  c["image"] = {**c["image"], "scan": False}
  c["text"] = {**c["text"], "scan": False}
  c.pop("itm", None)
  model = coca.Model(**c)
  length = c["text"]["max_len"] - (c.get("bos_id") is not None)
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), jnp.zeros((1, image_size, image_size, 3)),
      jnp.zeros((1, length), jnp.int32)))["params"]
  return {p: jax.ShapeDtypeStruct(v.shape, jnp.float32)
          for p, v in traverse_util.flatten_dict(shapes).items()}


def from_open_clip_coca(state_dict_or_path: Mapping | str | os.PathLike,
                        model_name: str | Mapping, *, image_size: int | None = None,
                        dtype: Any = np.float32) -> Converted:
  """An open_clip CoCa state dict -> Converted(config, params, preprocess, 'clip').

  model_name: an OPEN_CLIP_COCA_MODELS key, or coca.Model kwargs (coca_config) of another
  open_clip CoCa built with the same structure; image_size then defaults to 7 patches.
  config is `coca.Model(**config)`'s kwargs, params numpy arrays (itm head: none, open_clip
  has none; a model with itm=True initialises it itself).
  """
  if isinstance(model_name, str):
    config = open_clip_coca_config(model_name)
    size = OPEN_CLIP_COCA_MODELS[model_name].image_size
  else:
    config, size = dict(model_name), _image_size(model_name, image_size)
  # load_state_dict strips the 'text.' prefix (open_clip's CustomTextCLIP layout); a CoCa's
  # other keys are all visual., text_decoder. or logit_scale, so it goes back on exactly.
  sd = {k if k.startswith(("visual.", "text_decoder.", "logit_")) else f"text.{k}": v
        for k, v in common.load_state_dict(state_dict_or_path).items()}
  name = model_name if isinstance(model_name, str) else "CoCa"
  what = f"{common.source_name(state_dict_or_path)} is not an open_clip {name!r} state dict"
  params = common.apply_rules(coca_rules(config), sd, config=config, image_size=size, what=what,
                              dtype=dtype, ignore=lambda k: k.endswith("attn_mask"),
                              shapes=model_shapes(config, size))
  prep = ImagePrep(size, "crop", "bicubic", OPENAI_MEAN, OPENAI_STD, crop_offset="round")
  return Converted(config, params, prep, "clip")


def to_open_clip_coca(config: Mapping, params: Mapping, *, as_torch: bool = False
                      ) -> dict[str, Any]:
  """mmjax CoCa (config as open_clip_coca_config / coca_config give, params) -> open_clip
  state dict (numpy, or torch tensors with as_torch=True); an itm head is dropped."""
  for tower, key, value in (("image", "pool_type", "tok"), ("image", "posemb_cls", True),
                            ("image", "ln_pre", True), ("image", "patch_bias", False),
                            ("image", "ln_eps", _LN_EPS), ("text", "ln_eps", _LN_EPS),
                            ("text", "correct_cls_mask", False)):
    if config[tower].get(key) != value:
      raise ValueError(f"config[{tower!r}][{key!r}]={config[tower].get(key)!r}; open_clip's "
                       f"CoCa layout needs {value!r} (start from convert.open_clip_coca_config)")
  if config.get("bos_id") is not None:
    raise ValueError(f"config['bos_id']={config['bos_id']!r}; open_clip's CoCa reads SOT from "
                     "the tokens (bos_id=None)")
  params = {k: v for k, v in params.items() if k != "itm_head"}
  sd = common.unapply_rules(coca_rules(config), params)
  if as_torch:
    import torch   # optional and heavy: only as_torch=True needs it
    sd = {k: torch.from_numpy(v) for k, v in sd.items()}
  return sd
