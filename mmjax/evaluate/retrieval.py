"""Image <-> text retrieval recall@k."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from mmjax.evaluate.checks import require_finite


def _recall(scores: np.ndarray, match: np.ndarray, ks: Sequence[int]) -> dict[int, float]:
  """scores, match: [queries, candidates]; rank of the best-scoring correct candidate."""
  best_correct = np.where(match, scores, -np.inf).max(1, keepdims=True)
  # Pessimistic on ties: a wrong candidate scoring equal to the best correct one counts as above it.
  rank = ((scores >= best_correct) & ~match).sum(1)
  return {k: float(np.mean(rank < k)) for k in ks}


def retrieval_recall(img_emb: np.ndarray, txt_emb: np.ndarray, *,
                     img_ids: np.ndarray | None = None,
                     txt_ids: np.ndarray | None = None,
                     match: np.ndarray | None = None,
                     ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
  """Recall@k for image->text and text->image retrieval.

  A text is a correct answer for an image when their ids are equal. By default
  ids are positions (text i describes image i); passing class labels as both
  ids scores class-level retrieval.

  Args:
    img_emb: [n, d] image embeddings.
    txt_emb: [m, d] text embeddings.
    img_ids: [n] ints (default arange(n)).
    txt_ids: [m] ints (default arange(m)).
    match: [n, m] bool, which texts go with which image, in place of the ids.
    ks: the k of recall@k.

  Returns:
    {"i2t_r1": ..., "t2i_r1": ..., ...} for each k.

  Raises ValueError when an embedding holds NaN or Inf.
  """
  img_emb = np.asarray(img_emb, np.float32)
  txt_emb = np.asarray(txt_emb, np.float32)
  if img_emb.ndim != 2 or txt_emb.ndim != 2 or img_emb.shape[1] != txt_emb.shape[1]:
    raise ValueError(f"img_emb {img_emb.shape} and txt_emb {txt_emb.shape} must be [n, d] and [m, d]")
  require_finite("retrieval_recall", img_emb=img_emb, txt_emb=txt_emb)
  img_ids = np.arange(len(img_emb)) if img_ids is None else np.asarray(img_ids)
  txt_ids = np.arange(len(txt_emb)) if txt_ids is None else np.asarray(txt_ids)
  if img_ids.shape != img_emb.shape[:1] or txt_ids.shape != txt_emb.shape[:1]:
    raise ValueError(f"img_ids {img_ids.shape} / txt_ids {txt_ids.shape} must match "
                     f"img_emb {img_emb.shape} / txt_emb {txt_emb.shape} rows")
  scores = img_emb @ txt_emb.T
  if match is None:
    match = img_ids[:, None] == txt_ids[None, :]
  elif np.shape(match) != scores.shape:
    raise ValueError(f"match {np.shape(match)} must be [n, m] = {scores.shape}")
  out = {}
  for name, s, m in (("i2t", scores, match), ("t2i", scores.T, match.T)):
    if not m.any(1).all():
      raise ValueError(f"{name}: some queries have no correct candidate; check img_ids/txt_ids")
    out.update({f"{name}_r{k}": v for k, v in _recall(s, m, ks).items()})
  return out


def rerank_recall(sim: np.ndarray, score, *, k: int, img_ids: np.ndarray | None = None,
                  txt_ids: np.ndarray | None = None,
                  match: np.ndarray | None = None) -> dict[str, float]:
  """Recall@1 after re-ranking: each query's top-k candidates by `sim` re-ordered by
  `score` (BLIP's ITM re-ranking); a query whose correct candidates are all outside the
  top k counts as missed.

  Args:
    sim: [n_img, n_txt] first-stage scores (contrastive similarities).
    score: (img_idx [m] int, txt_idx [m] int) -> [m] float, higher = better match.
    k: candidates re-ranked per query.
    img_ids, txt_ids, match: as in retrieval_recall (default: positions).

  Returns:
    {"i2t_r1": ..., "t2i_r1": ...}.
  """
  sim = np.asarray(sim, np.float32)
  if sim.ndim != 2:
    raise ValueError(f"sim must be [n_img, n_txt]; got shape {sim.shape}")
  require_finite("rerank_recall", sim=sim)
  n, m = sim.shape
  if not 1 <= k:
    raise ValueError(f"k={k} must be >= 1")
  if match is None:
    img_ids = np.arange(n) if img_ids is None else np.asarray(img_ids)
    txt_ids = np.arange(m) if txt_ids is None else np.asarray(txt_ids)
    match = img_ids[:, None] == txt_ids[None, :]
  match = np.asarray(match, bool)
  out = {}
  for name, s, good, pair in (("i2t", sim, match, lambda q, c: (q, c)),
                              ("t2i", sim.T, match.T, lambda q, c: (c, q))):
    kk = min(k, s.shape[1])
    top = np.argsort(-s, axis=1, kind="stable")[:, :kk]            # [queries, kk]
    q = np.repeat(np.arange(s.shape[0]), kk)
    ii, jj = pair(q, top.reshape(-1))
    scores = np.asarray(score(ii, jj), np.float32).reshape(-1, kk)
    best = top[np.arange(len(top)), np.argmax(scores, axis=1)]
    out[f"{name}_r1"] = float(np.mean(good[np.arange(len(best)), best]))
  return out
