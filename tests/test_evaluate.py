"""Zero-shot and retrieval metrics against brute-force loops on fresh random data; the Evaluator
(templates, duplicate captions, the batching pad) against float64 loops through fake towers; the
linear probe and kNN against scikit-learn called directly."""

import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.preprocessing import StandardScaler

from mmjax.evaluate import (class_embeddings, knn_accuracy, linear_probe_accuracy,
                            retrieval_recall, zeroshot_accuracy)
from mmjax.objectives import Objective
from tests.reference import assert_close


def _unit(rng, *shape):
  x = rng.normal(size=shape)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_class_embeddings_average_templates_then_renormalise(rng):
  table = {}

  def encode(strings):
    for s in strings:
      table.setdefault(s, _unit(rng, 6))
    return np.stack([table[s] for s in strings])

  names, templates = ["cat", "dog", "eel"], ["a {}.", "the {} here", "{}"]
  emb = class_embeddings(encode, names, templates)
  for c, name in enumerate(names):
    mean = np.mean([table[t.format(name)] for t in templates], axis=0)
    np.testing.assert_allclose(emb[c], mean / np.linalg.norm(mean), rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="templates"):
    class_embeddings(encode, names, ["no slot"])


def test_zeroshot_accuracy_matches_loop(rng):
  img, cls = _unit(rng, 50, 8), _unit(rng, 7, 8)
  labels = rng.integers(0, 7, size=50)
  acc = zeroshot_accuracy(img, cls, labels, ks=(1, 3))
  # The loop ranks the float32 scores zeroshot_accuracy ranks (a float64 loop can order a
  # near-tie the other way), with its tie rule: rank = other classes scoring at least as high.
  s = img.astype(np.float32) @ cls.astype(np.float32).T
  rank = [sum(s[i, c] >= s[i, y] for c in range(7) if c != y) for i, y in enumerate(labels)]
  top1, top3 = np.mean([r < 1 for r in rank]), np.mean([r < 3 for r in rank])
  assert acc == pytest.approx({"top1": top1, "top3": top3}, abs=1e-12)
  assert 0 < top1 < top3 < 1, (top1, top3)   # the ks differ on these data
  perfect = zeroshot_accuracy(cls[labels], cls, labels)
  assert perfect["top1"] == 1.0


# Hand-made scores (the image embeddings, against identity class embeddings): 6 images of
# classes 0, 0, 1, 2, 2, 2 (class 3 absent), row 2 tied between its class 1 and class 0.
# Ranks (other classes scoring >= the true one): 0, 1, 1, 1, 0, 3.
_HAND_SCORES = np.array([[0.9, 0.1, 0.0, 0.5],
                         [0.2, 0.1, 0.0, 0.7],
                         [0.3, 0.3, 0.1, 0.0],
                         [0.0, 0.1, 0.2, 0.9],
                         [0.1, 0.0, 0.8, 0.3],
                         [0.5, 0.6, 0.1, 0.7]], np.float32)
_HAND_LABELS = np.array([0, 0, 1, 2, 2, 2])


def test_zeroshot_exact_values_ties_and_an_absent_class():
  """Hand-counted top-k and mean per-class recall (over the classes that occur: class 0 1/2,
  class 1 0/1 (its tie counts against it), class 2 1/3); a collapsed model (every class
  scored alike) ranks every true class last."""
  from mmjax.evaluate.zeroshot import ZeroShotCounts
  acc = zeroshot_accuracy(_HAND_SCORES, np.eye(4, dtype=np.float32), _HAND_LABELS, ks=(1, 2, 3))
  assert acc == {"top1": 2 / 6, "top2": 5 / 6, "top3": 5 / 6}
  counts = ZeroShotCounts(4, ks=(1, 3, 5))   # 5 > 4 classes: not reported
  counts.update(_HAND_SCORES, _HAND_LABELS)
  assert counts.result() == pytest.approx({"acc1": 2 / 6, "acc3": 5 / 6, "n": 6,
                                           "mean_per_class_recall": (1 / 2 + 0 + 1 / 3) / 3},
                                          abs=1e-12)
  flat = np.zeros((6, 4), np.float32)
  assert zeroshot_accuracy(flat, np.eye(4, dtype=np.float32), _HAND_LABELS, ks=(1, 3)) == {
      "top1": 0.0, "top3": 0.0}
  collapsed = ZeroShotCounts(4, ks=(1, 3))
  collapsed.update(flat, _HAND_LABELS)
  assert collapsed.result() == {"acc1": 0.0, "acc3": 0.0, "mean_per_class_recall": 0.0, "n": 6}


