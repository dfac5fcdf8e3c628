"""What the converters share: their result, exact array maps, and the check against the model.

A converter is a list of `Rule`s, each taking some checkpoint arrays to some
mmjax params and back with transposes, reshapes, splits and concatenations
only, so both directions are exact.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors import SafetensorError
from safetensors.numpy import load_file

from mmjax.data.preprocess import ImagePrep
from mmjax.models import image as image_lib, naflex, scan as scan_lib, text, two_tower, vit

Path = tuple[str, ...]


class Converted(NamedTuple):
  """A checkpoint in mmjax terms.

  config: the `two_tower.Model(**config)` keyword arguments.
  params: nested dict of numpy arrays for `model.apply({'params': params}, ...)`.
  batch_stats: a ResNet image tower's BatchNorm statistics (Flax's 'batch_stats' collection),
    else None; `variables` holds both for `model.apply(ckpt.variables, ...)`.
  preprocess: how the checkpoint's images are prepared (`preprocess(uint8 image)`).
  tokenizer: a `mmjax.data.tokenizers.get_tokenizer` spec, or None when the
    checkpoint does not say (big_vision .npz files hold no vocabulary).
  The text length to tokenise to is config['text']['max_len'].
  """
  config: dict
  params: dict
  preprocess: ImagePrep
  tokenizer: str | None
  batch_stats: dict | None = None

  @property
  def variables(self) -> dict:
    """{'params': params[, 'batch_stats': batch_stats]}: what model.apply takes."""
    if not self.batch_stats:
      return {"params": self.params}
    return {"params": self.params, "batch_stats": self.batch_stats}

  def with_scan(self, scan: bool = True) -> "Converted":
    """The same checkpoint for `Encoder(scan=scan)` towers: config's image and text get
    scan=scan, params their blocks stacked (scan=True) or per-layer (mmjax.models.scan)."""
    config = {**self.config, **{t: {**self.config[t], "scan": scan} for t in ("image", "text")}}
    params = (scan_lib.stack_blocks if scan else scan_lib.unstack_blocks)(self.params)
    return self._replace(config=config, params=params)


class Rule(NamedTuple):
  """Checkpoint keys `src` <-> mmjax param paths `dst`: fwd(*src arrays) -> dst arrays,
  back(*dst arrays) -> src arrays, each the other's exact inverse."""
  src: tuple[str, ...]
  dst: tuple[Path, ...]
  fwd: Callable[..., tuple]
  back: Callable[..., tuple]


def _xp(x):
  """numpy for arrays, jax.numpy for the tracers of `checkpoint_shapes`' eval_shape."""
  return jnp if isinstance(x, jax.core.Tracer) else np


def _one(f):
  return lambda *xs: (f(*xs),)


def same(src: str, dst: Path, fwd=lambda x: x, back=lambda x: x) -> Rule:
  return Rule((src,), (dst,), _one(fwd), _one(back))


def row(src: str, dst: Path) -> Rule:
  """[n, w] <-> [1, n, w] (position embeddings stored without the batch axis)."""
  return same(src, dst, lambda x: x[None], lambda x: x[0])


def token(src: str, dst: Path) -> Rule:
  """[w] <-> [1, 1, w] (a class token or probe stored as a vector)."""
  return same(src, dst, lambda x: x.reshape(1, 1, -1), lambda x: x.reshape(-1))


def scalar(src: str, dst: Path, shape: tuple = ()) -> Rule:
  """[] <-> the checkpoint's shape (() or (1,)) for logit scales and biases."""
  return same(src, dst, lambda x: x.reshape(()), lambda x: x.reshape(shape))


def conv(src: str, dst: Path) -> Rule:
  """torch Conv2d OIHW <-> flax HWIO."""
  return same(src, dst, lambda x: x.transpose(2, 3, 1, 0), lambda x: x.transpose(3, 2, 0, 1))


def linear(src: str, dst: Path, bias: bool = True) -> list[Rule]:
  """torch Linear `src`.weight (out, in) [+ .bias] <-> Dense kernel (in, out) [+ bias]."""
  out = [same(f"{src}.weight", (*dst, "kernel"), lambda x: x.T, lambda x: x.T)]
  return out + ([same(f"{src}.bias", (*dst, "bias"))] if bias else [])


def layer_norm(src: str, dst: Path) -> list[Rule]:
  return [same(f"{src}.weight", (*dst, "scale")), same(f"{src}.bias", (*dst, "bias"))]


