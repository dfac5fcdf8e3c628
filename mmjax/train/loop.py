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
from flax import traverse_util
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding

from mmjax import objectives
from mmjax.models import factory, image as image_lib
from mmjax.data import eval_data, pipeline, prompts, sources, tokenizers
from mmjax.data.preprocess import ImagePrep
from mmjax.evaluate import Evaluator, evaluator as evaluator_lib
from mmjax.evaluate.streaming import Split
from mmjax.train import checkpoint, config as config_lib, export, init_from, monitor
from mmjax.train import multihost
from mmjax.train import optimizer
from mmjax.train import sharding
from mmjax.train import state as state_lib
from mmjax.train.metrics import MetricWriter, plot_curves
from mmjax.train.monitor import NonFiniteError  # noqa: F401  (run raises it; launchers catch it)

DEFAULT_TEMPLATES = ("a photo of a {}.",)


@dataclasses.dataclass
class Run:
  """Everything a run needs before its train state exists (see `build`)."""
  config: ml_collections.ConfigDict
  mesh: Mesh
  objective: objectives.Objective
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  data_iter: sources.TrainIterator    # uint8 images; get_state / set_state
  evaluator: Evaluator
  rng: jax.Array
  abstract: state_lib.TrainState      # shapes, dtypes and shardings of the state
  state_sharding: Any
  batch_sharding: NamedSharding
  t_start: float                      # when build began: results.json's wall_s counts from here
  start: Any = None                   # config.init_from.checkpoint's variables (host numpy)
  normalize: tuple | None = None      # (mean, std) of uint8 images, applied once on the device
  tokenizer_spec: str = ""            # the run's tokenizer (mmjax.data.tokenizers spec)
  preprocess: Any = None              # the run's eval image preparation (ImagePrep)
  architecture: dict | None = None    # config.init_from.checkpoint's two_tower kwargs, else None
  image_fields: dict | None = None    # the image tower's complete fields (its init input)
  data_id: str = ""                   # the training data's name (DataSource.tokenizer_name: a
                                      # TFDS name, a hash of the shard paths); checkpoints keep it
                                      # (None: [-1, 1])

  def init_state(self) -> state_lib.TrainState:
    """The initial state, created on the mesh already sharded (no host copy)."""
    d = self.config.data
    dummy = _dummy_batch(d, self.image_fields)
    return jax.jit(lambda r: state_lib.init_state(self.objective, self.tx, r, dummy,
                                                  ema_decay=self.config.ema_decay),
                   out_shardings=self.state_sharding)(self.rng)


def _dummy_batch(d, image_fields: dict | None = None) -> dict:
  """One example as the objective's init takes it: the image as the tower of complete fields
  image_fields takes it (mmjax.models.image.example_input; None: [1, S, S, 3])."""
  image = (jnp.zeros((1, d.image_size, d.image_size, 3), jnp.float32) if image_fields is None
           else image_lib.example_input(image_fields, d.image_size))
  return {"image": image, "text": jnp.zeros((1, d.text_len), jnp.int32)}


def _data_metrics(data_iter) -> dict:
  """The input pipeline's counters over all processes, from its iterator's metrics() (data/epoch:
  the furthest any process got; the others, e.g. data/skipped_<kind>, summed); {} without."""
  if not hasattr(data_iter, "metrics"):
    return {}
  rows = multihost.gather_json(data_iter.metrics())
  return {k: (max if k == "data/epoch" else sum)(r[k] for r in rows) for k in rows[0]}


def _data_state(data_iter) -> dict:
  """Every process's input-pipeline position (each process reads its own shard)."""
  return {"processes": multihost.gather_json(data_iter.get_state())}