def test_zeroshot_counts_match_sklearn_with_absent_and_single_example_classes(rng):
  """ZeroShotCounts over uneven batches with padding rows (valid=False, labelled with classes
  the valid rows never have) == scikit-learn on the valid rows: accuracy_score, top_k_accuracy_score
  (k=5) and balanced_accuracy_score (CLIP_benchmark's mean per-class recall: the mean over the
  classes that occur, also when the model predicts others). 12 classes, 3 absent from the
  evaluated subset, 2 with one example."""
  import warnings
  from sklearn.metrics import accuracy_score, balanced_accuracy_score, top_k_accuracy_score
  from mmjax.evaluate.zeroshot import ZeroShotCounts
  c, absent, single = 12, [2, 7, 11], [0, 5]
  many = [k for k in range(c) if k not in absent + single]
  labels = rng.permutation(np.r_[single, rng.choice(many, 88), many]).astype(np.int64)
  n = len(labels)
  scores = rng.normal(size=(n, c)).astype(np.float32)
  scores[np.arange(n), labels] += 1.2          # informative, far from perfect
  scores[:, absent] += 0.8                     # the absent classes are predicted now and then
  counts, lo = ZeroShotCounts(c), 0
  for size in (13, 1, 40, n):                  # the last batch takes the rest
    hi = min(n, lo + size)
    pad = int(rng.integers(1, 4))
    pad_labels = rng.choice(absent, pad)
    pad_scores = rng.normal(size=(pad, c)).astype(np.float32)
    pad_scores[np.arange(pad), pad_labels] += 5.0   # padding rows would be hits of absent classes
    counts.update(np.concatenate([scores[lo:hi], pad_scores]),
                  np.concatenate([labels[lo:hi], pad_labels]),
                  valid=np.arange(hi - lo + pad) < hi - lo)
    lo = hi
  assert lo == n
  pred = scores.argmax(1)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")   # "y_pred contains classes not in y_true": intended here
    balanced = balanced_accuracy_score(labels, pred)
  want = {"acc1": accuracy_score(labels, pred), "n": n, "mean_per_class_recall": balanced,
          "acc5": top_k_accuracy_score(labels, scores, k=5, labels=np.arange(c))}
  assert counts.result() == pytest.approx(want, abs=1e-12)
  # The data tell the averages apart: sklearn's (over the true classes) differs from the mean
  # over the predicted classes, over all 12 and from the plain accuracy.
  recall = {k: np.mean(pred[labels == k] == k) for k in np.unique(labels)}
  assert set(pred) - set(labels) and {recall[k] for k in single} <= {0.0, 1.0}
  predicted = np.mean([np.mean(pred[labels == k] == k) if k in recall else 0.0
                       for k in np.unique(pred)])
  everyone = sum(recall.values()) / c
  assert min(abs(balanced - v) for v in (predicted, everyone, want["acc1"])) > 1e-3


def test_retrieval_recall_matches_loop(rng):
  n = 40
  img, txt = _unit(rng, n, 8), _unit(rng, n, 8)
  txt[:20] = img[:20] + 0.3 * _unit(rng, 20, 8)  # half the pairs findable
  r = retrieval_recall(img, txt, ks=(1, 5))
  # The loop ranks the float32 scores retrieval_recall ranks (a float64 loop can order a
  # near-tie the other way), with its tie rule: rank = wrong candidates scoring >= the right one.
  s = img.astype(np.float32) @ txt.astype(np.float32).T
  for k in (1, 5):
    i2t = np.mean([sum(s[i, j] >= s[i, i] for j in range(n) if j != i) < k for i in range(n)])
    t2i = np.mean([sum(s[i, j] >= s[j, j] for i in range(n) if i != j) < k for j in range(n)])
    assert r[f"i2t_r{k}"] == pytest.approx(i2t)
    assert r[f"t2i_r{k}"] == pytest.approx(t2i)
  # The data is informative: the findable half is found, the rest mostly not. Over 100,000
  # seeds, 40 * i2t_r1 ranged 13..25 (mean 19.7; below 16, the old bound of 0.4, on 28 seeds).
  # A findable pair is missed with p = 0.037, another pair hit by chance with p = 0.022, and
  # the tails are no heavier than binomial (45 seeds, not 67, missed >= 5 of 20). So < 12 needs
  # >= 9 of 20 misses (1.5e-8) and > 30 needs >= 10 of 20 chance hits (4e-12); a broken
  # ranking sits near 1 in 40.
  assert 12 <= round(n * r["i2t_r1"]) <= 30, r


