"""Zero-shot classification with prompt-template ensembles (Radford et al., 2021)."""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np

from mmjax.data.prompts import fill_template, template_problem
from mmjax.evaluate.checks import require_finite
from mmjax.numerics import l2_normalize


def class_embeddings(encode_text: Callable[[Sequence[str]], np.ndarray],
                     class_names: Sequence[str],
                     templates: Sequence[str] | Mapping[str, Sequence[str]]) -> np.ndarray:
  """One embedding per class: its prompts' text embeddings, averaged and re-normalised.

  Args:
    encode_text: maps n strings to [n, d] text embeddings (L2-normalised).
    class_names: C names, e.g. ["zero", "one", ...].
    templates: T prompt templates, each naming the class as "{c}" (CLIP_benchmark's
      `template.format(c=name)`, any number of times) or one "{}" (open_clip's lists); or
      per-class prompts {class name: [prompt, ...]} used as they are (CLIP_benchmark's
      CuPL-style template files), every class name a key.

  Returns:
    [C, d] float32, unit-norm rows.
  """
  if not class_names:
    raise ValueError("class_names is empty")
  per_class = _per_class_prompts(class_names, templates)
  counts = [len(p) for p in per_class]
  emb = l2_normalize(np.asarray(encode_text([t for p in per_class for t in p]), np.float32))
  ends = np.cumsum(counts)
  means = np.add.reduceat(emb, ends - counts, axis=0) / np.asarray(counts)[:, None]
  return l2_normalize(means)


def _per_class_prompts(class_names: Sequence[str], templates) -> list[list[str]]:
  """Each class's prompts: the templates filled in, or its entry of a per-class dict."""
  if isinstance(templates, Mapping):
    missing = [c for c in class_names if c not in templates]
    empty = [c for c in class_names if c in templates and not _strings(templates[c])]
    if missing or empty:
      raise ValueError(f"per-class prompts: no prompts for {len(missing) + len(empty)} of "
                       f"{len(class_names)} classes, e.g. {(missing + empty)[:3]}")
    return [list(templates[c]) for c in class_names]
  bad = [(t, template_problem(t)) for t in templates if template_problem(t)]
  if not templates or bad:
    raise ValueError(f"templates must be non-empty, each with the class name as '{{c}}' or "
                     f"'{{}}'; bad: {bad[:3]}")
  return [[fill_template(t, c) for t in templates] for c in class_names]


def _strings(x) -> bool:
  """A non-empty list of strings."""
  return isinstance(x, (list, tuple)) and bool(x) and all(isinstance(t, str) for t in x)


def zeroshot_accuracy(img_emb: np.ndarray, class_emb: np.ndarray,
                      labels: np.ndarray, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
  """Top-k accuracy of classifying images by their nearest class embedding.

  Args:
    img_emb: [n, d] image embeddings.
    class_emb: [C, d] class embeddings from `class_embeddings`.
    labels: [n] int class indices.
    ks: which top-k to report (k > C is skipped).

  Returns:
    {"top1": ..., "top5": ...}.

  Raises ValueError when an embedding holds NaN or Inf.
  """
  img_emb, labels = np.asarray(img_emb, np.float32), np.asarray(labels)
  if img_emb.ndim != 2 or labels.shape != img_emb.shape[:1]:
    raise ValueError(f"img_emb {img_emb.shape} must be [n, d] and labels {labels.shape} [n]")
  require_finite("zeroshot_accuracy", img_emb=img_emb, class_emb=class_emb)
  scores = img_emb @ np.asarray(class_emb, np.float32).T
  # Rank of the true class = how many other classes score at least as high (pessimistic on
  # ties, as retrieval_recall: a collapsed model that scores every class alike ranks last).
  true = np.take_along_axis(scores, labels[:, None], axis=1)
  rank = (scores >= true).sum(1) - 1
  return {f"top{k}": float(np.mean(rank < k)) for k in ks if k <= scores.shape[1]}


class ZeroShotCounts:
  """Running sums for zero-shot classification over a stream of batches (CLIP_benchmark's
  metrics): top-1 / top-5 hits and per-class hits and counts; memory O(classes).

    counts = ZeroShotCounts(num_classes)
    for batch: counts.update(img_emb @ class_emb.T, labels, valid)
    counts.result()   # {'acc1', 'acc5', 'mean_per_class_recall', 'n'}

  A tie with the true class counts against it (rank = other classes scoring at least as high).
  """

  def __init__(self, num_classes: int, ks: Sequence[int] = (1, 5)):
    self.num_classes, self.ks = num_classes, tuple(k for k in ks if k <= num_classes)
    self.hits = {k: 0 for k in self.ks}
    self.class_hits = np.zeros(num_classes, np.int64)
    self.class_count = np.zeros(num_classes, np.int64)

  def update(self, scores: np.ndarray, labels: np.ndarray, valid: np.ndarray | None = None):
    """scores [b, C], labels [b] int, valid [b] bool (False rows: batch padding, skipped)."""
    scores, labels = np.asarray(scores, np.float32), np.asarray(labels)
    if scores.ndim != 2 or scores.shape[1] != self.num_classes or labels.shape != scores.shape[:1]:
      raise ValueError(f"scores {scores.shape} must be [b, {self.num_classes}] and labels "
                       f"{labels.shape} [b]")
    if valid is not None:
      scores, labels = scores[np.asarray(valid, bool)], labels[np.asarray(valid, bool)]
    bad = labels[(labels < 0) | (labels >= self.num_classes)]
    if bad.size:
      raise ValueError(f"labels outside [0, {self.num_classes}): {bad[:5]}")
    require_finite("ZeroShotCounts.update", scores=scores)
    true = np.take_along_axis(scores, labels[:, None], axis=1)
    rank = (scores >= true).sum(1) - 1
    for k in self.ks:
      self.hits[k] += int((rank < k).sum())
    np.add.at(self.class_count, labels, 1)
    np.add.at(self.class_hits, labels, (rank < 1).astype(np.int64))

  def result(self) -> dict[str, float]:
    n = int(self.class_count.sum())
    if n == 0:
      raise ValueError("ZeroShotCounts: no examples were counted")
    seen = self.class_count > 0
    out = {f"acc{k}": self.hits[k] / n for k in self.ks}
    out["mean_per_class_recall"] = float((self.class_hits[seen] / self.class_count[seen]).mean())
    out["n"] = n
    return out
