"""Per-layer <-> scanned encoder params (mmjax.nn.layers.Encoder, scan=False / scan=True).

An unscanned Encoder's params hold one subtree per block, `encoder/block{i}/...`; a scanned one
a single `encoder/blocks/...` whose leaves carry a leading [depth] axis. `stack_blocks` and
`unstack_blocks` turn every such group in a nested dict into the other form, at any depth (both
towers of a two-tower model, MAE's decoder) and inside tuples and namedtuples too (optax states:
their mu / nu are param-shaped). Each is idempotent on a tree already in its target form, and
the two are exact inverses. `match_blocks` converts a tree to another's form, group by group.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

SCANNED = "blocks"                     # Encoder(scan=True)'s name for its stacked block
_BLOCK = re.compile(r"block(\d+)$")    # Encoder(scan=False)'s, block0 .. block{depth-1}


def _block_ids(d: Mapping) -> list[int] | None:
  """The i of d's block{i} keys when they are 0 .. n-1 (n >= 1), else None."""
  ids = sorted(int(m.group(1)) for m in map(_BLOCK.match, map(str, d)) if m)
  return ids if ids and ids == list(range(len(ids))) else None


def _stack(subtrees: list) -> Any:
  def stack(*xs):
    # numpy stays numpy (converted checkpoints live in host memory); jax arrays, tracers -> jnp
    xp = np if all(isinstance(x, (np.ndarray, np.generic)) for x in xs) else jnp
    return xp.stack(xs)
  try:
    return jax.tree.map(stack, *subtrees)
  except ValueError as e:
    raise ValueError(f"params: the encoder blocks differ in structure ({e})") from None


def _unstack(subtree: Any, where: str) -> list:
  leaves = jax.tree.leaves(subtree)
  if not leaves:
    raise ValueError(f"params: {where}/{SCANNED} holds no arrays, so its depth is unknown")
  depth = np.shape(leaves[0])[0]
  return [jax.tree.map(lambda x, i=i: x[i], subtree) for i in range(depth)]


def _walk(tree: Any, on_dict, path: str = "") -> Any:
  """tree with every Mapping d replaced by on_dict(d, path) (which recurses via _walk itself);
  tuples, lists and namedtuples are walked through, anything else is a leaf."""
  if isinstance(tree, Mapping):
    return on_dict(tree, path)
  if isinstance(tree, (tuple, list)):
    items = [_walk(x, on_dict, f"{path}/{i}") for i, x in enumerate(tree)]
    if hasattr(tree, "_fields"):
      return type(tree)(*items)
    return type(tree)(items)
  return tree


def stack_blocks(params: Any) -> Any:
  """Every `.../block{i}/...` group (i = 0 .. depth-1) -> `.../blocks/...`, leaves stacked on a
  new axis 0: a per-layer tree in the scan=True form. Groups already stacked stay as they are."""
  def on_dict(d, path):
    out = {k: _walk(v, on_dict, f"{path}/{k}") for k, v in d.items()}
    ids = _block_ids(d)
    if ids is None:
      return out
    if SCANNED in d:
      raise ValueError(f"params: {path or '/'} holds both {SCANNED!r} and block{{i}} subtrees")
    stacked = _stack([out.pop(f"block{i}") for i in ids])
    return {SCANNED: stacked, **out}
  return _walk(params, on_dict)


def unstack_blocks(params: Any) -> Any:
  """Every `.../blocks/...` (leaves [depth, ...]) -> `.../block0/...` .. `.../block{depth-1}/...`:
  a scan=True tree in the per-layer form. Trees already per-layer stay as they are."""
  def on_dict(d, path):
    out = {k: _walk(v, on_dict, f"{path}/{k}") for k, v in d.items()}
    if SCANNED not in out:
      return out
    if _block_ids(d) is not None:
      raise ValueError(f"params: {path or '/'} holds both {SCANNED!r} and block{{i}} subtrees")
    blocks = _unstack(out.pop(SCANNED), f"{path}")
    return {**{f"block{i}": b for i, b in enumerate(blocks)}, **out}
  return _walk(params, on_dict)


def is_scanned(params: Any) -> bool:
  """Whether any group of encoder blocks in the tree is in the scanned form."""
  found = []

  def on_dict(d, path):
    found.append(SCANNED in d)
    return {k: _walk(v, on_dict, f"{path}/{k}") for k, v in d.items()}
  _walk(params, on_dict)
  return any(found)


def match_blocks(params: Any, like: Any) -> Any:
  """params with each group of blocks in the form `like` has at the same path (stacked where
  `like` has `blocks`, per-layer where it has block{i}); the rest of params as it is. For
  loading a checkpoint of either form into a model of either form."""
  def go(p, ref):
    if not isinstance(p, Mapping) or not isinstance(ref, Mapping):
      if isinstance(p, (tuple, list)) and isinstance(ref, (tuple, list)) and len(p) == len(ref):
        items = [go(a, b) for a, b in zip(p, ref)]
        return type(p)(*items) if hasattr(p, "_fields") else type(p)(items)
      return p
    if SCANNED in ref and _block_ids(p) is not None:
      p = stack_blocks({"g": p})["g"]
    elif _block_ids(ref) is not None and SCANNED in p:
      p = unstack_blocks({"g": p})["g"]
    return {k: go(v, ref[k]) if k in ref else v for k, v in p.items()}
  return go(params, like)