def test_retrieval_with_label_ids_counts_any_same_class_text(rng):
  labels = rng.integers(0, 4, size=30)
  centers = _unit(rng, 4, 8)
  img = centers[labels] + 0.01 * rng.normal(size=(30, 8))
  txt = centers[labels][::-1] + 0.01 * rng.normal(size=(30, 8))
  ids = labels[::-1]
  r = retrieval_recall(img, txt, img_ids=labels, txt_ids=ids, ks=(1,))
  assert r == {"i2t_r1": 1.0, "t2i_r1": 1.0}
  # Exact-pair matching on the same embeddings: the float32 loop with the pessimistic tie rule.
  s = img.astype(np.float32) @ txt.astype(np.float32).T
  pair = np.eye(30, dtype=bool)
  assert retrieval_recall(img, txt, ks=(1, 5)) == pytest.approx(
      {"i2t_r1": _ref_recall(s, pair, 1), "t2i_r1": _ref_recall(s.T, pair, 1),
       "i2t_r5": _ref_recall(s, pair, 5), "t2i_r5": _ref_recall(s.T, pair, 5)}, abs=1e-12)
  # Noisier class-level retrieval, not perfect: the loop with label ids.
  txt = centers[labels][::-1] + 0.6 * rng.normal(size=(30, 8))
  s, same = img.astype(np.float32) @ txt.astype(np.float32).T, labels[:, None] == ids[None, :]
  r = retrieval_recall(img, txt, img_ids=labels, txt_ids=ids, ks=(1, 2))
  want = {"i2t_r1": _ref_recall(s, same, 1), "t2i_r1": _ref_recall(s.T, same.T, 1),
          "i2t_r2": _ref_recall(s, same, 2), "t2i_r2": _ref_recall(s.T, same.T, 2)}
  assert r == pytest.approx(want, abs=1e-12)


def test_retrieval_exact_values_with_ties_and_several_correct_texts():
  """Hand-counted recall@k: image 0's correct text ties with a wrong one (counts as a miss at
  k=1), image 1 has two correct texts (the better one counts), text 2 shares image 1's id."""
  scores = np.array([[0.9, 0.2, 0.9, 0.1],
                     [0.1, 0.3, 0.5, 0.4],
                     [0.6, 0.7, 0.8, 0.5]], np.float32)
  r = retrieval_recall(scores, np.eye(4, dtype=np.float32), img_ids=[0, 1, 2],
                       txt_ids=[0, 1, 1, 2], ks=(1, 2, 3))
  # i2t ranks 1, 0, 3; t2i ranks 0, 1, 2, 0.
  assert r == {"i2t_r1": 1 / 3, "i2t_r2": 2 / 3, "i2t_r3": 2 / 3,
               "t2i_r1": 2 / 4, "t2i_r2": 3 / 4, "t2i_r3": 1.0}


def test_retrieval_bad_shapes():
  with pytest.raises(ValueError, match="img_emb"):
    retrieval_recall(np.zeros((3, 4)), np.zeros((3, 5)))


class _CountingObjective(Objective):
  """A two-tower objective whose image embedding is a fixed projection of the pixels and
  whose text embedding is that of the class its tokens name; counts the rows each sees."""

  def __init__(self, proj):
    import jax
    import jax.numpy as jnp
    self.rows = {"image": 0, "features": 0}
    self.proj, self._jax, self._jnp = proj, jax, jnp

  def _count(self, key, x):
    def bump(n):
      self.rows[key] += int(n)
    self._jax.debug.callback(bump, x.shape[0])

  def _embed(self, params, image):
    jnp = self._jnp
    z = image.reshape(image.shape[0], -1) @ self.proj
    return z / jnp.linalg.norm(z, axis=-1, keepdims=True)

  def features(self, params, image):
    self._count("features", image)
    return self._embed(params, image)

  def towers(self):
    def image_fn(params, image):
      self._count("image", image)
      return self._embed(params, image)

    def text_fn(params, tokens):   # token 0 names the class: the mean image of that class
      return params["class_emb"][tokens[:, 0]]
    return image_fn, text_fn


