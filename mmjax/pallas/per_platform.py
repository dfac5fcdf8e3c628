"""A kernel layout chosen when the computation is lowered, per lowering platform.

`per_platform(*args, tpu=f, gpu=g, default=h)` is `f(*args)` where the
computation is lowered for TPU, `g(*args)` for CUDA or ROCm and `h(*args)`
elsewhere (CPU: the kernels in interpret mode). The choice is made at lowering,
not from the host's default backend, so one jitted function exports for
`platforms=["tpu", "cuda"]` from any machine.

Why not `jax.lax.platform_dependent`: it stages the branches into a `cond`,
and when a module is lowered for several platforms at once (jax.export with
`platforms=["tpu", "cuda"]`) every branch is lowered for every platform
(jax 0.10.2, `_cond_lowering` keeps the branches of the lowering platforms but
lowers each with the module's whole platform list). A `pallas_call` with
Mosaic compiler params cannot lower for CUDA ("Compiler params for platform tpu
cannot be used for gpu lowering"), nor one with Triton params for TPU. Here a
primitive with one lowering rule per platform lowers each branch with
`mlir.lower_fun` under the context JAX's multi-platform lowering narrows to
that rule's platforms, so each kernel is lowered only for its own platform.

All branches are traced (to jaxprs) when called and must return the same
shapes and dtypes. The primitive has an impl (eager calls compile it for the
default device), a vmap rule, and no JVP or transpose: use it inside a
custom_vjp's forward and backward, as mmjax's kernels do.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.extend import core as jex_core
from jax._src import sharding_impls   # the lowering's axis context (no public name)
from jax.interpreters import batching, mlir

# Branch order in `branches`, and the lowering platforms of each (None: the rest).
_PLATFORMS = (("tpu",), ("cuda", "rocm"), None)

per_platform_p = jex_core.Primitive("mmjax_per_platform")
per_platform_p.multiple_results = True


def _trace(fn: Callable, flat_args, in_tree):
  return jax.make_jaxpr(lambda *flat: fn(*jax.tree.unflatten(in_tree, flat)),
                        return_shape=True)(*flat_args)


def _bind(fns, flat_args, in_tree, tpu_partitioned: bool = False):
  """Traces every branch on flat_args, checks they agree, binds the primitive."""
  traced = [_trace(fn, flat_args, in_tree) for fn in fns]
  (jaxpr0, shape0), *rest = traced
  types0 = [(a.shape, a.dtype) for a in jaxpr0.out_avals]
  for name, (jaxpr, shape) in zip(("gpu", "default"), rest):
    types = [(a.shape, a.dtype) for a in jaxpr.out_avals]
    if jax.tree.structure(shape) != jax.tree.structure(shape0) or types != types0:
      raise ValueError(f"per_platform: the {name} branch returns {shape}, the tpu branch "
                       f"{shape0}; every branch must return the same shapes and dtypes")
  out = per_platform_p.bind(*flat_args, branches=tuple(j for j, _ in traced),
                            tpu_partitioned=tpu_partitioned)
  return jax.tree.unflatten(jax.tree.structure(shape0), out)


def per_platform(*args, tpu: Callable, gpu: Callable, default: Callable,
                 tpu_partitioned: str = "tpu"):
  """tpu(*args) when lowered for TPU, gpu(*args) for CUDA/ROCm, default(*args) elsewhere.

  args: pytrees of arrays (Python scalars are made arrays). The branches
  should be closed functions of args (static settings bound with
  functools.partial), not close over traced values.
  tpu_partitioned: the branch for a TPU computation that XLA partitions over
  several devices outside shard_map: "tpu" (a Mosaic kernel there fails to
  lower: "Mosaic kernels cannot be automatically partitioned") or "default".
  """
  if tpu_partitioned not in ("tpu", "default"):
    raise ValueError(f"tpu_partitioned={tpu_partitioned!r} is not 'tpu' or 'default'")
  flat, in_tree = jax.tree.flatten(args)
  flat = [jnp.asarray(x) for x in flat]
  return _bind((tpu, gpu, default), flat, in_tree, tpu_partitioned == "default")


def _abstract_eval(*avals, branches, tpu_partitioned):
  effects = set()
  for b in branches:
    effects |= set(b.effects)
  return branches[0].out_avals, effects


def _impl(*args, branches, tpu_partitioned):
  # Eager call: compile for the default device, whose platform picks the branch.
  return jax.jit(lambda *a: per_platform_p.bind(*a, branches=branches,
                                                tpu_partitioned=tpu_partitioned))(*args)


def _auto_partitioned(ctx) -> bool:
  """Whether XLA partitions this lowering over several devices (outside a full shard_map)."""
  axis_context = ctx.module_context.axis_context
  if isinstance(axis_context, sharding_impls.SPMDAxisContext):
    manual = axis_context.manual_axes | set(axis_context.mesh.manual_axes)
    return bool(axis_context.manual_axes) and manual != frozenset(axis_context.mesh.axis_names)
  if isinstance(axis_context, sharding_impls.ShardingContext):
    return axis_context.num_devices != 1
  return False


def _lowering(index: int):
  def rule(ctx, *args, branches, tpu_partitioned):
    # ctx.platforms is this rule's platforms in a multi-platform lowering; lower_fun
    # lowers the branch for them only.
    i = index
    if index == 0 and tpu_partitioned and _auto_partitioned(ctx):
      i = len(branches) - 1
    fun = jex_core.jaxpr_as_fun(branches[i])
    return mlir.lower_fun(fun, multiple_results=True)(ctx, *args)
  return rule


def _batch(args, dims, *, branches, tpu_partitioned):
  in_axes = tuple(dims)   # an int, or None where not mapped
  fns = [jax.vmap(jex_core.jaxpr_as_fun(b), in_axes=in_axes) for b in branches]
  flat, in_tree = jax.tree.flatten(tuple(args))
  outs = _bind([lambda *a, f=f: list(f(*a)) for f in fns], flat, in_tree, tpu_partitioned)
  return outs, [0] * len(outs)


per_platform_p.def_impl(_impl)
per_platform_p.def_effectful_abstract_eval(_abstract_eval)
batching.primitive_batchers[per_platform_p] = _batch
for _i, _ps in enumerate(_PLATFORMS):
  if _ps is None:
    mlir.register_lowering(per_platform_p, _lowering(_i))
  else:
    for _p in _ps:
      mlir.register_lowering(per_platform_p, _lowering(_i), platform=_p)
