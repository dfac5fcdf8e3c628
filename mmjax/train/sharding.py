"""Device mesh and shardings. One device is a mesh of one."""

from __future__ import annotations

import math

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

BATCH_AXES = ("data",)


def make_mesh(config: ml_collections.ConfigDict) -> Mesh:
  """A Mesh from config.mesh (axis -> size, one -1 taking the rest) over config.num_devices devices."""
  devices = jax.devices()
  n = len(devices) if config.num_devices == -1 else config.num_devices
  if not 1 <= n <= len(devices):
    raise ValueError(f"config.num_devices={config.num_devices} but {len(devices)} devices exist")
  names, sizes = list(config.mesh.keys()), list(config.mesh.values())
  if "data" not in names:
    raise ValueError(f"config.mesh must have a 'data' axis; got {dict(config.mesh)}")
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
  return Mesh(grid, tuple(names),
              axis_types=(jax.sharding.AxisType.Auto,) * len(names))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dim split over the data axes."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_parallel_size(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES)
