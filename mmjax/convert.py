"""open_clip <-> mmjax for open_clip's ViT CLIP models (ViT-B-32, ViT-B-16, ViT-L-14, ...).

  config, params = from_open_clip("open_clip_pytorch_model.bin", "ViT-B-32")
  model = two_tower.Model(**config)
  zimg = model.apply({"params": params}, images, method="encode_image")   # [b, 224, 224, 3]
  ztxt = model.apply({"params": params}, ClipTokenizer().encode(texts), method="encode_text")

  state_dict = to_open_clip(config, params, as_torch=True)
  open_clip.create_model("ViT-B-32", pretrained=None).load_state_dict(state_dict)

Images are NHWC here and NCHW in open_clip; normalise them as open_clip's
preprocessing does (OPENAI_DATASET_MEAN/STD), mmjax does not. Text: the CLIP
BPE tokenizer, `mmjax.data.clip_tokenizer.ClipTokenizer`. Both directions are
exact (transposes, reshapes and splits only). torch is imported only to read
.pt/.bin files and for `as_torch=True`.

Which name to give: open_clip's ViT-B-32 / ViT-B-16 / ViT-L-14 use the erf
GELU; OpenAI's original weights (pretrained='openai') need the '-quickgelu'
names, as in open_clip. The state dict's shapes are checked against the name.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, NamedTuple

import numpy as np
from flax import traverse_util


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

_LN_EPS = 1e-5   # torch.nn.LayerNorm's default


def get_spec(model_name: str) -> OpenClipSpec:
  if model_name not in OPEN_CLIP_MODELS:
    raise ValueError(f"model_name={model_name!r} is not a supported open_clip model; "
                     f"supported: {sorted(OPEN_CLIP_MODELS)}")
  return OPEN_CLIP_MODELS[model_name]


def open_clip_config(model_name: str) -> dict[str, Any]:
  """The `two_tower.Model(**config)` keyword arguments of an open_clip ViT CLIP model."""
  s = get_spec(model_name)
  act = "quick_gelu" if s.quick_gelu else "gelu_exact"
  common = dict(act=act, ln_eps=_LN_EPS)
  image = dict(width=s.vision_width, depth=s.vision_layers, mlp_dim=s.vision_mlp,
               num_heads=s.vision_heads, patch_size=(s.patch_size, s.patch_size),
               pool_type="tok", posemb="learn", posemb_cls=True, ln_pre=True, patch_bias=False,
               **common)
  text = dict(vocab_size=s.vocab_size, max_len=s.context_length, width=s.text_width,
              depth=s.text_layers, mlp_dim=4 * s.text_width, num_heads=s.text_heads,
              causal=True, pool_type="argmax", pad_id=None, **common)
  return dict(image=image, text=text, embed_dim=s.embed_dim, loss="clip")


# ------------------------------------------------------------ the key map

# (open_clip -> mmjax, mmjax -> open_clip), each exact.
_SAME = (lambda x: x, lambda x: x)
_T = (lambda x: x.T, lambda x: x.T)                        # torch Linear (out, in)
_ROW = (lambda x: x[None], lambda x: x[0])                 # [n, w] <-> [1, n, w]
_TOKEN = (lambda x: x[None, None], lambda x: x[0, 0])      # [w] <-> [1, 1, w]
_CONV = (lambda x: x.transpose(2, 3, 1, 0), lambda x: x.transpose(3, 2, 0, 1))  # OIHW <-> HWIO
_SCALAR = (lambda x: x.reshape(()), lambda x: x.reshape(()))  # logit_scale [] (or [1])
_QKV = ("query", "key", "value")


def _ln(oc: str, mm: tuple) -> list:
  return [(f"{oc}.weight", (*mm, "scale"), _SAME), (f"{oc}.bias", (*mm, "bias"), _SAME)]


def _block_rules(oc: str, mm: tuple) -> list:
  """One residual block without its packed attention input projection."""
  return [*_ln(f"{oc}.ln_1", (*mm, "ln1")), *_ln(f"{oc}.ln_2", (*mm, "ln2")),
          (f"{oc}.mlp.c_fc.weight", (*mm, "mlp", "Dense_0", "kernel"), _T),
          (f"{oc}.mlp.c_fc.bias", (*mm, "mlp", "Dense_0", "bias"), _SAME),
          (f"{oc}.mlp.c_proj.weight", (*mm, "mlp", "Dense_1", "kernel"), _T),
          (f"{oc}.mlp.c_proj.bias", (*mm, "mlp", "Dense_1", "bias"), _SAME)]


def _towers(vision_layers: int, text_layers: int) -> tuple[list, list]:
  """(one-to-one rules [(open_clip key, mmjax path, transforms)],
  attention blocks [(open_clip prefix, mmjax path)])."""
  rules = [
      ("visual.conv1.weight", ("img", "embedding", "kernel"), _CONV),
      ("visual.class_embedding", ("img", "cls"), _TOKEN),
      ("visual.positional_embedding", ("img", "pos_embedding"), _ROW),
      *_ln("visual.ln_pre", ("img", "ln_pre")),
      *_ln("visual.ln_post", ("img", "encoder", "ln_final")),
      ("visual.proj", ("img_proj", "kernel"), _SAME),        # already (in, out)
      ("token_embedding.weight", ("txt", "token_embedding", "embedding"), _SAME),
      ("positional_embedding", ("txt", "pos_embedding"), _ROW),
      *_ln("ln_final", ("txt", "encoder", "ln_final")),
      ("text_projection", ("txt_proj", "kernel"), _SAME),   # already (in, out)
      ("logit_scale", ("t",), _SCALAR),
  ]
  attn = []
  for tower_oc, tower_mm, depth in (("visual.transformer", "img", vision_layers),
                                    ("transformer", "txt", text_layers)):
    for i in range(depth):
      oc, mm = f"{tower_oc}.resblocks.{i}", (tower_mm, "encoder", f"block{i}")
      rules += _block_rules(oc, mm)
      rules.append((f"{oc}.attn.out_proj.bias", (*mm, "attn", "out", "bias"), _SAME))
      attn.append((f"{oc}.attn", (*mm, "attn")))
  return rules, attn


def _attn_keys(prefix: str) -> list[str]:
  return [f"{prefix}.in_proj_weight", f"{prefix}.in_proj_bias", f"{prefix}.out_proj.weight"]


def _expected_shapes(s: OpenClipSpec) -> dict[str, tuple[int, ...]]:
  """Every open_clip key of the model and its shape."""
  vw, tw, grid = s.vision_width, s.text_width, s.image_size // s.patch_size
  shapes = {
      "visual.conv1.weight": (vw, 3, s.patch_size, s.patch_size),
      "visual.class_embedding": (vw,),
      "visual.positional_embedding": (grid * grid + 1, vw),
      "visual.proj": (vw, s.embed_dim),
      "token_embedding.weight": (s.vocab_size, tw),
      "positional_embedding": (s.context_length, tw),
      "text_projection": (tw, s.embed_dim),
      "logit_scale": (),
  }
  for ln, w in (("visual.ln_pre", vw), ("visual.ln_post", vw), ("ln_final", tw)):
    shapes[f"{ln}.weight"] = shapes[f"{ln}.bias"] = (w,)
  for tower, w, mlp, depth in (("visual.transformer", vw, s.vision_mlp, s.vision_layers),
                               ("transformer", tw, 4 * tw, s.text_layers)):
    for i in range(depth):
      b = f"{tower}.resblocks.{i}"
      for ln in ("ln_1", "ln_2"):
        shapes[f"{b}.{ln}.weight"] = shapes[f"{b}.{ln}.bias"] = (w,)
      shapes.update({
          f"{b}.attn.in_proj_weight": (3 * w, w), f"{b}.attn.in_proj_bias": (3 * w,),
          f"{b}.attn.out_proj.weight": (w, w), f"{b}.attn.out_proj.bias": (w,),
          f"{b}.mlp.c_fc.weight": (mlp, w), f"{b}.mlp.c_fc.bias": (mlp,),
          f"{b}.mlp.c_proj.weight": (w, mlp), f"{b}.mlp.c_proj.bias": (w,)})
  return shapes


# ------------------------------------------------------------ reading state dicts

def _contiguous(x: np.ndarray) -> np.ndarray:
  return np.asarray(x, order="C")   # np.ascontiguousarray would make a 0-d array 1-d


def _to_numpy(x, dtype) -> np.ndarray:
  """A torch tensor or array-like -> a new numpy array of `dtype` (never a view of x)."""
  if hasattr(x, "detach"):   # torch, without importing it
    x = x.detach().cpu()
    if str(x.dtype) == "torch.bfloat16":   # numpy has no bfloat16
      x = x.float()
    x = x.numpy()
  return np.array(x, dtype=dtype, copy=True)


def load_state_dict(state_dict_or_path: Mapping | str | os.PathLike) -> dict[str, Any]:
  """A state dict, or a .safetensors / .pt / .pth / .bin file of one (offline).

  Unwraps open_clip's training checkpoints ({'state_dict': ...}), strips the
  'module.' prefix of DistributedDataParallel and the 'text.' prefix of
  open_clip's CustomTextCLIP layout.
  """
  sd = state_dict_or_path
  if isinstance(sd, (str, os.PathLike)):
    path = os.fspath(sd)
    if not os.path.isfile(path):
      raise ValueError(f"state_dict_or_path={path!r} is not a file")
    if path.endswith(".safetensors"):
      try:
        from safetensors.numpy import load_file
      except ImportError as e:
        raise ImportError("reading .safetensors needs `pip install safetensors`") from e
      sd = load_file(path)
    else:
      try:
        import torch
      except ImportError as e:
        raise ImportError(f"reading {path!r} needs torch (`pip install torch`)") from e
      try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
      except RuntimeError as e:
        raise ValueError(f"torch.load({path!r}, weights_only=True) failed ({e}); OpenAI's "
                         "TorchScript .pt files: load them with open_clip and pass "
                         "model.state_dict()") from e
  if not isinstance(sd, Mapping):
    raise ValueError(f"state_dict_or_path must be a mapping or a file path; got {type(sd)}")
  if "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
    sd = sd["state_dict"]
  out = {}
  for k, v in sd.items():
    k = k.removeprefix("module.")
    out[k.removeprefix("text.") if k.startswith("text.") else k] = v
  return out


def from_open_clip(state_dict_or_path: Mapping | str | os.PathLike, model_name: str, *,
                   dtype: Any = np.float32) -> tuple[dict[str, Any], dict[str, Any]]:
  """An open_clip ViT CLIP state dict -> (config, params) of `two_tower.Model(**config)`.

  Args:
    state_dict_or_path: {key: torch tensor or array}, or a path (load_state_dict).
    model_name: an OPEN_CLIP_MODELS key, e.g. 'ViT-B-32' (GELU) or
      'ViT-B-32-quickgelu' (OpenAI's weights); decides the activation and the
      heads, and the state dict's shapes must match it.
    dtype: of the returned params (numpy arrays, host memory).

  Returns:
    (config, params): config as `open_clip_config(model_name)` gives it;
    params a nested dict of numpy arrays (new memory, some of them transposed
    views) for model.apply({'params': params}, ...); `jax.device_put(params)`
    once before calling a jitted function many times.
  """
  spec = get_spec(model_name)
  sd = load_state_dict(state_dict_or_path)
  want = _expected_shapes(spec)
  sd.pop("attn_mask", None)   # a buffer some old checkpoints saved
  missing = [k for k in want if k not in sd]
  unexpected = [k for k in sd if k not in want]
  wrong = [f"{k}: {tuple(np.shape(sd[k]))} (want {want[k]})" for k in want
           if k in sd and tuple(np.shape(sd[k])) != want[k]
           and not (k == "logit_scale" and np.size(sd[k]) == 1)]
  problems = []
  for what, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                     ("wrong shapes", wrong)):
    if keys:
      more = f" (+{len(keys) - 8} more)" if len(keys) > 8 else ""
      problems.append(f"{what}: {keys[:8]}{more}")
  if problems:
    raise ValueError(f"state_dict is not an open_clip {model_name!r} state dict: "
                     + "; ".join(problems))

  arr = lambda k: _to_numpy(sd[k], dtype)
  rules, attn = _towers(spec.vision_layers, spec.text_layers)
  # Transposes stay numpy views (a transposing copy is ~20x slower than a copy
  # here); jax lays them out when it copies them to the device.
  flat = {path: fwd(arr(k)) for k, path, (fwd, _) in rules}
  for prefix, path in attn:
    w_in, b_in, w_out = (arr(k) for k in _attn_keys(prefix))
    width = w_out.shape[0]
    heads = spec.vision_heads if path[0] == "img" else spec.text_heads
    for name, w, b in zip(_QKV, np.split(w_in, 3), np.split(b_in, 3)):
      flat[(*path, name, "kernel")] = w.T.reshape(width, heads, -1)
      flat[(*path, name, "bias")] = b.reshape(heads, -1)
    flat[(*path, "out", "kernel")] = w_out.T.reshape(heads, -1, width)
  return open_clip_config(model_name), traverse_util.unflatten_dict(flat)


# ------------------------------------------------------------ writing state dicts

# What the config must say for the params to be an open_clip CLIP: (tower, key, value).
_CLIP_LAYOUT = [("image", "pool_type", "tok"), ("image", "posemb", "learn"),
                ("image", "posemb_cls", True), ("image", "ln_pre", True),
                ("image", "patch_bias", False), ("image", "ln_eps", _LN_EPS),
                ("text", "causal", True), ("text", "pool_type", "argmax"),
                ("text", "pad_id", None), ("text", "ln_eps", _LN_EPS)]


def _check_clip_layout(config: Mapping) -> None:
  if config.get("loss") != "clip":
    raise ValueError(f"config['loss']={config.get('loss')!r}; an open_clip CLIP model is 'clip'")
  for tower, key, value in _CLIP_LAYOUT:
    got = config[tower].get(key)
    if got != value:
      raise ValueError(f"config[{tower!r}][{key!r}]={got!r}; open_clip's CLIP layout needs "
                       f"{value!r} (start from convert.open_clip_config(name))")
  acts = {config["image"].get("act"), config["text"].get("act")}
  if len(acts) != 1 or not acts <= {"gelu_exact", "quick_gelu"}:
    raise ValueError(f"config image/text 'act' = {sorted(map(str, acts))}; open_clip needs both "
                     "'gelu_exact' (nn.GELU) or both 'quick_gelu' ('-quickgelu' models)")


def to_open_clip(config: Mapping, params: Mapping, *, as_torch: bool = False
                 ) -> dict[str, Any]:
  """mmjax (config, params) in open_clip's CLIP layout -> open_clip state dict.

  Args:
    config: two_tower.Model kwargs (as from_open_clip / open_clip_config give);
      checked to describe open_clip's CLIP layout.
    params: the model's params (numpy or jax arrays).
    as_torch: torch tensors (for `model.load_state_dict`) instead of numpy.

  Returns:
    {open_clip key: array} with every key of the open_clip model; load it into
    `open_clip.create_model(name)` where name ends in '-quickgelu' iff
    config's act is 'quick_gelu'.
  """
  _check_clip_layout(config)
  flat = traverse_util.flatten_dict(dict(params))
  depth = lambda tower: sum(1 for p in flat
                            if p[:2] == (tower, "encoder") and p[3:] == ("ln1", "scale"))
  rules, attn = _towers(depth("img"), depth("txt"))
  need = [p for _, p, _ in rules] + [(*p, n, "kernel") for _, p in attn for n in (*_QKV, "out")]
  missing = [p for p in need if p not in flat]
  if missing:
    raise ValueError(f"params lack {['/'.join(p) for p in missing[:8]]}")
  arr = lambda p: np.array(flat[p], copy=True)   # never a view of a device buffer
  sd = {k: _contiguous(back(arr(p))) for k, p, (_, back) in rules}
  for prefix, path in attn:
    k = [arr((*path, n, "kernel")) for n in _QKV]
    width = k[0].shape[0]
    sd[f"{prefix}.in_proj_weight"] = np.concatenate([w.reshape(width, width).T for w in k])
    sd[f"{prefix}.in_proj_bias"] = np.concatenate(
        [arr((*path, n, "bias")).reshape(width) for n in _QKV])
    sd[f"{prefix}.out_proj.weight"] = _contiguous(
        arr((*path, "out", "kernel")).reshape(width, width).T)
  if as_torch:
    import torch
    sd = {k: torch.from_numpy(v) for k, v in sd.items()}
  return sd