def heads_in(src: str, dst: Path, heads: int) -> list[Rule]:
  """torch Linear (h*d, w) [+ (h*d,)] <-> DenseGeneral kernel [w, h, d], bias [h, d] (q, k, v)."""
  return [same(f"{src}.weight", (*dst, "kernel"), lambda x: x.T.reshape(x.shape[1], heads, -1),
               lambda x: x.reshape(x.shape[0], -1).T),
          same(f"{src}.bias", (*dst, "bias"), lambda x: x.reshape(heads, -1),
               lambda x: x.reshape(-1))]


def heads_out(src: str, dst: Path, heads: int) -> list[Rule]:
  """torch Linear (w, h*d) + bias <-> kernel [h, d, w], bias [w] (the output projection)."""
  return [same(f"{src}.weight", (*dst, "kernel"), lambda x: x.T.reshape(heads, -1, x.shape[0]),
               lambda x: x.reshape(-1, x.shape[-1]).T),
          same(f"{src}.bias", (*dst, "bias"))]


def fused_in(weight: str, bias: str, dst: Path, heads: int,
             names: Sequence[str] = ("query", "key", "value")) -> list[Rule]:
  """A packed torch projection (len(names)*h*d, w) + bias (nn.MultiheadAttention's in_proj,
  timm's qkv / kv) <-> one [w, h, d] kernel and [h, d] bias per name."""
  k = len(names)

  def fwd(w, b):
    xp, w_in = _xp(w), w.shape[1]
    ws = [x.T.reshape(w_in, heads, -1) for x in xp.split(w, k)]
    return (*ws, *[x.reshape(heads, -1) for x in xp.split(b, k)])

  def back(*xs):
    xp, ws, bs = _xp(xs[0]), xs[:k], xs[k:]
    return (xp.concatenate([x.reshape(x.shape[0], -1).T for x in ws]),
            xp.concatenate([x.reshape(-1) for x in bs]))

  dst_paths = tuple((*dst, n, "kernel") for n in names) + tuple((*dst, n, "bias") for n in names)
  return [Rule((weight, bias), dst_paths, fwd, back)]


# What decides a two-tower model's params and forward pass (not its dtypes, remat, dropout).
# The kind of layout first, the sizes last: the first mismatch is the most telling one.
_TWO_TOWER_LAYOUT = ("loss", "image_proj", "text_proj", "embed_dim")
_LAYOUT = {
    "image": ("pool_type", "posemb", "patch_bias", "posemb_cls", "ln_pre", "act", "ln_eps",
              "patch_size", "width", "depth", "mlp_dim", "num_heads"),
    "text": ("causal", "pool_type", "pad_id", "act", "ln_eps", "vocab_size", "max_len",
             "width", "depth", "mlp_dim", "num_heads"),
}


def tower_settings(tower: str, fields: Mapping) -> dict:
  """Every field of the tower, the given ones decoded and checked, the rest the defaults.
  The complete fields of a built model (a run's: mmjax.train.export) name their kind too."""
  cls, decode = (vit.ViT, vit.config) if tower == "image" else (text.TextTransformer,
                                                                 text.config)
  if tower == "image" and fields.get(image_lib.KIND) == "naflex":
    cls, decode = naflex.NaFlexViT, naflex.config
  if fields.get(image_lib.KIND) in ("vit", "naflex"):
    fields = {k: v for k, v in fields.items() if k != image_lib.KIND}
  return {**{f.name: f.default for f in dataclasses.fields(cls)}, **decode(**fields)}


def layout_mismatches(config: Mapping, want: Mapping, layout: str) -> list[str]:
  """One message per field where two_tower kwargs `config` differ from `want` in
  anything that decides the params or the forward pass."""
  out = []
  for key in _TWO_TOWER_LAYOUT:
    default = getattr(two_tower.TwoTower, key, None)
    got, need = config.get(key, default), want.get(key, default)
    if got != need:
      out.append(f"config[{key!r}]={got!r}; {layout} needs {need!r}")
  kinds = [image_lib.kind(c["image"]).name for c in (config, want)]
  if kinds[0] != kinds[1]:
    return [f"config['image'] is a {kinds[0]!r} tower; {layout} needs a {kinds[1]!r} one"]
  for tower in ("image", "text"):
    got, need = tower_settings(tower, config[tower]), tower_settings(tower, want[tower])
    keys = _LAYOUT[tower] + (("posemb_grid",) if kinds[0] == "naflex" and tower == "image"
                             else ())
    out += [f"config[{tower!r}][{key!r}]={got.get(key)!r}; {layout} needs {need.get(key)!r}"
            for key in keys if got.get(key) != need.get(key)]
  return out


def check_layout(config: Mapping, want: Mapping, layout: str) -> None:
  """ValueError naming the first field of `layout_mismatches`."""
  problems = layout_mismatches(config, want, layout)
  if problems:
    raise ValueError(problems[0])


# ------------------------------------------------------------ reading

