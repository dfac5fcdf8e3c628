"""What every objective supplies to the loop, the train step and the evaluators, and the
registry that finds an objective by config.loss.

An objective is a class registered by name (`@register('my_loss')`). The loop builds it
as `cls(config, context)`, and from then on reads only what this base class declares:
its batch keys and image views, the host-side fields it derives from each caption, its
init and grad_fn, and its evaluation hooks. Nothing outside an objective's module knows
its name.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Callable, Iterable

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from mmjax.losses import registry as loss_registry
from mmjax.models import image as image_lib

Params = Any


@dataclasses.dataclass
class Context:
  """What an objective may need beyond the config, known once the data is open.

  vocab_size: the tokenizer's ids; mesh, batch_axes: where a sharded loss runs;
  converted: a converted checkpoint's model kwargs (config.init_from.checkpoint);
  train_texts: () -> the training captions (read on demand: CatLIP builds its labels);
  tokenizer: the run's (host-side fields that tokenize: SigLIP 2's region texts).
  """
  vocab_size: int = 0
  mesh: Mesh | None = None
  batch_axes: tuple[str, ...] = ()
  converted: dict | None = None
  train_texts: Callable[[], Iterable[str]] | None = None
  tokenizer: Any = None


class Objective:
  """What a run optimises. Subclasses set `model` in __init__(config, context) and define
  init, grad_fn and features; every other hook has a default meaning "not used".

  Class attributes:
    batch_keys: the batch fields grad_fn reads (the loop shards exactly these).
    views: augmented views of each image in the batch: 1 ('image') or 2 (+ 'image2').
    settings_path, default_settings(): its own config subtree (e.g. 'model.mae') and its
      defaults; config.defaults() holds them, so its keys are checked like any other.
    takes_loss_impl: config.loss_impl, loss_blocks and accum_steps apply to it.
    takes_checkpoint: config.init_from.checkpoint (a converted two-tower model) applies.
  `frozen`: None or a pytree of 'frozen' / 'train' labels over the params (config.frozen,
  worked out once by the loop): no gradient flows through the frozen ones.
  """
  model: nn.Module
  batch_keys: tuple[str, ...] = ("image", "text")
  views: int = 1
  settings_path: str | None = None
  takes_loss_impl: bool = False
  takes_checkpoint: bool = False
  frozen: Any = None

  @staticmethod
  def default_settings() -> dict:
    return {}

  @classmethod
  def check_config(cls, config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the field for what is wrong in config for this objective
    (its own subtree, and what it refuses); run once, before any data is read."""

  def init_variables(self, rng: jax.Array, batch: dict) -> dict:
    """{'params': ...[, 'batch_stats': ...]} (Flax's variable collections) from a dummy batch
    {'image' [1, S, S, 3], 'text' [1, L]} (shapes only). Define this or `init`."""
    return {"params": self.init(rng, batch)}

  def init(self, rng: jax.Array, batch: dict) -> Params:
    """The params alone (see init_variables)."""
    return self.init_variables(rng, batch)["params"]

  takes_step = False   # True: grad_fn also takes step= (the state's step, int32 [])

  def grad_fn(self, params: Params, ema: Any, batch: dict, rng: jax.Array,
              batch_stats: Any = None) -> tuple[tuple[jax.Array, dict], Params]:
    """((loss, metrics), grads) of the global batch. batch_stats: the running statistics
    (BatchNorm's), or None; metrics may hold 'batch_stats', the moved ones, which the train
    step keeps (the optimizer never sees them)."""
    raise NotImplementedError

  def features(self, variables: dict, image: jax.Array) -> jax.Array:
    """[b, H, W, 3] -> [b, d] image features for the linear probe and kNN. variables:
    {'params': ...[, 'batch_stats': ...]} (TrainState.variables)."""
    raise NotImplementedError

  def eval_fields(self) -> dict[str, Callable[[dict], np.ndarray]]:
    """Evaluation-split fields computed on the host from each whole record (its decoded
    features): {key: record -> array}, each function naming the record keys it reads in its
    `reads` attribute; added to the eval and probe splits when the records have them (SigLIP
    2's regions and per-patch labels). Empty: none."""
    return {}

  def patch_features(self) -> Callable | None:
    """(variables, image [b, H, W, 3]) -> patch features [b, g * g, c] on a g x g grid
    (row-major; the dense probe's), or None when the objective has none."""
    return None

  def region_fields(self) -> dict[str, Callable[[str], np.ndarray]]:
    """Batch fields computed on the host from each record's regions (a JSON string, the
    record's config.data.regions_key / regions_ext): {key: regions -> array} (picklable;
    SigLIP 2's referring expressions). Empty: the records' regions are not read."""
    return {}

  def caption_fields(self) -> dict[str, Callable[[str], np.ndarray]]:
    """Batch fields computed on the host from each training caption: {key: caption -> array}
    (picklable; CatLIP: its multi-hot label targets)."""
    return {}

  def ema_init(self, params: Params) -> Any:
    """The momentum encoder's initial params, or None when there is none."""
    return None

  def ema_update(self, ema: Any, params: Params, step: jax.Array) -> Any:
    return ema

  def towers(self) -> tuple[Callable, Callable] | None:
    """(embed_image(variables, image), embed_text(variables, tokens)) -> unit-norm [b, e] for
    zero-shot and retrieval; None for an image-only objective."""
    return None

  def transfer_head(self, variables: dict, class_names: list[str]
                    ) -> tuple[np.ndarray, np.ndarray, int] | None:
    """(w [d, c], b [c], classes found): a classifier of features() for the named classes
    taken from what was learnt; None when the objective has no such head."""
    return None

  def captioner(self, first: int | None = None) -> Callable | None:
    """gen(variables, images [b, H, W, 3]) -> caption tokens [b, L] for the evaluator, or None.
    first: the tokenizer's start token, for models that prepend none of their own."""
    return None

  def reranker(self) -> tuple[Callable, Callable, int] | None:
    """(image_tokens(variables, images) -> [b, n, e], score(variables, tokens, texts) -> [b],
    k): the evaluator re-ranks the top k of retrieval by score; None: no re-ranking."""
    return None

  def moves_batch_stats(self) -> bool:
    """Whether a train-time forward pass normalises by the batch's own statistics (and moves
    the running ones): the loop refuses to freeze such a tower."""
    image = getattr(self.model, "image", None)
    return isinstance(image, dict) and image_lib.uses_batch_stats(image)

  def save_or_check(self, workdir: str) -> None:
    """Writes what a run keeps beside its checkpoints on a fresh run, or checks that a
    resumed run's equals it; nothing for most objectives."""

  def with_frozen(self, frozen: Any) -> "Objective":
    """A copy whose grad_fn stops gradients at the leaves labelled 'frozen'."""
    new = copy.copy(self)
    new.frozen = frozen
    return new

  def _freeze(self, params: Params) -> Params:
    return params if self.frozen is None else stop_frozen(params, self.frozen)