def _tokenizer_spec(config, ddir: str, name: str) -> tuple[str, str]:
  """(spec, the config field naming it) for a run without a checkpoint: config.data.tokenizer,
  else the trained kind: config.data.tokenizer_path, else the BPE trained on the training
  captions, cached under ddir/name (the source's tokenizer_name)."""
  d = config.data
  if d.tokenizer:
    return d.tokenizer, "config.data.tokenizer"
  if d.tokenizer_path:
    return f"trained:{os.path.abspath(d.tokenizer_path)}", "config.data.tokenizer_path"
  return tokenizers.trained_spec(ddir, name, d.vocab_size), "config.data.vocab_size"


def _open_data(config, ddir: str, ckpt=None):
  """(source, its train records, tokenizer): config.data's DataSource (mmjax.data.sources),
  opened once.

  An I/O error (a read-only or missing data_dir that needs writing on first
  use) is a ValueError naming config.data.data_dir and the path.
  """
  d, ev = config.data, config.evaluate
  try:
    source = sources.open(d, ddir)
    probes = evaluator_lib.wants(config.evals, ev, "probe") and d.label_key
    # The probes' train set must decode; the captions for a trained tokenizer and the
    # truncation check need no image.
    train_src = source.train_records(ev.probe_train_examples if probes else 2000,
                                     decode=bool(probes))
    if ckpt is not None:   # its text tower fixes the vocabulary
      tok = tokenizers.tokenizer_for_tower(
          d.tokenizer, checkpoint_spec=ckpt.tokenizer, field="config.data.tokenizer",
          vocab_size=ckpt.config["text"]["vocab_size"])
    else:
      spec, field = _tokenizer_spec(config, ddir, source.tokenizer_name)
      try:
        # The captions and the zero-shot prompts: a prompt's words outside the captions
        # would otherwise be spelt out piece by piece (and cut off at text_len).
        tok = tokenizers.get_tokenizer(spec, train_texts=lambda: itertools.chain(
            pipeline.iter_texts(train_src, d.text_key), _zeroshot_prompts(config, source)))
      except ValueError as e:
        raise ValueError(f"{field}: {e}") from None
  except OSError as e:
    where = f" {e.filename}" if e.filename else ""
    raise ValueError(f"config.data.data_dir={ddir!r}: cannot use{where} "
                     f"({e.strerror or e}); the dataset and tokenizer are built there on first "
                     "use, so it must be writable until then") from None
  if jax.process_index() == 0 and hasattr(tok, "num_tokens"):
    _warn_truncation(train_src, tok, config, _zeroshot_prompts(config, source))
  return source, train_src, tok


def _zeroshot_prompts(config, source) -> list[str]:
  """The zero-shot prompts of the run's own evaluation (its templates, a list of strings,
  filled with the dataset's class names); [] without class names."""
  names = source.class_names(config.data.label_key) if config.data.label_key else None
  templates = config.evaluate.templates or source.templates or DEFAULT_TEMPLATES
  if not names or not all(isinstance(t, str) for t in templates):
    return []
  return [prompts.fill_template(t, n) for t in templates for n in names]


def _warn_truncation(train_src, tok, config, zeroshot: Sequence[str] = (),
                     sample: int = 2000) -> None:
  """Warns when training captions or zero-shot prompts do not fit config.data.text_len (EOS
  included): their ends, often the words that matter (a prompt's class name), would be cut
  off."""
  d = config.data
  texts = list(itertools.islice(pipeline.iter_texts(train_src, d.text_key), sample))
  long = sum(tok.num_tokens(t) > d.text_len for t in texts)
  if long:
    print(f"mmjax: warning: {long} of the first {len(texts)} training captions are longer than "
          f"config.data.text_len={d.text_len} tokens and will be truncated", flush=True)
  long = [t for t in zeroshot if tok.num_tokens(t) > d.text_len]
  if long:
    print(f"mmjax: warning: {len(long)} of the {len(zeroshot)} zero-shot prompts are longer "
          f"than config.data.text_len={d.text_len} tokens and will be truncated, their class "
          f"names maybe with them (e.g. {long[0]!r}: {tok.num_tokens(long[0])} tokens)",
          flush=True)


