"""The evaluators of a run, each on its own schedule (big_vision's `config.evals`).

  config.evals.zs = dict(type="zeroshot", every=500)
  config.evals.probe = dict(type="probe", every=2000, probe_shots=(5, 10))

Each entry names an evaluator type (mmjax.evaluate.evaluators: zeroshot, retrieval, probe,
captioning, rerank, refexp, dense_probe, audio), `every` (steps; 0: only at the end; default
config.evaluate.every) and keyword arguments that override config.evaluate's keys of the same name for that evaluator
alone (the type's `options`). Empty config.evals: the standard set, every one that applies to
the objective and the data, each every config.evaluate.every.

An entry with `dataset` evaluates on that set instead of the run's eval split (a list of
evaluation sets, each with its own schedule and templates), its metrics named
'<entry>/<metric>':

  config.evals.captions = dict(type="retrieval", dataset="folder:/data/captions", every=1000)
  config.evals.in1k = dict(type="zeroshot", dataset="tfds:imagenet2012", split="validation",
                           templates="openai", limit=10_000)

`dataset` is a spec the caller opens (the trainer: mmjax.data.eval_data.open_eval_set's, the
same as `experiments.evaluate --dataset`), `split` its split (default 'test'), `limit` its
first N examples; `templates` a tuple or a load_templates spec ('openai', 'simple', a file).
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Sequence

from mmjax.data import prompts
from mmjax.evaluate import evaluators as registry
from mmjax.evaluate.streaming import Split

# An entry's own evaluation set (any type): its spec, split and first N examples.
DATASET_KEYS = ("dataset", "split", "limit")
# The standard set, in the order its metrics are computed.
STANDARD = ("probe", "zeroshot", "retrieval", "captioning", "rerank", "refexp", "dense_probe",
            "audio")
_OPTION_DEFAULTS = dict(batch_size=256, retrieval_match="pair", knn_k=20, probe_shots=(),
                        templates=None)


def _is_count(x, low: int) -> bool:
  return isinstance(x, int) and not isinstance(x, bool) and x >= low


def _check_option(where: str, key: str, value) -> None:
  """ValueError naming where.key for a value its evaluators cannot take."""
  ok = {"batch_size": lambda v: _is_count(v, 1), "knn_k": lambda v: _is_count(v, 1),
        "retrieval_match": lambda v: v in ("pair", "label"),
        "probe_shots": lambda v: isinstance(v, (tuple, list)) and all(_is_count(k, 1) for k in v),
        "templates": lambda v: v is None or (isinstance(v, str) and v.strip()) or (
            isinstance(v, Mapping) and v) or (
            isinstance(v, (tuple, list)) and v and all(
                prompts.template_problem(t) is None for t in v)),
        "dataset": lambda v: isinstance(v, str) and ":" in v and v == v.strip(),
        "split": lambda v: isinstance(v, str) and v and v == v.strip(),
        "limit": lambda v: v is None or _is_count(v, 1)}[key]
  if not ok(value):
    want = {"batch_size": "a positive int", "knn_k": "a positive int",
            "retrieval_match": "'pair' or 'label'", "probe_shots": "a tuple of positive ints",
            "templates": "None, a tuple of strings each naming the class as '{c}' or '{}', or "
                         "a templates spec ('openai', 'simple', a file)",
            "dataset": "a dataset spec ('<kind>:<name or path>', experiments.evaluate's)",
            "split": "a split name", "limit": "None or a positive int"}[key]
    raise ValueError(f"{where}.{key} must be {want}; got {value!r}")


def check_evals(evals: Mapping | None) -> None:
  """Raises ValueError naming config.evals.<name>.<field> for an entry that is not a dict,
  an unknown type, a bad every, or a keyword its type does not take or a bad value of one."""
  for name, spec in (evals or {}).items():
    where = f"config.evals.{name}"
    if not isinstance(spec, Mapping) and not hasattr(spec, "items"):
      raise ValueError(f"{where} must be a dict(type=..., every=..., ...); got {spec!r}")
    spec = dict(spec.items())
    if spec.get("type") not in registry.names():
      raise ValueError(f"{where}.type must be one of {registry.names()}; "
                       f"got {spec.get('type')!r}")
    if "every" in spec and not _is_count(spec["every"], 0):
      raise ValueError(f"{where}.every must be a non-negative int (steps; 0: only at the "
                       f"end); got {spec['every']!r}")
    cls = registry.get(spec["type"])
    for key, value in spec.items():
      if key in ("type", "every"):
        continue
      if key not in cls.options + DATASET_KEYS:
        raise ValueError(f"{where}.{key}: not an option of type={spec['type']!r}; its "
                         f"options: {('every',) + cls.options + DATASET_KEYS}")
      _check_option(where, key, value)
    if "dataset" not in spec and ("split" in spec or "limit" in spec):
      raise ValueError(f"{where}: split and limit choose part of a `dataset`, and the entry "
                       "names none (the run's eval split is config.data's)")


def wants(evals: Mapping | None, settings, kind: str) -> bool:
  """Whether a run's evaluations may include `kind` (the standard set: the probes only
  when settings.probes is set)."""
  if evals:
    return any(dict(s.items()).get("type") == kind for s in evals.values())
  return bool(getattr(settings, "probes", True)) if kind == "probe" else True


class EvalSet(NamedTuple):
  """An entry's own evaluation set (config.evals.<name>.dataset), opened by the caller."""
  split: Split                      # read in fixed-size batches: 'image', 'label' or 'text'
  class_names: list[str] | None     # classification sets
  templates: Any = None             # a list of templates or per-class prompts (a dict)


