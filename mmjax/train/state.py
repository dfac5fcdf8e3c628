"""The train state: a pytree passed into and out of the train step."""

from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, PartitionSpec as P

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


def contrastive_loss(loss: str, impl: str = "dense", *, mesh: Mesh | None = None,
                     axes: tuple[str, ...] = ()) -> Callable:
  """(zimg [B, e], ztxt [B, e], out) -> scalar loss of the global batch.

  impl 'gather' / 'ring' run the sharded loss inside shard_map over the mesh's
  batch `axes`; 'dense' leaves the partitioning to XLA.
  """
  if loss not in ("clip", "siglip"):
    raise ValueError(f"loss must be 'clip' or 'siglip'; got {loss!r}")

  def local(zimg, ztxt, scale, bias, axis_name=None):
    kw = dict(impl=impl, axis_name=axis_name)
    if loss == "siglip":
      return siglip_loss(zimg, ztxt, scale, bias, **kw)
    return clip_loss(zimg, ztxt, scale, **kw)

  if impl == "dense":
    fn = local
  else:
    if mesh is None or not axes:
      raise ValueError(f"loss_impl={impl!r} needs a mesh with batch axes")
    fn = jax.shard_map(lambda *a: local(*a, axis_name=axes), mesh=mesh,
                       in_specs=(P(axes), P(axes), P(), P()), out_specs=P())
  return lambda zimg, ztxt, out: fn(zimg, ztxt, out["scale"], out.get("bias", jnp.zeros(())))


def make_train_step(model, tx: optax.GradientTransformation, *, loss: str,
                    schedule: Callable[[jax.Array], jax.Array], loss_impl: str = "dense",
                    mesh: Mesh | None = None, batch_axes: tuple[str, ...] = ()):
  """Returns train_step(state, batch) -> (state, metrics), pure, ready for jit.

  batch: {'image': [B, H, W, 3] float32, 'text': [B, L] int32}, B the global
  batch, split over `batch_axes` of `mesh`. The loss is that of the whole
  global batch whatever loss_impl computes it.
  """
  loss_of = contrastive_loss(loss, loss_impl, mesh=mesh, axes=batch_axes)

  def loss_fn(params, batch, rng):
    zimg, ztxt, out = model.apply({"params": params}, batch["image"], batch["text"],
                                  train=True, rngs={"dropout": rng})
    return loss_of(zimg, ztxt, out), out

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