def _first(source, n: int):
  """The first n records of a random-access source (all if it has fewer)."""
  class Head:
    def __len__(self):
      return min(n, len(source))

    def __getitem__(self, i):
      return source[i]

    def meta(self, i):
      return pipeline._meta(source, i)
  return Head()


def _check_labels(config, source) -> None:
  """Raises ValueError naming the field when the evaluation asks for labels the
  dataset lacks; without labels (config.data.label_key='') zero-shot and the
  probes are skipped, with one line saying so."""
  d, e = config.data, config.evaluate
  if d.label_key and d.label_key not in source.features:
    raise ValueError(f"config.data.label_key={d.label_key!r}: dataset {d.name!r} has no such "
                     f"feature (its features: {sorted(source.features)}); set "
                     "config.data.label_key='' for a dataset without labels")
  if not d.label_key:
    if e.retrieval_match == "label":
      raise ValueError("config.evaluate.retrieval_match='label' needs labels, and "
                       f"config.data.label_key is {d.label_key!r}; use "
                       "config.evaluate.retrieval_match='pair' (text i goes with image i)")
    if jax.process_index() == 0:
      print(f"mmjax: dataset {d.name!r} has no labels (config.data.label_key=''): zero-shot "
            "and the linear/kNN probes are skipped; retrieval is evaluated", flush=True)


def _make_evaluator(config, objective, source, train_src, tok, prep=None) -> Evaluator:
  """prep: a converted checkpoint's ImagePrep (its eval resize, crop and normalisation)."""
  d, e = config.data, config.evaluate
  extra = objective.eval_fields()

  def arrays(src, audio=False):
    out = pipeline.make_eval_arrays(src, d, tokenizer=tok, lazy_images=True, prep=prep,
                                    audio=audio)
    # Each field reads the record keys it names (`reads`); records without them get none.
    if extra and len(src) and all(k in src[0] for fn in extra.values() for k in fn.reads):
      out.update({k: np.stack([fn(src[i]) for i in range(len(src))]) for k, fn in extra.items()})
    return out

  probe_arrays = None
  wants_probe = (evaluator_lib.wants(config.evals, e, "probe")
                 or evaluator_lib.wants(config.evals, e, "dense_probe"))
  if wants_probe and d.label_key:
    probe_arrays = arrays(_first(train_src, e.probe_train_examples))
  zeroshot = None
  names = source.class_names(d.label_key)
  if objective.towers() is not None and names:
    templates = e.templates
    if templates is None:
      templates = source.templates or DEFAULT_TEMPLATES
    zeroshot = (names, list(templates))
  eval_arrays = arrays(source.eval_source(), audio=True)   # the probes' split needs no audio
  for a in (eval_arrays, probe_arrays):
    _check_label_range(a, names, getattr(source, "names_path", None), d)
  if "text" not in eval_arrays and not config.evals and jax.process_index() == 0:
    print(f"mmjax: the evaluation set of dataset {d.name!r} has no captions "
          f"(config.data.text_key={d.text_key!r}): retrieval is skipped", flush=True)
  evals, sets = _own_eval_sets(config, prep or ImagePrep(d.image_size), names)
  return Evaluator(objective, e, eval_arrays, tokenizer=tok,
                   text_len=d.text_len, zeroshot=zeroshot, probe_arrays=probe_arrays,
                   class_names=names, evals=evals, datasets=sets)


