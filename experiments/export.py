r"""Exports a checkpoint (a training run's, or any converter's) for another library.

  python -m experiments.export --checkpoint workdir:workdirs/clip_ft --to hf:/out/clip-ft
  python -m experiments.export --checkpoint workdir:workdirs/clip_ft --ema \
      --to open_clip:/out/clip-ft-ema
  python -m experiments.export --checkpoint hf:/ckpt/siglip-base-patch16-224 \
      --to big_vision:/out/siglip_b16.npz

--to hf:DIR: a Hugging Face directory (config.json, model.safetensors, the tokenizer files and
preprocessor_config.json) that transformers' AutoModel and AutoProcessor load (SigLIP and CLIP
layouts). --to open_clip:DIR: open_clip_model.safetensors, open_clip_config.json (open_clip's
'local-dir:DIR' / Hugging Face hub layout, with the preprocessing) and NAME.json, NAME the
folder's name, for open_clip.add_model_config (CLIP ViT layouts of any size). --to
big_vision:FILE: a big_vision two-tower .npz (SigLIP-style layouts; the tokenizer is not part of
it). --ema: a training run's weight EMA (config.ema_decay) instead of its params.

The export is written beside the target under a temporary name and renamed into place at the
end: a failed export leaves nothing behind. An existing non-empty target is refused unless
--overwrite.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

from mmjax import hostmem

KINDS = ("hf", "open_clip", "big_vision")
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"   # open_clip's own name, first it looks for
OPEN_CLIP_CONFIG = "open_clip_config.json"          # {'model_cfg', 'preprocess_cfg'}


def parse_target(spec: str) -> tuple[str, str]:
  """'hf:/dir' | 'open_clip:/dir' | 'big_vision:/file.npz' -> (kind, absolute path, ~ expanded)."""
  kind, sep, path = str(spec).partition(":")
  if kind not in KINDS or not sep or not path:
    raise ValueError(f"--to {spec!r}: expected hf:/out_dir, open_clip:/out_dir or "
                     "big_vision:/out.npz")
  return kind, os.path.abspath(os.path.expanduser(path))


def check_free(path: str, overwrite: bool) -> None:
  """ValueError when path holds a file or a non-empty folder and overwrite is off."""
  if overwrite or not os.path.lexists(path):
    return
  if os.path.isdir(path) and not os.path.islink(path) and not os.listdir(path):
    return   # an empty folder: nothing to lose
  raise ValueError(f"--to {path}: exists and is not empty; pass --overwrite to replace it")


def _write_hf(ckpt, tmp: str, path: str) -> str:
  """config.json, model.safetensors, tokenizer files, preprocessor_config.json in tmp."""
  from mmjax import convert
  convert.to_hf(ckpt.config, ckpt.params, tmp, tokenizer=ckpt.tokenizer,
                preprocess=ckpt.preprocess)
  return "" if ckpt.tokenizer else "; no tokenizer files: the checkpoint names no tokenizer"


def _open_clip_preprocess(prep) -> dict:
  """An ImagePrep -> open_clip's preprocess_cfg (its eval transform: resize, crop, normalise)."""
  return {"size": prep.size, "mode": "RGB", "mean": list(map(float, prep.mean)),
          "std": list(map(float, prep.std)), "interpolation": prep.resample,
          "resize_mode": "squash" if prep.resize == "squash" else "shortest"}


def _write_open_clip(ckpt, tmp: str, path: str) -> str:
  """The state dict as safetensors, open_clip_config.json and <folder name>.json in tmp."""
  from safetensors.numpy import save_file
  from mmjax import convert
  model_cfg = convert.open_clip_model_config(ckpt.config, ckpt.preprocess.size)
  if ckpt.tokenizer not in (None, "clip"):
    raise ValueError(f"--to open_clip: the checkpoint's tokenizer is {ckpt.tokenizer!r}; an "
                     "open_clip CLIP model config names only open_clip's own ('clip', the CLIP "
                     "BPE)")
  state_dict = convert.to_open_clip(ckpt.config, ckpt.params, batch_stats=ckpt.batch_stats)
  os.makedirs(tmp)
  save_file(state_dict, os.path.join(tmp, OPEN_CLIP_WEIGHTS))
  name = os.path.basename(path)
  _write_json(os.path.join(tmp, OPEN_CLIP_CONFIG),
              {"model_cfg": model_cfg, "preprocess_cfg": _open_clip_preprocess(ckpt.preprocess)})
  _write_json(os.path.join(tmp, f"{name}.json"), model_cfg)
  return f"; open_clip model name {name!r}"


