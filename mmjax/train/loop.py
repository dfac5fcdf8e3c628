"""The training loop: config -> data -> sharded batches -> jit train step -> checkpoints, eval, logs.

`train(config, workdir)` is the whole main job. Re-running it with the same
workdir resumes from the latest checkpoint and reproduces the uninterrupted
run's per-step losses.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm
from jax.experimental import multihost_utils

from mmjax import evaluate
from mmjax.data import pipeline, tokenizer as tokenizer_lib
from mmjax.train import checkpoint, config as config_lib, distributed, objectives, optimizer
from mmjax.train import sharding
from mmjax.train import state as state_lib
from mmjax.train.metrics import MetricWriter, plot_curves

DEFAULT_TEMPLATES = ("a photo of a {}.",)


build_model = objectives.build_two_tower


def _zeroshot_setup(config, data_dir: str):
  """(class_names, templates) for zero-shot, or None without a label feature."""
  features = pipeline.dataset_features(config.data.name, data_dir=data_dir)
  label = features.get(config.data.label_key) if config.data.label_key else None
  names = getattr(label, "names", None)
  if not names:
    return None
  templates = config.evaluate.templates
  if templates is None:
    templates = pipeline.default_templates(config.data.name) or DEFAULT_TEMPLATES
  return list(names), list(templates)


class Evaluator:
  """Zero-shot top-1/top-5 and retrieval recall@1/5/10 on the eval split (contrastive
  runs), and a linear probe and kNN on frozen image features (any run).

  probe_arrays: the probe's train split in memory ({'image', 'label'}), or None.
  """

  def __init__(self, objective, config, arrays: dict, tok, zeroshot, probe_arrays=None):
    self.arrays, self.tok, self.zeroshot, self.probe = arrays, tok, zeroshot, probe_arrays
    self.batch_size, self.text_len = config.evaluate.batch_size, config.data.text_len
    self.match = config.evaluate.retrieval_match
    self.knn_k, self.probe_shots = config.evaluate.knn_k, tuple(config.evaluate.probe_shots)
    self.contrastive = isinstance(objective, objectives.Contrastive)
    self._features = jax.jit(objective.features)
    if self.contrastive:
      model = objective.model
      self._img = jax.jit(lambda p, x: model.apply({"params": p}, x, method="encode_image"))
      self._txt = jax.jit(lambda p, t: model.apply({"params": p}, t, method="encode_text"))

  def _batched(self, fn, params, x: np.ndarray) -> np.ndarray:
    """Fixed-size batches (one compile); the last one padded with its first row."""
    out, b = [], self.batch_size
    for i in range(0, len(x), b):
      chunk = x[i:i + b]
      pad = b - len(chunk)
      if pad:
        chunk = np.concatenate([chunk, np.repeat(chunk[:1], pad, 0)])
      out.append(np.asarray(fn(params, chunk))[:b - pad])
    return np.concatenate(out)

  def probes(self, params) -> dict[str, float]:
    """linear_probe_top1 and knn_top1: train on the probe split, test on the eval split."""
    if self.probe is None or "label" not in self.arrays:
      return {}
    train_x = self._batched(self._features, params, self.probe["image"])
    test_x = self._batched(self._features, params, self.arrays["image"])
    args = (train_x, self.probe["label"], test_x, self.arrays["label"])
    out = {"linear_probe_top1": evaluate.linear_probe_accuracy(*args),
           "knn_top1": evaluate.knn_accuracy(*args, k=self.knn_k)}
    for k in self.probe_shots:
      out[f"linear_probe_{k}shot_top1"] = evaluate.linear_probe_accuracy(*args, shots=k)
    return out

  def __call__(self, params) -> dict[str, float]:
    results = self.probes(params)
    if not self.contrastive:
      return results
    a = self.arrays
    img = self._batched(self._img, params, a["image"])
    txt = self._batched(self._txt, params, a["text"])
    if self.zeroshot is not None and "label" in a:
      names, templates = self.zeroshot
      encode = lambda s: self._batched(self._txt, params, self.tok.encode(s, self.text_len))
      cls = evaluate.class_embeddings(encode, names, templates)
      acc = evaluate.zeroshot_accuracy(img, cls, a["label"])
      results.update({f"zeroshot_{k}": v for k, v in acc.items()})
    if self.match == "label":
      ids = a["label"]
      results.update(_prefixed(evaluate.retrieval_recall(img, txt, img_ids=ids, txt_ids=ids)))
    else:
      # Identical captions are one text: any of them is a correct answer.
      _, ids = np.unique(a["text"], axis=0, return_inverse=True)
      results.update(_prefixed(evaluate.retrieval_recall(img, txt, img_ids=ids, txt_ids=ids)))
    return results


def _data_state(data_iter) -> dict:
  """Every process's input-pipeline position (each process reads its own shard)."""
  return {"processes": distributed.gather_json(data_iter.get_state())}


