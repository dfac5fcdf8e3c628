"""The training loop: config -> data -> sharded batches -> jit train step -> checkpoints, eval, logs.

`train(config, workdir)` is the whole main job: `build(config, workdir)` makes
the run (mesh, data, objective, optimizer, shardings, evaluator) without
touching the train state; `run(built, workdir)` initialises or restores the
state and trains. Re-running with the same workdir resumes from the latest
checkpoint and reproduces the uninterrupted run's per-step losses.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding

from mmjax.data import pipeline, tokenizer as tokenizer_lib
from mmjax.evaluate import Evaluator
from mmjax.train import checkpoint, config as config_lib, multihost, objectives, optimizer
from mmjax.train import sharding
from mmjax.train import state as state_lib
from mmjax.train.metrics import MetricWriter, plot_curves

DEFAULT_TEMPLATES = ("a photo of a {}.",)


@dataclasses.dataclass
class Run:
  """Everything a run needs before its train state exists (see `build`)."""
  config: ml_collections.ConfigDict
  mesh: Mesh
  objective: objectives.Objective
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  data_iter: Any                      # grain iterator with get_state / set_state
  evaluator: Evaluator
  rng: jax.Array
  abstract: state_lib.TrainState      # shapes, dtypes and shardings of the state
  state_sharding: Any
  batch_sharding: NamedSharding
  t_start: float                      # when build began: results.json's wall_s counts from here

  def init_state(self) -> state_lib.TrainState:
    """The initial state, created on the mesh already sharded (no host copy)."""
    d = self.config.data
    dummy = _dummy_batch(d)
    return jax.jit(lambda r: state_lib.init_state(self.objective, self.tx, r, dummy),
                   out_shardings=self.state_sharding)(self.rng)


def _dummy_batch(d) -> dict:
  return {"image": jnp.zeros((1, d.image_size, d.image_size, 3), jnp.float32),
          "text": jnp.zeros((1, d.text_len), jnp.int32)}


def _data_state(data_iter) -> dict:
  """Every process's input-pipeline position (each process reads its own shard)."""
  return {"processes": multihost.gather_json(data_iter.get_state())}


def _open_data(config, ddir: str):
  """(dataset, train source, tokenizer); the dataset is opened once."""
  d = config.data
  dataset = pipeline.open_dataset(d, ddir)
  train_src = dataset.source(d.train_split)
  tok = tokenizer_lib.get_tokenizer(
      name=d.name, data_dir=ddir, vocab_size=d.vocab_size, path=d.tokenizer_path,
      train_texts_fn=lambda: pipeline.iter_texts(train_src, d.text_key))
  if jax.process_index() == 0:
    _warn_truncation(train_src, tok, config)
  return dataset, train_src, tok


def _warn_truncation(train_src, tok, config, sample: int = 2000) -> None:
  """Warns when training captions do not fit config.data.text_len (EOS included):
  their ends, often the words that matter, would be cut off."""
  d = config.data
  texts = list(itertools.islice(pipeline.iter_texts(train_src, d.text_key), sample))
  long = sum(tok.num_tokens(t) > d.text_len for t in texts)
  if long:
    print(f"mmjax: warning: {long} of the first {len(texts)} training captions are longer than "
          f"config.data.text_len={d.text_len} tokens and will be truncated", flush=True)


def _first(source, n: int):
  """The first n records of a random-access source (all if it has fewer)."""
  class Head:
    def __len__(self):
      return min(n, len(source))

    def __getitem__(self, i):
      return source[i]
  return Head()


def _make_evaluator(config, objective, dataset, train_src, tok) -> Evaluator:
  d, e = config.data, config.evaluate
  arrays = lambda src: pipeline.make_eval_arrays(src, d, tokenizer=tok)
  probe_arrays = None
  if e.probes and d.label_key:
    probe_arrays = arrays(_first(train_src, e.probe_train_examples))
  zeroshot = None
  names = dataset.class_names(d.label_key)
  if objective.towers() is not None and names:
    templates = e.templates
    if templates is None:
      templates = dataset.templates or DEFAULT_TEMPLATES
    zeroshot = (names, list(templates))
  return Evaluator(objective, e, arrays(dataset.source(d.eval_split)), tokenizer=tok,
                   text_len=d.text_len, zeroshot=zeroshot, probe_arrays=probe_arrays)


