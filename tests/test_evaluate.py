"""Zero-shot and retrieval metrics against brute-force loops on fresh random data."""

import numpy as np
import pytest

from mmjax.evaluate import class_embeddings, retrieval_recall, zeroshot_accuracy


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
  top1 = np.mean([np.argmax(cls @ x) == y for x, y in zip(img, labels)])
  top3 = np.mean([y in np.argsort(-(cls @ x))[:3] for x, y in zip(img, labels)])
  assert acc == pytest.approx({"top1": top1, "top3": top3})
  perfect = zeroshot_accuracy(cls[labels], cls, labels)
  assert perfect["top1"] == 1.0


def test_retrieval_recall_matches_loop(rng):
  n = 40
  img, txt = _unit(rng, n, 8), _unit(rng, n, 8)
  txt[:20] = img[:20] + 0.3 * _unit(rng, 20, 8)  # half the pairs findable
  r = retrieval_recall(img, txt, ks=(1, 5))
  s = img @ txt.T
  for k in (1, 5):
    i2t = np.mean([i in np.argsort(-s[i])[:k] for i in range(n)])
    t2i = np.mean([j in np.argsort(-s[:, j])[:k] for j in range(n)])
    assert r[f"i2t_r{k}"] == pytest.approx(i2t)
    assert r[f"t2i_r{k}"] == pytest.approx(t2i)
  assert 0.4 <= r["i2t_r1"] < 1.0


def test_retrieval_with_label_ids_counts_any_same_class_text(rng):
  labels = rng.integers(0, 4, size=30)
  centers = _unit(rng, 4, 8)
  img = centers[labels] + 0.01 * rng.normal(size=(30, 8))
  txt = centers[labels][::-1] + 0.01 * rng.normal(size=(30, 8))
  ids = labels[::-1]
  r = retrieval_recall(img, txt, img_ids=labels, txt_ids=ids, ks=(1,))
  assert r == {"i2t_r1": 1.0, "t2i_r1": 1.0}
  # Exact-pair matching on the same embeddings mostly fails: the pairs were shuffled.
  assert retrieval_recall(img, txt, ks=(1,))["i2t_r1"] < 0.5


def test_retrieval_bad_shapes():
  with pytest.raises(ValueError, match="img_emb"):
    retrieval_recall(np.zeros((3, 4)), np.zeros((3, 5)))
