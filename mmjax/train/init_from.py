"""A run's start from elsewhere: config.init_from.checkpoint (a converted checkpoint's params
and BatchNorm statistics) or config.init_from.workdir (a subtree of another run's)."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mmjax.models import scan as scan_lib
from mmjax.train import checkpoint, export
from mmjax.train.state import TrainState


def load_checkpoint(config: ml_collections.ConfigDict):
  """config.init_from.checkpoint converted (mmjax.convert.load), or None; its image size
  and text length replace config.data's (said in one line when they differ)."""
  spec = config.init_from.checkpoint
  if not spec:
    return None
  try:
    ckpt = export.load(spec)   # a converter's spec, or another run: 'workdir:/path[@step]'
  except ValueError as e:
    raise ValueError(f"config.init_from.checkpoint={spec!r}: {e}") from None
  if ckpt.config["loss"] != config.loss:
    raise ValueError(f"config.loss={config.loss!r}, but config.init_from.checkpoint={spec!r} "
                     f"is a {ckpt.config['loss']!r} model; set --config.loss="
                     f"{ckpt.config['loss']}")
  d, size, length = config.data, ckpt.preprocess.size, ckpt.config["text"]["max_len"]
  if (d.image_size, d.text_len) != (size, length):
    if jax.process_index() == 0:
      print(f"mmjax: config.data.image_size={size}, text_len={length} from "
            f"config.init_from.checkpoint (the config said {d.image_size}, {d.text_len})",
            flush=True)
    d.image_size, d.text_len = size, length
  return ckpt


def _cast_like(target, tree, what: str):
  """tree (host numpy) with target's structure and dtypes; ValueError naming `what` when the
  structures differ."""
  if jax.tree_util.tree_structure(tree) != jax.tree_util.tree_structure(target):
    raise ValueError(f"config.init_from.checkpoint: its {what} do not have this run's "
                     f"structure ({jax.tree_util.tree_structure(target)})")
  return jax.tree.map(lambda x, y: np.asarray(y, x.dtype), target, tree)


def from_checkpoint(state: TrainState, start: dict, state_sharding, spec: str) -> TrainState:
  """The state with every param (and running statistic) replaced by
  config.init_from.checkpoint's, cast to the run's dtypes and placed with the state's
  shardings; its per-layer blocks stacked when config.model.scan is set."""
  params = _cast_like(state.params, scan_lib.match_blocks(start["params"], state.params),
                      "params")
  params = jax.device_put(params, state_sharding.params)
  stats = state.batch_stats
  if stats is not None:
    if not start.get("batch_stats"):
      raise ValueError("config.init_from.checkpoint: this run's image tower keeps BatchNorm "
                       "statistics and the checkpoint has none")
    stats = jax.device_put(_cast_like(stats, start["batch_stats"], "BatchNorm statistics"),
                           state_sharding.batch_stats)
  if jax.process_index() == 0:
    print(f"mmjax: params from {spec}", flush=True)
  return state.replace(params=params, batch_stats=stats)


def prefixes(prefix) -> tuple[str, ...]:
  """config.init_from.prefix as a tuple of top-level params keys (a str is one)."""
  return (prefix,) if isinstance(prefix, str) else tuple(prefix)


def _loaded_subtree(mine, theirs, prefix: str, init_from, step: int):
  """params[prefix] of this run (mine) replaced leaf by leaf by the other run's (theirs),
  init_from.skip's leaves kept as initialised; ValueError naming a leaf that differs."""
  theirs = scan_lib.match_blocks(theirs, mine)
  skip = [re.compile(p) for p in init_from.get("skip") or ()]
  name = lambda path: prefix + "/" + "/".join(str(getattr(k, "key", k)) for k in path)
  kept = lambda path: not any(p.fullmatch(name(path)) for p in skip)
  every = jax.tree_util.tree_leaves_with_path(mine)
  want = [(path, leaf) for path, leaf in every if kept(path)]
  got = {p: x for p, x in jax.tree_util.tree_leaves_with_path(theirs) if kept(p)}
  for path, leaf in want:
    if path not in got or got[path].shape != leaf.shape:
      raise ValueError(
          f"config.init_from: {prefix}{jax.tree_util.keystr(path)} is {leaf.shape} here but "
          f"{getattr(got.get(path), 'shape', 'missing')} in {init_from.workdir!r} (step {step}); "
          "the towers must have the same architecture")
  extra = sorted(jax.tree_util.keystr(p) for p in set(got) - {p for p, _ in want})
  if extra:   # e.g. a deeper tower there: taking its first blocks would be a silent mistake
    raise ValueError(
        f"config.init_from: {init_from.workdir!r} (step {step}) has {prefix} parameters this "
        f"run lacks, e.g. {prefix}{extra[0]} ({len(extra)} in all); the towers must have the "
        "same architecture")
  # A skipped leaf keeps this run's initial value.
  return jax.tree.map(lambda x, y: np.asarray(y, x.dtype), mine,
                      jax.tree.unflatten(jax.tree.structure(mine),
                                         [got[p] if kept(p) else leaf for p, leaf in every]))


def from_run(state: TrainState, init_from, state_sharding, objective) -> TrainState:
  """Replaces the params under each of init_from.prefix (a top-level key, or a tuple of them:
  ('img', 'img_proj', 'txt', 'txt_proj')) with those of another run's checkpoint (its encoder
  blocks scanned or per-layer, converted to this run's config.model.scan)."""
  variables, step = checkpoint.load_variables(init_from.workdir)
  loaded, keys = variables["params"], prefixes(init_from.prefix)
  for prefix in keys:
    if prefix not in state.params or prefix not in loaded:
      raise ValueError(f"config.init_from.prefix={prefix!r} must be a top-level params key of "
                       f"both runs; this run has {sorted(state.params)}, {init_from.workdir!r} "
                       f"has {sorted(loaded)}")
  params = {**state.params, **{prefix: _loaded_subtree(state.params[prefix], loaded[prefix],
                                                       prefix, init_from, step)
                               for prefix in keys}}
  params = jax.device_put(params, state_sharding.params)
  ema, stats = state.ema, state.batch_stats
  if ema is not None:
    # Copies: an EMA that starts as the params (SigLIP 2's teacher, MoCo's momentum
    # encoder) must not share their buffers, or the train step would donate one twice.
    ema = jax.device_put(jax.tree.map(lambda x: jnp.array(x, copy=True),
                                      objective.ema_init(params)), state_sharding.ema)
  for prefix in keys:
    if stats is not None and prefix in stats:   # the prefix's BatchNorm statistics come along
      theirs = (variables.get("batch_stats") or {}).get(prefix)
      if theirs is None:
        raise ValueError(f"config.init_from: {prefix!r} keeps BatchNorm statistics here, and "
                         f"{init_from.workdir!r} (step {step}) has none")
      sub_stats = _cast_like(stats[prefix], theirs, f"{prefix!r} BatchNorm statistics")
      stats = jax.device_put({**stats, prefix: sub_stats}, state_sharding.batch_stats)
  named = keys[0] if len(keys) == 1 else keys
  print(f"mmjax: {named!r} initialised from {init_from.workdir} (step {step})", flush=True)
  return state.replace(params=params, ema=ema, batch_stats=stats)