def test_evaluator_embeds_the_eval_images_once_and_scores_them(rng):
  import ml_collections
  from mmjax.evaluate import Evaluator

  n, n_probe, c = 23, 40, 3
  labels, probe_labels = rng.integers(0, c, n), rng.integers(0, c, n_probe)
  centers = rng.normal(size=(c, 2, 2, 3)) * 3
  images = (centers[labels] + 0.1 * rng.normal(size=(n, 2, 2, 3))).astype(np.float32)
  probe = (centers[probe_labels] + 0.1 * rng.normal(size=(n_probe, 2, 2, 3))).astype(np.float32)
  obj = _CountingObjective(np.eye(12, dtype=np.float32))
  emb = lambda x: obj._embed(None, x)
  class_emb = np.stack([np.asarray(emb(centers[k:k + 1].astype(np.float32)))[0] for k in range(c)])
  settings = ml_collections.ConfigDict(dict(batch_size=8, retrieval_match="label", knn_k=5,
                                            probe_shots=(2,)))

  class Tok:
    def encode(self, texts, length):
      return np.array([[int(t.split()[-1])] + [0] * (length - 1) for t in texts], np.int32)

  arrays = {"image": images, "text": np.repeat(labels[:, None], 2, 1).astype(np.int32),
            "label": labels.astype(np.int32)}
  ev = Evaluator(obj, settings, arrays, tokenizer=Tok(), text_len=2,
                 zeroshot=([f"class {k}" for k in range(c)], ["{}"]),
                 probe_arrays={"image": probe, "label": probe_labels.astype(np.int32)})
  out = ev({"class_emb": class_emb})
  # Fixed batches of 8: the last one is padded, so 24 eval rows, once; 40 probe rows, once.
  assert obj.rows == {"image": 24, "features": 40}, obj.rows
  assert out["zeroshot_top1"] == 1.0 and out["retrieval_i2t_r1"] == 1.0
  assert out["linear_probe_top1"] == 1.0 and out["knn_top1"] == 1.0
  assert set(out) >= {"retrieval_t2i_r1", "retrieval_i2t_r5", "linear_probe_2shot_top1"}


# ------------------------------------------- the Evaluator against float64 brute force

_NAMES = ["ant", "bee", "cat", "dog", "eel", "fox", "gnu"]
_TEMPLATES = ["a photo of a {}", "{} drawn by hand", "the number {} in ink"]
_TEXT_LEN = 6
_EPS = 1e-4   # a float64 score gap below this could be ordered the other way in float32


class _WordTok:
  """Word-level: vocab[i] -> id i + 1, padding 0."""

  def __init__(self, vocab):
    self.ids = {w: i + 1 for i, w in enumerate(vocab)}

  def encode(self, texts, length):
    out = np.zeros((len(texts), length), np.int32)
    for i, text in enumerate(texts):
      ids = [self.ids[w] for w in text.split()]
      out[i, :len(ids)] = ids
    return out


class _ProjectionTowers(Objective):
  """Towers that are fixed maps, no params: an image embeds as unit(flatten(image) @ proj),
  a token row as unit(sum of its word vectors) (words[0], the pad, is 0); the probe features
  are the image embedding."""

  def __init__(self, proj, words):
    self.proj, self.words = np.float32(proj), np.float32(words)

  def features(self, params, image):
    z = jnp.reshape(image, (image.shape[0], -1)) @ self.proj
    return z / jnp.linalg.norm(z, axis=-1, keepdims=True)

  def towers(self):
    def embed_text(params, tokens):
      z = jnp.asarray(self.words)[tokens].sum(1)
      return z / jnp.linalg.norm(z, axis=-1, keepdims=True)
    return self.features, embed_text

  # float64 NumPy twins of the towers
  def ref_image(self, image):
    z = np.reshape(image, (len(image), -1)).astype(np.float64) @ self.proj.astype(np.float64)
    return z / np.linalg.norm(z, axis=-1, keepdims=True)

  def ref_text(self, tokens):
    z = self.words.astype(np.float64)[tokens].sum(1)
    return z / np.linalg.norm(z, axis=-1, keepdims=True)


def _ref_class_embeddings(towers, tok, names, templates):
  """float64 loop: per class, embed each filled template, average, re-normalise."""
  out = []
  for name in names:
    prompts = [t.format(name) for t in templates]
    mean = towers.ref_text(tok.encode(prompts, _TEXT_LEN)).mean(0)
    out.append(mean / np.linalg.norm(mean))
  return np.stack(out)


def _ref_topk(scores, labels, k):
  """Share of rows whose true class has fewer than k other classes scoring at least as high."""
  hits = [sum(s[c] >= s[y] for c in range(len(s)) if c != y) < k for s, y in zip(scores, labels)]
  return float(np.mean(hits))


def _ref_recall(scores, correct, k):
  """Share of query rows (of scores / correct [queries, candidates]) with fewer than k wrong
  candidates scoring >= their best correct one (the pessimistic tie rule)."""
  hits = []
  for s, ok in zip(scores, correct):
    best = max(s[j] for j in range(len(s)) if ok[j])
    hits.append(sum(s[j] >= best for j in range(len(s)) if not ok[j]) < k)
  return float(np.mean(hits))


