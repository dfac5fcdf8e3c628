"""GradCache (Gao et al. 2021): the full-batch gradient of a contrastive loss with the
activation memory of one micro-batch. Usable outside the trainer: it needs only an embedding
function and a loss of the embeddings."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

Params = Any


def make_grad_fn(embed: Callable, head_loss: Callable, *, accum_steps: int = 1,
                 keys: tuple[str, ...] = ("image", "text")) -> Callable:
  """grad_fn(params, batch, rng) -> ((loss, aux), grads) of the global-batch loss.

  embed(params, *[batch[k] for k in keys], rng) -> (embeddings, stats): a tuple of
  [b, e] arrays and the 'batch_stats' the pass sowed ({} for none);
  head_loss(*embeddings, params) -> (loss, aux): the loss of the whole batch's embeddings.

  accum_steps = k > 1: the batch is split into k micro-batches; all are embedded without
  keeping activations, the loss and its gradient wrt the embeddings are computed on the
  full batch, then each micro-batch's towers are re-run and the cached embedding gradients
  backpropagated. The gradients equal the full-batch ones; peak activation memory is that
  of one micro-batch. Micro-batch j takes rows j, j+k, j+2k, ..., so each stays split over
  all devices of the batch axes. (BatchNorm statistics would differ per micro-batch:
  callers refuse k > 1 for such towers; the stats are dropped here.)
  """
  if accum_steps < 1:
    raise ValueError(f"config.accum_steps must be >= 1; got {accum_steps}")

  if accum_steps == 1:
    def full(params, batch, rng):
      def loss_fn(p):
        z, stats = embed(p, *[batch[k] for k in keys], rng)
        value, aux = head_loss(*z, p)
        return value, {**aux, "batch_stats": stats} if stats else aux
      return jax.value_and_grad(loss_fn, has_aux=True)(params)
    return full

  k = accum_steps

  def accumulated(params, batch, rng):
    b = batch[keys[0]].shape[0]
    if b % k:
      raise ValueError(f"batch {b} is not divisible by config.accum_steps={k}")
    split = lambda x: x.reshape(b // k, k, *x.shape[1:]).swapaxes(0, 1)    # [k, b/k, ...]
    merge = lambda x: x.swapaxes(0, 1).reshape(b, *x.shape[2:])
    micro = {key: split(batch[key]) for key in keys}
    rngs = jax.random.split(rng, k)
    only_z = lambda p, mb, r: embed(p, *[mb[key] for key in keys], r)[0]
    zs = jax.lax.map(lambda a: only_z(jax.lax.stop_gradient(params), *a), (micro, rngs))
    (value, aux), grads = jax.value_and_grad(
        lambda zs, p: head_loss(*map(merge, zs), p), argnums=(0, 1), has_aux=True)(zs, params)
    dzs, grads = grads

    def backprop(grads, xs):
      mb, r, dz = xs
      _, vjp = jax.vjp(lambda p: only_z(p, mb, r), params)
      return jax.tree.map(jnp.add, grads, vjp(dz)[0]), None

    grads, _ = jax.lax.scan(backprop, grads, (micro, rngs, dzs))
    return (value, aux), grads

  return accumulated
