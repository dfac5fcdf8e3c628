"""open_clip <-> mmjax: open_clip's CLIP models (ViT and ModifiedResNet image towers) and its
SigLIP models (timm ViT trunk).

  ckpt = from_open_clip("open_clip_pytorch_model.bin", "ViT-B-32")   # or "ViT-B-16-SigLIP"
  model = two_tower.Model(**ckpt.config)
  zimg = model.apply({"params": ckpt.params}, ckpt.preprocess(image)[None], method="encode_image")
  ztxt = model.apply({"params": ckpt.params}, ClipTokenizer().encode(texts), method="encode_text")

  state_dict = to_open_clip(ckpt.config, ckpt.params, as_torch=True)
  open_clip.create_model("ViT-B-32", pretrained=None).load_state_dict(state_dict)

Images are NHWC here and NCHW in open_clip; `ckpt.preprocess` prepares them as
open_clip's preprocessing does. Text: the CLIP BPE tokenizer for the CLIP
models; the SigLIP models' sentencepiece / Gemma vocabularies live on the HF
hub (timm/ViT-B-16-SigLIP, ...), so ckpt.tokenizer is None for them: pass
`get_tokenizer("sentencepiece:/path/spiece.model?canonicalize=true")`. Both
directions are exact (transposes, reshapes and splits only). torch is imported
only to read .pt/.bin files and for `as_torch=True`.

Which name to give: open_clip's ViT-B-32 / ViT-B-16 / ViT-L-14 use the erf
GELU; OpenAI's original weights (pretrained='openai') need the '-quickgelu'
names, as in open_clip. The state dict's shapes are checked against the name.

Other names are read from open_clip's own JSON model configs (the installed package's
model_configs/<name>.json, or model_name a .json path): ViT CLIP, SigLIP (the timm trunks of
TIMM_SIGLIP_TRUNKS) and ModifiedResNet configs; any other is refused naming the file and field.

The ResNet models (RN50, RN101, RN50x4, RN50x16, RN50x64 and their '-quickgelu' twins, the
ones OpenAI's weights need) convert into mmjax.models.resnet with norm='frozen_bn': each
BatchNorm's running mean and var become params that get no gradient (open_clip's
`lock(freeze_bn_stats=True)`); the attention pool's output projection is the image
projection (image_proj='none'). `num_batches_tracked` is not read and is written as 0.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any, Mapping, NamedTuple

import numpy as np

from mmjax.convert import coca, common
from mmjax.convert.common import Converted, Rule, load_state_dict
from mmjax.data.preprocess import OPENAI_MEAN, OPENAI_STD, ImagePrep
from mmjax.models import resnet


class OpenClipSpec(NamedTuple):
  """The numbers of one open_clip ViT CLIP model (its model_configs/<name>.json)."""
  embed_dim: int
  image_size: int
  patch_size: int
  vision_width: int
  vision_layers: int
  vision_heads: int
  vision_mlp: int
  text_width: int
  text_layers: int
  text_heads: int
  quick_gelu: bool = False
  context_length: int = 77
  vocab_size: int = 49408
  text_mlp: int | None = None   # None: 4 x text_width


def _spec(embed, image, patch, vw, vl, vh, tw, tl, th, vmlp=None) -> OpenClipSpec:
  return OpenClipSpec(embed, image, patch, vw, vl, vh, vmlp or 4 * vw, tw, tl, th)


_BASE = {
    "ViT-B-32": _spec(512, 224, 32, 768, 12, 12, 512, 12, 8),
    "ViT-B-32-256": _spec(512, 256, 32, 768, 12, 12, 512, 12, 8),
    "ViT-B-16": _spec(512, 224, 16, 768, 12, 12, 512, 12, 8),
    "ViT-B-16-plus-240": _spec(640, 240, 16, 896, 12, 14, 640, 12, 10),
    "ViT-L-14": _spec(768, 224, 14, 1024, 24, 16, 768, 12, 12),
    "ViT-L-14-336": _spec(768, 336, 14, 1024, 24, 16, 768, 12, 12),
    "ViT-H-14": _spec(1024, 224, 14, 1280, 32, 16, 1024, 24, 16),
    "ViT-g-14": _spec(1024, 224, 14, 1408, 40, 16, 1024, 24, 16, vmlp=6144),
    "ViT-bigG-14": _spec(1280, 224, 14, 1664, 48, 16, 1280, 32, 20, vmlp=8192),
}
# open_clip's '-quickgelu' twins (OpenAI's and some LAION/DFN/MetaCLIP weights).
_QUICKGELU = ("ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336", "ViT-H-14")
OPEN_CLIP_MODELS: dict[str, OpenClipSpec] = {
    **_BASE, **{f"{n}-quickgelu": _BASE[n]._replace(quick_gelu=True) for n in _QUICKGELU}}


class SiglipSpec(NamedTuple):
  """One open_clip SigLIP model: a timm ViT trunk ('map' pooling, no projection) and
  open_clip's bidirectional text tower pooled at the last token."""
  image_size: int
  patch_size: int
  vision: tuple[int, int, int, int]   # width, depth, heads, mlp
  vision_act: str                     # 'gelu_exact' (timm's nn.GELU) or 'gelu' (gelu_tanh)
  text: tuple[int, int, int, int]
  text_act: str
  vocab_size: int
  context_length: int
  embed_dim: int
  text_proj: str                      # two_tower.PROJECTIONS