def _far_from_ties(scores, correct):
  """No wrong candidate within _EPS of a query's best correct score (then float32 ranks
  exactly as float64 does)."""
  best = np.where(correct, scores, -np.inf).max(1, keepdims=True)
  return bool(np.all(np.abs(scores - best)[~correct] > _EPS))


def _settings(batch_size, match="pair", knn_k=5, probe_shots=()):
  import ml_collections
  return ml_collections.ConfigDict(dict(batch_size=batch_size, retrieval_match=match,
                                        knn_k=knn_k, probe_shots=probe_shots))


def _towers_case(rng, d=8, image_shape=(2, 2, 3)):
  """Random word vectors (class words scaled 0.3x..4x, so the template average's norm varies
  by class), a random [prod(image_shape), d] projection, and the word tokenizer."""
  vocab = sorted({w for t in _TEMPLATES for w in t.split()} - {"{}"} | set(_NAMES))
  words = np.concatenate([np.zeros((1, d)), rng.normal(size=(len(vocab), d))])
  for name in _NAMES:
    words[vocab.index(name) + 1] *= rng.uniform(0.3, 4.0)
  proj = rng.normal(size=(int(np.prod(image_shape)), d))
  return _ProjectionTowers(proj, words), _WordTok(vocab)


def _images_near(rng, towers, targets, sigma, image_shape=(2, 2, 3)):
  """float32 images whose embedding is unit(targets + sigma * noise) (through pinv(proj))."""
  z = targets + sigma * rng.normal(size=targets.shape) / np.sqrt(targets.shape[1])
  flat = z @ np.linalg.pinv(towers.proj.astype(np.float64))
  return flat.reshape(len(targets), *image_shape).astype(np.float32)


def _zeroshot_case(rng, n, sigma=1.5, retrieval=False):
  """Towers, tokenizer, eval arrays (images near their class embedding, captions naming their
  class, so one caption per class) and the float64 class embeddings, redrawn until no
  zero-shot score (and with retrieval=True, no retrieval score) is within _EPS of a tie."""
  while True:
    towers, tok = _towers_case(rng)
    cls = _ref_class_embeddings(towers, tok, _NAMES, _TEMPLATES)
    labels = rng.integers(0, len(_NAMES), n)
    images = _images_near(rng, towers, cls[labels], sigma)
    text = tok.encode([f"the number {_NAMES[y]} in ink" for y in labels], _TEXT_LEN)
    img = towers.ref_image(images)
    ok = _far_from_ties(img @ cls.T, np.eye(len(_NAMES), dtype=bool)[labels])
    if retrieval:
      scores, same = img @ towers.ref_text(text).T, labels[:, None] == labels[None, :]
      ok = ok and _far_from_ties(scores, same) and _far_from_ties(scores.T, same.T)
    if ok:
      break
  arrays = {"image": images, "text": text, "label": labels.astype(np.int32)}
  return towers, tok, arrays, cls


def test_evaluator_zeroshot_template_ensemble_matches_float64_loop(rng, monkeypatch):
  """Through the Evaluator (tokenizer, text tower, batching), zero-shot scores each image
  against the per-class mean of its template embeddings, re-normalised: top-1 and top-5
  equal a float64 loop's, and the class embeddings it ranks with are that loop's."""
  from mmjax.evaluate import Evaluator, evaluators as evaluator_lib

  towers, tok, arrays, cls = _zeroshot_case(rng, n=300)
  seen = {}
  real = evaluator_lib.class_embeddings

  def spy(*args, **kw):
    seen["class_emb"] = np.asarray(real(*args, **kw))
    return seen["class_emb"]

  monkeypatch.setattr(evaluator_lib, "class_embeddings", spy)
  ev = Evaluator(towers, _settings(batch_size=16), arrays, tokenizer=tok, text_len=_TEXT_LEN,
                 zeroshot=(_NAMES, _TEMPLATES))
  out = ev({})
  assert_close(seen["class_emb"], cls, dtype=np.float32, name="class_emb")
  scores = towers.ref_image(arrays["image"]) @ cls.T
  for k in (1, 5):   # rows are far from ties (_zeroshot_case): the counts are exact
    assert out[f"zeroshot_top{k}"] == _ref_topk(scores, arrays["label"], k), k
  assert 0.2 < out["zeroshot_top1"] < 0.9, out   # neither trivial nor hopeless


