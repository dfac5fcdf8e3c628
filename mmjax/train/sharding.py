"""Device mesh, batch sharding and parameter partition rules (data parallel + FSDP).

The mesh has named axes from config.mesh, e.g. {'data': -1} (pure data
parallel) or {'data': 2, 'fsdp': 4}. The batch is split over every batch axis
('data' and 'fsdp'); FSDP additionally shards each large array of the train
state (params and optimizer moments) over 'fsdp' along its largest dimension
that the axis divides. One device is a mesh of one.
"""

from __future__ import annotations

import math
import re
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mmjax.train.optimizer import param_path

_BATCH_AXES = ("data", "fsdp")


def make_mesh(config: ml_collections.ConfigDict) -> Mesh:
  """A Mesh from config.mesh (axis -> size, one -1 taking the rest) over config.num_devices devices."""
  devices = jax.devices()
  n = len(devices) if config.num_devices == -1 else config.num_devices
  if not 1 <= n <= len(devices):
    raise ValueError(f"config.num_devices={config.num_devices} but {len(devices)} devices exist")
  names, sizes = list(config.mesh.keys()), list(config.mesh.values())
  if "data" not in names:
    raise ValueError(f"config.mesh must have a 'data' axis; got {dict(config.mesh)}")
  unknown = set(names) - set(_BATCH_AXES)
  if unknown:
    raise ValueError(f"config.mesh: unknown axes {sorted(unknown)}; known: {_BATCH_AXES}")
  if sizes.count(-1) > 1:
    raise ValueError(f"config.mesh: at most one axis may be -1; got {dict(config.mesh)}")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if n % known:
      raise ValueError(f"config.mesh {dict(config.mesh)} does not divide {n} devices")
    sizes[sizes.index(-1)] = n // known
  if math.prod(sizes) != n:
    raise ValueError(f"config.mesh {dict(config.mesh)} has {math.prod(sizes)} devices; {n} are used")
  grid = np.asarray(devices[:n]).reshape(sizes)
  return Mesh(grid, tuple(names), axis_types=(jax.sharding.AxisType.Auto,) * len(names))


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
  """The mesh axes the batch is split over."""
  return tuple(a for a in mesh.axis_names if a in _BATCH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dim split over the batch axes."""
  return NamedSharding(mesh, P(batch_axes(mesh)))


def data_parallel_size(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in batch_axes(mesh))


def fsdp_spec(shape: tuple[int, ...], fsdp_size: int, min_size: int) -> P:
  """'fsdp' on the largest dimension it divides, for arrays of at least min_size elements."""
  if fsdp_size <= 1 or math.prod(shape) < min_size:
    return P()
  for dim in sorted(range(len(shape)), key=lambda i: -shape[i]):
    if shape[dim] % fsdp_size == 0:
      return P(*[("fsdp" if i == dim else None) for i in range(len(shape))])
  return P()


def state_shardings(abstract_state: Any, mesh: Mesh,
                    sharding_config: ml_collections.ConfigDict) -> Any:
  """A NamedSharding for every leaf of the train state.

  sharding_config.rules: (regex, 'fsdp' | 'replicate') pairs matched against a
  leaf's path ('params/img/encoder/block0/mlp/Dense_0/kernel', and the same
  path inside the optimizer state); the first match wins; no match: 'fsdp'.
  Arrays smaller than sharding_config.fsdp_min_size stay replicated.
  """
  fsdp = mesh.shape.get("fsdp", 1)
  rules = [(re.compile(r), kind) for r, kind in sharding_config.rules]
  for _, kind in rules:
    if kind not in ("fsdp", "replicate"):
      raise ValueError(f"config.sharding.rules: kind must be 'fsdp' or 'replicate'; got {kind!r}")

  def leaf(keypath, x):
    path = param_path(keypath)
    kind = next((k for r, k in rules if r.search(path)), "fsdp")
    spec = fsdp_spec(tuple(x.shape), fsdp, sharding_config.fsdp_min_size) if kind == "fsdp" else P()
    return NamedSharding(mesh, spec)

  return jax.tree_util.tree_map_with_path(leaf, abstract_state)
