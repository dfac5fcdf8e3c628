"""Contrastive losses by name, and the shard_map wrapping of the sharded ones.

`register_contrastive(name, fn, ...)` makes a loss a value of config.loss: it then trains
the two-tower model (mmjax.objectives.contrastive) with its own temperature and bias inits,
and takes every impl= / blocks= the function supports.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
from jax.sharding import Mesh, PartitionSpec as P

from mmjax.losses.contrastive import IMPLS, clip_loss, siglip_loss


@dataclasses.dataclass(frozen=True)
class ContrastiveLoss:
  """fn(img_emb [n, e], txt_emb [n, e], scale, bias, *, impl, blocks, axis_name) -> scalar.

  temperature_init: the model's initial logit scale exp(t); bias_init: its learned logit
  bias's initial value, None when the loss takes no bias; impls: the impl= values fn takes.
  """
  fn: Callable
  temperature_init: float
  bias_init: float | None = None
  impls: tuple[str, ...] = IMPLS


CONTRASTIVE: dict[str, ContrastiveLoss] = {}


def register_contrastive(name: str, fn: Callable, *, temperature_init: float,
                         bias_init: float | None = None,
                         impls: tuple[str, ...] = IMPLS) -> ContrastiveLoss:
  """Adds (or replaces) the loss `name`; returns its entry."""
  CONTRASTIVE[name] = ContrastiveLoss(fn, temperature_init, bias_init, tuple(impls))
  return CONTRASTIVE[name]


register_contrastive("clip", lambda zi, zt, scale, bias, **kw: clip_loss(zi, zt, scale, **kw),
                     temperature_init=1 / 0.07,
                     impls=tuple(i for i in IMPLS if i != "ring_bidir"))
register_contrastive("siglip", siglip_loss, temperature_init=10.0, bias_init=-10.0)


def get_contrastive(name: str) -> ContrastiveLoss:
  if name not in CONTRASTIVE:
    raise ValueError(f"loss must be one of {tuple(CONTRASTIVE)}; got {name!r}")
  return CONTRASTIVE[name]


def contrastive(name: str, impl: str = "global", blocks: str = "dense", *,
                mesh: Mesh | None = None, axes: tuple[str, ...] = ()) -> Callable:
  """(img_emb [B, e], txt_emb [B, e], scale, bias) -> the global batch's loss `name`.

  impl 'global' leaves the partitioning to XLA; 'gather' / 'ring' / 'ring_bidir' run the
  sharded loss inside shard_map over the mesh's batch `axes`. blocks: 'dense' | 'tiled' |
  'pallas' (mmjax.losses). bias: a scalar, ignored by a loss without one.
  """
  entry = get_contrastive(name)
  if impl not in entry.impls:
    raise ValueError(f"impl must be one of {entry.impls} for loss {name!r}; got {impl!r}")

  def local(zimg, ztxt, scale, bias, axis_name=None):
    return entry.fn(zimg, ztxt, scale, bias, impl=impl, blocks=blocks, axis_name=axis_name)

  if impl == "global":
    return local
  if mesh is None or not axes:
    raise ValueError(f"impl={impl!r} needs a mesh with batch axes")
  # The Pallas interpreter (CPU) fails under check_vma=True; the kernels lower with either.
  return jax.shard_map(lambda *a: local(*a, axis_name=axes), mesh=mesh,
                       in_specs=(P(axes), P(axes), P(), P()), out_specs=P(),
                       check_vma=blocks != "pallas")
