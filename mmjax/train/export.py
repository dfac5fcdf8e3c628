"""A training run's workdir as a checkpoint: `from_workdir(path[, step])` gives the same
`Converted(config, params, preprocess, tokenizer, batch_stats)` the converters give, so
`experiments.evaluate --checkpoint workdir:/path[@step]`, `config.init_from.checkpoint` and
the exporters (mmjax.convert.to_hf, to_open_clip, to_big_vision) take a run as they take an
open_clip or Hugging Face checkpoint.

What it reads: config.json (the architecture, as the run built it: mmjax.models.factory),
model.json (the run's tokenizer spec and image preprocessing, written by the loop, and for a
run started from a converted checkpoint that checkpoint's architecture) and the newest
checkpoint (or `step`): its params, or with ema=True its weight EMA.
"""

from __future__ import annotations

import json
import os

import ml_collections

from mmjax import convert, objectives
from mmjax.data.naflex import NaflexPrep
from mmjax.data.preprocess import ImagePrep
from mmjax.data.tokenizers import get_tokenizer
from mmjax.models import factory
from mmjax.train import checkpoint

MODEL_FILE = "model.json"   # beside config.json: {'tokenizer', 'preprocess'[, 'architecture']}


def save_model_card(workdir: str, tokenizer_spec: str, preprocess: ImagePrep,
                    architecture: dict | None = None) -> None:
  """Writes what using the run's checkpoints elsewhere needs beyond config.json.

  architecture: the two_tower.Model kwargs of the checkpoint the run started from
  (config.init_from.checkpoint: Converted.config), which replace config.model's towers;
  kept without the runtime settings (factory.RUNTIME_FIELDS), which config.model gives.
  """
  card = {"tokenizer": tokenizer_spec, "preprocess": preprocess._asdict()}
  if architecture is not None:
    card["architecture"] = {k: ({f: x for f, x in v.items() if f not in factory.RUNTIME_FIELDS}
                                if k in ("image", "text") else v)
                            for k, v in architecture.items()}
  with open(os.path.join(workdir, MODEL_FILE), "w") as f:
    json.dump(card, f, indent=2)


def _tuples(x):
  """JSON's lists back to the tuples the configs hold (patch_size, a ResNet's layers)."""
  if isinstance(x, dict):
    return {k: _tuples(v) for k, v in x.items()}
  return tuple(map(_tuples, x)) if isinstance(x, list) else x


def _read_json(path: str, what: str):
  try:
    with open(path) as f:
      return json.load(f)
  except OSError as e:
    raise ValueError(f"{what} {path}: cannot read it ({e.strerror or e}); is it an mmjax run's "
                     "workdir?") from None
  except json.JSONDecodeError as e:
    raise ValueError(f"{what} {path}: not JSON ({e})") from None


def from_workdir(workdir: str, step: int | None = None, *, ema: bool = False
                 ) -> convert.Converted:
  """The two-tower model a run trained: its newest checkpoint, or `step`; ema=True: its
  weight EMA (config.ema_decay) instead of the params."""
  workdir = os.path.expanduser(workdir)
  config = ml_collections.ConfigDict(_read_json(os.path.join(workdir, "config.json"),
                                                "workdir config"))
  card = _read_json(os.path.join(workdir, MODEL_FILE), "workdir model card")
  if not objectives.get(config.loss).takes_checkpoint:
    two = [n for n in objectives.names() if objectives.get(n).takes_checkpoint]
    raise ValueError(f"workdir {workdir}: a config.loss={config.loss!r} run; only two-tower "
                     f"runs ({', '.join(two)}) make a checkpoint of two towers")
  tok = get_tokenizer(card["tokenizer"])
  model = factory.two_tower_model(config, tok.vocab_size, loss=config.loss,
                                  converted=_architecture(config, card))
  variables, _ = checkpoint.load_variables(workdir, step, ema=ema)
  fields = dict(image=dict(model.image), text=dict(model.text), embed_dim=model.embed_dim,
                image_proj=model.image_proj, text_proj=model.text_proj,
                temperature_init=model.temperature_init, bias_init=model.bias_init,
                loss=config.loss)
  prep = card["preprocess"]
  prep = NaflexPrep(**prep) if "max_patches" in prep else ImagePrep(**prep)
  return convert.Converted(fields, variables["params"], prep,
                           card["tokenizer"], variables.get("batch_stats"))


def _architecture(config: ml_collections.ConfigDict, card: dict) -> dict | None:
  """The architecture of the checkpoint a run started from (config.init_from.checkpoint), or
  None (config.model's towers). Runs from before model.json kept it: the checkpoint's own."""
  if "architecture" in card:
    return _tuples(card["architecture"])
  spec = config.init_from.get("checkpoint") if "init_from" in config else None
  return load(spec).config if spec else None


def load(spec: str, *, ema: bool = False) -> convert.Converted:
  """'workdir:/path[@step]' (a run: from_workdir), else a mmjax.convert.load spec.
  ema=True: the run's weight EMA (a 'workdir:' spec only)."""
  kind, sep, rest = str(spec).partition(":")
  if kind != "workdir" or not sep:
    if ema:
      raise ValueError(f"checkpoint spec {spec!r}: only a training run ('workdir:/path') has a "
                       "weight EMA")
    return convert.load(spec)
  path, at, step = rest.rpartition("@") if "@" in rest else (rest, "", "")
  if at and not step.isdigit():
    raise ValueError(f"checkpoint spec {spec!r}: 'workdir:/path@STEP' takes a step number")
  return from_workdir(path or rest, int(step) if at else None, ema=ema)
