"""Multi-host set-up: jax.distributed from the config or the environment, and
gathering each process's small JSON state (its input pipeline's position)."""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

ENV = {"coordinator_address": "MMJAX_COORDINATOR_ADDRESS",
       "num_processes": "MMJAX_NUM_PROCESSES", "process_id": "MMJAX_PROCESS_ID"}


def initialize(config: ml_collections.ConfigDict) -> None:
  """Calls jax.distributed.initialize when a coordinator is given (config.distributed.*
  or $MMJAX_COORDINATOR_ADDRESS, $MMJAX_NUM_PROCESSES, $MMJAX_PROCESS_ID); else one process.

  A process that dies stops sending heartbeats; the others then fail within
  config.distributed.heartbeat_timeout seconds instead of hanging.
  """
  d = config.distributed
  values = {k: d[k] if d[k] is not None else os.environ.get(env) for k, env in ENV.items()}
  if not values["coordinator_address"]:
    return
  for key in ("num_processes", "process_id"):
    try:
      values[key] = int(values[key])
    except (TypeError, ValueError):
      raise ValueError(f"config.distributed.{key} (or ${ENV[key]}) must be an int when a "
                       f"coordinator is given; got {values[key]!r}") from None
  if not 0 <= values["process_id"] < values["num_processes"]:
    raise ValueError(f"config.distributed.process_id={values['process_id']} is not in "
                     f"[0, num_processes={values['num_processes']})")
  if jax.distributed.is_initialized():
    return
  jax.distributed.initialize(
      coordinator_address=values["coordinator_address"],
      num_processes=values["num_processes"], process_id=values["process_id"],
      initialization_timeout=d.initialization_timeout,
      heartbeat_timeout_seconds=d.heartbeat_timeout)


def gather_json(obj: Any) -> list:
  """Every process's `obj` (JSON-serialisable), in process order, on every process."""
  if jax.process_count() == 1:
    return [obj]
  raw = np.frombuffer(json.dumps(obj).encode(), np.uint8)
  lengths = np.asarray(multihost_utils.process_allgather(np.array([raw.size], np.int32)))
  lengths = lengths.reshape(-1)
  padded = np.zeros(int(lengths.max()), np.uint8)
  padded[:raw.size] = raw
  rows = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(lengths), -1)
  return [json.loads(bytes(rows[i, :lengths[i]])) for i in range(len(lengths))]
