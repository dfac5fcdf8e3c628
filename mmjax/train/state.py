"""The train state (a pytree passed into and out of the train step) and the train step."""

from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from mmjax.nn import partitioning


@flax.struct.dataclass
class TrainState:
  step: jax.Array       # int32 scalar: optimizer steps taken
  params: Any
  opt_state: Any
  rng: jax.Array        # raw uint32[2] key; step keys are fold_in(rng, step)
  ema: Any = None       # momentum-encoder params (MoCo), else None
  batch_stats: Any = None   # running statistics (BatchNorm's), outside the optimizer; else None
  params_ema: Any = None    # weight EMA of params (config.ema_decay > 0), else None

  @property
  def variables(self) -> dict:
    """Flax's variable collections for model.apply: {'params'[, 'batch_stats']}."""
    if self.batch_stats is None:
      return {"params": self.params}
    return {"params": self.params, "batch_stats": self.batch_stats}

  @property
  def ema_variables(self) -> dict:
    """variables with the weight EMA (params_ema) as 'params'; the running statistics stay."""
    return {**self.variables, "params": self.params_ema}


def init_state(objective, tx: optax.GradientTransformation, rng: jax.Array,
               batch: dict, *, ema_decay: float = 0.0) -> TrainState:
  """Initialises params from a dummy batch (shapes only matter).

  objective: an mmjax.objectives.Objective (init_variables, ema_init).
  ema_decay > 0: params_ema starts as a copy of params (config.ema_decay).
  """
  init_rng, rng = jax.random.split(rng)
  variables = objective.init_variables(init_rng, batch)
  params = variables["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=tx.init(params), rng=rng, ema=objective.ema_init(params),
                    batch_stats=variables.get("batch_stats") or None,
                    params_ema=jax.tree.map(jnp.copy, params) if ema_decay else None)


def abstract_state(objective, tx: optax.GradientTransformation, abstract_variables: dict,
                   rng: jax.Array, *, ema_decay: float = 0.0) -> TrainState:
  """init_state's shapes and dtypes from the variables' (jax.ShapeDtypeStruct leaves, as
  jax.eval_shape(objective.init_variables, ...) gives them), without tracing the init again."""
  params = abstract_variables["params"]
  return TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                    opt_state=jax.eval_shape(tx.init, params),
                    rng=jax.ShapeDtypeStruct(jnp.shape(rng), jnp.asarray(rng).dtype),
                    ema=jax.eval_shape(objective.ema_init, params),
                    batch_stats=abstract_variables.get("batch_stats") or None,
                    params_ema=params if ema_decay else None)


def images_to_float(batch: dict, normalize: tuple | None = None) -> dict:
  """The batch with its uint8 images (every uint8 [b, H, W, C] field: 'image', an objective's
  further views; a NaFlex batch's 'patches') as float32: (x / 255 - mean) / std for normalize=(mean, std), else [-1, 1];
  float images pass as they are."""
  out = dict(batch)
  for key, x in batch.items():
    if isinstance(x, dict) and "patches" in x and x["patches"].dtype == jnp.uint8:
      # A NaFlex batch (mmjax.data.naflex): patches [R, L, p*p*3], channels last.
      patches = _to_float(x["patches"].reshape(*x["patches"].shape[:-1], -1, 3), normalize)
      out[key] = {**x, "patches": patches.reshape(x["patches"].shape)}
    elif not isinstance(x, dict) and x.dtype == jnp.uint8 and x.ndim == 4:
      out[key] = _to_float(x, normalize)
  return out


def _to_float(x: jax.Array, normalize: tuple | None) -> jax.Array:
  """uint8 [..., 3] -> float32: (x / 255 - mean) / std, or [-1, 1] without normalize."""
  x = x.astype(jnp.float32)
  if normalize is None:
    return x * (2.0 / 255.0) - 1.0
  mean, std = (jnp.asarray(v, jnp.float32) for v in normalize)
  return (x / 255.0 - mean) / std


def _schedule_count(opt_state, step: jax.Array) -> jax.Array:
  """The count the optimizer's lr schedule reads (optax.scale_by_schedule's state), else `step`:
  a skipped non-finite step does not advance it, so after one it lags the step count."""
  is_sched = lambda x: isinstance(x, optax.ScaleByScheduleState)
  counts = [s.count for s in jax.tree.leaves(opt_state, is_leaf=is_sched) if is_sched(s)]
  return counts[0] if counts else step


def make_train_step(objective, tx: optax.GradientTransformation, *,
                    schedule: Callable[[jax.Array], jax.Array], normalize: tuple | None = None,
                    mesh: Mesh | None = None, ema_decay: float = 0.0):
  """Returns train_step(state, batch) -> (state, metrics), pure, ready for jit.

  batch: the objective's batch_keys, e.g. {'image': [B, H, W, 3] float32,
  'text': [B, L] int32}, B the global batch (split over the mesh's batch axes). uint8
  images are made float32 here, on the device (images_to_float with `normalize`).
  The objective computes the loss and gradients (mmjax.objectives) and moves the running
  statistics (the 'batch_stats' it returns in its aux replace the state's); the optimizer
  step, the momentum-encoder update and the metrics are common.
  When the loss or the gradient norm is not finite the params, optimizer state
  and EMA stay as they were (the optimizer's count, so its lr schedule, does not
  advance) and metrics['finite'] is False: the loop stops or skips
  (config.nan_policy), and no state holding a non-finite update exists.
  ema_decay > 0: after each finite step state.params_ema becomes
  ema_decay * params_ema + (1 - ema_decay) * params (the new params; config.ema_decay).
  mesh: the towers' activations are constrained to it (batch-sharded over its batch axes,
  mmjax.nn.partitioning's default rules) while the step is traced; None: no constraints.
  """
  def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    with partitioning.logical_rules(mesh):
      return _step(state, batch)

  def _step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    rng = jax.random.fold_in(state.rng, state.step)
    batch = images_to_float(batch, normalize)
    # An objective whose losses change with the step (SigLIP 2's late-training ones) gets it.
    extra = {"step": state.step} if getattr(objective, "takes_step", False) else {}
    (value, aux), grads = objective.grad_fn(state.params, state.ema, batch, rng,
                                            batch_stats=state.batch_stats, **extra)
    aux = dict(aux)
    moved = aux.pop("batch_stats", None)
    stats = state.batch_stats if state.batch_stats is None or not moved else moved
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(value) & jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # An objective may compute part of its EMA state in the step (SigLIP 2's teacher centers):
    # aux['ema'], merged in before the update.
    parts = aux.pop("ema", None)
    ema = objective.ema_update(state.ema if parts is None else {**state.ema, **parts}, params,
                               state.step)
    params_ema = state.params_ema
    if ema_decay:
      params_ema = jax.tree.map(
          lambda e, p: (ema_decay * e.astype(jnp.float32)
                        + (1 - ema_decay) * p.astype(jnp.float32)).astype(e.dtype),
          state.params_ema, params)
    # A non-finite loss or gradient changes nothing but the step count.
    params, opt_state, ema, stats, params_ema = jax.tree.map(
        lambda new, old: jnp.where(finite, new, old),
        (params, opt_state, ema, stats, params_ema),
        (state.params, state.opt_state, state.ema, state.batch_stats, state.params_ema))
    metrics = {"loss": value, "lr": schedule(_schedule_count(state.opt_state, state.step)),
               "grad_norm": grad_norm, "finite": finite, **aux}
    new = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema=ema,
                        batch_stats=stats, params_ema=params_ema)
    return new, metrics

  return train_step