def _retrieval_case(rng, n, n_captions=6, sigma=0.8):
  """Eval arrays of n images over n_captions distinct captions (each caption on >= 2 images;
  images near their caption's embedding), redrawn until no score is within _EPS of a tie."""
  while True:
    towers, tok = _towers_case(rng)
    names = rng.choice(_NAMES, n_captions, replace=False)
    captions = [f"{rng.choice(['a photo of a', 'the number'])} {w}" for w in names]
    which = rng.permutation(np.arange(n) % n_captions)
    text = tok.encode([captions[c] for c in which], _TEXT_LEN)
    txt = towers.ref_text(text)
    images = _images_near(rng, towers, txt, sigma)
    img = towers.ref_image(images)
    same = which[:, None] == which[None, :]   # image i's caption is text j
    scores = img @ txt.T
    if _far_from_ties(scores, same) and _far_from_ties(scores.T, same.T):
      break
  return towers, {"image": images, "text": text}, scores, same


def test_evaluator_retrieval_counts_any_identical_caption(rng):
  """retrieval_match='pair' with duplicate captions: a text identical to an image's own caption
  is a correct answer (the Evaluator's ids are the unique caption rows), each other row a wrong
  one. i2t and t2i recall@1/5/10 equal a float64 loop with that rule, and differ from the
  naive rule where only text i goes with image i (its duplicates tie with it and rank above)."""
  from mmjax.evaluate import Evaluator

  towers, arrays, scores, same = _retrieval_case(rng, n=30)
  out = Evaluator(towers, _settings(batch_size=16), arrays)({})
  naive = np.eye(len(same), dtype=bool)
  for k in (1, 5, 10):
    assert out[f"retrieval_i2t_r{k}"] == _ref_recall(scores, same, k), k
    assert out[f"retrieval_t2i_r{k}"] == _ref_recall(scores.T, same.T, k), k
  assert out["retrieval_i2t_r1"] > 0.3 and out["retrieval_t2i_r1"] > 0.3, out
  # The naive rule: an image's duplicate captions tie with its own and rank above it (i2t
  # recall@1 is 0); a text must find its own image, not the best of those sharing it.
  assert _ref_recall(scores, naive, 1) == 0.0
  assert _ref_recall(scores.T, naive.T, 1) < out["retrieval_t2i_r1"]


def test_evaluator_pads_the_last_batch_and_drops_the_pad(rng):
  """37 eval rows and 45 probe rows in batches of 16 (the last one padded with its first row):
  every score equals that of batch 37 (no pad) and 64 (one padded batch), and zero-shot and
  retrieval equal the float64 loops over the 37 rows: no pad row is scored."""
  from mmjax.evaluate import Evaluator

  towers, tok, arrays, cls = _zeroshot_case(rng, n=37, retrieval=True)
  probe_labels = rng.integers(0, len(_NAMES), 45).astype(np.int32)
  probe = {"image": _images_near(rng, towers, cls[probe_labels], 1.5), "label": probe_labels}
  outs = {}
  for b in (16, 37, 64):
    ev = Evaluator(towers, _settings(batch_size=b, knn_k=5), arrays,
                   tokenizer=tok, text_len=_TEXT_LEN, zeroshot=(_NAMES, _TEMPLATES),
                   probe_arrays=probe)
    outs[b] = ev({})
  assert outs[16] == outs[37] == outs[64]
  img, y = towers.ref_image(arrays["image"]), arrays["label"]
  # One caption per class: identical captions are the same class.
  scores, same = img @ towers.ref_text(arrays["text"]).T, y[:, None] == y[None, :]
  want = {f"zeroshot_top{k}": _ref_topk(img @ cls.T, y, k) for k in (1, 5)}
  for k in (1, 5, 10):
    want[f"retrieval_i2t_r{k}"] = _ref_recall(scores, same, k)
    want[f"retrieval_t2i_r{k}"] = _ref_recall(scores.T, same.T, k)
  assert {k: outs[16][k] for k in want} == want
  assert set(outs[16]) == set(want) | {"linear_probe_top1", "knn_top1"}


# ------------------------------------------- probes against scikit-learn called directly


def _clusters(rng, n, c=4, d=6, spread=1.2):
  """[n, d] float64 points around c random centres (overlapping), offset and scaled per axis
  (so standardisation matters), and their [n] labels."""
  centers = rng.normal(size=(c, d)) * 1.5
  y = rng.integers(0, c, n)
  x = centers[y] + spread * rng.normal(size=(n, d)) + rng.normal(size=d)
  return x * rng.uniform(0.2, 5.0, d), y


def _sk_linear_predict(train_x, train_y, test_x, l2):
  """scikit-learn directly, as the docstring says: standardise with the train split's mean
  and std, then multinomial logistic regression by L-BFGS with C = 1 / (n l2)."""
  scaler = StandardScaler().fit(train_x)
  clf = LogisticRegression(C=1.0 / (len(train_x) * l2), max_iter=1000)
  return clf.fit(scaler.transform(train_x), train_y).predict(scaler.transform(test_x))


