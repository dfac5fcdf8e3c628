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
  ema: Any = None       # momentum-encoder params (MoCo), else None


def init_state(objective, tx: optax.GradientTransformation, rng: jax.Array,
               batch: dict) -> TrainState:
  """Initialises params from a dummy batch (shapes only matter); see mmjax.train.objectives."""
  init_rng, rng = jax.random.split(rng)
  params = objective.init(init_rng, batch)
  ema = objective.ema_init(params) if hasattr(objective, "ema_init") else None
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=tx.init(params), rng=rng, ema=ema)


def freezer(labels) -> Callable[[Any], Any]:
  """params -> params with stop_gradient on the leaves labelled 'frozen' (see
  optimizer.frozen_labels), so no backward pass runs through a locked tower."""
  return lambda params: jax.tree.map(
      lambda label, p: jax.lax.stop_gradient(p) if label == "frozen" else p, labels, params)


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


def make_grad_fn(model, loss_of: Callable, *, accum_steps: int = 1,
                 freeze: Callable[[Any], Any] | None = None) -> Callable:
  """grad_fn(params, batch, rng) -> ((loss, out), grads) of the global-batch loss.

  accum_steps = k > 1 is contrastive gradient accumulation (GradCache): the
  batch is split into k micro-batches; all are embedded without keeping
  activations, the loss and its gradient wrt the embeddings are computed on
  the full batch, then each micro-batch's towers are re-run and the cached
  embedding gradients backpropagated. The gradients equal the full-batch ones;
  peak activation memory is that of one micro-batch. Micro-batch j takes rows
  j, j+k, j+2k, ..., so each stays split over all devices of the batch axes.
  """
  if accum_steps < 1:
    raise ValueError(f"config.accum_steps must be >= 1; got {accum_steps}")
  freeze = freeze or (lambda p: p)

  def embed(params, image, text, rng):
    zimg, ztxt, _ = model.apply({"params": freeze(params)}, image, text, train=True,
                                rngs={"dropout": rng})
    return zimg, ztxt

  def head_loss(zimg, ztxt, params):
    _, _, out = model.apply({"params": params}, None, None)   # scale, bias from t, b
    return loss_of(zimg, ztxt, out), out

  if accum_steps == 1:
    def full(params, batch, rng):
      def loss_fn(p):
        return head_loss(*embed(p, batch["image"], batch["text"], rng), p)
      return jax.value_and_grad(loss_fn, has_aux=True)(params)
    return full

  k = accum_steps

  def accumulated(params, batch, rng):
    b = batch["image"].shape[0]
    if b % k:
      raise ValueError(f"batch {b} is not divisible by config.accum_steps={k}")
    split = lambda x: x.reshape(b // k, k, *x.shape[1:]).swapaxes(0, 1)    # [k, b/k, ...]
    merge = lambda x: x.swapaxes(0, 1).reshape(b, *x.shape[2:])
    micro = {key: split(batch[key]) for key in ("image", "text")}
    rngs = jax.random.split(rng, k)
    zimg, ztxt = jax.lax.map(
        lambda a: embed(jax.lax.stop_gradient(params), a[0]["image"], a[0]["text"], a[1]),
        (micro, rngs))
    (value, out), (dzimg, dztxt, grads) = jax.value_and_grad(
        lambda zi, zt, p: head_loss(merge(zi), merge(zt), p), argnums=(0, 1, 2),
        has_aux=True)(zimg, ztxt, params)

    def backprop(grads, xs):
      mb, r, dzi, dzt = xs
      _, vjp = jax.vjp(lambda p: embed(p, mb["image"], mb["text"], r), params)
      return jax.tree.map(jnp.add, grads, vjp((dzi, dzt))[0]), None

    grads, _ = jax.lax.scan(backprop, grads, (micro, rngs, dzimg, dztxt))
    return (value, out), grads

  return accumulated


def make_train_step(objective, tx: optax.GradientTransformation, *,
                    schedule: Callable[[jax.Array], jax.Array]):
  """Returns train_step(state, batch) -> (state, metrics), pure, ready for jit.

  batch: the objective's batch_keys, e.g. {'image': [B, H, W, 3] float32,
  'text': [B, L] int32}, B the global batch (split over the mesh's batch axes).
  The objective computes the loss and gradients (mmjax.train.objectives); the
  optimizer step, the momentum-encoder update and the metrics are common.
  """
  def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    rng = jax.random.fold_in(state.rng, state.step)
    (value, aux), grads = objective.grad_fn(state.params, state.ema, batch, rng)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state.ema
    if ema is not None:
      ema = objective.ema_update(ema, params, state.step)
    metrics = {"loss": value, "lr": schedule(state.step), "grad_norm": optax.tree.norm(grads),
               **aux}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema=ema), metrics

  return train_step
