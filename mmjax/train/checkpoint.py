"""orbax checkpoints of the train state together with the input pipeline's state.

Saving both is what makes resumption exact: the restored run sees the same
batches (grain's iterator state) and the same randomness (the rng in the state,
folded with the step) as the uninterrupted one.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


def make_manager(workdir: str, *, every: int, keep: int) -> ocp.CheckpointManager:
  """Async, keeps the `keep` newest; saves when step % every == 0 (or when forced)."""
  if every <= 0 or keep <= 0:
    raise ValueError(f"config.checkpoint.every ({every}) and .keep ({keep}) must be > 0")
  return ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), "checkpoints"),
      options=ocp.CheckpointManagerOptions(
          max_to_keep=keep, save_interval_steps=every, create=True))


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_state: dict,
         *, force: bool = False) -> bool:
  """Starts an async save of (state, data_state) at `step`; returns whether it saved."""
  return manager.save(step, force=force, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)))


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any
            ) -> tuple[Any, dict]:
  """Restores (state, data_state); abstract_state carries shapes, dtypes and shardings."""
  r = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
  return r["state"], r["data"]


def load_params(workdir: str, step: int | None = None) -> tuple[dict, int]:
  """The params tree (numpy) of another run's checkpoint: the newest, or `step`.

  For initialising from a pretrained run (config.init_from); reads the state
  item without a target, so the other run's model need not be built.
  """
  directory = os.path.join(os.path.abspath(workdir), "checkpoints")
  if not os.path.isdir(directory):
    raise ValueError(f"config.init_from.workdir={workdir!r} has no checkpoints/ directory")
  with ocp.CheckpointManager(directory) as manager:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise ValueError(f"config.init_from.workdir={workdir!r} has no checkpoint")
    state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  return jax.tree.map(np.asarray, state["state"]["params"]), step