def _prefixed(d: dict) -> dict:
  return {f"retrieval_{k}": v for k, v in d.items()}


def _prepare_data(config, ddir: str):
  d = config.data
  train_src = pipeline.get_source(d.name, d.train_split, data_dir=ddir,
                                  image_key=d.image_key, text_key=d.text_key)
  tok = tokenizer_lib.get_tokenizer(
      name=d.name, data_dir=ddir, vocab_size=d.vocab_size, path=d.tokenizer_path,
      train_texts_fn=lambda: pipeline.iter_texts(train_src, d.text_key))
  if jax.process_index() == 0:
    _warn_truncation(train_src, tok, config)
  return train_src, tok


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


def train(config: ml_collections.ConfigDict, workdir: str, *,
          callbacks: Sequence[Callable[[int, dict], None]] = ()) -> dict:
  """Trains, evaluates and checkpoints; returns the final results (also in workdir/results.json).

  callbacks: each called as cb(step, metrics) after every step (metrics are
  device arrays; converting them syncs).
  """
  t_start = time.time()
  config_lib.validate(config)
  distributed.initialize(config)
  mesh = sharding.make_mesh(config)
  n_data = sharding.data_parallel_size(mesh)
  if config.batch_size % (n_data * config.accum_steps) or config.batch_size % jax.process_count():
    raise ValueError(f"config.batch_size={config.batch_size} must be divisible by the "
                     f"{n_data} devices of the batch axes x config.accum_steps={config.accum_steps}, "
                     f"and by {jax.process_count()} processes")
  ddir = config_lib.data_dir(config)
  d = config.data
  # Process 0 builds the dataset and tokenizer (first use only); the others then read them.
  if jax.process_index() == 0:
    train_src, tok = _prepare_data(config, ddir)
  _sync("mmjax_data_ready")
  if jax.process_index() != 0:
    train_src, tok = _prepare_data(config, ddir)
  freeze = None
  if config.frozen:   # LiT: no backward pass through, and no optimizer state for, these
    freeze = lambda p: state_lib.freezer(optimizer.frozen_labels(p, config.frozen))(p)
  objective = objectives.make(config, tok.vocab_size, mesh=mesh,
                              batch_axes=sharding.batch_axes(mesh), freeze=freeze)
  tx, schedule = optimizer.make_optimizer(config.optim, config.total_steps,
                                          frozen=config.frozen)
  eval_src = pipeline.get_source(d.name, d.eval_split, data_dir=ddir,
                                 image_key=d.image_key, text_key=d.text_key)
  arrays = lambda src: pipeline.make_eval_arrays(
      src, tokenizer=tok, image_size=d.image_size, text_len=d.text_len,
      image_key=d.image_key, text_key=d.text_key, label_key=d.label_key)
  probe_arrays = None
  if config.evaluate.probes and d.label_key:
    probe_arrays = arrays(_first(train_src, config.evaluate.probe_train_examples))
  zeroshot = _zeroshot_setup(config, ddir) if config.loss in objectives.CONTRASTIVE else None
  evaluator = Evaluator(objective, config, arrays(eval_src), tok, zeroshot, probe_arrays)

  # The state is created on the mesh directly, already sharded (no host copy of the full state).
  batch_sharding = sharding.batch_sharding(mesh)
  dummy = {"image": jnp.zeros((1, d.image_size, d.image_size, 3), jnp.float32),
           "text": jnp.zeros((1, d.text_len), jnp.int32)}
  init_fn = lambda rng: state_lib.init_state(objective, tx, rng, dummy)
  rng = jax.random.PRNGKey(config.seed)
  state_sharding = sharding.state_shardings(jax.eval_shape(init_fn, rng), mesh, config.sharding)
  init = jax.jit(init_fn, out_shardings=state_sharding)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          jax.eval_shape(init_fn, rng), state_sharding)

  os.makedirs(workdir, exist_ok=True)
  ckpt = checkpoint.make_manager(workdir, every=config.checkpoint.every,
                                 keep=config.checkpoint.keep)
  data_iter = pipeline.make_train_iterator(
      train_src, tokenizer=tok, global_batch_size=config.batch_size,
      image_size=d.image_size, text_len=d.text_len, seed=config.seed,
      process_index=jax.process_index(), process_count=jax.process_count(),
      augment=d.augment, crop_scale_min=d.crop_scale_min, flip=d.flip,
      image_key=d.image_key, text_key=d.text_key, num_workers=d.num_workers,
      views=2 if "image2" in objective.batch_keys else 1)
  start = ckpt.latest_step()
  init_results = {}
  if start is None:
    state, start = init(rng), 0
    if config.init_from.workdir:
      state = _init_from(state, config.init_from, state_sharding, objective)
    if config.evaluate.at_init:   # the baseline the trained numbers are compared with
      init_results = evaluator(state.params)
  else:
    state, data_state = checkpoint.restore(ckpt, start, abstract)
    states = data_state["processes"]
    if len(states) != jax.process_count():
      raise ValueError(f"the checkpoint in {workdir} was written by {len(states)} processes; "
                       f"this run has {jax.process_count()} (config.distributed)")
    data_iter.set_state(states[jax.process_index()])
    print(f"mmjax: resumed from {workdir} at step {start}", flush=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json(indent=2))

  train_step = state_lib.make_train_step(objective, tx, schedule=schedule)
  step_fn = jax.jit(train_step,
                    in_shardings=(state_sharding, batch_sharding),
                    out_shardings=(state_sharding, None), donate_argnums=0)
  writer = MetricWriter(workdir, resume_step=start)
  if init_results:
    writer.write(0, init_results)
  bar = tqdm.tqdm(total=config.total_steps, initial=start, desc="train", unit="step",
                  dynamic_ncols=True, mininterval=1.0, disable=jax.process_index() != 0)
  t_first = None   # time after the first step of this run: compile excluded from speed
  steps_timed = 0
  t_log, n_log = time.time(), 0
  last_saved = start
  try:
    for step in range(start + 1, config.total_steps + 1):
      local = next(data_iter)
      batch = {k: jax.make_array_from_process_local_data(batch_sharding, local[k])
               for k in objective.batch_keys}
      state, metrics = step_fn(state, batch)
      for cb in callbacks:
        cb(step, metrics)
      if t_first is None:
        jax.block_until_ready(state)
        t_first = t_log = time.time()
      else:
        steps_timed += 1
      n_log += 1
      if ckpt.should_save(step):
        checkpoint.save(ckpt, step, state, _data_state(data_iter))
        last_saved = step
      if step % config.log_every == 0 or step == config.total_steps:
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        now = time.time()
        m["examples_per_sec"] = n_log * config.batch_size / max(now - t_log, 1e-9)
        t_log, n_log = now, 0
        writer.write(step, m)
        bar.set_postfix(loss=f"{m['loss']:.4f}", ex_s=f"{m['examples_per_sec']:.0f}")
      bar.update(1)
      if config.evaluate.every and step % config.evaluate.every == 0 and step != config.total_steps:
        writer.write(step, evaluator(state.params))
    bar.close()
    jax.block_until_ready(state)
    train_time = time.time() - (t_first or time.time())
    if last_saved != config.total_steps:
      checkpoint.save(ckpt, config.total_steps, state, _data_state(data_iter), force=True)
    final = evaluator(state.params)
    ckpt.wait_until_finished()
  finally:
    ckpt.close()
    if hasattr(data_iter, "close"):
      data_iter.close()
  writer.write(config.total_steps, final)
  results = {**final, **{f"init_{k}": v for k, v in init_results.items()},
             "steps": config.total_steps,
             "examples_per_sec": steps_timed * config.batch_size / train_time if steps_timed else None,
             "resumed_from_step": start, "wall_s": time.time() - t_start,
             "devices": mesh.size, "loss": config.loss}
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "results.json"), "w") as f:
      json.dump(results, f, indent=2)
    plot_curves(writer.path, os.path.join(workdir, "curves.png"))
  writer.close()
  return results