def _own_eval_sets(config, prep: ImagePrep, run_names) -> tuple[dict, dict]:
  """config.evals with templates specs loaded, and {entry: EvalSet} for the entries with a
  `dataset` (entries on the same dataset, split and limit share one), streamed through the
  run's eval preprocessing `prep`."""
  evals, sets, opened = {}, {}, {}
  for name, spec in (config.evals or {}).items():
    spec = dict(spec.items())
    ds = None
    if "dataset" in spec:
      key = (spec["dataset"], spec.get("split", "test"), spec.get("limit"))
      if key not in opened:
        opened[key] = _open_eval_set(config, name, spec, prep)
      ds, sets[name] = opened[key]
    if isinstance(spec.get("templates"), str):
      try:
        spec["templates"] = eval_data.load_templates(
            os.path.expanduser(spec["templates"]),
            class_names=ds.class_names if ds else run_names,
            dataset=eval_data.dataset_keys(ds.name) if ds else ())
      except (ValueError, OSError) as e:
        raise ValueError(f"config.evals.{name}.templates: {e}") from None
    evals[name] = spec
  return evals, sets


def _open_eval_set(config, name: str, spec: dict, prep: ImagePrep):
  """(the eval_data.EvalSet, its evaluator_lib.EvalSet) of config.evals.<name>.dataset."""
  try:
    ds = eval_data.open_eval_set(spec["dataset"],
                                 split=spec.get("split", "test"),
                                 data_dir=config_lib.data_dir(config))
  except (ValueError, OSError) as e:
    raise ValueError(f"config.evals.{name}.dataset={spec['dataset']!r}: {e}") from None
  limit, threads = spec.get("limit"), max(1, config.data.num_workers or 4)
  batches = lambda b: eval_data.eval_batches(ds, prep, b, limit=limit, num_threads=threads)
  templates = ds.templates or list(config.evaluate.templates or DEFAULT_TEMPLATES)
  return ds, evaluator_lib.EvalSet(Split(batches, ["label"] if ds.class_names else ["text"]),
                                   ds.class_names, templates)


def _check_label_range(arrays, names, names_path, d) -> None:
  """ValueError naming the class names' file (or config.data.label_key) and the largest
  label when a label has no name."""
  if not arrays or not names or "label" not in arrays or not len(arrays["label"]):
    return
  top = int(np.max(arrays["label"]))
  if top >= len(names):
    what = names_path or f"the class names of config.data.label_key={d.label_key!r}"
    raise ValueError(f"{what}: {len(names)} class names, but the data has label {top} "
                     f"(labels index the names: 0..{len(names) - 1})")


def _check_frozen_batch_norm(objective, frozen, batch_stats, config) -> None:
  """A locked tower must not normalise by batch statistics (which change with every batch):
  ValueError when config.frozen covers a module with running statistics that the objective's
  forward pass moves (Objective.moves_batch_stats)."""
  if frozen is None or not batch_stats or not objective.moves_batch_stats():
    return
  labels = traverse_util.flatten_dict(frozen)
  modules = {path[:-1] for path in traverse_util.flatten_dict(batch_stats)}
  locked = sorted(m for m in modules
                  if any(p[:len(m)] == m and label == "frozen" for p, label in labels.items()))
  if locked:
    raise ValueError(f"config.frozen={tuple(config.frozen)} locks BatchNorm statistics "
                     f"({'/'.join(locked[0])}) of a tower with config.model.image.norm='batch', "
                     "which normalises by each batch's at train time; lock a BatchNorm tower "
                     "with norm='frozen_bn'")


