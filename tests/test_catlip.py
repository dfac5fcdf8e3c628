"""CatLIP: the caption-label vocabulary, the multi-label BCE loss (float64), the model and its
transfer head, the fixed-budget softmax regression, config validation, and a run through
loop.train (probes, transfer metrics, the vocabulary saved and checked on resume).
Exact resumption of a CatLIP run is in test_resume.py."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.data import catlip_vocab
from mmjax.evaluate.probe import softmax_regression_accuracy
from mmjax.losses import multilabel_bce_loss
from mmjax.models import catlip
from mmjax.train import config as config_lib
from tests.configs import tiny_config
from tests.reference import assert_close

CAPTIONS = [
    "A photo of a Dog, and a dog's ball.",
    "the cat sat on the mat",
    "a dog and a cat",
    "Two dogs: one_cat?",
    "nothing here",
]


# ------------------------------------------------------------ vocabulary

def test_vocabulary_counts_captions_not_words_and_drops_stop_words():
  v = catlip_vocab.build_vocabulary(CAPTIONS)
  # 'a', 'of', 'and', 'the', 'on', 'two', 'one', 'nothing', 'here' are scikit-learn stop words;
  # 's' (from "dog's") is not, nor 'dogs' (no stemming); '_' splits words.
  want = {"dog": 2, "cat": 3, "photo": 1, "ball": 1, "s": 1, "sat": 1, "mat": 1, "dogs": 1}
  assert dict(zip(v.labels, v.counts)) == want
  # Count descending, then the label's text.
  assert v.labels == ("cat", "dog", "ball", "dogs", "mat", "photo", "s", "sat")
  assert not {"a", "the", "and", "one", "two", "of"} & set(v.word_to_label)
  assert "one" in catlip_vocab.stop_word_set("sklearn")
  assert "one" not in catlip_vocab.stop_word_set("sklearn", keep_words=("One",))


def test_min_count_max_labels_keep_words_and_own_stop_words():
  v = catlip_vocab.build_vocabulary(CAPTIONS, min_count=2)
  assert v.labels == ("cat", "dog") and v.counts == (3, 2)
  assert catlip_vocab.build_vocabulary(CAPTIONS, max_labels=3).labels == ("cat", "dog", "ball")
  kept = catlip_vocab.build_vocabulary(CAPTIONS, keep_words=("two", "one"), min_count=1)
  assert {"two", "one"} <= set(kept.labels)
  own = catlip_vocab.build_vocabulary(CAPTIONS, stop_words=("the", "A"), min_count=2)
  assert own.labels == ("cat", "and", "dog") and own.counts == (3, 2, 2)
  with pytest.raises(ValueError, match="no label occurs in >= config.model.catlip.min_count=9"):
    catlip_vocab.build_vocabulary(CAPTIONS, min_count=9)
  with pytest.raises(ValueError, match="config.model.catlip.labels must be one of"):
    catlip_vocab.build_vocabulary(CAPTIONS, labels="nouns")
  with pytest.raises(ValueError, match="config.model.catlip.max_labels must be an int >= 0"):
    catlip_vocab.build_vocabulary(CAPTIONS, max_labels=-1)


def test_vocabulary_is_deterministic_and_saves_and_loads(rng, tmp_path):
  words = ["red", "blue", "green", "cat", "dog", "tree", "car", "the", "a", "of"]
  captions = [" ".join(rng.choice(words, size=rng.integers(1, 6))) for _ in range(200)]
  v = catlip_vocab.build_vocabulary(captions, min_count=3)
  shuffled = [captions[i] for i in rng.permutation(len(captions))]
  assert catlip_vocab.build_vocabulary(shuffled, min_count=3).to_json() == v.to_json()
  path = str(tmp_path / "vocab.json")
  v.save(path)
  assert catlip_vocab.Vocabulary.load(path) == v
  assert json.load(open(path))["labels"] == list(v.labels)
  # Counts of captions, from a plain recount.
  for lab, c in zip(v.labels, v.counts):
    assert c == sum(lab in cap.split() for cap in captions)


def test_a_captions_multi_hot_target_is_the_hand_computed_one():
  v = catlip_vocab.build_vocabulary(CAPTIONS)   # cat dog ball dogs mat photo s sat
  t = v.targets("The DOG chased a cat; the cat ran. Unknown-words too.")
  assert t.dtype == np.float32 and t.shape == (8,)
  np.testing.assert_array_equal(t, [1, 1, 0, 0, 0, 0, 0, 0])
  np.testing.assert_array_equal(v("a mat, a photo's sat"), [0, 0, 0, 0, 1, 1, 1, 1])
  np.testing.assert_array_equal(v("of the"), np.zeros(8))
  assert catlip_vocab.class_label_ids(v, ["cat", "hot dog", "zebra"]) == [[0], [1], []]


class _StubSynset:
  def __init__(self, name):
    self._name = name

  def name(self):
    return self._name


class _StubWordNet:
  """Stands in for nltk's reader: a few words' noun senses (this checks mmjax's mapping,
  not WordNet)."""
  NOUNS = {"dog": ["dog.n.01", "frump.n.01"], "dogs": ["dog.n.01"], "cat": ["cat.n.01"],
           "kitty": ["kitty.n.02", "cat.n.01"], "puppy": ["puppy.n.01"]}

  def synsets(self, word, pos=None):
    assert pos == "n"
    return [_StubSynset(s) for s in self.NOUNS.get(word, [])]


def test_wordnet_labels_are_first_noun_senses_and_without_data_it_is_refused():
  caps = ["a dog and dogs", "the cat ran", "a kitty", "a puppy sat", "dogs barked"]
  v = catlip_vocab.build_vocabulary(caps, labels="wordnet", wordnet=_StubWordNet())
  assert dict(zip(v.labels, v.counts)) == {"dog.n.01": 2, "cat.n.01": 1, "kitty.n.02": 1,
                                             "puppy.n.01": 1}
  assert "ran" not in v.word_to_label and "barked" not in v.word_to_label
  np.testing.assert_array_equal(v("dogs and a dog"), np.eye(4)[v.labels.index("dog.n.01")])
  try:
    from nltk.corpus import wordnet
    wordnet.ensure_loaded()
    pytest.skip("nltk finds WordNet data here; the refusal is for machines without it")
  except (ImportError, LookupError):
    pass
  with pytest.raises(ValueError, match=r"labels='wordnet' needs nltk and its WordNet data"):
    catlip_vocab.build_vocabulary(caps, labels="wordnet")


# ------------------------------------------------------------ loss and model

def _np_bce(z, y):
  """float64 mean BCE with logits and its gradient."""
  z, y = np.asarray(z, np.float64), np.asarray(y, np.float64)
  value = np.mean(np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z))))
  return value, (1 / (1 + np.exp(-z)) - y) / z.size


def test_multilabel_bce_matches_float64_value_and_gradient(rng):
  b, v = 7, 13
  z = rng.normal(size=(b, v)) * 3
  z[0, :3] = [40.0, -40.0, 0.0]                   # saturated logits stay finite
  y = (rng.random((b, v)) < 0.3).astype(np.float64)
  y[1, 2] = 0.25                                  # soft targets too
  want, want_grad = _np_bce(z, y)
  got, grad = jax.value_and_grad(multilabel_bce_loss)(jnp.asarray(z, jnp.float32),
                                                      jnp.asarray(y, jnp.float32))
  assert_close(got, want, dtype=jnp.float32, name="bce")
  assert_close(grad, want_grad, dtype=jnp.float32, name="bce grad")
  with pytest.raises(ValueError, match=r"logits \(7, 13\) and targets \(7, 12\)"):
    multilabel_bce_loss(jnp.zeros((7, 13)), jnp.zeros((7, 12)))


@pytest.fixture(scope="module")
def tiny_catlip():
  model = catlip.Model(image=dict(variant="mu/8", pool_type="gap"), num_labels=11)
  x = jnp.zeros((3, 16, 16, 3))
  return model, jax.eval_shape(model.init, jax.random.PRNGKey(0), x)


def test_logits_are_the_head_on_the_pooled_features(rng, tiny_catlip):
  model, shapes = tiny_catlip
  params = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape) * 0.3, s.dtype), shapes)
  x = jnp.asarray(rng.normal(size=(3, 16, 16, 3)), jnp.float32)
  logits = jax.jit(model.apply)(params, x)
  feats = jax.jit(lambda p, x: model.apply(p, x, method="image_features"))(params, x)
  head = params["params"]["head"]
  assert logits.shape == (3, 11) and logits.dtype == jnp.float32 and feats.shape == (3, 32)   # mu: width 32
  want = (np.asarray(feats, np.float64) @ np.asarray(head["kernel"], np.float64)
          + np.asarray(head["bias"], np.float64))
  assert_close(logits, want, dtype=jnp.float32, name="logits")
  with pytest.raises(ValueError, match="num_labels must be a positive int"):
    catlip.Model(image=dict(variant="mu/8"), num_labels=0).init(jax.random.PRNGKey(0), x)


def test_transfer_head_is_the_mean_of_the_class_names_rows(rng, data_dir):
  from mmjax import objectives
  vocab = catlip_vocab.build_vocabulary(CAPTIONS)   # cat dog ball dogs mat photo s sat
  obj = objectives.catlip.CatLIP(tiny_config(data_dir, loss="catlip"), objectives.Context(),
                                 vocab=vocab)
  shapes = jax.eval_shape(obj.init, jax.random.PRNGKey(0), {"image": jnp.zeros((1, 32, 32, 3))})
  params = jax.tree.map(lambda s: np.asarray(rng.normal(size=s.shape), s.dtype), shapes)
  k, bias = params["head"]["kernel"], params["head"]["bias"]
  assert k.shape[1] == 8 and bias.shape == (8,)
  w, b, found = obj.transfer_head({"params": params}, ["Dog", "cat mat", "zebra"])
  assert found == 2 and w.shape == (k.shape[0], 3)
  np.testing.assert_allclose(w[:, 0], k[:, 1])
  np.testing.assert_allclose(w[:, 1], (k[:, 0].astype(np.float64) + k[:, 4]) / 2, rtol=1e-6)
  np.testing.assert_array_equal(w[:, 2], 0)
  np.testing.assert_allclose(b, [bias[1], (bias[0] + np.float64(bias[4])) / 2, 0], rtol=1e-6)


def test_softmax_regression_from_a_start_and_from_zeros(rng):
  centers = rng.normal(size=(4, 12)) * 3
  y_tr, y_te = rng.integers(0, 4, 120), rng.integers(0, 4, 80)
  x_tr, x_te = centers[y_tr] + rng.normal(size=(120, 12)), centers[y_te] + rng.normal(size=(80, 12))
  # steps=0: the start's own top-1; zeros predict class 0 everywhere.
  w0 = centers.T
  b0 = -0.5 * (centers ** 2).sum(1)
  start = np.mean((x_te @ w0 + b0).argmax(1) == y_te)
  assert softmax_regression_accuracy(x_tr, y_tr, x_te, y_te, w0=w0, b0=b0, steps=0) == start
  assert softmax_regression_accuracy(x_tr, y_tr, x_te, y_te, steps=0) == np.mean(y_te == 0)
  assert softmax_regression_accuracy(x_tr, y_tr, x_te, y_te, steps=200) > 0.9
  assert softmax_regression_accuracy(x_tr, y_tr, x_te, y_te, w0=w0, b0=b0, shots=3) > 0.9
  with pytest.raises(ValueError, match=r"w0 \(12, 3\)"):
    softmax_regression_accuracy(x_tr, y_tr, x_te, y_te, w0=w0[:, :3], b0=b0[:3])


# ------------------------------------------------------------ config and the loop

@pytest.mark.parametrize("key, value, match", [
    ("model.catlip.labels", "nouns", "config.model.catlip.labels must be one of"),
    ("model.catlip.stop_words", "nltk", "config.model.catlip.stop_words must be 'sklearn' or"),
    ("model.catlip.min_count", 0, "config.model.catlip.min_count must be an int >= 1"),
    ("model.catlip.max_labels", -2, "config.model.catlip.max_labels must be an int >= 0"),
    ("model.catlip.keep_words", ("ok", 3), "config.model.catlip.keep_words must be a tuple"),
    ("data.name", "wds", "config.loss='catlip' reads its caption labels through the TFDS"),
    ("accum_steps", 2, "config.accum_steps must be 1 for config.loss='catlip'"),
])
def test_catlip_config_errors_name_the_field(key, value, match):
  c = tiny_config("/nonexistent", loss="catlip", **{key: value})
  if key == "data.name":
    c.data.shards = c.data.eval_shards = "/x/{0..1}.tar"
  with pytest.raises(ValueError, match=match):
    config_lib.validate(c)


def test_catlip_run_probes_transfer_and_a_vocabulary_kept_with_the_run(data_dir, tmp_path):
  """A 3-step run through loop.train: its batches hold the captions' multi-hot targets, its
  results the probes and transfer metrics (also at init), its workdir the vocabulary; a
  resumption whose config.model.catlip builds another vocabulary is refused."""
  from mmjax.data.digits import CLASS_NAMES
  from mmjax.train import loop
  keys = {"evaluate.probes": True, "evaluate.probe_train_examples": 200,
          "evaluate.at_init": True, "model.catlip.keep_words": tuple(CLASS_NAMES),
          "model.catlip.min_count": 3, "model.catlip.max_labels": 30,
          "model.image.pool_type": "gap", "total_steps": 3}
  workdir = str(tmp_path / "run")
  built = loop.build(tiny_config(data_dir, loss="catlip", **keys))
  vocab = built.objective.vocab
  assert len(vocab) == 30 and vocab.settings["min_count"] == 3
  assert set(CLASS_NAMES) <= set(vocab.labels)          # keep_words reached the vocabulary
  batch = next(built.data_iter)
  assert batch["targets"].shape == (16, 30) and batch["targets"].dtype == np.float32
  assert set(np.unique(batch["targets"])) <= {0.0, 1.0} and (batch["targets"].sum(1) >= 1).all()
  # Each row is the vocabulary's target of that example's caption (read back from its tokens).
  texts = built.evaluator.tok.decode(batch["text"])
  assert all(t and t == t.strip() for t in texts)
  np.testing.assert_array_equal(batch["targets"], np.stack([vocab(t) for t in texts]))
  built.data_iter.close()
  results = loop.train(tiny_config(data_dir, loss="catlip", **keys), workdir)
  for k in ("linear_probe_top1", "linear_probe_10shot_top1", "knn_top1", "transfer_top1",
            "transfer_10shot_top1", "transfer_10shot_from_zero_top1"):
    assert 0.0 <= results[k] <= 1.0 and 0.0 <= results[f"init_{k}"] <= 1.0, k
  assert results["transfer_classes_found"] == 10
  saved = catlip_vocab.Vocabulary.load(os.path.join(workdir, "catlip_vocab.json"))
  assert saved == vocab
  more = tiny_config(data_dir, loss="catlip", **{**keys, "total_steps": 5,
                                                 "model.catlip.max_labels": 20})
  with pytest.raises(ValueError, match="config.model.catlip: the label vocabulary built now "
                                       r"\(20 labels\) differs from the one in"):
    loop.train(more, workdir)
