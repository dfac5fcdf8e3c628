"""The evaluator a training run calls: zero-shot, retrieval, linear probes and kNN."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import numpy as np

from mmjax.evaluate.captioning import class_word_match, corpus_bleu
from mmjax.evaluate.probe import knn_accuracy, linear_probe_accuracy, softmax_regression_accuracy
from mmjax.evaluate.retrieval import rerank_recall, retrieval_recall
from mmjax.evaluate.zeroshot import class_embeddings, zeroshot_accuracy


class Evaluator:
  """Zero-shot top-1/top-5 and retrieval recall@1/5/10 on the eval split (two-tower
  objectives), and a linear probe and kNN on frozen image features (any objective).

  Args:
    objective: an mmjax.objectives.Objective: features(variables, image) -> [b, d], towers()
      -> (embed_image, embed_text) or None, and its hooks transfer_head, captioner, reranker.
      With towers, the image embeddings are the probe features too, so the
      eval images are embedded once per evaluation.
    settings: config.evaluate (batch_size, retrieval_match, knn_k, probe_shots).
    arrays: the eval split, {'image' [n, S, S, 3], 'text' [n, L][, 'label' [n]]}; 'image'
      may be lazy (mmjax.data.pipeline.EvalImages: decoded one batch at a time).
    tokenizer, text_len: encode the zero-shot prompts.
    zeroshot: (class_names, templates), or None.
    probe_arrays: the probe's train split ({'image', 'label'}, 'image' maybe lazy), or None.
    class_names: the labels' names; with an objective whose transfer_head gives a classifier
      for them, transfer_top1 is that classifier's top-1 on the eval split as it is,
      and transfer_{k}shot_top1 / transfer_{k}shot_from_zero_top1 the top-1 after 100 steps
      of gradient descent on k examples per class from it / from zeros
      (probe.softmax_regression_accuracy).
  """

  def __init__(self, objective: Any, settings, arrays: dict, *, tokenizer=None,
               text_len: int = 0, zeroshot: tuple[Sequence[str], Sequence[str]] | None = None,
               probe_arrays: dict | None = None, class_names: Sequence[str] | None = None):
    self.arrays, self.tok, self.text_len = arrays, tokenizer, text_len
    self.zeroshot, self.probe = zeroshot, probe_arrays
    self.batch_size, self.match = settings.batch_size, settings.retrieval_match
    self.knn_k, self.probe_shots = settings.knn_k, tuple(settings.probe_shots)
    self._features = jax.jit(objective.features)
    self.class_names = list(class_names) if class_names else None
    self._transfer = objective.transfer_head
    towers = objective.towers()
    self._img, self._txt = (None, None) if towers is None else (jax.jit(f) for f in towers)
    # An objective's further evaluations: captions (the tokenizer's start token given, for
    # texts that carry their own) and re-ranked retrieval.
    self._caption = objective.captioner(getattr(tokenizer, "bos_id", None))
    reranker = objective.reranker()
    self._itm, self.rerank_k = (None, 0) if reranker is None else (
        (jax.jit(reranker[0]), jax.jit(reranker[1])), reranker[2])

  def _batched(self, fn: Callable, params, x: np.ndarray) -> np.ndarray:
    """Fixed-size batches (one compile); the last one padded with its first row."""
    out, b = [], self.batch_size
    for i in range(0, len(x), b):
      chunk = x[i:i + b]
      pad = b - len(chunk)
      if pad:
        chunk = np.concatenate([chunk, np.repeat(chunk[:1], pad, 0)])
      out.append(np.asarray(fn(params, chunk))[:b - pad])
    return np.concatenate(out)

  def probes(self, params, test_x: np.ndarray | None = None) -> dict[str, float]:
    """linear_probe_top1, the few-shot probes and knn_top1: trained on the probe
    split, tested on the eval split (test_x: its features, if already computed)."""
    if self.probe is None or "label" not in self.arrays:
      return {}
    train_x = self._batched(self._features, params, self.probe["image"])
    if test_x is None:
      test_x = self._batched(self._features, params, self.arrays["image"])
    args = (train_x, self.probe["label"], test_x, self.arrays["label"])
    out = {"linear_probe_top1": linear_probe_accuracy(*args),
           "knn_top1": knn_accuracy(*args, k=self.knn_k)}
    for k in self.probe_shots:
      out[f"linear_probe_{k}shot_top1"] = linear_probe_accuracy(*args, shots=k)
    head = None if self._transfer is None or not self.class_names else (
        self._transfer(params, self.class_names))
    if head is not None:
      w, b, found = head
      out["transfer_classes_found"] = int(found)
      out["transfer_top1"] = float(np.mean((test_x @ w + b).argmax(1) == self.arrays["label"]))
      for k in self.probe_shots:
        out[f"transfer_{k}shot_top1"] = softmax_regression_accuracy(*args, w0=w, b0=b, shots=k)
        out[f"transfer_{k}shot_from_zero_top1"] = softmax_regression_accuracy(
            *args, w0=np.zeros_like(w), b0=np.zeros_like(b), shots=k)
    return out

  def __call__(self, params) -> dict[str, float]:
    if self._img is None:
      return self.probes(params)
    a = self.arrays
    img = self._batched(self._img, params, a["image"])
    txt = self._batched(self._txt, params, a["text"])
    results = self.probes(params, test_x=img)
    if self.zeroshot is not None and "label" in a:
      names, templates = self.zeroshot
      encode = lambda s: self._batched(self._txt, params, self.tok.encode(s, self.text_len))
      cls = class_embeddings(encode, names, templates)
      acc = zeroshot_accuracy(img, cls, a["label"])
      results.update({f"zeroshot_{k}": v for k, v in acc.items()})
    if self.match == "label":
      ids = a["label"]
    else:   # identical captions are one text: any of them is a correct answer
      _, ids = np.unique(a["text"], axis=0, return_inverse=True)
    recall = retrieval_recall(img, txt, img_ids=ids, txt_ids=ids)
    results.update({f"retrieval_{k}": v for k, v in recall.items()})
    if self._caption is not None:
      results.update(self.captions(params))
    if self._itm is not None:
      results.update(self.itm_rerank(params, img, txt, ids))
    return results

  def captions(self, params) -> dict[str, float]:
    """caption_exact_match and caption_bleu of the captions generated for the eval images
    (mmjax.evaluate.captioning); references: the eval captions of the image's class
    (retrieval_match='label') or its own caption."""
    a = self.arrays
    tokens = self._batched(self._caption, params, a["image"])
    generated = self.tok.decode(tokens)
    captions = self.tok.decode(a["text"])
    if self.match == "label" and "label" in a:
      by_class = {c: sorted({t for t, l in zip(captions, a["label"]) if l == c})
                  for c in np.unique(a["label"])}
      refs = [by_class[c] for c in a["label"]]
    else:
      refs = [[t] for t in captions]
    out = {"caption_bleu": corpus_bleu(generated, refs)}
    if self.zeroshot is not None and "label" in a:
      out["caption_exact_match"] = class_word_match(generated, a["label"], self.zeroshot[0])
    return out

  def itm_rerank(self, params, img: np.ndarray, txt: np.ndarray, ids) -> dict[str, float]:
    """itm_retrieval_{i2t,t2i}_r1: the top rerank_k of the contrastive similarities
    re-ranked by the matching head (mmjax.evaluate.retrieval.rerank_recall)."""
    tokens_fn, score_fn = self._itm
    image_tokens = self._batched(tokens_fn, params, self.arrays["image"])
    texts, b = self.arrays["text"], self.batch_size

    def score(ii: np.ndarray, jj: np.ndarray) -> np.ndarray:
      out = []
      for s in range(0, len(ii), b):
        i, j = ii[s:s + b], jj[s:s + b]
        pad = b - len(i)
        i, j = np.r_[i, np.repeat(i[:1], pad)], np.r_[j, np.repeat(j[:1], pad)]
        out.append(np.asarray(score_fn(params, image_tokens[i], texts[j]))[:b - pad])
      return np.concatenate(out)

    recall = rerank_recall(img @ txt.T, score, k=self.rerank_k, img_ids=ids, txt_ids=ids)
    return {f"itm_retrieval_{k}": v for k, v in recall.items()}