def build(config: ml_collections.ConfigDict, *, validate: bool = True) -> Run:
  """Validates the config (validate=False: the caller just did) and makes everything but the
  train state: the mesh, the data (built on first use by process 0), the objective and
  optimizer with the frozen labels worked out once, the state's shardings, the evaluator."""
  t_start = time.time()
  if validate:
    config_lib.validate(config)
  multihost.initialize(config)
  mesh = sharding.make_mesh(config)
  n_data = sharding.data_parallel_size(mesh)
  if config.batch_size % (n_data * config.accum_steps) or config.batch_size % jax.process_count():
    raise ValueError(f"config.batch_size={config.batch_size} must be divisible by the "
                     f"{n_data} devices of the batch axes x config.accum_steps={config.accum_steps}, "
                     f"and by {jax.process_count()} processes")
  ddir = config_lib.data_dir(config)
  ckpt = init_from.load_checkpoint(config)
  # Process 0 builds the dataset and tokenizer (first use only); the others then read them.
  if jax.process_index() == 0:
    source, train_src, tok = _open_data(config, ddir, ckpt)
  _sync("mmjax_data_ready")
  if jax.process_index() != 0:
    source, train_src, tok = _open_data(config, ddir, ckpt)
  _check_labels(config, source)
  objective = objectives.make(config, objectives.Context(
      vocab_size=tok.vocab_size, mesh=mesh, batch_axes=sharding.batch_axes(mesh),
      converted=None if ckpt is None else ckpt.config,
      train_texts=lambda: pipeline.iter_texts(train_src, config.data.text_key), tokenizer=tok))
  normalize = None if ckpt is None else (ckpt.preprocess.mean, ckpt.preprocess.std)
  rng = jax.random.PRNGKey(config.seed)
  # The model's init is traced once, for shapes: the frozen labels and the state's shardings.
  image_fields = ckpt.config["image"] if ckpt is not None else factory.tower_config(config,
                                                                                   "image")
  # How the tower's batches are made beyond uint8 [b, S, S, 3] (a registered kind's own).
  batching = sources.image_batching(config, image_fields, normalize=normalize,
                                    process_index=jax.process_index(),
                                    process_count=jax.process_count())
  abstract_variables = jax.eval_shape(objective.init_variables, rng,
                                      _dummy_batch(config.data, image_fields))
  abstract_params = abstract_variables["params"]
  frozen = optimizer.frozen_labels(abstract_params, config.frozen) if config.frozen else None
  _check_frozen_batch_norm(objective, frozen, abstract_variables.get("batch_stats"), config)
  objective = objective.with_frozen(frozen)
  if config.total_steps == 0:   # evaluate only: no update is ever made
    tx, schedule = optax.identity(), optax.constant_schedule(0.0)
  else:
    tx, schedule = optimizer.make_optimizer(config.optim, config.total_steps, frozen=frozen,
                                            params=abstract_params)
  abstract = state_lib.abstract_state(objective, tx, abstract_variables, rng,
                                      ema_decay=config.ema_decay)
  state_sharding = sharding.state_shardings(abstract, mesh, config.sharding)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          abstract, state_sharding)
  views = objective.views
  # uint8 images from every source, normalised once on the device (Run.normalize).
  data_iter = source.train_iterator(
      config.data, tokenizer=tok, global_batch_size=config.batch_size, seed=config.seed,
      process_index=jax.process_index(), process_count=jax.process_count(), views=views,
      caption_fields=objective.caption_fields(), **batching.view,
      **({"region_fields": objective.region_fields()} if objective.region_fields() else {}))
  data_iter = batching.wrap(data_iter)
  prep = batching.prep   # the tower's own eval preparation, else the checkpoint's, else None
  if prep is None and ckpt is not None:
    prep = ckpt.preprocess
  evaluator = _make_evaluator(config, objective, source, train_src, tok, prep)
  return Run(config=config, mesh=mesh, objective=objective, tx=tx, schedule=schedule,
             data_iter=data_iter, evaluator=evaluator, rng=rng, abstract=abstract,
             state_sharding=state_sharding, batch_sharding=sharding.batch_sharding(mesh),
             t_start=t_start, start=None if ckpt is None else ckpt.variables,
             normalize=normalize, data_id=source.tokenizer_name, tokenizer_spec=tok.spec,
             preprocess=prep or ImagePrep(config.data.image_size), image_fields=image_fields,
             architecture=None if ckpt is None else ckpt.config)


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def _check_writable(workdir: str) -> None:
  """Raises ValueError naming --workdir when it cannot be created or written."""
  try:
    os.makedirs(workdir, exist_ok=True)
    # No JAX call here: train() runs this before jax.distributed.initialize.
    probe = os.path.join(workdir, f".mmjax_write_test_{os.uname().nodename}_{os.getpid()}")
    with open(probe, "w"):
      pass
    os.remove(probe)
  except OSError as e:
    raise ValueError(f"--workdir {workdir!r} is not writable ({e.strerror or e})") from None