def test_linear_probe_matches_sklearn(rng):
  """linear_probe_accuracy (full data with the default and a strong l2, and 5-shot) equals
  scikit-learn's standardised logistic regression with C = 1/(n l2): the same accuracy, and
  the same share of test rows predicted as each class. Few-shot trains on few_shot_indices:
  5 distinct rows of each class (all of a smaller one)."""
  from mmjax.evaluate.probe import few_shot_indices

  x, y = _clusters(rng, 400)
  y[:240][y[:240] == 3] = 2   # class 3 keeps 3 train rows (200..202): fewer than the 5 shots
  y[200:203] = 3
  train_x, train_y, test_x, test_y = x[:240], y[:240], x[240:], y[240:]
  keep = few_shot_indices(train_y, 5)
  counts = {c: int(np.sum(train_y[keep] == c)) for c in range(4)}
  assert counts == {0: 5, 1: 5, 2: 5, 3: 3} and len(np.unique(keep)) == len(keep) == 18
  # Exact: each fit is well-conditioned (overlapping classes, or 18 rows with a strong l2), so
  # L-BFGS stopping at its tolerance and the std's 1e-6 floor move no test row across a
  # boundary (none did on 200 seeds at l2=1e-3, 150 of 5-shot at 0.1; 5-shot at l2=1e-3 is
  # near-separable: one row moved on 1 of 150 seeds).
  for shots, l2, (fx, fy) in ((None, 1e-3, (train_x, train_y)),
                              (None, 0.3, (train_x, train_y)),
                              (5, 0.1, (train_x[keep], train_y[keep]))):
    pred = _sk_linear_predict(fx, fy, test_x, l2)
    got = linear_probe_accuracy(train_x, train_y, test_x, test_y, shots=shots, l2=l2)
    assert got == np.mean(pred == test_y), shots
    for c in range(3):   # the share predicted as class c (3: the rest): accuracy on all-c labels
      share = linear_probe_accuracy(train_x, train_y, test_x, np.full_like(test_y, c),
                                    shots=shots, l2=l2)
      assert share == np.mean(pred == c), (shots, c)
    assert 0.15 < got < 0.97, (shots, got)   # not saturated: C and the standardisation matter


def _knn_far_from_ties(train_x, test_x, train_y, k, temperature):
  """float64: every test row's k-th and (k+1)-th similarities, and its two best class votes
  (relatively), more than _EPS apart (then float32 picks and votes as float64 does)."""
  unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)
  sim = unit(test_x) @ unit(train_x).T
  order = np.argsort(-sim, axis=1)
  sim = np.take_along_axis(sim, order, 1)
  if np.any(sim[:, k - 1] - sim[:, k] <= _EPS):
    return False
  top = order[:, :k]
  votes = np.zeros((len(test_x), int(train_y.max()) + 1))
  np.add.at(votes, (np.arange(len(test_x))[:, None], train_y[top]),
            np.exp(sim[:, :k] / temperature))
  votes = np.sort(votes, axis=1)
  return bool(np.all(votes[:, -1] - votes[:, -2] > _EPS * votes[:, -1]))


def test_knn_matches_sklearn(rng):
  """knn_accuracy equals scikit-learn's KNeighborsClassifier with the same k, cosine distance
  and vote weight exp(similarity / temperature) = exp((1 - distance) / temperature): the
  same prediction on every test row (the same algorithm; data far from ties)."""
  k, temperature = 7, 0.07
  while True:
    x, y = _clusters(rng, 400, spread=1.5)
    train_x, train_y, test_x, test_y = x[:250], y[:250], x[250:], y[250:]
    if _knn_far_from_ties(train_x, test_x, train_y, k, temperature):
      break
  weight = lambda dist: np.exp((1.0 - dist) / temperature)
  clf = KNeighborsClassifier(n_neighbors=k, metric="cosine", weights=weight, algorithm="brute")
  pred = clf.fit(train_x, train_y).predict(test_x)
  got = knn_accuracy(train_x, train_y, test_x, test_y, k=k, temperature=temperature)
  assert got == np.mean(pred == test_y)
  # Row by row: one test row scored against sklearn's prediction for it is 1.0.
  rows = [knn_accuracy(train_x, train_y, test_x[i:i + 1], pred[i:i + 1], k=k,
                       temperature=temperature) for i in range(len(test_x))]
  np.testing.assert_array_equal(rows, 1.0)
  assert 0.15 < got < 0.99, got   # not saturated: the weights and k matter


