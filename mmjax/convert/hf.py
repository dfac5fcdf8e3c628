"""Hugging Face transformers SiglipModel / CLIPModel directories <-> mmjax.

  ckpt = from_hf("siglip-base-patch16-224/")     # config.json + model.safetensors
  model = two_tower.Model(**ckpt.config)
  zimg = model.apply({"params": ckpt.params}, ckpt.preprocess(image)[None], method="encode_image")
  tok = get_tokenizer(ckpt.tokenizer)             # mmjax.data.tokenizers

  to_hf(ckpt.config, ckpt.params, "out_dir/")    # SiglipModel.from_pretrained("out_dir/") loads it
  to_hf(ckpt.config, ckpt.params, "out_dir/", tokenizer=ckpt.tokenizer,
        preprocess=ckpt.preprocess)               # and AutoProcessor.from_pretrained("out_dir/")

The numbers come from config.json (with transformers' defaults for the fields
save_pretrained leaves out); the arrays from model.safetensors (sharded
safetensors and pytorch_model.bin too, the latter through torch). Both
directions are exact; so are the tokenizer ids and the pixels of the exported processor
(transformers' PIL backend: its torchvision one resizes up to ~1/255 apart). Siglip2Model
(NaFlex) directories convert both ways to a NaFlex image tower (mmjax.models.naflex), whose
inputs mmjax.data.naflex prepares. Not covered: CLIP variants other than ViT/ViT.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Mapping

import numpy as np
import tokenizers as tokenizers_lib
from flax import traverse_util
import sentencepiece as spm
from safetensors.numpy import save_file

from mmjax.convert import common
from mmjax.convert.common import Converted, Rule
from mmjax.data import clip_tokenizer, tokenizers
from mmjax.data.naflex import NaflexPrep
from mmjax.data.preprocess import OPENAI_MEAN, OPENAI_STD, ImagePrep

# transformers' config defaults (SiglipVisionConfig / SiglipTextConfig / CLIPVisionConfig /
# CLIPTextConfig): config.json holds only the fields that differ from them.
_DEFAULTS = {
    ("siglip", "vision"): dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                               num_attention_heads=12, num_channels=3, image_size=224,
                               patch_size=16, hidden_act="gelu_pytorch_tanh",
                               layer_norm_eps=1e-6, vision_use_head=True),
    ("siglip", "text"): dict(vocab_size=32000, hidden_size=768, intermediate_size=3072,
                             num_hidden_layers=12, num_attention_heads=12,
                             max_position_embeddings=64, hidden_act="gelu_pytorch_tanh",
                             layer_norm_eps=1e-6, projection_size=None, pad_token_id=1,
                             bos_token_id=49406, eos_token_id=49407),
    ("clip", "vision"): dict(hidden_size=768, intermediate_size=3072, projection_dim=512,
                             num_hidden_layers=12, num_attention_heads=12, num_channels=3,
                             image_size=224, patch_size=32, hidden_act="quick_gelu",
                             layer_norm_eps=1e-5),
    ("clip", "text"): dict(vocab_size=49408, hidden_size=512, intermediate_size=2048,
                           projection_dim=512, num_hidden_layers=12, num_attention_heads=8,
                           max_position_embeddings=77, hidden_act="quick_gelu",
                           layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=49406,
                           eos_token_id=49407),
}
# Siglip2Model: the NaFlex vision tower (num_patches: the position table's G * G, no image
# size), SigLIP's text tower.
_DEFAULTS[("siglip2", "vision")] = {
    **{k: v for k, v in _DEFAULTS[("siglip", "vision")].items() if k != "image_size"},
    "num_patches": 256}
_DEFAULTS[("siglip2", "text")] = _DEFAULTS[("siglip", "text")]
_ACTS = {"gelu_pytorch_tanh": "gelu", "gelu_new": "gelu", "gelu": "gelu_exact",
         "quick_gelu": "quick_gelu"}
_ACTS_BACK = {"gelu": "gelu_pytorch_tanh", "gelu_exact": "gelu", "quick_gelu": "quick_gelu"}
_ARCH = {"siglip": "SiglipModel", "clip": "CLIPModel", "siglip2": "Siglip2Model"}


_POSITIVE = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
_POSITIVE_TOWER = {"vision": ("image_size", "patch_size", "num_patches"),
                   "text": ("vocab_size", "max_position_embeddings")}


def _is_int(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def _positive(x) -> bool:
  if isinstance(x, (list, tuple)):
    return bool(x) and all(map(_positive, x))
  return _is_int(x) and x > 0


def _check_tower(c: Mapping, tower: str, where: str) -> None:
  """ValueError naming the first field of {tower}_config of the wrong type or value."""
  name = f"{where}: {tower}_config"
  for k in _POSITIVE + _POSITIVE_TOWER[tower]:
    if k in c and not _positive(c[k]):
      raise ValueError(f"{name}.{k}={c[k]!r} is not a positive integer")
  if c["hidden_size"] % c["num_attention_heads"]:
    raise ValueError(f"{name}.num_attention_heads={c['num_attention_heads']} does not divide "
                     f"hidden_size={c['hidden_size']}")
  eps = c["layer_norm_eps"]
  if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps > 0:
    raise ValueError(f"{name}.layer_norm_eps={eps!r} is not a positive number")
  for k in ("eos_token_id", "pad_token_id", "bos_token_id"):
    if k in c and not _is_int(c[k]):
      raise ValueError(f"{name}.{k}={c[k]!r} is not an integer")
  if c.get("projection_size") is not None and not _positive(c["projection_size"]):
    raise ValueError(f"{name}.projection_size={c['projection_size']!r} is not a positive integer")


def _sub(cfg: Mapping, kind: str, tower: str, where: str) -> dict:
  key = f"{tower}_config"
  if key not in cfg:
    raise ValueError(f"{where}: no {key} (a {_ARCH[kind]} config.json has one)")
  got = cfg[key]
  if not isinstance(got, Mapping):
    raise ValueError(f"{where}: {key}={got!r} is not a JSON object")
  out = {**_DEFAULTS[(kind, tower)], **{k: v for k, v in got.items() if v is not None}}
  _check_tower(out, tower, where)
  if out["hidden_act"] not in _ACTS:
    raise ValueError(f"{where}: {tower}_config.hidden_act={out['hidden_act']!r} is not one of "
                     f"{sorted(_ACTS)}")
  if out.get("num_channels", 3) != 3:
    raise ValueError(f"{where}: vision_config.num_channels={out['num_channels']}; mmjax takes RGB")
  return out


def _square(x, field: str, where: str) -> int:
  if isinstance(x, (list, tuple)):
    if len(set(x)) != 1:
      raise ValueError(f"{where}: vision_config.{field}={x}; mmjax takes square ones")
    x = x[0]
  return int(x)


def mmjax_config(cfg: Mapping, where: str = "config.json") -> tuple[dict, int]:
  """An HF SiglipConfig / CLIPConfig dict -> (two_tower.Model kwargs, image size)."""
  if not isinstance(cfg, Mapping):
    raise ValueError(f"{where}: holds a {type(cfg).__name__}, not a JSON object")
  kind = cfg.get("model_type")
  if kind not in _ARCH:
    raise ValueError(f"{where}: model_type={kind!r}; mmjax converts {sorted(_ARCH)} "
                     "(transformers' SiglipModel, CLIPModel and Siglip2Model)")
  v, t = _sub(cfg, kind, "vision", where), _sub(cfg, kind, "text", where)
  patch = _square(v["patch_size"], "patch_size", where)
  size = _square(v["image_size"], "image_size", where) if "image_size" in v else None
  tower = lambda c: dict(width=c["hidden_size"], depth=c["num_hidden_layers"],
                         mlp_dim=c["intermediate_size"], num_heads=c["num_attention_heads"],
                         act=_ACTS[c["hidden_act"]], ln_eps=float(c["layer_norm_eps"]))
  image = dict(tower(v), patch_size=(patch, patch))
  text = dict(tower(t), vocab_size=t["vocab_size"], max_len=t["max_position_embeddings"],
              pad_id=None)
  if kind == "siglip2":
    grid = int(round(v["num_patches"] ** 0.5))
    if grid * grid != v["num_patches"]:
      raise ValueError(f"{where}: vision_config.num_patches={v['num_patches']} is not a square "
                       "(the position table is G x G)")
    image = dict(tower(v), patch_size=(patch, patch), posemb_grid=grid, tower="naflex")
    size = patch * grid   # the square image whose grid is the table's (fixed-size evaluation)
  if kind in ("siglip", "siglip2"):
    if not v["vision_use_head"]:
      raise ValueError(f"{where}: vision_config.vision_use_head=False; SiglipModel's image "
                       "embedding is its attention-pooling head")
    embed = t["projection_size"] or t["hidden_size"]
    image.update(pool_type="map")
    if kind == "siglip":
      image.update(posemb="learn", patch_bias=True)
    text.update(causal=False, pool_type="last")
    out = dict(image=image, text=text, embed_dim=embed, loss="siglip", image_proj="none",
               text_proj="dense_bias")
  else:
    eos = t["eos_token_id"]
    if eos not in (2, t["vocab_size"] - 1):
      raise ValueError(f"{where}: text_config.eos_token_id={eos}; mmjax pools CLIP's text at "
                       f"the largest token id, the EOS only when it is vocab_size - 1 "
                       f"({t['vocab_size'] - 1}) (or transformers' legacy 2)")
    embed = cfg.get("projection_dim") or 512
    if not _positive(embed):
      raise ValueError(f"{where}: projection_dim={embed!r} is not a positive integer")
    image.update(posemb="learn", pool_type="tok", posemb_cls=True, ln_pre=True,
                 patch_bias=False)
    text.update(causal=True, pool_type="argmax")
    out = dict(image=image, text=text, embed_dim=embed, loss="clip")
  return out, size


def _layers(src: str, dst: tuple, depth: int, heads: int) -> list[Rule]:
  rules = []
  for i in range(depth):
    s, d = f"{src}.encoder.layers.{i}", (*dst, "encoder", f"block{i}")
    rules += [*common.layer_norm(f"{s}.layer_norm1", (*d, "ln1")),
              *common.layer_norm(f"{s}.layer_norm2", (*d, "ln2")),
              *common.linear(f"{s}.mlp.fc1", (*d, "mlp", "Dense_0")),
              *common.linear(f"{s}.mlp.fc2", (*d, "mlp", "Dense_1")),
              *common.heads_out(f"{s}.self_attn.out_proj", (*d, "attn", "out"), heads)]
    for hf, mm in (("q", "query"), ("k", "key"), ("v", "value")):
      rules += common.heads_in(f"{s}.self_attn.{hf}_proj", (*d, "attn", mm), heads)
  return rules


def _patches(v: str, img: Mapping) -> list[Rule]:
  """The patch and position embeddings: SiglipModel's / CLIPModel's convolution and position
  rows, or Siglip2Model's (NaFlex) Linear on flattened patches and G * G table rows."""
  if img.get("tower") == "naflex":
    g = img["posemb_grid"]
    return [*common.linear(f"{v}.embeddings.patch_embedding", ("img", "embedding")),
            common.same(f"{v}.embeddings.position_embedding.weight", ("img", "pos_embedding"),
                        lambda x: x.reshape(g, g, -1), lambda x: x.reshape(g * g, -1))]
  out = [common.conv(f"{v}.embeddings.patch_embedding.weight", ("img", "embedding", "kernel")),
         common.row(f"{v}.embeddings.position_embedding.weight", ("img", "pos_embedding"))]
  if img.get("patch_bias", True):
    out.append(common.same(f"{v}.embeddings.patch_embedding.bias", ("img", "embedding", "bias")))
  return out