def completed(workdir: str, total_steps: int) -> dict | None:
  """The results of a run in workdir that finished config.total_steps, else None
  (none yet, or fewer steps: training continues). Raises ValueError when the
  workdir's run went past total_steps."""
  path = os.path.join(workdir, "results.json")
  try:
    with open(path) as f:
      results = json.load(f)
    steps = int(results["steps"])
  except (OSError, ValueError, KeyError, TypeError):
    return None   # no results yet (or unreadable ones: the final evaluation reruns)
  if steps > total_steps:
    raise ValueError(f"config.total_steps={total_steps}, but the run in {workdir!r} has "
                     f"finished {steps} steps; use another --workdir or total_steps >= {steps}")
  return results if steps == total_steps else None


def _finished(workdir: str, total_steps: int) -> dict | None:
  """completed(), after checking the workdir is writable; says so when it is."""
  _check_writable(workdir)
  done = completed(workdir, total_steps)
  if done is not None:
    print(f"mmjax: the run in {workdir} is complete (step {done['steps']} of {total_steps}); "
          f"results: {os.path.join(workdir, 'results.json')}", flush=True)
  return done


def _save_config(config: ml_collections.ConfigDict, workdir: str, start: int) -> None:
  """config.json holds the config a run started with; a resume with another config writes it
  to config.resumed_at_<step>.json and says which fields changed."""
  path = os.path.join(workdir, "config.json")
  text = config.to_json(indent=2)
  if start == 0 or not os.path.exists(path):
    with open(path, "w") as f:
      f.write(text)
    return
  with open(path) as f:
    first = json.load(f)
  changed = [f"{k}: {first_v!r} -> {now_v!r}" for k, first_v, now_v in _diff(first,
                                                                             json.loads(text))]
  if changed:
    resumed = os.path.join(workdir, f"config.resumed_at_{start}.json")
    with open(resumed, "w") as f:
      f.write(text)
    print(f"mmjax: resumed with a changed config ({'; '.join(changed[:5])}"
          f"{'; ...' if len(changed) > 5 else ''}): config.json keeps the first, {resumed} "
          "this run's", flush=True)


def _diff(a, b, prefix: str = ""):
  """(dotted key, a's value, b's value) where two JSON trees differ."""
  for key in sorted(set(a) | set(b)):
    x, y = a.get(key), b.get(key)
    if isinstance(x, dict) and isinstance(y, dict):
      yield from _diff(x, y, f"{prefix}{key}.")
    elif x != y:
      yield f"{prefix}{key}", x, y


def _start(built: Run, ckpt, workdir: str) -> tuple[state_lib.TrainState, int, dict, dict]:
  """(state, start step, init-eval results, extra data state): a fresh state (maybe
  initialised from another run, maybe evaluated) or the newest checkpoint that
  restores, with the data position."""
  config = built.config
  restored = checkpoint.restore_latest(ckpt, built.abstract, workdir)
  if restored is None:
    state = built.init_state()
    if config.init_from.workdir:
      state = init_from.from_run(state, config.init_from, built.state_sharding, built.objective)
    elif built.start is not None:
      state = init_from.from_checkpoint(state, built.start, built.state_sharding,
                                         config.init_from.checkpoint)
    if state.params_ema is not None:   # the weight EMA starts where training starts
      state = state.replace(params_ema=jax.tree.map(jnp.copy, state.params))
    # The baseline the trained numbers are compared with.
    return state, 0, built.evaluator(state.variables) if config.evaluate.at_init else {}, {}
  start, state, data_state = restored
  trained_on = data_state.get("data")
  if trained_on is not None and trained_on != built.data_id:
    raise ValueError(f"the checkpoint in {workdir} (step {start}) was trained on other data "
                     f"({trained_on}) than config.data names now ({built.data_id}): its data "
                     "position would be applied to other files; resume with the data it started "
                     "with, or use another --workdir")
  states = data_state["processes"]
  if len(states) != jax.process_count():
    raise ValueError(f"the checkpoint in {workdir} was written by {len(states)} processes; "
                     f"this run has {jax.process_count()} (config.distributed)")
  built.data_iter.set_state(states[jax.process_index()])
  print(f"mmjax: resumed from {workdir} at step {start}", flush=True)
  return state, start, {}, data_state


