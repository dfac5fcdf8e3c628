"""A training run's workdir as a checkpoint: `from_workdir(path[, step])` gives the same
`Converted(config, params, preprocess, tokenizer, batch_stats)` the converters give, so
`experiments.evaluate --checkpoint workdir:/path[@step]`, `config.init_from.checkpoint` and
the exporters (mmjax.convert.to_hf, to_open_clip, to_big_vision) take a run as they take an
open_clip or Hugging Face checkpoint.

What it reads: config.json (the architecture, as the run built it: mmjax.models.factory),
model.json (the run's tokenizer spec and image preprocessing, written by the loop) and the
newest checkpoint (or `step`).
"""

from __future__ import annotations

import json
import os

import ml_collections

from mmjax import convert, objectives
from mmjax.data.preprocess import ImagePrep
from mmjax.data.tokenizers import get_tokenizer
from mmjax.models import factory
from mmjax.train import checkpoint

MODEL_FILE = "model.json"   # beside config.json: {'tokenizer': spec, 'preprocess': ImagePrep}


def save_model_card(workdir: str, tokenizer_spec: str, preprocess: ImagePrep) -> None:
  """Writes what using the run's checkpoints elsewhere needs beyond config.json."""
  with open(os.path.join(workdir, MODEL_FILE), "w") as f:
    json.dump({"tokenizer": tokenizer_spec, "preprocess": preprocess._asdict()}, f, indent=2)


def _read_json(path: str, what: str):
  try:
    with open(path) as f:
      return json.load(f)
  except OSError as e:
    raise ValueError(f"{what} {path}: cannot read it ({e.strerror or e}); is it an mmjax run's "
                     "workdir?") from None
  except json.JSONDecodeError as e:
    raise ValueError(f"{what} {path}: not JSON ({e})") from None


def from_workdir(workdir: str, step: int | None = None) -> convert.Converted:
  """The two-tower model a run trained: its newest checkpoint, or `step`."""
  workdir = os.path.expanduser(workdir)
  config = ml_collections.ConfigDict(_read_json(os.path.join(workdir, "config.json"),
                                                "workdir config"))
  card = _read_json(os.path.join(workdir, MODEL_FILE), "workdir model card")
  if not objectives.get(config.loss).takes_checkpoint:
    two = [n for n in objectives.names() if objectives.get(n).takes_checkpoint]
    raise ValueError(f"workdir {workdir}: a config.loss={config.loss!r} run; only two-tower "
                     f"runs ({', '.join(two)}) make a checkpoint of two towers")
  tok = get_tokenizer(card["tokenizer"])
  model = factory.two_tower_model(config, tok.vocab_size, loss=config.loss)
  variables, _ = checkpoint.load_variables(workdir, step)
  fields = dict(image=dict(model.image), text=dict(model.text), embed_dim=model.embed_dim,
                image_proj=model.image_proj, text_proj=model.text_proj,
                temperature_init=model.temperature_init, bias_init=model.bias_init,
                loss=config.loss)
  return convert.Converted(fields, variables["params"], ImagePrep(**card["preprocess"]),
                           card["tokenizer"], variables.get("batch_stats"))


def load(spec: str) -> convert.Converted:
  """'workdir:/path[@step]' (a run: from_workdir), else a mmjax.convert.load spec."""
  kind, sep, rest = str(spec).partition(":")
  if kind != "workdir" or not sep:
    return convert.load(spec)
  path, at, step = rest.rpartition("@") if "@" in rest else (rest, "", "")
  if at and not step.isdigit():
    raise ValueError(f"checkpoint spec {spec!r}: 'workdir:/path@STEP' takes a step number")
  return from_workdir(path or rest, int(step) if at else None)
