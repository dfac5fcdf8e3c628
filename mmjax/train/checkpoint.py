"""orbax checkpoints of the train state together with the input pipeline's state.

Saving both is what makes resumption exact: the restored run sees the same
batches (grain's iterator state) and the same randomness (the rng in the state,
folded with the step) as the uninterrupted one.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

BROKEN = "checkpoints.broken"   # <workdir>/checkpoints.broken/<step>: steps that did not restore


def make_manager(workdir: str, *, every: int, keep: int) -> ocp.CheckpointManager:
  """Async, keeps the `keep` newest; saves when step % every == 0 (or when forced).

  Temporary directories of a save that never finished (a kill mid-save) are
  removed when the manager opens.
  """
  if every <= 0 or keep <= 0:
    raise ValueError(f"config.checkpoint.every ({every}) and .keep ({keep}) must be > 0")
  return ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), "checkpoints"),
      options=ocp.CheckpointManagerOptions(
          max_to_keep=keep, save_interval_steps=every, create=True,
          cleanup_tmp_directories=True),
      item_handlers={"state": ocp.StandardCheckpointHandler(),
                     "data": ocp.JsonCheckpointHandler()})


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


def _reason(e: BaseException) -> str:
  """The first line of the exception's root cause (TensorStore's, under orbax's
  wrappers), shortened: their messages run long."""
  while e.__cause__ is not None:
    e = e.__cause__
  lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
  line = lines[0] if lines else type(e).__name__
  return line if len(line) <= 300 else line[:297] + "..."


def _name(path) -> str:
  """orbax's name of a leaf: its keys joined by dots ('opt_state.1.0.mu.img.embedding.bias')."""
  return ".".join(str(getattr(k, "name", getattr(k, "key", getattr(k, "idx", k)))) for k in path)


class DifferentModelError(ValueError):
  """The workdir's checkpoint holds arrays of other shapes than the config's model."""


def check_same_model(manager: ocp.CheckpointManager, step: int, abstract_state: Any,
                     workdir: str) -> None:
  """Raises DifferentModelError naming the first array whose shape differs between the
  checkpoint at `step` and abstract_state (or that only one of them has): the
  workdir holds another model. Parameters are compared first.

  Reading the checkpoint's metadata may itself fail (a damaged checkpoint);
  that error propagates as it is.
  """
  saved = {m.name: tuple(m.shape) for m in jax.tree.leaves(manager.item_metadata(step)["state"])
           if hasattr(m, "shape")}
  want = {_name(path): tuple(x.shape)
          for path, x in jax.tree_util.tree_leaves_with_path(abstract_state)}
  names = sorted(set(saved) | set(want), key=lambda n: (not n.startswith("params."), n))
  for name in names:
    if saved.get(name) != want.get(name):
      there = saved.get(name, "absent")
      here = want.get(name, "absent")
      scans = [any(".blocks." in n for n in names) for names in (saved, want)]
      hint = (" (config.model.scan differs from the run's; init_from converts between the "
              "two, a resume does not)" if scans[0] != scans[1] else "")
      raise DifferentModelError(
          f"workdir {workdir!r} holds a different model: {name} is {there} in its checkpoint "
          f"(step {step}) and {here} in this config{hint}; use another --workdir, or the config "
          "that wrote it")


def restore_latest(manager: ocp.CheckpointManager, abstract_state: Any, workdir: str
                   ) -> tuple[int, Any, dict] | None:
  """(step, state, data_state) of the newest checkpoint that restores, or None
  when there is none.

  A checkpoint that does not restore (a truncated or corrupt file) gets one
  warning line naming its directory and the reason, and is moved to
  <workdir>/checkpoints.broken/ (kept, not deleted); the next older one is
  tried. Raises ValueError when checkpoints exist but none restores, or when
  the workdir holds another model (DifferentModelError, a ValueError).
  """
  steps = sorted(manager.all_steps(), reverse=True)
  directory = os.fspath(manager.directory)
  reason = None
  for i, step in enumerate(steps):
    try:
      check_same_model(manager, step, abstract_state, workdir)
      state, data = restore(manager, step, abstract_state)
      return step, state, data
    except DifferentModelError:
      raise
    except Exception as e:  # orbax and TensorStore raise many kinds
      reason = _reason(e)
    _move_aside(directory, step, workdir)
    manager.reload()
    then = f"trying step {steps[i + 1]}" if i + 1 < len(steps) else "no older checkpoint"
    print(f"mmjax: warning: checkpoint {os.path.join(directory, str(step))} does not restore "
          f"({reason}); moved to {os.path.join(workdir, BROKEN)}; {then}", flush=True)
  if steps:
    raise ValueError(f"no checkpoint in {workdir!r} restores (steps {steps[::-1]}, now in "
                     f"{os.path.join(workdir, BROKEN)}); the newest failed with: {reason}")
  return None


def _move_aside(directory: str, step: int, workdir: str) -> None:
  """Moves checkpoints/<step> to checkpoints.broken/<step> (process 0; the others wait)."""
  if jax.process_index() == 0:
    dest = os.path.join(workdir, BROKEN)
    os.makedirs(dest, exist_ok=True)
    target = os.path.join(dest, str(step))
    if os.path.exists(target):
      shutil.rmtree(target)
    shutil.move(os.path.join(directory, str(step)), target)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"mmjax_broken_{step}")


def load_variables(workdir: str, step: int | None = None, *, ema: bool = False
                   ) -> tuple[dict, int]:
  """({'params'[, 'batch_stats']} (numpy), step) of another run's checkpoint: the newest,
  or `step`.

  For initialising from a pretrained run (config.init_from) and exporting one; reads the
  state item without a target, so the other run's model need not be built. ema=True: the
  run's weight EMA (TrainState.params_ema, config.ema_decay) as 'params'; ValueError when
  the run kept none.
  """
  directory = os.path.join(os.path.abspath(os.path.expanduser(workdir)), "checkpoints")
  if not os.path.isdir(directory):
    raise ValueError(f"config.init_from.workdir={workdir!r} has no checkpoints/ directory")
  with ocp.CheckpointManager(directory) as manager:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise ValueError(f"config.init_from.workdir={workdir!r} has no checkpoint")
    state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  state = state["state"]
  params = state["params"]
  if ema:
    params = state.get("params_ema")
    if not params:   # orbax keeps a None field as absent or None
      raise ValueError(f"workdir {workdir!r} (step {step}) has no weight EMA: the run was "
                       "trained without config.ema_decay")
  out = {"params": jax.tree.map(np.asarray, params)}
  if state.get("batch_stats"):
    out["batch_stats"] = jax.tree.map(np.asarray, state["batch_stats"])
  return out, step


def load_params(workdir: str, step: int | None = None) -> tuple[dict, int]:
  """(the params tree (numpy), step) of another run's checkpoint (see load_variables)."""
  variables, step = load_variables(workdir, step)
  return variables["params"], step