def run(built: Run, workdir: str, *, callbacks: Sequence[Callable[[int, dict], None]] = (),
        check_finished: bool = True) -> dict:
  """Trains a built run from its start (fresh or resumed); evaluates, checkpoints
  and logs; returns the final results (also in workdir/results.json).

  A workdir whose run already finished config.total_steps is left as it is:
  its results are returned (a larger total_steps continues training). A
  non-finite step raises NonFiniteError (config.nan_policy) after the
  checkpoints saved so far are complete; no results are written then.
  check_finished=False: the caller has just checked (train does, before building).
  """
  config, data_iter = built.config, built.data_iter
  workdir = os.path.expanduser(workdir)   # '~' as the shell would, in every form it arrives
  done = _finished(workdir, config.total_steps) if check_finished else None
  if done is not None:
    return done
  built.objective.save_or_check(workdir)
  ckpt = checkpoint.make_manager(workdir, every=config.checkpoint.every,
                                 keep=config.checkpoint.keep)
  primary, bar = jax.process_index() == 0, None
  try:
    state, start, init_results, saved = _start(built, ckpt, workdir)
    # The skip count and the current streak of skipped steps resume as they were.
    guard = monitor.Guard(config.nan_policy, config.nan_skip_limit,
                          saved.get("skipped_steps", 0), saved.get("skipped_in_a_row", 0))
    data_state = lambda: {**_data_state(data_iter), "skipped_steps": guard.skipped,
                          "skipped_in_a_row": guard.in_a_row, "data": built.data_id}
    if primary:
      _save_config(config, workdir, start)
      export.save_model_card(workdir, built.tokenizer_spec, built.preprocess,
                             built.architecture)
    step_fn = _step_fn(built)
    writer = MetricWriter(workdir, resume_step=start)
    if init_results:
      writer.write(0, init_results)
    bar = tqdm.tqdm(total=config.total_steps, initial=start, desc="train", unit="step",
                    dynamic_ncols=True, mininterval=1.0, disable=not primary)
    say = lambda msg: bar.write(msg) if primary else None
    speed, last_saved = monitor.Speed(config.batch_size), start
    for step in range(start + 1, config.total_steps + 1):
      local = next(data_iter)
      batch = {k: jax.tree.map(lambda x: jax.make_array_from_process_local_data(
                   built.batch_sharding, x), local[k]) for k in built.objective.batch_keys}
      state, metrics = step_fn(state, batch)
      guard.push(step, metrics)
      for cb in callbacks:
        cb(step, metrics)
      speed.step(state)
      if ckpt.should_save(step):
        guard.flush()
        checkpoint.save(ckpt, step, state, data_state())
        last_saved = step
      if step % config.log_every == 0 or step == config.total_steps:
        guard.flush()
        row = _log_row(metrics, speed, data_iter, guard)
        writer.write(step, row)
        bar.set_postfix(loss=f"{row['loss']:.4f}", ex_s=f"{row['examples_per_sec']:.0f}")
      bar.update(1)
      due = built.evaluator.due(step, config.total_steps) if step != config.total_steps else []
      if due:   # each evaluator on its own schedule (config.evals); the final one runs all
        guard.flush()
        results = built.evaluator(state.variables, due)
        if state.params_ema is not None:   # config.ema_decay: the EMA on the same schedule
          results.update({f"ema_{k}": v
                          for k, v in built.evaluator(state.ema_variables, due).items()})
        writer.write(step, results)
        say(f"mmjax: step {step} eval: {monitor.summary(results)}")
    guard.flush()
    bar.close()
    bar = None
    jax.block_until_ready(state)
    examples_per_sec = speed.overall()
    if last_saved != config.total_steps:
      checkpoint.save(ckpt, config.total_steps, state, data_state(), force=True)
    final = built.evaluator(state.variables)
    if state.params_ema is not None:   # config.ema_decay: the weight EMA evaluated too
      final.update({f"ema_{k}": v for k, v in built.evaluator(state.ema_variables).items()})
    ckpt.wait_until_finished()
  finally:
    if bar is not None:
      bar.close()
    ckpt.close()
    if hasattr(data_iter, "close"):
      data_iter.close()
  results = {**final, **{f"init_{k}": v for k, v in init_results.items()},
             "steps": config.total_steps, "examples_per_sec": examples_per_sec,
             "resumed_from_step": start, "wall_s": time.time() - built.t_start,
             "devices": built.mesh.size, "loss": config.loss}
  if config.nan_policy == "skip":
    results["skipped_steps"] = guard.skipped
  return _write_results(writer, workdir, config.total_steps, final, results)