def build(config: ml_collections.ConfigDict) -> Run:
  """Validates the config and makes everything but the train state: the mesh,
  the data (built on first use by process 0), the objective and optimizer with
  the frozen labels worked out once, the state's shardings, the evaluator."""
  t_start = time.time()
  config_lib.validate(config)
  multihost.initialize(config)
  mesh = sharding.make_mesh(config)
  n_data = sharding.data_parallel_size(mesh)
  if config.batch_size % (n_data * config.accum_steps) or config.batch_size % jax.process_count():
    raise ValueError(f"config.batch_size={config.batch_size} must be divisible by the "
                     f"{n_data} devices of the batch axes x config.accum_steps={config.accum_steps}, "
                     f"and by {jax.process_count()} processes")
  ddir = config_lib.data_dir(config)
  # Process 0 builds the dataset and tokenizer (first use only); the others then read them.
  if jax.process_index() == 0:
    dataset, train_src, tok = _open_data(config, ddir)
  _sync("mmjax_data_ready")
  if jax.process_index() != 0:
    dataset, train_src, tok = _open_data(config, ddir)
  objective = objectives.make(config, tok.vocab_size, mesh=mesh,
                              batch_axes=sharding.batch_axes(mesh))
  rng = jax.random.PRNGKey(config.seed)
  # The model's init is traced once, for shapes: the frozen labels and the state's shardings.
  abstract_params = jax.eval_shape(objective.init, rng, _dummy_batch(config.data))
  frozen = optimizer.frozen_labels(abstract_params, config.frozen) if config.frozen else None
  objective = objective.with_frozen(frozen)
  tx, schedule = optimizer.make_optimizer(config.optim, config.total_steps, frozen=frozen)
  abstract = state_lib.abstract_state(objective, tx, abstract_params, rng)
  state_sharding = sharding.state_shardings(abstract, mesh, config.sharding)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          abstract, state_sharding)
  data_iter = pipeline.make_train_iterator(
      train_src, config.data, tokenizer=tok, global_batch_size=config.batch_size,
      seed=config.seed, process_index=jax.process_index(), process_count=jax.process_count(),
      views=2 if "image2" in objective.batch_keys else 1)
  evaluator = _make_evaluator(config, objective, dataset, train_src, tok)
  return Run(config=config, mesh=mesh, objective=objective, tx=tx, schedule=schedule,
             data_iter=data_iter, evaluator=evaluator, rng=rng, abstract=abstract,
             state_sharding=state_sharding, batch_sharding=sharding.batch_sharding(mesh),
             t_start=t_start)


def _init_from(state, init_from, state_sharding, objective):
  """Replaces the params under init_from.prefix with those of another run's checkpoint."""
  loaded, step = checkpoint.load_params(init_from.workdir)
  prefix = init_from.prefix
  if prefix not in state.params or prefix not in loaded:
    raise ValueError(f"config.init_from.prefix={prefix!r} must be a top-level params key of both "
                     f"runs; this run has {sorted(state.params)}, {init_from.workdir!r} has "
                     f"{sorted(loaded)}")
  want = jax.tree_util.tree_leaves_with_path(state.params[prefix])
  got = dict(jax.tree_util.tree_leaves_with_path(loaded[prefix]))
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
  sub = jax.tree.map(lambda x, y: np.asarray(y, x.dtype), state.params[prefix],
                     jax.tree.unflatten(jax.tree.structure(state.params[prefix]),
                                        [got[p] for p, _ in want]))
  params = {**state.params, prefix: sub}
  params = jax.device_put(params, state_sharding.params)
  ema = state.ema
  if ema is not None:
    ema = jax.device_put(objective.ema_init(params), state_sharding.ema)
  print(f"mmjax: {prefix!r} initialised from {init_from.workdir} (step {step})", flush=True)
  return state.replace(params=params, ema=ema)


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def _start(built: Run, ckpt, workdir: str) -> tuple[state_lib.TrainState, int, dict]:
  """(state, start step, init-eval results): a fresh state (maybe initialised from
  another run, maybe evaluated) or the latest checkpoint's, with the data position."""
  config = built.config
  start = ckpt.latest_step()
  if start is None:
    state = built.init_state()
    if config.init_from.workdir:
      state = _init_from(state, config.init_from, built.state_sharding, built.objective)
    # The baseline the trained numbers are compared with.
    return state, 0, built.evaluator(state.params) if config.evaluate.at_init else {}
  state, data_state = checkpoint.restore(ckpt, start, built.abstract)
  states = data_state["processes"]
  if len(states) != jax.process_count():
    raise ValueError(f"the checkpoint in {workdir} was written by {len(states)} processes; "
                     f"this run has {jax.process_count()} (config.distributed)")
  built.data_iter.set_state(states[jax.process_index()])
  print(f"mmjax: resumed from {workdir} at step {start}", flush=True)
  return state, start, {}


