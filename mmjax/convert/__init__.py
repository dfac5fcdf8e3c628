"""Checkpoints in and out: open_clip state dicts, Hugging Face directories, big_vision .npz.

Each `from_*` returns a `Converted(config, params, preprocess, tokenizer[, batch_stats])`:
`two_tower.Model(**config)` with `params`, the checkpoint's image preprocessing
and the `mmjax.data.tokenizers.get_tokenizer` spec of its vocabulary; each
`to_*` writes the exact inverse. `load(spec)` reads any of them from one string.
"""

from mmjax.convert.big_vision import from_big_vision, to_big_vision
from mmjax.convert.coca import (OPEN_CLIP_COCA_MODELS, coca_config, from_open_clip_coca,
                                open_clip_coca_config, to_open_clip_coca)
from mmjax.convert.common import Converted, load_state_dict
from mmjax.convert.hf import from_hf, to_hf
from mmjax.convert.openclip import (OPEN_CLIP_MODELS, TIMM_SIGLIP_TRUNKS, OpenClipSpec,
                                    ResNetSpec, SiglipSpec, from_open_clip, get_spec,
                                    open_clip_config, open_clip_model_config, to_open_clip)

__all__ = ["Converted", "OPEN_CLIP_COCA_MODELS", "coca_config", "from_open_clip_coca",
           "open_clip_coca_config", "to_open_clip_coca", "OPEN_CLIP_MODELS",
           "TIMM_SIGLIP_TRUNKS", "OpenClipSpec", "ResNetSpec",
           "SiglipSpec", "from_big_vision", "from_hf", "from_open_clip", "get_spec", "load",
           "load_state_dict", "open_clip_config", "open_clip_model_config", "to_big_vision",
           "to_hf", "to_open_clip"]

KINDS = ("big_vision", "hf", "open_clip")


def load(spec: str, **kwargs) -> Converted:
  """'big_vision:/path.npz', 'hf:/dir' or 'open_clip:MODEL_NAME:/path' -> Converted.

  kwargs go to the converter (e.g. tokenizer= for big_vision).
  """
  kind, sep, rest = str(spec).partition(":")
  if not sep or kind not in KINDS or not rest:
    raise ValueError(f"checkpoint spec {spec!r}: expected 'big_vision:/path.npz', 'hf:/dir' "
                     "or 'open_clip:MODEL_NAME:/path'")
  if kind == "big_vision":
    return from_big_vision(rest, **kwargs)
  if kind == "hf":
    return from_hf(rest, **kwargs)
  name, sep, path = rest.partition(":")
  if not sep or not path:
    raise ValueError(f"checkpoint spec {spec!r}: open_clip needs 'open_clip:MODEL_NAME:/path' "
                     "(e.g. open_clip:ViT-B-32:/ckpt/open_clip_pytorch_model.bin)")
  return from_open_clip(path, name, **kwargs)