def rules(config: Mapping) -> list[Rule]:
  """The key map of the HF model that `config` (from mmjax_config) describes."""
  img, txt = config["image"], config["text"]
  v, t = "vision_model", "text_model"
  out = [*_layers(v, ("img",), img["depth"], img["num_heads"]),
         *_layers(t, ("txt",), txt["depth"], txt["num_heads"]),
         common.same(f"{t}.embeddings.token_embedding.weight", ("txt", "token_embedding",
                                                                "embedding")),
         common.row(f"{t}.embeddings.position_embedding.weight", ("txt", "pos_embedding")),
         *common.layer_norm(f"{t}.final_layer_norm", ("txt", "encoder", "ln_final")),
         *_patches(v, img),
         *common.layer_norm(f"{v}.post_layernorm", ("img", "encoder", "ln_final"))]
  if config["loss"] == "siglip":
    h = (f"{v}.head", ("img", "map_head"))
    out += [common.same(f"{h[0]}.probe", (*h[1], "probe")),
            *common.fused_in(f"{h[0]}.attention.in_proj_weight",
                             f"{h[0]}.attention.in_proj_bias", (*h[1], "attn"),
                             img["num_heads"]),
            *common.heads_out(f"{h[0]}.attention.out_proj", (*h[1], "attn", "out"),
                              img["num_heads"]),
            *common.layer_norm(f"{h[0]}.layernorm", (*h[1], "ln")),
            *common.linear(f"{h[0]}.mlp.fc1", (*h[1], "mlp", "Dense_0")),
            *common.linear(f"{h[0]}.mlp.fc2", (*h[1], "mlp", "Dense_1")),
            *common.linear(f"{t}.head", ("txt_proj",)),
            common.scalar("logit_scale", ("t",), (1,)),
            common.scalar("logit_bias", ("b",), (1,))]
  else:
    out += [common.token(f"{v}.embeddings.class_embedding", ("img", "cls")),
            *common.layer_norm(f"{v}.pre_layrnorm", ("img", "ln_pre")),   # sic
            *common.linear("visual_projection", ("img_proj",), bias=False),
            *common.linear("text_projection", ("txt_proj",), bias=False),
            common.scalar("logit_scale", ("t",))]
  return out