class _Speed:
  """Examples per second, the first step (compile) excluded; per log interval and overall."""

  def __init__(self, batch_size: int):
    self.batch_size, self.t_first, self.steps = batch_size, None, 0
    self.t_log, self.n_log = time.time(), 0

  def step(self, state) -> None:
    if self.t_first is None:
      jax.block_until_ready(state)
      self.t_first = self.t_log = time.time()
    else:
      self.steps += 1
    self.n_log += 1

  def interval(self) -> float:
    now = time.time()
    rate = self.n_log * self.batch_size / max(now - self.t_log, 1e-9)
    self.t_log, self.n_log = now, 0
    return rate

  def overall(self) -> float | None:
    if not self.steps:
      return None
    return self.steps * self.batch_size / (time.time() - self.t_first)


def run(built: Run, workdir: str, *,
        callbacks: Sequence[Callable[[int, dict], None]] = ()) -> dict:
  """Trains a built run from its start (fresh or resumed); evaluates, checkpoints
  and logs; returns the final results (also in workdir/results.json)."""
  config, data_iter = built.config, built.data_iter
  os.makedirs(workdir, exist_ok=True)
  ckpt = checkpoint.make_manager(workdir, every=config.checkpoint.every,
                                 keep=config.checkpoint.keep)
  try:
    state, start, init_results = _start(built, ckpt, workdir)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json(indent=2))
    step_fn = jax.jit(state_lib.make_train_step(built.objective, built.tx,
                                                schedule=built.schedule),
                      in_shardings=(built.state_sharding, built.batch_sharding),
                      out_shardings=(built.state_sharding, None), donate_argnums=0)
    writer = MetricWriter(workdir, resume_step=start)
    if init_results:
      writer.write(0, init_results)
    bar = tqdm.tqdm(total=config.total_steps, initial=start, desc="train", unit="step",
                    dynamic_ncols=True, mininterval=1.0, disable=jax.process_index() != 0)
    speed, last_saved = _Speed(config.batch_size), start
    for step in range(start + 1, config.total_steps + 1):
      local = next(data_iter)
      batch = {k: jax.make_array_from_process_local_data(built.batch_sharding, local[k])
               for k in built.objective.batch_keys}
      state, metrics = step_fn(state, batch)
      for cb in callbacks:
        cb(step, metrics)
      speed.step(state)
      if ckpt.should_save(step):
        checkpoint.save(ckpt, step, state, _data_state(data_iter))
        last_saved = step
      if step % config.log_every == 0 or step == config.total_steps:
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        m["examples_per_sec"] = speed.interval()
        writer.write(step, m)
        bar.set_postfix(loss=f"{m['loss']:.4f}", ex_s=f"{m['examples_per_sec']:.0f}")
      bar.update(1)
      if config.evaluate.every and step % config.evaluate.every == 0 and step != config.total_steps:
        writer.write(step, built.evaluator(state.params))
    bar.close()
    jax.block_until_ready(state)
    examples_per_sec = speed.overall()
    if last_saved != config.total_steps:
      checkpoint.save(ckpt, config.total_steps, state, _data_state(data_iter), force=True)
    final = built.evaluator(state.params)
    ckpt.wait_until_finished()
  finally:
    ckpt.close()
    if hasattr(data_iter, "close"):
      data_iter.close()
  writer.write(config.total_steps, final)
  results = {**final, **{f"init_{k}": v for k, v in init_results.items()},
             "steps": config.total_steps, "examples_per_sec": examples_per_sec,
             "resumed_from_step": start, "wall_s": time.time() - built.t_start,
             "devices": built.mesh.size, "loss": config.loss}
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "results.json"), "w") as f:
      json.dump(results, f, indent=2)
    plot_curves(writer.path, os.path.join(workdir, "curves.png"))
  writer.close()
  return results


def train(config: ml_collections.ConfigDict, workdir: str, *,
          callbacks: Sequence[Callable[[int, dict], None]] = ()) -> dict:
  """build + run: trains, evaluates and checkpoints; returns the final results
  (also in workdir/results.json).

  callbacks: each called as cb(step, metrics) after every step (metrics are
  device arrays; converting them syncs).
  """
  return run(build(config), workdir, callbacks=callbacks)
