"""Logical-axis sharding constraints on activations (for FSDP on a data x fsdp mesh).

The towers name their activations' axes ('batch', 'seq', 'embed', 'mlp', 'heads', 'kv') with
`constrain(x, 'batch', 'seq', 'embed')`; inside `with logical_rules(mesh):` that is
jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec)), spec mapped from the names by
the active rules; outside one it returns x unchanged (single device, tests, notebooks, jit
without a mesh). The rules are read while tracing: activate them inside the jitted function
(mmjax.train.state.make_train_step(mesh=...) does), not around the call of a cached one.

Why: with FSDP the params are sharded over 'fsdp' along a feature dim, and XLA's propagation
may carry that sharding into the activations (feature-sharded, batch-replicated residual
streams) instead of gathering the params; the constraints pin the activations to the batch
sharding of the inputs, so every device keeps 1 / (data x fsdp) of them. Measured (So400m/14
bf16 train step, batch 32, data=2 x fsdp=4, benchmarks/activation_sharding.py): without them
the residual stream per device was [16, 256, 288] (batch over 'data' only, width over 'fsdp'),
with them [4, 256, 1152]; compiled temporaries 7.53 -> 4.44 GiB per device.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Iterator, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

# (logical name, mesh axis | tuple of mesh axes | None) pairs; the first pair naming an axis
# wins, unnamed axes and mesh axes absent from the mesh are replicated. 'batch' goes over
# mmjax.train.sharding's batch axes.
DEFAULT_RULES = (("batch", ("data", "fsdp")),)
# The towers' names: batch, tokens, width, MLP hidden, attention heads, head dim.
LOGICAL_AXES = ("batch", "seq", "embed", "mlp", "heads", "kv")

_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("mmjax_logical_rules", default=None)


@contextlib.contextmanager
def logical_rules(mesh: Mesh | None, rules: Sequence[tuple] = DEFAULT_RULES) -> Iterator[None]:
  """Activates `rules` on `mesh` for the constrain() calls traced inside; mesh=None
  deactivates them (constrain() is a no-op again)."""
  for rule in rules:
    if len(rule) != 2 or not isinstance(rule[0], str):
      raise ValueError(f"rules: each rule is (logical name, mesh axes); got {rule!r}")
  token = _ACTIVE.set(None if mesh is None else (mesh, tuple(rules)))
  try:
    yield
  finally:
    _ACTIVE.reset(token)


def active() -> tuple[Mesh, tuple] | None:
  """(mesh, rules) of the innermost logical_rules, or None."""
  return _ACTIVE.get()


def logical_spec(shape: Sequence[int], axes: Sequence[str | None], mesh: Mesh,
                 rules: Sequence[tuple] = DEFAULT_RULES) -> P:
  """The PartitionSpec of an array of `shape` whose dims are named `axes`. A dim takes its
  rule's mesh axes that are in the mesh, in order, while they are not used by an earlier dim
  and divide its size: a batch of 2 on data=2 x fsdp=4 is split over 'data' only, a
  batch of 1 (a model's init) is replicated."""
  if len(axes) != len(shape):
    raise ValueError(f"axes {tuple(axes)} name {len(axes)} dims of an array of shape "
                     f"{tuple(shape)}")
  table = {}
  for name, target in rules:
    table.setdefault(name, target)
  unknown = [a for a in axes if a is not None and a not in LOGICAL_AXES and a not in table]
  if unknown:
    raise ValueError(f"axes: unknown logical name {unknown[0]!r}; known: {LOGICAL_AXES} and "
                     "the rules' names")
  used, spec = set(), []
  for size, name in zip(shape, axes):
    target = table.get(name) if name is not None else None
    target = (target,) if isinstance(target, str) else tuple(target or ())
    keep = []
    for a in target:
      if a not in mesh.shape:
        continue
      if a in used or size % (math.prod(mesh.shape[k] for k in keep) * mesh.shape[a]):
        break   # a prefix only: later axes are finer splits of the same dim
      keep.append(a)
    used.update(keep)
    spec.append(None if not keep else keep[0] if len(keep) == 1 else tuple(keep))
  return P(*spec)


def constrain(x: jax.Array, *axes: str | None) -> jax.Array:
  """x with its sharding constrained to the logical `axes` (one name or None per dim, e.g.
  [b, n, d] -> 'batch', 'seq', 'embed') under the active logical_rules; x itself when none
  are active."""
  rules = _ACTIVE.get()
  if rules is None:
    return x
  mesh, table = rules
  spec = logical_spec(x.shape, axes, mesh, table)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