class TimmTrunk(NamedTuple):
  """The numbers of one timm SigLIP ViT (open_clip's vision_cfg.timm_model_name), which the
  JSON config does not spell out: timm's model definition does."""
  patch_size: int
  image_size: int
  vision: tuple[int, int, int, int]   # width, depth, heads, mlp
  act: str                            # 'gelu_exact' (timm's nn.GELU) or 'gelu' (gelu_tanh)


_B, _L = (768, 12, 12, 3072), (1024, 24, 16, 4096)
_SO = (1152, 27, 16, 4304)
_G = (1536, 40, 16, 6144)
_E, _T = "gelu_exact", "gelu"   # the erf GELU (timm / torch default) and the tanh one
# timm's vit_*_siglip_* models that open_clip's SigLIP configs name.
TIMM_SIGLIP_TRUNKS: dict[str, TimmTrunk] = {
    **{f"vit_base_patch16_siglip_{n}": TimmTrunk(16, n, _B, _E) for n in (224, 256, 384, 512)},
    "vit_base_patch32_siglip_256": TimmTrunk(32, 256, _B, _T),
    **{f"vit_large_patch16_siglip_{n}": TimmTrunk(16, n, _L, _E) for n in (256, 384)},
    "vit_large_patch16_siglip_512": TimmTrunk(16, 512, _L, _T),
    **{f"vit_so400m_patch14_siglip_{n}": TimmTrunk(14, n, _SO, _E) for n in (224, 378, 384)},
    **{f"vit_so400m_patch16_siglip_{n}": TimmTrunk(16, n, _SO, _T) for n in (256, 384, 512)},
    **{f"vit_giantopt_patch16_siglip_{n}": TimmTrunk(16, n, _G, _T) for n in (256, 384)},
}


class ResNetSpec(NamedTuple):
  """One open_clip ModifiedResNet CLIP model (model_configs/RN*.json): the image tower is
  mmjax.models.resnet's style='clip' ResNet; the text tower is CLIP's."""
  embed_dim: int
  image_size: int
  layers: tuple[int, int, int, int]   # blocks per stage
  width: int                          # the stem's; the features are 32 x width wide
  heads: int                          # the attention pool's: 32 x width / head_width
  text_width: int
  text_layers: int
  text_heads: int
  quick_gelu: bool = False
  context_length: int = 77
  vocab_size: int = 49408
  text_mlp: int | None = None         # None: 4 x text_width

_LN_EPS = 1e-5   # torch.nn.LayerNorm's default


def get_spec(model_name: str) -> OpenClipSpec | SiglipSpec | ResNetSpec:
  """The model's numbers: from OPEN_CLIP_MODELS, else from open_clip's own JSON model config
  (model_name a path to one, or a name of the installed open_clip's model_configs/)."""
  if model_name in OPEN_CLIP_MODELS:
    return OPEN_CLIP_MODELS[model_name]
  path = _json_config_path(model_name)
  if path is None:
    raise ValueError(f"model_name={model_name!r} is not a supported open_clip model: not a "
                     ".json file, not one of the installed open_clip's model_configs, and not "
                     f"in mmjax's table; supported: {sorted(OPEN_CLIP_MODELS)} and open_clip's "
                     "ViT, SigLIP and ResNet model configs")
  return spec_from_json(common.read_json(path), path)


def _json_config_path(model_name: str) -> str | None:
  """A JSON model config for model_name: the path itself, or the installed open_clip's
  model_configs/<name>.json (found without importing open_clip, which imports torch)."""
  name = os.path.expanduser(str(model_name))
  if name.endswith(".json"):
    return name if os.path.isfile(name) else None
  found = importlib.util.find_spec("open_clip")
  if found is None or not found.submodule_search_locations:
    return None
  for folder in found.submodule_search_locations:
    path = os.path.join(folder, "model_configs", f"{name}.json")
    if os.path.isfile(path):
      return path
  return None