class Evaluator:
  """The evaluators of a run over its eval split, each on its own schedule.

  Args:
    objective: an mmjax.objectives.Objective (features, towers, transfer_head, captioner,
      reranker); its hooks get the variables the evaluator is called with, untouched.
    settings: config.evaluate (batch_size, retrieval_match, knn_k, probe_shots, every).
    arrays: the eval split, {'image' [n, S, S, 3], 'text' [n, L][, 'label' [n]]}; 'image'
      may be lazy (mmjax.data.pipeline.EvalImages: decoded one batch at a time).
    tokenizer, text_len: encode the zero-shot prompts.
    zeroshot: (class_names, templates), or None (no zero-shot in the standard set).
    probe_arrays: the probes' train split ({'image', 'label'}, 'image' maybe lazy), or None.
    class_names: the labels' names (the transfer head's classes; default zeroshot's).
    evals: config.evals (see the module docstring); empty: the standard set.
    datasets: {entry name: EvalSet} for the entries with a `dataset` (the same EvalSet object
      for entries on the same set: its images are embedded once per round); their templates
      come resolved (a string spec loaded by the caller).

  evaluator(variables) runs them all (or `names`) and returns their metrics;
  due(step, total_steps) says which are due after a step.
  """

  def __init__(self, objective: Any, settings, arrays: dict, *, tokenizer=None,
               text_len: int = 0, zeroshot: tuple[Sequence[str], Sequence[str]] | None = None,
               probe_arrays: dict | None = None, class_names: Sequence[str] | None = None,
               evals: Mapping | None = None, datasets: Mapping[str, EvalSet] | None = None):
    self.arrays, self.probe, self.zeroshot = arrays, probe_arrays, zeroshot
    self.tok, self.text_len = tokenizer, text_len
    names = list(class_names) if class_names else (list(zeroshot[0]) if zeroshot else None)
    self.inputs = registry.Inputs(
        objective, Split.from_arrays(arrays),
        None if probe_arrays is None else Split.from_arrays(probe_arrays),
        tokenizer=tokenizer, text_len=text_len, class_names=names,
        templates=list(zeroshot[1]) if zeroshot else None)
    check_evals(evals)
    every = getattr(settings, "every", 0)
    self.evaluators, self.every, self.prefix, own = {}, {}, {}, {}
    datasets = dict(datasets or {})
    if evals:
      for name, spec in evals.items():
        spec = dict(spec.items())
        if "dataset" in spec and name not in datasets:
          raise ValueError(f"config.evals.{name}.dataset={spec['dataset']!r}: not opened "
                           "(the caller passes datasets={name: EvalSet})")
        inputs = self.inputs
        if name in datasets:   # its own set: one Inputs per set, sharing the round's memo
          ds = datasets[name]
          if id(ds) not in own:
            own[id(ds)] = registry.Inputs(objective, ds.split, tokenizer=tokenizer,
                                          text_len=text_len, class_names=ds.class_names,
                                          templates=ds.templates, memo=self.inputs.memo)
          inputs = own[id(ds)]
        s = self._settings(settings, spec)
        if name in datasets and "retrieval_match" not in spec:
          s["retrieval_match"] = "pair"   # a set's captions go with their own images
        try:
          self._add(name, spec["type"], s, spec.get("every", every), inputs)
        except registry.NotApplicable as e:
          where = f" on dataset={spec['dataset']!r}" if name in datasets else ""
          raise ValueError(f"config.evals.{name}.type={spec['type']!r}{where}: {e}") from None
        self.prefix[name] = f"{name}/" if name in datasets else ""
    else:
      for kind in STANDARD:
        if kind == "zeroshot" and zeroshot is None:
          continue
        try:
          self._add(kind, kind, self._settings(settings, {}), every, self.inputs)
        except registry.NotApplicable:
          pass
        self.prefix[kind] = ""

  @staticmethod
  def _settings(settings, spec: dict) -> dict:
    """config.evaluate's evaluator keys, overridden by the entry's."""
    s = {k: getattr(settings, k, v) for k, v in _OPTION_DEFAULTS.items()}
    s["templates"] = None   # config.evaluate.templates is in the inputs' templates already
    s.update({k: v for k, v in spec.items() if k not in ("type", "every") + DATASET_KEYS})
    return s

  def _add(self, name: str, kind: str, s: dict, every: int, inputs: registry.Inputs) -> None:
    self.evaluators[name] = registry.get(kind).build(inputs, s)
    self.every[name] = every

  def due(self, step: int, total_steps: int) -> list[str]:
    """The evaluators due after `step`: those whose every divides it (the final step's
    evaluation runs them all)."""
    if step == total_steps:
      return list(self.evaluators)
    return [n for n, e in self.every.items() if e and step % e == 0]

  def __call__(self, variables, names: Sequence[str] | None = None) -> dict[str, float]:
    """The metrics of the evaluators `names` (default: all) on `variables`; the eval split
    is embedded once for all of them."""
    out = {}
    with self.inputs.memo.round():
      for name in self.evaluators if names is None else names:
        out.update({self.prefix[name] + k: v
                    for k, v in self.evaluators[name].run(variables).items()})
    return out
