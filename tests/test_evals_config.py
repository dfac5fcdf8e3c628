"""config.evals (big_vision's): evaluators named by type, each on its own schedule, with its
own keyword arguments; bad entries refused with one line naming config.evals.<name>.<field>;
the registry open to a type written here; the evaluation library grep-clean of objective and
data-format names."""

import json
import os
import re

import ml_collections
import numpy as np
import pytest

from mmjax import evaluate
from mmjax.evaluate import evaluators
from mmjax.objectives import Objective
from tests.configs import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Towers(Objective):
  """Fixed maps, no params: an image embeds as its unit-normed flattened pixels, a token row
  as the unit vector of its first id."""

  def features(self, variables, image):
    import jax.numpy as jnp
    z = jnp.reshape(image, (image.shape[0], -1))
    return z / jnp.linalg.norm(z, axis=-1, keepdims=True)

  def towers(self):
    import jax
    return self.features, lambda v, t: jax.nn.one_hot(t[:, 0], 12)


def _settings(**kw):
  return ml_collections.ConfigDict({**dict(batch_size=4, retrieval_match="pair", knn_k=3,
                                           probe_shots=(), every=5), **kw})


def _arrays(rng, n=10):
  labels = rng.integers(0, 3, n).astype(np.int32)
  image = np.zeros((n, 2, 2, 3), np.float32)
  image.reshape(n, -1)[np.arange(n), labels] = 1.0
  image += 0.01 * rng.random(image.shape).astype(np.float32)
  return {"image": image, "text": np.stack([labels, labels], 1), "label": labels}


def test_due_follows_each_evaluators_every_and_the_final_step_runs_all(rng):
  """every=2 and every=3 (and 0: the end only) over 12 steps: each is due exactly at its
  multiples, none at other steps, all at the final step; the standard set takes every from
  config.evaluate.every."""
  evals = {"zs": dict(type="zeroshot", every=2), "r": dict(type="retrieval", every=3),
           "late": dict(type="retrieval", every=0)}
  ev = evaluate.Evaluator(_Towers(), _settings(), _arrays(rng), tokenizer=None,
                          zeroshot=(["a", "b", "c"], ["{}"]), evals=evals)
  due = {s: ev.due(s, 12) for s in range(1, 13)}
  assert {s for s, d in due.items() if "zs" in d} == {2, 4, 6, 8, 10, 12}
  assert {s for s, d in due.items() if "r" in d} == {3, 6, 9, 12}
  assert {s for s, d in due.items() if "late" in d} == {12}
  assert due[1] == [] and due[12] == ["zs", "r", "late"]
  standard = evaluate.Evaluator(_Towers(), _settings(), _arrays(rng))
  assert list(standard.evaluators) == ["retrieval"]   # no labels named, no probe split
  assert [s for s in range(1, 13) if standard.due(s, 12)] == [5, 10, 12]


def test_an_entrys_keywords_override_config_evaluate_for_it_alone(rng):
  """Two retrieval evaluators, 'pair' and 'label' matching: their metrics are those of the
  standard evaluator with that retrieval_match; run only the named ones."""
  arrays = _arrays(rng)
  # Each caption its own (its second token), embedded by its class (the first): 'pair' finds
  # an image's own caption among its class's ties, 'label' takes any of them.
  arrays["text"][:, 1] = np.arange(len(arrays["text"]))
  evals = {"a": dict(type="retrieval"), "b": dict(type="retrieval", retrieval_match="label",
                                                   batch_size=3)}
  ev = evaluate.Evaluator(_Towers(), _settings(), arrays, evals=evals)
  outs = {}
  for name, match in (("a", "pair"), ("b", "label")):
    want = evaluate.Evaluator(_Towers(), _settings(retrieval_match=match), arrays)({})
    outs[name] = ev({}, [name])
    assert outs[name] == want, name
  assert outs["b"]["retrieval_i2t_r1"] == 1.0 > outs["a"]["retrieval_i2t_r1"]
  assert ev.every == {"a": 5, "b": 5}