# The open_clip JSON fields this converter reads, per kind of model ('vit': a ViT CLIP model,
# 'resnet': a ModifiedResNet CLIP model, both with open_clip's own text tower; 'siglip': a timm
# SigLIP trunk beside open_clip's custom text tower); any other field changes the layout or
# the maths. Tokenizer fields and timm_model_pretrained change neither.
_CLIP_TEXT = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio"}
_JSON_FIELDS = {
    "vit": {"": {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu"},
            "vision_cfg": {"image_size", "layers", "width", "patch_size", "head_width",
                           "mlp_ratio", "patch_dropout"},
            "text_cfg": _CLIP_TEXT},
    "resnet": {"": {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu"},
               "vision_cfg": {"image_size", "layers", "width", "patch_size", "head_width"},
               "text_cfg": _CLIP_TEXT},
    "siglip": {"": {"embed_dim", "vision_cfg", "text_cfg", "init_logit_bias", "custom_text"},
               "vision_cfg": {"image_size", "timm_model_name", "timm_model_pretrained",
                              "timm_pool", "timm_proj"},
               "text_cfg": _CLIP_TEXT | {"hf_tokenizer_name", "tokenizer_kwargs",
                                         "no_causal_mask", "proj_bias", "proj_type",
                                         "pool_type", "norm_kwargs", "act_kwargs"}}}
_ABSENT = object()
# The values a SigLIP config's layout fields may take (_ABSENT: the field left out).
_SIGLIP_VALUES = {
    "custom_text": (True,), "vision_cfg.timm_pool": ("map",), "vision_cfg.timm_proj": ("none",),
    "text_cfg.no_causal_mask": (True,), "text_cfg.pool_type": ("last",),
    "text_cfg.proj_type": (_ABSENT, "linear", "none"), "text_cfg.norm_kwargs": ({"eps": 1e-6},),
    "text_cfg.act_kwargs": (_ABSENT, None, {"approximate": "tanh"})}


def _json_kind(cfg: Mapping) -> str:
  """'siglip' (a timm trunk), 'resnet' (a stage list) or 'vit'."""
  v = cfg["vision_cfg"]
  if "timm_model_name" in v:
    return "siglip"
  return "resnet" if isinstance(v.get("layers"), (list, tuple)) else "vit"


def _field(cfg: Mapping, dotted: str) -> Any:
  """cfg['text_cfg']['pool_type'] for 'text_cfg.pool_type'; _ABSENT if not there."""
  for part in dotted.split("."):
    cfg = cfg.get(part, _ABSENT) if isinstance(cfg, Mapping) else _ABSENT
  return cfg


def _refuse(where: str, fields: str, kind: str) -> ValueError:
  return ValueError(f"{where}: open_clip config field{fields} not supported (mmjax reads ViT "
                    "and ModifiedResNet CLIP configs with open_clip's own text tower, and "
                    f"SigLIP configs with a timm trunk of {sorted(TIMM_SIGLIP_TRUNKS)[:2]}...; "
                    f"read as a {kind} config)")


def _check_json_fields(cfg: Mapping, where: str, kind: str) -> None:
  """ValueError naming the file and the first fields the kind of model does not take."""
  allowed = _JSON_FIELDS[kind]
  odd = sorted(set(cfg) - allowed[""]) + [
      f"{part}.{k}" for part in ("vision_cfg", "text_cfg") for k in sorted(cfg[part])
      if k not in allowed[part]]
  if odd:
    raise _refuse(where, f"s {odd[:4]} are", kind)
  if kind == "vit" and not isinstance(cfg["vision_cfg"].get("layers"), int):
    raise _refuse(where, f" vision_cfg.layers={cfg['vision_cfg'].get('layers')!r} is", kind)
  if kind != "siglip":
    return
  values = {"vision_cfg.timm_model_name": tuple(TIMM_SIGLIP_TRUNKS), **_SIGLIP_VALUES}
  for dotted, ok in values.items():
    got = _field(cfg, dotted)
    if not any(got is v or (got == v and type(got) is type(v)) for v in ok):
      raise _refuse(where, f" {dotted}={'(absent)' if got is _ABSENT else repr(got)} is", kind)
  trunk = TIMM_SIGLIP_TRUNKS[cfg["vision_cfg"]["timm_model_name"]]
  size = _field(cfg, "vision_cfg.image_size")
  if size != trunk.image_size:   # timm builds the size its name says
    raise _refuse(where, f" vision_cfg.image_size={size!r} (timm's trunk is {trunk.image_size} "
                  "px) is", kind)
  if size % trunk.patch_size:   # timm's patch embedding drops the last pixels; mmjax's ViT refuses
    raise _refuse(where, f" vision_cfg.image_size={size!r} (not a multiple of the trunk's patch "
                  f"{trunk.patch_size}) is", kind)


def spec_from_json(cfg: Mapping, where: str) -> OpenClipSpec | SiglipSpec | ResNetSpec:
  """The spec of open_clip's JSON model config `cfg` (read from `where`); ValueError naming
  the file and the field mmjax cannot build (other timm trunks, Hugging Face or custom text
  towers, attentional pools, ...)."""
  if not isinstance(cfg, Mapping) or not all(isinstance(cfg.get(k), Mapping)
                                             for k in ("vision_cfg", "text_cfg")):
    raise ValueError(f"{where}: not an open_clip model config (no vision_cfg / text_cfg)")
  kind = _json_kind(cfg)
  _check_json_fields(cfg, where, kind)
  try:
    return _JSON_READERS[kind](cfg, cfg["vision_cfg"], cfg["text_cfg"])
  except (KeyError, TypeError, ValueError) as e:
    raise ValueError(f"{where}: a field is missing or not a number ({type(e).__name__}: "
                     f"{e})") from None


def _mlp(tower: Mapping) -> int:
  return int(tower["width"] * tower.get("mlp_ratio", 4.0))


def _vit_spec(cfg: Mapping, v: Mapping, t: Mapping) -> OpenClipSpec:
  return OpenClipSpec(
      int(cfg["embed_dim"]), int(v["image_size"]), int(v["patch_size"]), int(v["width"]),
      int(v["layers"]), int(v["width"]) // int(v.get("head_width", 64)), _mlp(v),
      int(t["width"]), int(t["layers"]), int(t["heads"]), bool(cfg.get("quick_gelu", False)),
      int(t["context_length"]), int(t["vocab_size"]), _mlp(t))


def _resnet_spec(cfg: Mapping, v: Mapping, t: Mapping) -> ResNetSpec:
  # open_clip's ModifiedResNet: heads = width * 32 // head_width (its features are 32 x width)
  return ResNetSpec(
      int(cfg["embed_dim"]), int(v["image_size"]), tuple(int(n) for n in v["layers"]),
      int(v["width"]), int(v["width"]) * 32 // int(v.get("head_width", 64)), int(t["width"]),
      int(t["layers"]), int(t["heads"]), bool(cfg.get("quick_gelu", False)),
      int(t["context_length"]), int(t["vocab_size"]), _mlp(t))


def _siglip_spec(cfg: Mapping, v: Mapping, t: Mapping) -> SiglipSpec:
  trunk = TIMM_SIGLIP_TRUNKS[v["timm_model_name"]]
  float(cfg["init_logit_bias"])   # open_clip has a logit_bias only with it
  proj = ("none" if t.get("proj_type") == "none" else
          "dense_bias" if t.get("proj_bias", False) else "dense")
  act = "gelu" if (t.get("act_kwargs") or {}).get("approximate") == "tanh" else "gelu_exact"
  return SiglipSpec(trunk.image_size, trunk.patch_size, trunk.vision, trunk.act,
                    (int(t["width"]), int(t["layers"]), int(t["heads"]), _mlp(t)), act,
                    int(t["vocab_size"]), int(t["context_length"]), int(cfg["embed_dim"]), proj)


_JSON_READERS = {"vit": _vit_spec, "resnet": _resnet_spec, "siglip": _siglip_spec}


def _dims(w: tuple[int, int, int, int]) -> dict:
  return dict(width=w[0], depth=w[1], num_heads=w[2], mlp_dim=w[3])


def open_clip_config(model_name: str) -> dict[str, Any]:
  """The `two_tower.Model(**config)` keyword arguments of an open_clip model."""
  return spec_config(get_spec(model_name))


def spec_config(s: OpenClipSpec | SiglipSpec | ResNetSpec) -> dict[str, Any]:
  """The `two_tower.Model(**config)` keyword arguments of a spec."""
  if isinstance(s, SiglipSpec):
    image = dict(_dims(s.vision), patch_size=(s.patch_size, s.patch_size), pool_type="map",
                 posemb="learn", patch_bias=True, act=s.vision_act, ln_eps=1e-6)
    text = dict(_dims(s.text), vocab_size=s.vocab_size, max_len=s.context_length,
                causal=False, pool_type="last", pad_id=None, act=s.text_act, ln_eps=1e-6)
    return dict(image=image, text=text, embed_dim=s.embed_dim, loss="siglip",
                image_proj="none", text_proj=s.text_proj)
  act = "quick_gelu" if s.quick_gelu else "gelu_exact"
  common_ = dict(act=act, ln_eps=_LN_EPS)
  text = dict(vocab_size=s.vocab_size, max_len=s.context_length, width=s.text_width,
              depth=s.text_layers, mlp_dim=s.text_mlp or 4 * s.text_width,
              num_heads=s.text_heads,
              causal=True, pool_type="argmax", pad_id=None, **common_)
  if isinstance(s, ResNetSpec):
    image = dict(style="clip", layers=s.layers, width=s.width, num_heads=s.heads,
                 norm="frozen_bn", pool_type="attn", output_dim=s.embed_dim)
    return dict(image=image, text=text, embed_dim=s.embed_dim, loss="clip", image_proj="none")
  image = dict(width=s.vision_width, depth=s.vision_layers, mlp_dim=s.vision_mlp,
               num_heads=s.vision_heads, patch_size=(s.patch_size, s.patch_size),
               pool_type="tok", posemb="learn", posemb_cls=True, ln_pre=True, patch_bias=False,
               **common_)
  return dict(image=image, text=text, embed_dim=s.embed_dim, loss="clip")


def open_clip_model_config(config: Mapping, image_size: int) -> dict[str, Any]:
  """open_clip's JSON model config ({'embed_dim', 'quick_gelu', 'vision_cfg', 'text_cfg'}, as in
  its model_configs/*.json) of `config`, a CLIP ViT layout of any size (to_open_clip's state
  dict loads into the model open_clip builds from it). ValueError naming the first field the
  JSON cannot express; SigLIP, ResNet and CoCa models are refused (open_clip names them by its
  own configs: to_open_clip's state dict loads into `open_clip.create_model(name)`)."""
  kind = ("a CoCa" if "decoder" in config else "a SigLIP" if config.get("loss") == "siglip"
          else "a ResNet" if "layers" in config["image"] else None)
  if kind:
    raise ValueError(f"{kind} model: mmjax writes open_clip JSON model configs for CLIP ViT "
                     "layouts only (convert.to_open_clip's state dict loads into open_clip's "
                     "own config of that name)")
  _check_clip_layout(config)
  img, txt = config["image"], config["text"]
  patch = np.broadcast_to(img["patch_size"], 2).tolist()
  ratio = lambda c: c["mlp_dim"] / c["width"]
  out = {"embed_dim": int(config["embed_dim"]), "quick_gelu": img["act"] == "quick_gelu",
         "vision_cfg": {"image_size": int(image_size), "layers": img["depth"],
                        "width": img["width"], "patch_size": patch[0],
                        "head_width": img["width"] // img["num_heads"], "mlp_ratio": ratio(img)},
         "text_cfg": {"context_length": txt["max_len"], "vocab_size": txt["vocab_size"],
                      "width": txt["width"], "heads": txt["num_heads"], "layers": txt["depth"],
                      "mlp_ratio": ratio(txt)}}
  where = "the open_clip JSON config made from config"
  common.check_layout(config, spec_config(spec_from_json(out, where)),
                      f"{where} (non-square patches, heads not dividing the width?)")
  return out


def preprocess(model_name: str) -> ImagePrep:
  """open_clip's eval preprocessing of the model (resize, crop, normalisation), as its
  pretrained configs give it (torchvision's centre crop offset)."""
  s = get_spec(model_name)
  if isinstance(s, SiglipSpec):
    return ImagePrep(s.image_size, "squash", "bicubic")
  return ImagePrep(s.image_size, "crop", "bicubic", OPENAI_MEAN, OPENAI_STD, crop_offset="round")


# ------------------------------------------------------------ the key maps

def _resblocks(src: str, dst: tuple, depth: int, heads: int) -> list[Rule]:
  """open_clip's Transformer.resblocks (nn.MultiheadAttention packed in_proj)."""
  rules = []
  for i in range(depth):
    s, d = f"{src}.resblocks.{i}", (*dst, "encoder", f"block{i}")
    rules += [*common.layer_norm(f"{s}.ln_1", (*d, "ln1")),
              *common.layer_norm(f"{s}.ln_2", (*d, "ln2")),
              *common.linear(f"{s}.mlp.c_fc", (*d, "mlp", "Dense_0")),
              *common.linear(f"{s}.mlp.c_proj", (*d, "mlp", "Dense_1")),
              *common.fused_in(f"{s}.attn.in_proj_weight", f"{s}.attn.in_proj_bias",
                               (*d, "attn"), heads),
              *common.heads_out(f"{s}.attn.out_proj", (*d, "attn", "out"), heads)]
  return rules


def _text_rules(depth: int, heads: int) -> list[Rule]:
  return [*_resblocks("transformer", ("txt",), depth, heads),
          common.same("token_embedding.weight", ("txt", "token_embedding", "embedding")),
          common.row("positional_embedding", ("txt", "pos_embedding")),
          *common.layer_norm("ln_final", ("txt", "encoder", "ln_final"))]


def _timm_rules(depth: int, heads: int) -> list[Rule]:
  """timm's VisionTransformer with global_pool='map' (open_clip's visual.trunk)."""
  t, rules = "visual.trunk", []
  for i in range(depth):
    s, d = f"{t}.blocks.{i}", ("img", "encoder", f"block{i}")
    rules += [*common.layer_norm(f"{s}.norm1", (*d, "ln1")),
              *common.layer_norm(f"{s}.norm2", (*d, "ln2")),
              *common.linear(f"{s}.mlp.fc1", (*d, "mlp", "Dense_0")),
              *common.linear(f"{s}.mlp.fc2", (*d, "mlp", "Dense_1")),
              *common.fused_in(f"{s}.attn.qkv.weight", f"{s}.attn.qkv.bias", (*d, "attn"), heads),
              *common.heads_out(f"{s}.attn.proj", (*d, "attn", "out"), heads)]
  p, h = f"{t}.attn_pool", ("img", "map_head")
  return rules + [
      common.conv(f"{t}.patch_embed.proj.weight", ("img", "embedding", "kernel")),
      common.same(f"{t}.patch_embed.proj.bias", ("img", "embedding", "bias")),
      common.same(f"{t}.pos_embed", ("img", "pos_embedding")),
      *common.layer_norm(f"{t}.norm", ("img", "encoder", "ln_final")),
      common.same(f"{p}.latent", (*h, "probe")),
      *common.heads_in(f"{p}.q", (*h, "attn", "query"), heads),
      *common.fused_in(f"{p}.kv.weight", f"{p}.kv.bias", (*h, "attn"), heads,
                       names=("key", "value")),
      *common.heads_out(f"{p}.proj", (*h, "attn", "out"), heads),
      *common.layer_norm(f"{p}.norm", (*h, "ln")),
      *common.linear(f"{p}.mlp.fc1", (*h, "mlp", "Dense_0")),
      *common.linear(f"{p}.mlp.fc2", (*h, "mlp", "Dense_1"))]


def _batch_norm(src: str, dst: tuple) -> list[Rule]:
  """torch BatchNorm2d (weight, bias, running_mean, running_var) <-> resnet.Norm('frozen_bn'):
  its scale and bias params, its running statistics in the 'batch_stats' collection."""
  return [*(common.same(f"{src}.{a}", (*dst, b)) for a, b in (("weight", "scale"),
                                                              ("bias", "bias"))),
          *(common.same(f"{src}.{a}", (common.STATS, *dst, b)) for a, b in (
              ("running_mean", "mean"), ("running_var", "var")))]


def _resnet_rules(img: Mapping) -> list[Rule]:
  """open_clip's ModifiedResNet (visual.*) <-> mmjax.models.resnet.ResNet(style='clip')."""
  out = []
  for i in (1, 2, 3):
    out += [common.conv(f"visual.conv{i}.weight", ("img", f"stem_conv{i}", "kernel")),
            *_batch_norm(f"visual.bn{i}", ("img", f"stem_norm{i}"))]
  for stage, depth in enumerate(img["layers"], start=1):
    for i in range(depth):
      s, d = f"visual.layer{stage}.{i}", ("img", f"stage{stage}_{i}")
      for j in (1, 2, 3):
        out += [common.conv(f"{s}.conv{j}.weight", (*d, f"conv{j}", "kernel")),
                *_batch_norm(f"{s}.bn{j}", (*d, f"norm{j}"))]
      if i == 0:   # every stage's first block has a projected shortcut (planes x 4 out)
        out += [common.conv(f"{s}.downsample.0.weight", (*d, "down_conv", "kernel")),
                *_batch_norm(f"{s}.downsample.1", (*d, "down_norm"))]
  p, h, heads = "visual.attnpool", ("img", "attnpool"), img["num_heads"]
  return out + [
      common.same(f"{p}.positional_embedding", (*h, "pos_embedding")),
      *common.heads_in(f"{p}.q_proj", (*h, "attn", "query"), heads),
      *common.heads_in(f"{p}.k_proj", (*h, "attn", "key"), heads),
      *common.heads_in(f"{p}.v_proj", (*h, "attn", "value"), heads),
      *common.heads_out(f"{p}.c_proj", (*h, "attn", "out"), heads)]


def rules(config: Mapping) -> list[Rule]:
  """The key map of the open_clip model `config` (open_clip_config) describes."""
  img, txt = config["image"], config["text"]
  out = _text_rules(txt["depth"], txt["num_heads"])
  if "layers" in img:   # a ModifiedResNet
    return out + [*_resnet_rules(img),
                  common.same("text_projection", ("txt_proj", "kernel")),
                  common.scalar("logit_scale", ("t",))]
  if config["loss"] == "siglip":
    out += _timm_rules(img["depth"], img["num_heads"])
    proj = config.get("text_proj", "dense")
    if proj == "dense_bias":
      out += common.linear("text_projection", ("txt_proj",))
    elif proj == "dense":
      out.append(common.same("text_projection", ("txt_proj", "kernel")))   # (in, out)
    return out + [common.scalar("logit_scale", ("t",)), common.scalar("logit_bias", ("b",))]
  return out + [
      *_resblocks("visual.transformer", ("img",), img["depth"], img["num_heads"]),
      common.conv("visual.conv1.weight", ("img", "embedding", "kernel")),
      common.token("visual.class_embedding", ("img", "cls")),
      common.same("visual.positional_embedding", ("img", "pos_embedding"),
                  lambda x: x[None], lambda x: x[0]),
      *common.layer_norm("visual.ln_pre", ("img", "ln_pre")),
      *common.layer_norm("visual.ln_post", ("img", "encoder", "ln_final")),
      common.same("visual.proj", ("img_proj", "kernel")),        # already (in, out)
      common.same("text_projection", ("txt_proj", "kernel")),    # already (in, out)
      common.scalar("logit_scale", ("t",))]


def from_open_clip(state_dict_or_path: Mapping | str | os.PathLike, model_name: str, *,
                   dtype: Any = np.float32) -> Converted:
  """An open_clip CLIP (ViT or ResNet) or SigLIP state dict -> Converted(config, params,
  preprocess, tokenizer).

  Args:
    state_dict_or_path: {key: torch tensor or array}, or a path (load_state_dict).
    model_name: an OPEN_CLIP_MODELS key, a name of the installed open_clip's ViT, SigLIP or
      ModifiedResNet model_configs, or a path to such a .json (or a coca_* name of
      OPEN_CLIP_COCA_MODELS: mmjax.convert.coca, a CoCa model config), e.g. 'ViT-B-32'
      (GELU), 'ViT-B-32-quickgelu' / 'RN50-quickgelu' (OpenAI's weights), 'RN50' or
      'ViT-B-16-SigLIP'; decides the activations and the heads, and the state dict's shapes
      must match it.
    dtype: of the returned params (numpy arrays, host memory).

  Returns:
    Converted: config as `open_clip_config(model_name)` gives it; params a
    nested dict of numpy arrays (new memory, some of them transposed views), and for a
    ResNet its BatchNorm statistics, for model.apply(ckpt.variables, ...) (device_put once before
    calling a jitted function many times); preprocess as open_clip's; tokenizer
    'clip' for the CLIP models, None for SigLIP (see the module docstring).
  """
  if str(model_name).startswith("coca_"):   # open_clip's CoCa models: mmjax.convert.coca
    return coca.from_open_clip_coca(state_dict_or_path, model_name, dtype=dtype)
  spec = get_spec(model_name)
  config = spec_config(spec)
  sd = load_state_dict(state_dict_or_path)
  # Buffers: the attention mask some old checkpoints saved, BatchNorm's step counters.
  ignore = lambda k: k == "attn_mask" or k.endswith(".num_batches_tracked")
  what = f"{common.source_name(state_dict_or_path)} is not an open_clip {model_name!r} state dict"
  params, stats = common.split_stats(common.apply_rules(
      rules(config), sd, config=config, image_size=spec.image_size, what=what,
      dtype=dtype, ignore=ignore))
  siglip = isinstance(spec, SiglipSpec)
  return Converted(config, params, preprocess(model_name), None if siglip else "clip", stats)


# ------------------------------------------------------------ writing state dicts

def _check_siglip_layout(config: Mapping) -> None:
  """config must be open_clip's SigLIP layout (a timm 'map' trunk, the bidirectional text tower
  pooled last; any size): ValueError naming the first field that differs."""
  if config.get("loss") != "siglip":
    raise ValueError(f"config['loss']={config.get('loss')!r}; open_clip's SigLIP is 'siglip'")
  img, txt = (common.tower_settings(t, config[t]) for t in ("image", "text"))
  for tower, act in (("image", img["act"]), ("text", txt["act"])):
    if act not in ("gelu", "gelu_exact"):
      raise ValueError(f"config[{tower!r}]['act']={act!r}; open_clip's SigLIP needs 'gelu' "
                       "(gelu_tanh) or 'gelu_exact' (nn.GELU)")
  proj = config.get("text_proj", "dense")
  if proj not in ("dense", "dense_bias", "none"):
    raise ValueError(f"config['text_proj']={proj!r}; open_clip's SigLIP needs 'dense', "
                     "'dense_bias' or 'none'")
  patch = img["patch_size"]
  patch = patch[0] if isinstance(patch, (tuple, list)) else patch   # the check names non-square
  dims = lambda s: (s["width"], s["depth"], s["num_heads"], s["mlp_dim"])
  want = spec_config(SiglipSpec(0, patch, dims(img), img["act"], dims(txt), txt["act"],
                                txt["vocab_size"], txt["max_len"], config.get("embed_dim"), proj))
  common.check_layout(config, want, "open_clip's ViT-*-SigLIP* layout")


def _check_clip_layout(config: Mapping) -> None:
  """The layout of open_clip's CLIP models (any size; a ViT or a ModifiedResNet image tower),
  with a message naming the field."""
  if config.get("loss") != "clip":
    raise ValueError(f"config['loss']={config.get('loss')!r}; an open_clip CLIP model is 'clip'")
  text = [("text", "causal", True), ("text", "pool_type", "argmax"),
          ("text", "pad_id", None), ("text", "ln_eps", _LN_EPS)]
  if "layers" in config["image"]:   # ModifiedResNet
    image = resnet.settings(**config["image"])
    fixed = [("image", "style", "clip"), ("image", "norm", "frozen_bn"),
             ("image", "pool_type", "attn"), ("image", "output_dim", config.get("embed_dim")),
             *text]
    config = {**config, "image": image}
    if config.get("image_proj") != "none":
      raise ValueError(f"config['image_proj']={config.get('image_proj')!r}; open_clip's "
                       "ResNet projects in its attention pool: needs 'none'")
  else:
    fixed = [("image", "pool_type", "tok"), ("image", "posemb", "learn"),
             ("image", "posemb_cls", True), ("image", "ln_pre", True),
             ("image", "patch_bias", False), ("image", "ln_eps", _LN_EPS), *text]
  for tower, key, value in fixed:
    got = config[tower].get(key)
    if got != value:
      raise ValueError(f"config[{tower!r}][{key!r}]={got!r}; open_clip's CLIP layout needs "
                       f"{value!r} (start from convert.open_clip_config(name))")
  if "layers" in config["image"]:
    if config["text"].get("act") not in ("gelu_exact", "quick_gelu"):
      raise ValueError(f"config['text']['act']={config['text'].get('act')!r}; open_clip needs "
                       "'gelu_exact' (nn.GELU) or 'quick_gelu' ('-quickgelu' models)")
    return
  acts = {config["image"].get("act"), config["text"].get("act")}
  if len(acts) != 1 or not acts <= {"gelu_exact", "quick_gelu"}:
    raise ValueError(f"config image/text 'act' = {sorted(map(str, acts))}; open_clip needs both "
                     "'gelu_exact' (nn.GELU) or both 'quick_gelu' ('-quickgelu' models)")


def to_open_clip(config: Mapping, params: Mapping, *, batch_stats: Mapping | None = None,
                 as_torch: bool = False) -> dict[str, Any]:
  """mmjax (config, params) in an open_clip layout -> open_clip state dict.

  Args:
    config: two_tower.Model kwargs (as from_open_clip / open_clip_config give);
      checked to describe open_clip's CLIP or SigLIP layout (any size).
    params: the model's params (numpy or jax arrays).
    batch_stats: a ResNet's BatchNorm statistics (Converted.batch_stats, TrainState's).
    as_torch: torch tensors (for `model.load_state_dict`) instead of numpy.

  Returns:
    {open_clip key: array} with every key of the open_clip model; load it into
    `open_clip.create_model(name)` where, for CLIP, name ends in '-quickgelu'
    iff config's act is 'quick_gelu'. SigLIP keys of the text tower carry
    open_clip's 'text.' prefix.
  """
  if "decoder" in config:   # a CoCa model: mmjax.convert.coca
    return coca.to_open_clip_coca(config, params, as_torch=as_torch)
  if config.get("loss") == "siglip":
    _check_siglip_layout(config)
    sd = common.unapply_rules(rules(config), params)
    sd = {k if k.startswith(("visual.", "logit_")) else f"text.{k}": v for k, v in sd.items()}
  else:
    _check_clip_layout(config)
    sd = common.unapply_rules(rules(config), common.merge_stats(params, batch_stats))
    sd.update({k.replace(".running_mean", ".num_batches_tracked"): np.zeros((), np.int64)
               for k in list(sd) if k.endswith(".running_mean")})
  if as_torch:
    import torch   # optional and heavy: only as_torch=True needs it
    sd = {k: torch.from_numpy(v) for k, v in sd.items()}
  return sd