def stop_frozen(params: Params, labels: Any) -> Params:
  """params with stop_gradient on the leaves labelled 'frozen' (mmjax.train.optimizer.
  frozen_labels), so no backward pass runs through a locked tower."""
  return jax.tree.map(
      lambda label, p: jax.lax.stop_gradient(p) if label == "frozen" else p, labels, params)


_REGISTRY: dict[str, type[Objective]] = {}


def register(*names: str) -> Callable[[type[Objective]], type[Objective]]:
  """Class decorator: config.loss = each of `names` selects the class."""
  def add(cls: type[Objective]) -> type[Objective]:
    for name in names:
      _REGISTRY[name] = cls
    return cls
  return add


def names() -> tuple[str, ...]:
  """Every value config.loss takes: the registered objectives and the contrastive losses of
  mmjax.losses.registry (each trains a two-tower model)."""
  return tuple(dict.fromkeys([*_REGISTRY, *loss_registry.CONTRASTIVE]))


def get(name: str) -> type[Objective]:
  """The objective class of config.loss = name. A contrastive loss registered in
  mmjax.losses (register_contrastive) that no objective claims trains two towers."""
  if name in _REGISTRY:
    return _REGISTRY[name]
  if name in loss_registry.CONTRASTIVE and "clip" in _REGISTRY:
    return _REGISTRY["clip"]
  raise ValueError(f"config.loss must be one of {names()}; got {name!r}")


def make(config: ml_collections.ConfigDict, context: Context | None = None,
         **fields) -> Objective:
  """The objective of config.loss built for `context` (or Context(**fields)), with no
  frozen params (see Objective.with_frozen)."""
  if context is not None and not isinstance(context, Context):
    raise TypeError(f"context must be an mmjax.objectives.Context; got {context!r}")
  return get(config.loss)(config, context or Context(**fields))


def variables(params: Params, batch_stats: Any = None) -> dict:
  """Flax's variable collections: {'params': params[, 'batch_stats': batch_stats]}."""
  return {"params": params} if not batch_stats else {"params": params, "batch_stats": batch_stats}


def train_apply(model: nn.Module, params: Params, *args, batch_stats: Any = None, **kwargs):
  """model.apply(variables, *args, train=True, **kwargs) -> (outputs, the running statistics
  the pass moved: {} unless a tower has BatchNorm on batch statistics)."""
  out, state = model.apply(variables(params, batch_stats), *args, train=True,
                           mutable=["batch_stats"], **kwargs)
  return out, dict(state).get("batch_stats", {})


def with_stats(aux: dict, stats: dict) -> dict:
  """aux with the moved running statistics under 'batch_stats' (the train step keeps them)."""
  return {**aux, "batch_stats": stats} if stats else aux


def vit_patch_tokens(model: nn.Module) -> Callable | None:
  """(variables, image) -> a two-tower model's ViT patch tokens (TwoTower.patch_tokens), or
  None for another image tower (a ResNet's grid, a NaFlex tower's sequences)."""
  if model.image.get(image_lib.KIND) != "vit":
    return None
  return lambda v, image: model.apply(v, image, method="patch_tokens")


def encoders(model: nn.Module) -> tuple[Callable, Callable]:
  """(image(variables, images) -> [b, e], text(variables, texts) -> [b, e]) of a model with
  encode_image and encode_text methods."""
  return (lambda v, x: model.apply(v, x, method="encode_image"),
          lambda v, t: model.apply(v, t, method="encode_text"))