def _preprocess(directory: str, kind: str, size: int) -> ImagePrep:
  """preprocessor_config.json if there is one, else the processor's defaults."""
  if kind == "siglip":
    prep = ImagePrep(size, "squash", "bicubic")
  else:
    prep = ImagePrep(size, "crop", "bicubic", OPENAI_MEAN, OPENAI_STD)
  path = os.path.join(directory, "preprocessor_config.json")
  if not os.path.isfile(path):
    return prep
  p = common.read_json(path)
  resample = {2: "bilinear", 3: "bicubic"}.get(p.get("resample"), prep.resample)
  siglip_type = str(p.get("image_processor_type", "")).startswith("Siglip")
  crop = p.get("do_center_crop", kind == "clip" and not siglip_type)
  mean = tuple(p.get("image_mean", prep.mean))
  std = tuple(p.get("image_std", prep.std))
  return ImagePrep(size, "crop" if crop else "squash", resample, mean, std).check()


def _naflex_preprocess(directory: str, image: Mapping) -> NaflexPrep:
  """A Siglip2Model's NaFlex preparation: preprocessor_config.json's max_num_patches (the
  image processor's default, 256, without one), mean and std."""
  path = os.path.join(directory, "preprocessor_config.json")
  p = common.read_json(path) if os.path.isfile(path) else {}
  prep = NaflexPrep(int(image["patch_size"][0]), p.get("max_num_patches", 256),
                    tuple(p.get("image_mean", (0.5,) * 3)), tuple(p.get("image_std", (0.5,) * 3)))
  try:
    return prep.check()
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from None


