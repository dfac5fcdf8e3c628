"""The train state: a pytree passed into and out of the train step."""

from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

from mmjax.losses import clip_loss, siglip_loss


@flax.struct.dataclass
class TrainState:
  step: jax.Array       # int32 scalar: optimizer steps taken
  params: Any
  opt_state: Any
  rng: jax.Array        # raw uint32[2] key; step keys are fold_in(rng, step)


def init_state(model, tx: optax.GradientTransformation, rng: jax.Array,
               image: jax.Array, text: jax.Array) -> TrainState:
  """Initialises params from dummy inputs image [b, H, W, 3], text [b, L] (shapes only matter)."""
  init_rng, rng = jax.random.split(rng)
  params = model.init(init_rng, image, text)["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=tx.init(params), rng=rng)


def make_train_step(model, tx: optax.GradientTransformation, *, loss: str,
                    schedule: Callable[[jax.Array], jax.Array]):
  """Returns train_step(state, batch) -> (state, metrics), pure, ready for jit.

  batch: {'image': [B, H, W, 3] float32, 'text': [B, L] int32}, B the global
  batch. The loss sees the whole global batch (under jit, XLA inserts the
  collectives when the batch is sharded over devices).
  """
  if loss not in ("clip", "siglip"):
    raise ValueError(f"loss must be 'clip' or 'siglip'; got {loss!r}")

  def loss_fn(params, batch, rng):
    zimg, ztxt, out = model.apply({"params": params}, batch["image"], batch["text"],
                                  train=True, rngs={"dropout": rng})
    if loss == "siglip":
      value = siglip_loss(zimg, ztxt, out["scale"], out["bias"])
    else:
      value = clip_loss(zimg, ztxt, out["scale"])
    return value, out

  def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    rng = jax.random.fold_in(state.rng, state.step)
    (value, out), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, batch, rng)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": value, "lr": schedule(state.step), "scale": out["scale"],
               "grad_norm": optax.tree.norm(grads)}
    if "bias" in out:
      metrics["bias"] = out["bias"]
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step