def test_evaluator_probes_match_sklearn_on_its_features(rng, monkeypatch):
  """The Evaluator's probes train on the probe split's image features and test on the eval
  split's (each within float32 round-off of the float64 towers), with config's knn_k and
  probe_shots; its linear_probe_top1, few-shot and knn_top1 equal scikit-learn on them."""
  from mmjax.evaluate import Evaluator, evaluators as evaluator_lib
  from mmjax.evaluate.probe import few_shot_indices

  towers, tok, arrays, cls = _zeroshot_case(rng, n=150, sigma=2.0)
  while True:
    probe_labels = rng.integers(0, len(_NAMES), 200).astype(np.int32)
    probe = {"image": _images_near(rng, towers, cls[probe_labels], 2.0), "label": probe_labels}
    if _knn_far_from_ties(towers.ref_image(probe["image"]), towers.ref_image(arrays["image"]),
                          probe_labels, 3, 0.07):
      break
  calls = []

  def spy(name):
    real = getattr(evaluator_lib, name)

    def call(*args, **kw):
      calls.append((name, args, kw))
      return real(*args, **kw)
    return call

  for name in ("linear_probe_accuracy", "knn_accuracy"):
    monkeypatch.setattr(evaluator_lib, name, spy(name))
  ev = Evaluator(towers, _settings(batch_size=32, knn_k=3, probe_shots=(3,)), arrays,
                 tokenizer=tok, text_len=_TEXT_LEN, zeroshot=(_NAMES, _TEMPLATES),
                 probe_arrays=probe)
  out = ev({})
  assert [(c[0], c[2]) for c in calls] == [("linear_probe_accuracy", {}),
                                           ("knn_accuracy", {"k": 3}),
                                           ("linear_probe_accuracy", {"shots": 3})]
  train_x, train_y, test_x, test_y = calls[0][1]
  assert_close(train_x, towers.ref_image(probe["image"]), dtype=np.float32, name="train_x")
  assert_close(test_x, towers.ref_image(arrays["image"]), dtype=np.float32, name="test_x")
  np.testing.assert_array_equal(train_y, probe_labels)
  np.testing.assert_array_equal(test_y, arrays["label"])
  pred = _sk_linear_predict(train_x, train_y, test_x, 1e-3)
  assert out["linear_probe_top1"] == np.mean(pred == test_y)
  keep = few_shot_indices(train_y, 3)
  pred = _sk_linear_predict(train_x[keep], train_y[keep], test_x, 1e-3)
  # 21 rows in 8 dims at the default l2 are near-separable: the fit's optimum is flat, and
  # L-BFGS's stopping point can move one row of 150 across a boundary (2 of 150 seeds).
  assert abs(out["linear_probe_3shot_top1"] - np.mean(pred == test_y)) <= 1 / 150 + 1e-9
  weight = lambda dist: np.exp((1.0 - dist) / 0.07)
  clf = KNeighborsClassifier(n_neighbors=3, metric="cosine", weights=weight, algorithm="brute")
  assert out["knn_top1"] == np.mean(clf.fit(train_x, train_y).predict(test_x) == test_y)


def test_templates_name_the_class_as_clip_benchmark_or_open_clip_do(rng):
  """'{c}' (CLIP_benchmark: template.format(c=name), any number of times) and one '{}'
  (open_clip's lists) fill in the same prompts, so the class embeddings are equal; anything
  else is refused with the reason."""
  from mmjax.data.prompts import fill_template, template_problem
  assert fill_template("a photo of a {c}.", "cat") == fill_template("a photo of a {}.", "cat")
  assert fill_template("{c}, a type of {c}", "cat") == "cat, a type of cat"
  assert fill_template("{{literal}} {}", "cat") == "{literal} cat"
  for bad, why in (("a photo", "no '{c}' or '{}'"), ("{c} or {}", "both"),
                   ("{} and {}", "more than one"), ("a {name}", "fields ['name']"),
                   ("a {c", "not a format string"), (3, "not a string")):
    assert why in template_problem(bad), bad
  assert template_problem("itap of a {c}.") is None and template_problem("{}") is None
  proj = rng.normal(size=(64, 8))
  encode = lambda texts: np.stack([proj[[ord(ch) % 64 for ch in t]].sum(0) for t in texts])
  names = ["cat", "dog", "sea lion"]
  np.testing.assert_array_equal(class_embeddings(encode, names, ["a {c}.", "{c} art"]),
                                class_embeddings(encode, names, ["a {}.", "{} art"]))
  with pytest.raises(ValueError, match=r"templates must be non-empty.*'a photo'"):
    class_embeddings(encode, names, ["a photo"])