def _tokenizer(directory: str, kind: str, vocab_size: int) -> str | None:
  if kind == "clip" and vocab_size == 49408:
    return "clip"   # OpenAI's BPE, mmjax.data.clip_tokenizer
  spiece = os.path.join(directory, "spiece.model")
  if kind == "siglip" and os.path.isfile(spiece):
    # As SiglipTokenizer does, with tokenizer_config.json's pad token and lower-casing.
    return f"sentencepiece:{spiece}?canonicalize=true" + _spiece_options(directory, spiece)
  tok = os.path.join(directory, "tokenizer.json")
  return f"hf:{tok}{_hf_pad_option(directory, tok)}" if os.path.isfile(tok) else None


def _pad_token(directory: str) -> str | None:
  """tokenizer_config.json's pad_token (a string or an AddedToken dict), None without one."""
  path = os.path.join(directory, "tokenizer_config.json")
  pad = common.read_json(path).get("pad_token") if os.path.isfile(path) else None
  pad = pad.get("content") if isinstance(pad, Mapping) else pad
  return pad if isinstance(pad, str) else None


def _hf_pad_option(directory: str, path: str) -> str:
  """'?pad_id=N' for tokenizer_config.json's pad token (transformers pads with it)."""
  pad = _pad_token(directory)
  pad_id = None if pad is None else tokenizers_lib.Tokenizer.from_file(path).token_to_id(pad)
  return "" if pad_id is None else f"?pad_id={pad_id}"