def to_numpy(x, dtype=None) -> np.ndarray:
  """A torch tensor or array-like -> a new numpy array (never a view of x)."""
  if hasattr(x, "detach"):   # torch, without importing it
    x = x.detach().cpu()
    if str(x.dtype) == "torch.bfloat16":   # numpy has no bfloat16
      x = x.float()
    x = x.numpy()
  return np.array(x, dtype=dtype, copy=True)


def contiguous(x: np.ndarray) -> np.ndarray:
  return np.asarray(x, order="C")   # np.ascontiguousarray would make a 0-d array 1-d


def _listing(what: str, keys: Sequence) -> str:
  more = f" (+{len(keys) - 8} more)" if len(keys) > 8 else ""
  return f"{what}: {list(keys[:8])}{more}"


def model_shapes(config: Mapping, image_size: int) -> dict[Path, jax.ShapeDtypeStruct]:
  """{variable path: shape} of `two_tower.Model(**config)`, traced, nothing allocated: its
  params' paths, and its BatchNorm statistics under ('batch_stats', ...) (STATS)."""
  return dict(_model_shapes(json.dumps(config, sort_keys=True, default=repr), image_size))


@functools.lru_cache(maxsize=16)
def _model_shapes(config_json: str, image_size: int) -> tuple:
  config = json.loads(config_json)
  # The per-layer tree whatever config's scan says: the rules map one block at a time.
  model = two_tower.Model(**{**config, **{t: {**config[t], "scan": False}
                                         for t in ("image", "text")}})
  variables = jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), image_lib.example_input(config["image"], image_size),
      jnp.zeros((1, config["text"]["max_len"]), jnp.int32)))
  return tuple((p, jax.ShapeDtypeStruct(v.shape, jnp.float32))
               for p, v in traverse_util.flatten_dict(merge_stats(
                   variables["params"], variables.get("batch_stats"))).items())


STATS = "batch_stats"   # the rules' first path element of a BatchNorm statistic


def merge_stats(params: Mapping, batch_stats: Mapping | None) -> dict:
  """One tree for the rules: params, with the BatchNorm statistics (if any) under STATS (no
  model has a param of that name)."""
  return {**params, STATS: batch_stats} if batch_stats else dict(params)


def split_stats(tree: Mapping) -> tuple[dict, dict | None]:
  """merge_stats' inverse: (params, batch_stats or None)."""
  tree = dict(tree)
  return tree, tree.pop(STATS, None)


def checkpoint_shapes(rules: Sequence[Rule], config: Mapping, image_size: int,
                      shapes: Mapping[Path, jax.ShapeDtypeStruct] | None = None
                      ) -> dict[str, tuple[int, ...]]:
  """{checkpoint key: shape} that the model `config` describes, through the rules' back
  maps; RuntimeError if the rules and the model's params are not the same set.
  shapes: the model's {param path: shape} (default: model_shapes, a two-tower model's)."""
  shapes = model_shapes(config, image_size) if shapes is None else shapes
  covered = [p for r in rules for p in r.dst]
  if set(covered) != set(shapes) or len(covered) != len(shapes):
    odd = sorted(set(covered) ^ set(shapes))[:8]
    raise RuntimeError(f"converter bug: rules and model params differ at {odd}")
  out = {}
  for r in rules:
    outs = jax.eval_shape(r.back, *(shapes[p] for p in r.dst))
    out.update((k, tuple(o.shape)) for k, o in zip(r.src, outs))
  return out


def apply_rules(rules: Sequence[Rule], arrays: Mapping[str, Any], *, config: Mapping,
                image_size: int, what: str, dtype=np.float32,
                ignore: Callable[[str], bool] = lambda k: False,
                shapes: Mapping[Path, jax.ShapeDtypeStruct] | None = None) -> dict:
  """Checkpoint arrays -> nested mmjax params of the model `config` describes.

  ValueError naming every missing, unexpected and misshapen key (`what` names
  the checkpoint in the message); a scalar stored as [1] counts as []. shapes: as in
  checkpoint_shapes (another model than a two-tower one).
  """
  want = checkpoint_shapes(rules, config, image_size, shapes)
  missing = [k for k in want if k not in arrays]
  unexpected = [k for k in arrays if k not in want and not ignore(k)]
  got = {k: tuple(np.shape(arrays[k])) for k in want if k in arrays}
  wrong = [f"{k}: {got[k]} (want {want[k]})" for k in got
           if got[k] != want[k] and not (np.prod(got[k]) == np.prod(want[k]) == 1)]
  problems = [_listing(w, ks) for w, ks in (("missing keys", missing),
                                            ("unexpected keys", unexpected),
                                            ("wrong shapes", wrong)) if ks]
  if problems:
    raise ValueError(f"{what}: " + "; ".join(problems))
  flat = {}
  for r in rules:
    src = [to_numpy(arrays[k], dtype) for k in r.src]
    src = [x.reshape(want[k]) for k, x in zip(r.src, src)]
    flat.update(zip(r.dst, r.fwd(*src)))
  return traverse_util.unflatten_dict(flat)