def _write_big_vision(ckpt, tmp: str, path: str) -> str:
  from mmjax import convert
  convert.to_big_vision(ckpt.config, ckpt.params, tmp)
  return f"; its tokenizer: {ckpt.tokenizer}" if ckpt.tokenizer else ""


WRITERS = {"hf": _write_hf, "open_clip": _write_open_clip, "big_vision": _write_big_vision}


def _write_json(path: str, obj) -> None:
  with open(path, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=2)


def _remove(path: str) -> None:
  if os.path.isdir(path) and not os.path.islink(path):
    shutil.rmtree(path)
  elif os.path.lexists(path):
    os.remove(path)


def move_into_place(tmp: str, path: str) -> None:
  """Renames tmp to path; an existing path is moved aside first and removed after (put back
  when the rename fails)."""
  old = f"{path}.old{os.getpid()}"
  had = os.path.lexists(path)
  if had:
    os.rename(path, old)
  try:
    os.rename(tmp, path)
  except BaseException:
    if had:
      os.rename(old, path)
    raise
  if had:
    _remove(old)


def _size(path: str) -> int:
  """Bytes of a file, or of the files under a folder."""
  if not os.path.isdir(path):
    return os.path.getsize(path)
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def _human(n: int) -> str:
  for unit in ("bytes", "KB", "MB", "GB"):
    if n < 1000 or unit == "GB":
      return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
    n /= 1000
  raise AssertionError("unreachable")


def export(checkpoint: str, to: str, *, ema: bool = False, overwrite: bool = False) -> str:
  """Writes `checkpoint` (mmjax.train.export.load's spec) as `to` ('hf:/dir',
  'open_clip:/dir', 'big_vision:/file.npz'); returns the one-line summary. ValueError (one
  line) for a bad target, an occupied one without overwrite, a checkpoint that does not load
  or a layout the target cannot express: nothing is written then."""
  from mmjax.train import export as export_lib
  kind, path = parse_target(to)
  check_free(path, overwrite)
  ckpt = export_lib.load(checkpoint, ema=ema)
  parent = os.path.dirname(path)
  if not os.path.lexists(parent):   # a file there: the writers say 'Not a directory'
    os.makedirs(parent, exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  _remove(tmp)
  try:
    note = WRITERS[kind](ckpt, tmp, path)
    move_into_place(tmp, path)
  except BaseException:
    _remove(tmp)
    raise
  what = "the weight EMA of " if ema else ""
  return f"mmjax: wrote {kind}:{path} ({_human(_size(path))}) from {what}{checkpoint}{note}"


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m experiments.export", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--checkpoint", required=True,
                 help="workdir:/path/to/run[@STEP] (an mmjax training run) | hf:/dir | "
                 "big_vision:/path.npz | open_clip:MODEL_NAME:/path")
  p.add_argument("--to", required=True,
                 help="hf:/out_dir | open_clip:/out_dir | big_vision:/out.npz")
  p.add_argument("--ema", action="store_true",
                 help="export the run's weight EMA (config.ema_decay) instead of its params")
  p.add_argument("--overwrite", action="store_true", help="replace an existing target")
  a = p.parse_args(argv)
  try:
    summary = export(a.checkpoint, a.to, ema=a.ema, overwrite=a.overwrite)
  except (ValueError, ImportError, OSError) as e:
    print(f"mmjax: error: {e}", file=sys.stderr)
    return 1
  print(summary, flush=True)
  return 0


if __name__ == "__main__":
  hostmem.keep_freed_memory()   # process-wide malloc tuning, before JAX starts: mmjax/hostmem.py
  from mmjax.data import pipeline   # after the malloc tuning: it imports TFDS
  pipeline.quiet_tfds_noise()   # process-wide logging, the launcher's to set
  sys.exit(main())