def _spiece_options(directory: str, spiece: str) -> str:
  """'&pad_id=N' / '&lower=false' where tokenizer_config.json differs from the defaults
  (pad '</s>' = 1 in SigLIP's vocabulary, lower-cased)."""
  path = os.path.join(directory, "tokenizer_config.json")
  p = common.read_json(path) if os.path.isfile(path) else {}
  out = "" if p.get("do_lower_case", True) else "&lower=false"
  pad = _pad_token(directory)
  if pad is not None:
    pad_id = spm.SentencePieceProcessor(model_file=spiece).piece_to_id(pad)
    out += "" if pad_id == 1 else f"&pad_id={pad_id}"
  return out


def _shards(index: str) -> list[str]:
  """The shard file names of a model.safetensors.index.json."""
  got = common.read_json(index).get("weight_map")
  if not isinstance(got, dict) or not all(isinstance(v, str) for v in got.values()):
    raise ValueError(f"{index}: no weight_map (a JSON object of tensor name -> shard file)")
  return sorted(set(got.values()))


def read_weights(directory: str) -> dict[str, Any]:
  """model.safetensors, its shards (model.safetensors.index.json) or pytorch_model.bin."""
  single = os.path.join(directory, "model.safetensors")
  index = os.path.join(directory, "model.safetensors.index.json")
  if os.path.isfile(single):
    return common.read_safetensors(single)
  if os.path.isfile(index):
    files = _shards(index)
    out = {}
    for name in files:
      out.update(common.read_safetensors(os.path.join(directory, name)))
    return out
  binary = os.path.join(directory, "pytorch_model.bin")
  if os.path.isfile(binary):
    return common.torch_load(binary)
  raise ValueError(f"path={directory!r} has no model.safetensors, model.safetensors.index.json "
                   "or pytorch_model.bin")


def from_hf(path: str | os.PathLike, *, dtype: Any = np.float32) -> Converted:
  """A transformers SiglipModel / CLIPModel directory -> Converted(config, params,
  preprocess, tokenizer).

  Args:
    path: the directory save_pretrained wrote (config.json and the weights; the
      tokenizer and preprocessor files are used when present).
    dtype: of the returned params (numpy arrays, host memory).
  """
  directory = os.path.expanduser(os.fspath(path))
  cfg_path = os.path.join(directory, "config.json")
  if not os.path.isfile(cfg_path):
    raise ValueError(f"path={directory!r} has no config.json (a transformers model directory)")
  cfg = common.read_json(cfg_path)
  config, size = mmjax_config(cfg, cfg_path)
  weights = read_weights(directory)
  # Buffers some transformers versions saved (not parameters).
  ignore = lambda k: k.endswith("position_ids")
  params = common.apply_rules(rules(config), weights, config=config, image_size=size,
                              what=f"{directory} ({cfg['model_type']})", dtype=dtype,
                              ignore=ignore)
  kind = "siglip" if cfg["model_type"] == "siglip2" else cfg["model_type"]
  prep = (_naflex_preprocess(directory, config["image"]) if cfg["model_type"] == "siglip2"
          else _preprocess(directory, kind, size))
  return Converted(config, params, prep,
                   _tokenizer(directory, kind, config["text"]["vocab_size"]))