def unapply_rules(rules: Sequence[Rule], params: Mapping) -> dict[str, np.ndarray]:
  """mmjax params, per-layer or scanned (Encoder scan=True), -> {checkpoint key: numpy array};
  ValueError naming absent params."""
  flat = traverse_util.flatten_dict(scan_lib.unstack_blocks(dict(params)))
  missing = [p for r in rules for p in r.dst if p not in flat]
  if missing:
    raise ValueError(f"params lack {['/'.join(p) for p in missing[:8]]}")
  out = {}
  for r in rules:
    ins = r.back(*(np.array(flat[p], copy=True) for p in r.dst))
    out.update((k, contiguous(v)) for k, v in zip(r.src, ins))
  return out


def load_state_dict(state_dict_or_path: Mapping | str | os.PathLike) -> dict[str, Any]:
  """An open_clip state dict, or a .safetensors / .pt / .pth / .bin file of one (offline).

  Unwraps open_clip's training checkpoints ({'state_dict': ...}), strips the
  'module.' prefix of DistributedDataParallel and the 'text.' prefix of
  open_clip's CustomTextCLIP layout (its SigLIP models). Here, not in openclip.py, so that
  coca.py reads them without importing openclip.py (which imports coca.py for coca_* names).
  """
  sd = state_dict_or_path
  if isinstance(sd, (str, os.PathLike)):
    path = require_file(sd, "state_dict_or_path")
    sd = read_safetensors(path) if path.endswith(".safetensors") else torch_load(path)
  elif not isinstance(sd, Mapping):
    raise ValueError(f"state_dict_or_path must be a mapping or a file path; got {type(sd)}")
  if "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
    sd = sd["state_dict"]
  out = {}
  for k, v in sd.items():
    k = k.removeprefix("module.")
    out[k.removeprefix("text.") if k.startswith("text.") else k] = v
  return out


def _not_empty(path: str) -> None:
  if os.path.getsize(path) == 0:
    raise ValueError(f"{path}: empty file (0 bytes)")


def _kind(x) -> str:
  return type(x).__name__


def _reason(e: BaseException) -> str:
  """The exception's type and the first sentence of its message, on one line."""
  first = str(e).strip().splitlines()[0].split(". ")[0][:160] if str(e).strip() else ""
  return f"{_kind(e)}: {first}" if first else _kind(e)


def source_name(state_dict_or_path) -> str:
  """How an error names the state dict: its file, or 'state_dict'."""
  if isinstance(state_dict_or_path, (str, os.PathLike)):
    return os.path.expanduser(os.fspath(state_dict_or_path))
  return "state_dict"


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """A .safetensors file; ValueError naming it when it is empty, truncated or not one."""
  _not_empty(path)
  try:
    return load_file(path)
  except SafetensorError as e:
    raise ValueError(f"{path}: not a readable safetensors file, truncated or corrupt "
                     f"({_reason(e)})") from None


def torch_load(path: str) -> dict[str, Any]:
  """A torch.save'd state dict (weights_only); ValueError naming the file when it is none."""
  try:
    import torch   # optional and heavy: only .pt/.bin files need it
  except ImportError as e:
    raise ImportError(f"reading {path!r} needs torch (`pip install torch`)") from e
  _not_empty(path)
  try:
    sd = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:   # pickle, zip and EOF errors of a file that is no state dict
    raise ValueError(f"{path}: torch.load(weights_only=True) cannot read it ({_reason(e)}); "
                     "not a state dict file, truncated, or TorchScript (OpenAI's .pt files: load "
                     "them with open_clip and pass model.state_dict())") from None
  if not isinstance(sd, Mapping):
    raise ValueError(f"{path}: holds a {_kind(sd)}, not a state dict (a mapping of names to "
                     "tensors)")
  return sd


def read_json(path: str, *, shape: type = dict) -> Any:
  """A JSON file holding a `shape`; ValueError naming the file otherwise."""
  try:
    with open(path, encoding="utf-8") as f:
      out = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{path}: not valid JSON ({_reason(e)})") from None
  if not isinstance(out, shape):
    raise ValueError(f"{path}: holds a {_kind(out)}, not a JSON "
                     f"{'object' if shape is dict else shape.__name__}")
  return out


def require_file(path: str | os.PathLike, arg: str) -> str:
  path = os.path.expanduser(os.fspath(path))
  if not os.path.isfile(path):
    raise ValueError(f"{arg}={path!r} is not a file")
  return path