def _step_fn(built: Run):
  """The jitted train step on the run's shardings, its state donated. Activations are
  batch-sharded over the mesh (mmjax.nn.partitioning); one device: no constraints."""
  mesh = built.mesh if built.mesh.size > 1 else None
  return jax.jit(state_lib.make_train_step(built.objective, built.tx, schedule=built.schedule,
                                           normalize=built.normalize, mesh=mesh,
                                           ema_decay=built.config.ema_decay),
                 in_shardings=(built.state_sharding, built.batch_sharding),
                 out_shardings=(built.state_sharding, None), donate_argnums=0)


def _log_row(metrics: dict, speed: monitor.Speed, data_iter, guard: monitor.Guard) -> dict:
  """A metrics.jsonl row: the step's metrics as floats, examples/s since the last row, the
  input pipeline's counters and (nan_policy 'skip') the steps skipped so far."""
  row = {k: float(v) for k, v in jax.device_get(metrics).items() if k != "finite"}
  row["examples_per_sec"] = speed.interval()
  row.update(_data_metrics(data_iter))
  if guard.policy == "skip":
    row["skipped_steps"] = guard.skipped
  return row


def _write_results(writer: MetricWriter, workdir: str, step: int, final: dict,
                   results: dict) -> dict:
  """The final evaluation's metrics row; on process 0 results.json and curves.png, said in
  three lines. Returns results."""
  writer.write(step, final)
  if jax.process_index() == 0:
    results_path, curves_path = (os.path.join(workdir, n) for n in ("results.json", "curves.png"))
    with open(results_path, "w") as f:
      json.dump(results, f, indent=2)
    plot_curves(writer.path, curves_path)
    print(f"mmjax: done, step {step}: {monitor.summary(final)}\n"
          f"mmjax: results: {results_path}\nmmjax: curves: {curves_path}", flush=True)
  writer.close()
  return results


def train(config: ml_collections.ConfigDict, workdir: str, *,
          callbacks: Sequence[Callable[[int, dict], None]] = ()) -> dict:
  """build + run: trains, evaluates and checkpoints; returns the final results
  (also in workdir/results.json). A finished workdir is checked first: its
  results come back without building the run.

  callbacks: each called as cb(step, metrics) after every step (metrics are
  device arrays; converting them syncs).
  """
  config_lib.validate(config)   # once per launch, as the finished-workdir check
  workdir = os.path.expanduser(workdir)
  done = _finished(workdir, config.total_steps)
  if done is not None:
    return done
  return run(build(config, validate=False), workdir, callbacks=callbacks, check_finished=False)