def hf_config(config: Mapping, image_size: int) -> dict:
  """mmjax two_tower kwargs in an HF layout -> the config.json dict (ValueError naming
  the first field that has no HF counterpart)."""
  img, txt = config["image"], config["text"]
  kind = config.get("loss", "siglip")
  naflex = img.get("tower") == "naflex"
  if naflex and kind == "siglip":
    kind = "siglip2"
  if kind not in _ARCH or naflex and kind != "siglip2":
    raise ValueError(f"config['loss']={kind!r}")
  for tower, c in (("image", img), ("text", txt)):
    if c.get("act", "gelu") not in _ACTS_BACK:
      raise ValueError(f"config[{tower!r}]['act']={c.get('act')!r} has no HF counterpart")
  tower = lambda c: dict(hidden_size=c["width"], intermediate_size=c["mlp_dim"],
                         num_hidden_layers=c["depth"], num_attention_heads=c["num_heads"],
                         hidden_act=_ACTS_BACK[c.get("act", "gelu")],
                         layer_norm_eps=c.get("ln_eps", 1e-6))
  patch = tuple(np.broadcast_to(img["patch_size"], 2).tolist())
  vision = dict(tower(img), patch_size=patch[0], num_channels=3)
  if naflex:
    vision["num_patches"] = img.get("posemb_grid", 16) ** 2
  else:
    vision["image_size"] = image_size
  text = dict(tower(txt), vocab_size=txt["vocab_size"],
              max_position_embeddings=txt["max_len"])
  out = {"model_type": kind, "architectures": [_ARCH[kind]], "vision_config": vision,
         "text_config": text}
  if kind in ("siglip", "siglip2"):
    text["projection_size"] = config["embed_dim"]
    vision["vision_use_head"] = True
  else:
    out["projection_dim"] = config["embed_dim"]
    vision["projection_dim"] = text["projection_dim"] = config["embed_dim"]
    text["eos_token_id"] = txt["vocab_size"] - 1
  common.check_layout(config, mmjax_config(out, "the HF config made from config")[0],
                      f"the HF {_ARCH[kind]} layout")
  return out


def to_hf(config: Mapping, params: Mapping, path: str | os.PathLike, *,
          image_size: int | None = None, tokenizer: str | None = None,
          preprocess: ImagePrep | None = None) -> str:
  """Writes config.json + model.safetensors that transformers' SiglipModel / CLIPModel
  `from_pretrained(path)` loads; returns the directory. With `tokenizer` and `preprocess`
  too, the files AutoProcessor / AutoTokenizer / AutoImageProcessor load (see
  write_tokenizer and preprocessor_config); from_hf reads both back.

  image_size: None takes it from the learned position embeddings.
  tokenizer: a mmjax.data.tokenizers.get_tokenizer spec (a Converted's .tokenizer).
  preprocess: the checkpoint's ImagePrep (a Converted's .preprocess).
  """
  flat = traverse_util.flatten_dict(dict(params))
  if image_size is None and config["image"].get("tower") == "naflex":
    image_size = 0   # no fixed size: the table's grid is in the config
  elif image_size is None:
    n = np.shape(flat[("img", "pos_embedding")])[1] - (1 if config.get("loss") == "clip" else 0)
    image_size = int(round(np.sqrt(n))) * int(np.broadcast_to(config["image"]["patch_size"],
                                                              2)[0])
  cfg = hf_config(config, image_size)
  tensors = common.unapply_rules(rules(mmjax_config(cfg)[0]), params)
  prep = None if preprocess is None else preprocessor_config(preprocess)
  directory = os.path.expanduser(os.fspath(path))
  os.makedirs(directory, exist_ok=True)
  if tokenizer is not None:
    write_tokenizer(tokenizer, directory, max_len=config["text"]["max_len"],
                    vocab_size=config["text"]["vocab_size"])
  if prep is not None:
    _write_json(os.path.join(directory, "preprocessor_config.json"), prep)
  _write_json(os.path.join(directory, "config.json"), cfg)
  save_file(tensors, os.path.join(directory, "model.safetensors"))
  return directory


def _write_json(path: str, obj) -> None:
  with open(path, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=2, ensure_ascii=False)


_RESAMPLE_IDS = {"bilinear": 2, "bicubic": 3}   # PIL's, as transformers' processors save them


def preprocessor_config(prep: ImagePrep | NaflexPrep) -> dict:
  """An ImagePrep -> preprocessor_config.json: Siglip2ImageProcessor (a NaflexPrep),
  SiglipImageProcessor ('squash') or
  CLIPImageProcessor ('crop': shortest edge, then the centre). transformers crops at
  d // 2 (crop_offset 'floor'); a 'round' one differs by a pixel when d % 4 == 3."""
  if isinstance(prep, NaflexPrep):
    prep = prep.check()
    return dict(image_processor_type="Siglip2ImageProcessor", patch_size=prep.patch,
                max_num_patches=prep.max_patches, do_resize=True, resample=2, do_rescale=True,
                rescale_factor=1 / 255, do_normalize=True, image_mean=list(map(float, prep.mean)),
                image_std=list(map(float, prep.std)), do_convert_rgb=True)
  prep = ImagePrep(*prep).check()
  s = prep.size
  out = dict(do_resize=True, resample=_RESAMPLE_IDS[prep.resample], do_rescale=True,
             rescale_factor=1 / 255, do_normalize=True, image_mean=list(map(float, prep.mean)),
             image_std=list(map(float, prep.std)), do_convert_rgb=True)
  if prep.resize == "squash":
    return dict(image_processor_type="SiglipImageProcessor", size=dict(height=s, width=s),
                **out)
  return dict(image_processor_type="CLIPImageProcessor", size=dict(shortest_edge=s),
              do_center_crop=True, crop_size=dict(height=s, width=s), **out)


