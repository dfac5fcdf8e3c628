"""Frozen-feature evaluators for any image tower: linear probe and k-nearest neighbours."""

from __future__ import annotations

import numpy as np

from mmjax.evaluate.checks import require_finite
from mmjax.numerics import l2_normalize


def _check(evaluator, train_x, train_y, test_x, test_y) -> None:
  if train_x.ndim != 2 or test_x.ndim != 2 or train_x.shape[1] != test_x.shape[1]:
    raise ValueError(f"train_x {train_x.shape} and test_x {test_x.shape} must be [n, d] "
                     "with the same d")
  if train_y.shape != (len(train_x),) or test_y.shape != (len(test_x),):
    raise ValueError(f"train_y {train_y.shape} / test_y {test_y.shape} must be one label per "
                     f"row of train_x {train_x.shape} / test_x {test_x.shape}")
  require_finite(evaluator, train_x=train_x, test_x=test_x)


def few_shot_indices(labels: np.ndarray, shots: int, seed: int = 0) -> np.ndarray:
  """Indices of `shots` examples per class (all of a class that has fewer), seeded."""
  rng = np.random.default_rng(seed)
  idx = [rng.permutation(np.flatnonzero(labels == c))[:shots] for c in np.unique(labels)]
  return np.sort(np.concatenate(idx))


def linear_probe_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                          test_y: np.ndarray, *, shots: int | None = None, l2: float = 1e-3,
                          max_iter: int = 1000) -> float:
  """Top-1 of a multinomial logistic regression fit on frozen features (linear_probe_predict).

  Args:
    train_x: [n, d] features, train_y: [n] int labels; test_x [m, d], test_y [m].

  Returns:
    accuracy on the test split, in [0, 1].
  """
  pred = linear_probe_predict(train_x, train_y, test_x, test_y, shots=shots, l2=l2,
                              max_iter=max_iter)
  return float(np.mean(pred == np.asarray(test_y)))


def linear_probe_predict(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                         test_y: np.ndarray, *, shots: int | None = None, l2: float = 1e-3,
                         max_iter: int = 1000) -> np.ndarray:
  """The test split's predicted labels [m] of a multinomial logistic regression fit on frozen
  features (train_x [n, d], train_y [n] int; test_x [m, d]; test_y [m] is checked only).

  Features are standardised with the train split's mean and std; the fit is
  scikit-learn's L-BFGS with L2 penalty `l2` (per example, as in C = 1/(n l2)).
  shots=k fits on k examples per class only (big_vision's few-shot linear
  probes): on easy data the full-data probe saturates even for random features.
  """
  from sklearn.linear_model import LogisticRegression   # ~0.7 s to import: only probes need it

  train_x, test_x = np.asarray(train_x, np.float64), np.asarray(test_x, np.float64)
  train_y, test_y = np.asarray(train_y), np.asarray(test_y)
  _check("linear_probe_accuracy", train_x, train_y, test_x, test_y)
  if shots is not None:
    if shots < 1:
      raise ValueError(f"shots must be >= 1; got {shots}")
    keep = few_shot_indices(train_y, shots)
    train_x, train_y = train_x[keep], train_y[keep]
  mean, std = train_x.mean(0), train_x.std(0) + 1e-6
  clf = LogisticRegression(C=1.0 / (len(train_x) * l2), max_iter=max_iter)
  clf.fit((train_x - mean) / std, train_y)
  return clf.predict((test_x - mean) / std)


def knn_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                 test_y: np.ndarray, *, k: int = 20, temperature: float = 0.07) -> float:
  """Top-1 of a weighted k-NN vote on cosine similarity (InstDisc / DINO recipe).

  Each test row's k most similar train rows vote for their label with weight
  exp(similarity / temperature).

  Args:
    train_x: [n, d], train_y: [n] int labels; test_x [m, d], test_y [m].

  Returns:
    accuracy on the test split, in [0, 1].
  """
  train_x, test_x = np.asarray(train_x, np.float32), np.asarray(test_x, np.float32)
  train_y, test_y = np.asarray(train_y), np.asarray(test_y)
  _check("knn_accuracy", train_x, train_y, test_x, test_y)
  if k < 1:
    raise ValueError(f"k must be >= 1; got {k}")
  sim = l2_normalize(np.asarray(test_x)) @ l2_normalize(np.asarray(train_x)).T   # [m, n]
  k = min(k, len(train_x))
  top = np.argpartition(-sim, k - 1, axis=1)[:, :k]          # [m, k]
  weights = np.exp(np.take_along_axis(sim, top, 1) / temperature)
  n_cls = int(max(train_y.max(), test_y.max())) + 1
  votes = np.zeros((len(test_x), n_cls))
  np.add.at(votes, (np.arange(len(test_x))[:, None], train_y[top]), weights)
  return float(np.mean(votes.argmax(1) == test_y))


def softmax_regression_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                                test_y: np.ndarray, *, w0: np.ndarray | None = None,
                                b0: np.ndarray | None = None, steps: int = 100,
                                shots: int | None = None) -> float:
  """Top-1 of a multinomial logistic regression on raw features after a fixed budget of
  full-batch gradient descent started from (w0, b0), for comparing starting points.

  No penalty, no standardisation (a transferred head's rows apply to the raw features);
  the step is 1 / L with L = lambda_max([x, 1]^T [x, 1] / n) / 2, a bound on the mean
  cross-entropy's curvature, so every step lowers the loss. float64.

  Args:
    train_x: [n, d], train_y: [n] int labels in [0, c); test_x [m, d], test_y [m].
    w0: [d, c], b0: [c] the start (default zeros, c = the labels' max + 1).
    shots: fit on that many examples per class only (few_shot_indices).

  Returns:
    accuracy on the test split, in [0, 1].
  """
  train_x, test_x = np.asarray(train_x, np.float64), np.asarray(test_x, np.float64)
  train_y, test_y = np.asarray(train_y), np.asarray(test_y)
  _check("softmax_regression_accuracy", train_x, train_y, test_x, test_y)
  if shots is not None:
    keep = few_shot_indices(train_y, shots)
    train_x, train_y = train_x[keep], train_y[keep]
  n, d = train_x.shape
  c = int(max(train_y.max(), test_y.max())) + 1 if w0 is None else np.shape(w0)[1]
  w = np.zeros((d, c)) if w0 is None else np.array(w0, np.float64)
  b = np.zeros(c) if b0 is None else np.array(b0, np.float64)
  if w.shape != (d, c) or b.shape != (c,) or train_y.max() >= c:
    raise ValueError(f"w0 {w.shape} / b0 {b.shape} must be [d={d}, c] / [c] with c > every "
                     f"label (max {train_y.max()})")
  ones = np.concatenate([train_x, np.ones((n, 1))], 1)
  lr = 2.0 / np.linalg.eigvalsh(ones.T @ ones / n)[-1]
  onehot = np.eye(c)[train_y]
  for _ in range(steps):
    z = train_x @ w + b
    p = np.exp(z - z.max(1, keepdims=True))
    g = (p / p.sum(1, keepdims=True) - onehot) / n            # dL/dz of the mean loss
    w -= lr * train_x.T @ g
    b -= lr * g.sum(0)
  return float(np.mean((test_x @ w + b).argmax(1) == test_y))