@pytest.mark.parametrize("entry, message", [
    (dict(type="nope", every=1), r"config\.evals\.x\.type must be one of \('zeroshot'"),
    (dict(every=1), r"config\.evals\.x\.type must be one of"),
    (dict(type="zeroshot", every=-1), r"config\.evals\.x\.every must be a non-negative int"),
    (dict(type="zeroshot", every=2.0), r"config\.evals\.x\.every must be a non-negative int"),
    (dict(type="zeroshot", every=True), r"config\.evals\.x\.every must be"),
    (dict(type="zeroshot", knn_k=3), r"config\.evals\.x\.knn_k: not an option of "
                                     r"type='zeroshot'"),
    (dict(type="probe", knn_k=0), r"config\.evals\.x\.knn_k must be a positive int"),
    (dict(type="retrieval", retrieval_match="class"), r"config\.evals\.x\.retrieval_match "
                                                      r"must be 'pair' or 'label'"),
    (dict(type="zeroshot", templates=("no slot",)), r"config\.evals\.x\.templates must be"),
    ("zeroshot", r"config\.evals\.x must be a dict"),
])
def test_bad_entries_are_one_line_naming_the_field(entry, message):
  from mmjax.train import config as config_lib
  c = config_lib.defaults()
  c.evals.x = entry
  with pytest.raises(ValueError, match=message) as e:
    config_lib.validate(c)
  assert "\n" not in str(e.value)


def test_an_evaluator_the_objective_cannot_run_names_the_entry(rng):
  """An image-only objective asked for zero-shot, one without a captioner for captioning:
  ValueError naming config.evals.<name>.type and why; the standard set just leaves them out."""
  class ImageOnly(_Towers):
    def towers(self):
      return None

  for entry, why in ((dict(type="zeroshot"), "no image and text towers"),
                     (dict(type="captioning"), "generates no captions")):
    with pytest.raises(ValueError, match=rf"config\.evals\.e\.type='{entry['type']}': .*{why}"):
      evaluate.Evaluator(ImageOnly(), _settings(), _arrays(rng), evals={"e": entry})
  assert evaluate.Evaluator(ImageOnly(), _settings(), _arrays(rng)).evaluators == {}


def test_a_new_evaluator_type_registered_in_a_test_file(rng):
  """A type registered here is a config.evals type like the built-in ones; its run gets the
  variables the evaluator is called with, untouched."""
  seen = []

  @evaluators.register("mean_pixel_for_test")
  class MeanPixel:
    options = ("batch_size",)

    def __init__(self, images):
      self.images = images

    @classmethod
    def build(cls, inputs, s):
      return cls(inputs.embedded(inputs.eval_split, lambda v, x: x.mean((1, 2, 3)),
                                 s["batch_size"]))

    def run(self, variables):
      seen.append(variables)
      return {"mean_pixel": float(self.images.all(variables)[0].mean())}

  try:
    arrays = _arrays(rng)
    marker = {"params": object()}
    evaluate.check_evals({"m": dict(type="mean_pixel_for_test", every=1, batch_size=3)})
    ev = evaluate.Evaluator(_Towers(), _settings(), arrays,
                            evals={"m": dict(type="mean_pixel_for_test", batch_size=3)})
    assert ev(marker)["mean_pixel"] == pytest.approx(arrays["image"].mean(), rel=1e-6)
    assert seen == [marker] and seen[0] is marker
  finally:
    evaluators._REGISTRY.pop("mean_pixel_for_test")


def test_evaluation_and_training_name_no_objective_and_no_data_format():
  """mmjax/evaluate and mmjax/train know no objective or data format by name (metric names
  such as itm_retrieval_* aside, none contains these words)."""
  words = re.compile(r"\b(clip|siglip|mae|moco|catlip|coca|wds)\b", re.IGNORECASE)
  found = []
  for package in ("evaluate",):
    d = os.path.join(ROOT, "mmjax", package)
    for name in sorted(os.listdir(d)):
      if name.endswith(".py"):
        with open(os.path.join(d, name)) as f:
          found += [f"{package}/{name}:{i}" for i, line in enumerate(f, 1) if words.search(line)]
  assert not found, found


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(r) for r in f if r.strip()]


def test_two_evaluators_on_their_own_schedules_through_the_trainer(data_dir, tmp_path):
  """config.evals zero-shot every 2 and retrieval every 3 over 6 steps: zeroshot_* rows at
  steps 2, 4, 6, retrieval_* rows at 3 and 6 and nowhere else; results.json has both and
  nothing of the evaluators not asked for (probes, the pair-match retrieval)."""
  from mmjax.train import loop
  config = tiny_config(data_dir, total_steps=6, **{"evaluate.every": 1})
  config.evals.zs = dict(type="zeroshot", every=2, templates=("a {}",))
  config.evals.ret = dict(type="retrieval", every=3)
  results = loop.train(config, str(tmp_path))
  rows = _rows(str(tmp_path))
  steps = lambda key: sorted(r["step"] for r in rows if key in r)
  assert steps("zeroshot_top1") == [2, 4, 6]
  assert steps("retrieval_i2t_r1") == [3, 6]
  assert not any("linear_probe_top1" in r or "knn_top1" in r for r in rows)
  assert {"zeroshot_top1", "zeroshot_top5", "retrieval_i2t_r1", "retrieval_t2i_r10"} <= set(
      results)