_CLIP_SOT, _CLIP_EOT = "<|startoftext|>", "<|endoftext|>"   # transformers' names


def write_tokenizer(spec: str, directory: str, *, max_len: int, vocab_size: int) -> list[str]:
  """Writes the tokenizer files for a get_tokenizer `spec` that transformers' AutoTokenizer
  loads into `directory`; returns their names. Each with tokenizer_config.json
  (model_max_length=max_len):

  - 'clip': vocab.json, merges.txt (CLIPTokenizer; it pads with <|endoftext|> where mmjax pads
    with 0, '!': a pad token of '!' would split every '!' off the text).
  - 'sentencepiece:' / 'gemma:' / 'trained:': spiece.model (SiglipTokenizer, with the spec's EOS,
    pad and unk pieces; transformers canonicalizes the text as ?canonicalize=true does, so a spec
    without it matches on text with no punctuation).
  - 'hf:': the tokenizer.json (PreTrainedTokenizerFast).
  """
  try:
    kind, path, options = tokenizers.parse_spec(spec)
    tok = tokenizers.get_tokenizer(spec)
  except ValueError as e:
    raise ValueError(f"tokenizer: {e}") from None
  if tok.vocab_size > vocab_size:
    raise ValueError(f"tokenizer={spec!r} has {tok.vocab_size} ids; the text tower embeds "
                     f"{vocab_size}")
  if kind == "clip":
    names = _clip_files(directory)
    extra = dict(tokenizer_class="CLIPTokenizer", bos_token=_CLIP_SOT, eos_token=_CLIP_EOT,
                 unk_token=_CLIP_EOT, pad_token=_CLIP_EOT)
  elif kind == "hf":
    names = ["tokenizer.json"]
    shutil.copyfile(path, os.path.join(directory, names[0]))
    extra = dict(tokenizer_class="PreTrainedTokenizerFast",
                 pad_token=tok._tok.id_to_token(tok.pad_id))
  else:
    names = ["spiece.model"]
    shutil.copyfile(path, os.path.join(directory, names[0]))
    extra = _spiece_config(tok, options)
  _write_json(os.path.join(directory, "tokenizer_config.json"),
              dict(extra, model_max_length=max_len))
  return names + ["tokenizer_config.json"]


def _spiece_config(tok, options: Mapping) -> dict:
  """SiglipTokenizer's tokenizer_config.json fields for a sentencepiece-kind tokenizer."""
  sp = spm.SentencePieceProcessor(model_proto=tok._proto)
  piece = lambda i: sp.id_to_piece(i) if 0 <= i < sp.get_piece_size() else None
  lower = options.get("lower", "true").lower() == "true"   # trained: str.lower, no option
  return dict(tokenizer_class="SiglipTokenizer", eos_token=piece(tok.eos_id),
              pad_token=piece(tok.pad_id), unk_token=piece(sp.unk_id()),
              do_lower_case=lower)


def _clip_files(directory: str) -> list[str]:
  """vocab.json + merges.txt of OpenAI CLIP's BPE (mmjax.data.clip_tokenizer's vocabulary)."""
  tok = clip_tokenizer.ClipTokenizer()
  names = {clip_tokenizer.SOT: _CLIP_SOT, clip_tokenizer.EOT: _CLIP_EOT}
  vocab = {names.get(p, p): i for i, p in enumerate(tok._pieces)}
  merges = sorted(tok._rank, key=tok._rank.get)
  _write_json(os.path.join(directory, "vocab.json"), vocab)
  with open(os.path.join(directory, "merges.txt"), "w", encoding="utf-8") as f:
    f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
  return ["vocab.json", "merges.txt"]
