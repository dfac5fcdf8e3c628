"""The evaluators, registered by name (big_vision's `config.evals` types): zeroshot,
retrieval, probe, captioning, rerank, refexp, dense_probe and audio.

Each is a small class with `run(variables) -> {metric: float}`, built from the objective's
hooks and the data by `build(inputs, settings)` (which raises NotApplicable when the
objective or the data lacks what it needs), or directly from encoders and a
streaming.Split (experiments.evaluate does). `variables` is whatever the objective's hooks
take; the evaluators pass it through untouched.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple, Sequence

import jax
import numpy as np

from mmjax.data import regions as region_lib
from mmjax.evaluate.captioning import class_word_match, corpus_bleu
from mmjax.losses.distill import box_iou, token_boxes
from mmjax.evaluate.probe import (knn_accuracy, linear_probe_accuracy, linear_probe_predict,
                                  softmax_regression_accuracy)
from mmjax.evaluate.retrieval import rerank_recall, retrieval_recall
from mmjax.evaluate.streaming import Embedded, Memo, Split, Texts, caption_ids
from mmjax.evaluate.zeroshot import ZeroShotCounts, class_embeddings

_REGISTRY: dict[str, type] = {}


class NotApplicable(ValueError):
  """An evaluator asked of an objective or a split that lacks what it needs."""


def register(name: str):
  """Class decorator: config.evals.<any>.type = name selects the class."""
  def add(cls):
    cls.name = name
    _REGISTRY[name] = cls
    return cls
  return add


def names() -> tuple[str, ...]:
  return tuple(_REGISTRY)


def get(name: str) -> type:
  if name not in _REGISTRY:
    raise ValueError(f"evaluator type must be one of {names()}; got {name!r}")
  return _REGISTRY[name]


@dataclasses.dataclass
class Inputs:
  """What the evaluators of a run are built from.

  objective: features(variables, image) -> [b, d], towers() -> (embed_image, embed_text) or
    None, transfer_head, captioner, reranker, modality_encoders (mmjax.objectives.Objective).
  eval_split: the split evaluated; probe_split: the probes' train split ('image', 'label').
  tokenizer, text_len: encode prompts; class_names: the labels' names (label order);
  templates: the zero-shot prompt templates.
  """
  objective: Any
  eval_split: Split
  probe_split: Split | None = None
  tokenizer: Any = None
  text_len: int = 0
  class_names: list[str] | None = None
  templates: list[str] | None = None
  memo: Memo = dataclasses.field(default_factory=Memo)

  def __post_init__(self):
    self._jitted, self._embedded = {}, {}
    towers = self.objective.towers()
    self.towers = None if towers is None else tuple(self.jit(f) for f in towers)

  def jit(self, fn: Callable) -> Callable:
    """jax.jit(fn), once per hook."""
    if fn not in self._jitted:
      self._jitted[fn] = jax.jit(fn)
    return self._jitted[fn]

  def embedded(self, split: Split, fn: Callable, batch_size: int,
               field: str | None = "image") -> Embedded:
    """One Embedded per (split, fn, batch size, field): evaluators that read the same one
    share its outputs within a round. field None: fn reads the whole batch."""
    key = (id(split), fn, batch_size, field)
    if key not in self._embedded:
      self._embedded[key] = Embedded(split, fn, batch_size, key=field, memo=self.memo)
    return self._embedded[key]

  def image_embeddings(self, batch_size: int) -> Embedded:
    """The eval split through the image tower."""
    if self.towers is None:
      raise NotApplicable("the objective has no image and text towers (towers() is None)")
    return self.embedded(self.eval_split, self.towers[0], batch_size)

  def texts(self, batch_size: int) -> Texts:
    return Texts(self.towers[1], batch_size, self.tokenizer, self.text_len)


def _need_labels(split: Split, what: str) -> None:
  if "label" not in split.fields:
    raise NotApplicable(f"{what} needs class labels and the evaluation split has none")


@register("zeroshot")
class ZeroShot:
  """zeroshot_top1, zeroshot_top5: each image classified by its nearest class embedding (the
  templates' text embeddings averaged and re-normalised); running sums over the stream
  (ZeroShotCounts: also the mean per-class recall, CLIP_benchmark's metrics)."""
  options = ("templates", "batch_size")

  def __init__(self, images: Embedded, texts: Texts, class_names: Sequence[str],
               templates: Sequence[str]):
    self.images, self.texts = images, texts
    self.class_names = list(class_names)   # templates: a list, or per-class prompts (a dict)
    self.templates = dict(templates) if isinstance(templates, dict) else list(templates)

  @classmethod
  def build(cls, inputs: Inputs, s: dict) -> "ZeroShot":
    images = inputs.image_embeddings(s["batch_size"])
    if not inputs.class_names:
      raise NotApplicable("zero-shot needs class names and the dataset has none")
    _need_labels(inputs.eval_split, "zero-shot")
    return cls(images, inputs.texts(s["batch_size"]), inputs.class_names,
               s.get("templates") or inputs.templates)

  def class_embeddings(self, variables) -> np.ndarray:
    """[C, d] unit rows."""
    return class_embeddings(lambda s: self.texts(variables, list(s)), self.class_names,
                            self.templates)

  def counts(self, variables) -> ZeroShotCounts:
    cls = self.class_embeddings(variables)
    counts = ZeroShotCounts(len(self.class_names))
    for emb, fields in self.images.stream(variables):
      counts.update(emb @ cls.T, fields["label"])
    return counts

  def run(self, variables) -> dict[str, float]:
    r = self.counts(variables).result()
    return {f"zeroshot_top{k}": r[f"acc{k}"] for k in (1, 5) if f"acc{k}" in r}


class Pairing(NamedTuple):
  """The eval split's embeddings for retrieval: text j describes image i where match[i, j];
  texts: text j's input (a token row or a string)."""
  img: np.ndarray       # [n, d]
  txt: np.ndarray       # [m, d]
  match: np.ndarray     # [n, m] bool
  texts: Any            # [m, L] token rows or m strings


def caption_match(captions: Sequence[Sequence[str]]) -> np.ndarray:
  """[n, m] bool for n images' caption lists (m captions in all, in order): caption j goes
  with image i when image i has a caption equal to it."""
  flat = [t for caps in captions for t in caps]
  owner = np.repeat(np.arange(len(captions)), [len(c) for c in captions])
  _, sid = np.unique(np.asarray(flat, dtype=object).astype(str), return_inverse=True)
  has = np.zeros((len(captions), sid.max() + 1), bool)
  has[owner, sid] = True
  return has[:, sid]


class Pairs:
  """The eval split's image and text embeddings and which go together.

  One text per image: retrieval_match 'pair' (text i goes with image i, identical captions
  counting as one text) or 'label' (same class). Several captions per image (a list per
  image, as CLIP_benchmark's retrieval sets give them): every caption is a text, CLIP_benchmark's
  protocol, and goes with its image, and with any other image that has the same caption
  word for word (whose copies tie: CLIP_benchmark's top-k would pick one arbitrarily).
  """

  def __init__(self, images: Embedded, texts: Texts, match: str):
    if match not in ("pair", "label"):
      raise ValueError(f"retrieval_match must be 'pair' or 'label'; got {match!r}")
    self.images, self.texts, self.match = images, texts, match

  def __call__(self, variables) -> Pairing:
    def compute():
      img, fields = self.images.all(variables)
      texts = fields["text"]
      if isinstance(texts, list) and texts and isinstance(texts[0], list):
        flat = [t for caps in texts for t in caps]
        return Pairing(img, self.texts(variables, flat), caption_match(texts), flat)
      ids = fields["label"] if self.match == "label" else caption_ids(texts)
      return Pairing(img, self.texts(variables, texts), ids[:, None] == ids[None, :], texts)
    return self.images.memo.get(self, compute)

  @classmethod
  def build(cls, inputs: Inputs, s: dict) -> "Pairs":
    images = inputs.image_embeddings(s["batch_size"])
    if "text" not in inputs.eval_split.fields:
      raise NotApplicable("retrieval needs captions and the evaluation split has none")
    if s["retrieval_match"] == "label":
      _need_labels(inputs.eval_split, "retrieval_match='label'")
    key = ("pairs", s["batch_size"], s["retrieval_match"])
    if key not in inputs._embedded:
      inputs._embedded[key] = cls(images, inputs.texts(s["batch_size"]), s["retrieval_match"])
    return inputs._embedded[key]


@register("retrieval")
class Retrieval:
  """retrieval_{i2t,t2i}_r{1,5,10}: recall@k of image->text and text->image retrieval."""
  options = ("retrieval_match", "batch_size")

  def __init__(self, pairs: Pairs):
    self.pairs = pairs

  @classmethod
  def build(cls, inputs: Inputs, s: dict) -> "Retrieval":
    return cls(Pairs.build(inputs, s))

  def recall(self, variables) -> dict[str, float]:
    """{'i2t_r1', ..., 't2i_r10', 'n'}."""
    p = self.pairs(variables)
    return {**retrieval_recall(p.img, p.txt, match=p.match), "n": len(p.img)}

  def run(self, variables) -> dict[str, float]:
    return {f"retrieval_{k}": v for k, v in self.recall(variables).items() if k != "n"}


@register("probe")
class Probe:
  """linear_probe_top1, linear_probe_{k}shot_top1 and knn_top1 of frozen image features,
  trained on the probe split, tested on the eval split; with an objective whose
  transfer_head gives a classifier for the class names, transfer_top1 (that classifier as it
  is), transfer_{k}shot_top1 / transfer_{k}shot_from_zero_top1 (100 steps of gradient descent
  on k examples per class from it / from zeros) and transfer_classes_found."""
  options = ("knn_k", "probe_shots", "batch_size")

  def __init__(self, train: Embedded, test: Embedded, *, knn_k: int = 20,
               shots: Sequence[int] = (), transfer: Callable | None = None,
               class_names: Sequence[str] | None = None):
    self.train, self.test, self.knn_k, self.shots = train, test, knn_k, tuple(shots)
    self.transfer, self.class_names = transfer, list(class_names or [])

  @classmethod
  def build(cls, inputs: Inputs, s: dict) -> "Probe":
    if inputs.probe_split is None:
      raise NotApplicable("the probes need a train split with labels (config.data.label_key)")
    _need_labels(inputs.eval_split, "the probes")
    features = inputs.jit(inputs.objective.features)
    # With towers the image embeddings are the test features: the eval images are embedded
    # once per round, for zero-shot, retrieval and the probes.
    test = (inputs.image_embeddings(s["batch_size"]) if inputs.towers is not None
            else inputs.embedded(inputs.eval_split, features, s["batch_size"]))
    return cls(inputs.embedded(inputs.probe_split, features, s["batch_size"]), test,
               knn_k=s["knn_k"], shots=s["probe_shots"],
               transfer=inputs.objective.transfer_head, class_names=inputs.class_names)

  def run(self, variables) -> dict[str, float]:
    train_x, train = self.train.all(variables)
    test_x, test = self.test.all(variables)
    args = (train_x, train["label"], test_x, test["label"])
    out = {"linear_probe_top1": linear_probe_accuracy(*args),
           "knn_top1": knn_accuracy(*args, k=self.knn_k)}
    for k in self.shots:
      out[f"linear_probe_{k}shot_top1"] = linear_probe_accuracy(*args, shots=k)
    head = (self.transfer(variables, self.class_names)
            if self.transfer is not None and self.class_names else None)
    if head is not None:
      out.update(self._transfer(head, args))
    return out

  def _transfer(self, head, args) -> dict[str, float]:
    w, b, found = head
    test_x, test_y = args[2], args[3]
    out = {"transfer_classes_found": int(found),
           "transfer_top1": float(np.mean((test_x @ w + b).argmax(1) == test_y))}
    for k in self.shots:
      out[f"transfer_{k}shot_top1"] = softmax_regression_accuracy(*args, w0=w, b0=b, shots=k)
      out[f"transfer_{k}shot_from_zero_top1"] = softmax_regression_accuracy(
          *args, w0=np.zeros_like(w), b0=np.zeros_like(b), shots=k)
    return out


def _strings(tok, texts) -> list[str]:
  return list(texts) if isinstance(texts, (list, tuple)) else tok.decode(texts)


@register("captioning")
class Captioning:
  """caption_bleu (corpus BLEU, mmjax.evaluate.captioning) of the captions generated for the
  eval images against the eval captions of the image's class (retrieval_match='label') or its
  own caption; caption_exact: the share equal to one of those references (words compared,
  case and spacing ignored); caption_exact_match: the share that name their image's class and
  no other (one object an image: the digits, not the scenes)."""
  options = ("retrieval_match", "batch_size")

  def __init__(self, generated: Embedded, tokenizer, *, match: str = "pair",
               class_names: Sequence[str] | None = None):
    self.generated, self.tok, self.match = generated, tokenizer, match
    self.class_names = list(class_names or [])

  @classmethod
  def build(cls, inputs: Inputs, s: dict) -> "Captioning":
    # The tokenizer's start token, for texts that carry their own.
    gen = inputs.objective.captioner(getattr(inputs.tokenizer, "bos_id", None))
    if gen is None:
      raise NotApplicable("the objective generates no captions (captioner() is None)")
    if "text" not in inputs.eval_split.fields:
      raise NotApplicable("captioning needs reference captions and the split has none")
    return cls(inputs.embedded(inputs.eval_split, gen, s["batch_size"]), inputs.tokenizer,
               match=s["retrieval_match"], class_names=inputs.class_names)

  def run(self, variables) -> dict[str, float]:
    tokens, fields = self.generated.all(variables)
    generated = self.tok.decode(tokens)
    captions, labels = _strings(self.tok, fields["text"]), fields.get("label")
    if captions and isinstance(captions[0], list):   # several references per image
      refs = [list(c) for c in captions]
    elif self.match == "label" and labels is not None:
      by_class = {c: sorted({t for t, l in zip(captions, labels) if l == c})
                  for c in np.unique(labels)}
      refs = [by_class[c] for c in labels]
    else:
      refs = [[t] for t in captions]
    words = lambda t: " ".join(str(t).lower().split())
    out = {"caption_bleu": corpus_bleu(generated, refs),
           "caption_exact": float(np.mean([words(g) in {words(r) for r in rs}
                                           for g, rs in zip(generated, refs)]))}
    if self.class_names and labels is not None:
      out["caption_exact_match"] = class_word_match(generated, labels, self.class_names)
    return out


@register("rerank")
class Rerank:
  """itm_retrieval_{i2t,t2i}_r1: each query's top k by contrastive similarity re-ranked by
  the objective's matching score (mmjax.evaluate.retrieval.rerank_recall)."""
  options = ("retrieval_match", "batch_size")

  def __init__(self, pairs: Pairs, image_tokens: Embedded, score: Callable, k: int):
    self.pairs, self.image_tokens, self.score_fn, self.k = pairs, image_tokens, score, k
    self.encode = None   # strings -> token rows (an evaluation set's captions)

  @classmethod
  def build(cls, inputs: Inputs, s: dict) -> "Rerank":
    reranker = inputs.objective.reranker()
    if reranker is None:
      raise NotApplicable("the objective has no matching head (reranker() is None)")
    tokens_fn, score_fn, k = reranker
    out = cls(Pairs.build(inputs, s),
              inputs.embedded(inputs.eval_split, inputs.jit(tokens_fn), s["batch_size"]),
              inputs.jit(score_fn), k)
    out.encode = lambda texts: inputs.tokenizer.encode(texts, inputs.text_len)
    return out

  def run(self, variables) -> dict[str, float]:
    p = self.pairs(variables)
    image_tokens, _ = self.image_tokens.all(variables)
    texts, b = p.texts, self.image_tokens.batch_size
    texts = np.asarray(self.encode(texts) if isinstance(texts, list) else texts)

    def score(ii: np.ndarray, jj: np.ndarray) -> np.ndarray:
      out = []
      for s in range(0, len(ii), b):
        i, j = ii[s:s + b], jj[s:s + b]
        pad = b - len(i)
        i, j = np.r_[i, np.repeat(i[:1], pad)], np.r_[j, np.repeat(j[:1], pad)]
        out.append(np.asarray(self.score_fn(variables, image_tokens[i], texts[j]))[:b - pad])
      return np.concatenate(out)

    recall = rerank_recall(p.img @ p.txt.T, score, k=self.k, match=p.match)
    return {f"itm_retrieval_{k}": v for k, v in recall.items()}


@register("refexp")
class Refexp:
  """refexp_acc: the share of the eval images' regions whose box, predicted from the region's
  text by the objective (refexp_predictor: greedy box tokens), overlaps the true one with IoU
  >= 0.5 (LocCa's referring-expression accuracy). Needs the split's 'regions' (an objective's
  eval_fields: [R, 5 + Lr] valid, box tokens, text) and the objective's box_bins."""
  options = ("batch_size",)

  def __init__(self, predicted: Embedded, bins: int, offset: int):
    self.predicted, self.bins, self.offset = predicted, bins, offset

  @classmethod
  def build(cls, inputs: Inputs, s: dict) -> "Refexp":
    hook = getattr(inputs.objective, "refexp_predictor", lambda: None)()
    if hook is None:
      raise NotApplicable("the objective predicts no boxes (refexp_predictor() is None)")
    if "regions" not in inputs.eval_split.fields:
      raise NotApplicable("referring expressions need regions and the split has none")
    fn, bins, offset = hook
    return cls(inputs.embedded(inputs.eval_split, inputs.jit(fn), s["batch_size"], None), bins,
               offset)

  def run(self, variables) -> dict[str, float]:
    pred, fields = self.predicted.all(variables)             # [n, R, 4] box tokens
    regions = np.asarray(fields["regions"])
    valid = regions[..., 0] > 0
    if not valid.any():
      raise ValueError("refexp: the evaluation split has no regions")
    iou = np.asarray(box_iou(token_boxes(pred, self.bins, self.offset),
                             token_boxes(regions[..., 1:5], self.bins, self.offset)))
    return {"refexp_acc": float(np.mean(iou[valid] >= 0.5))}


@register("dense_probe")
class DenseProbe:
  """A linear probe of each patch token's class on the frozen patch features (the objective's
  patch_features, [b, g * g, w] on a g x g patch grid), fit on the probe split's patches and
  tested on the eval split's. A patch's class is that of the region whose box holds its
  centre, or background (the splits' 'region_boxes', mmjax.data.regions.patch_labels).
  dense_probe_top1: over all patches; dense_probe_fg_top1: over the patches inside a region
  (the informative one when background dominates)."""
  options = ("batch_size",)

  def __init__(self, train: Embedded, test: Embedded):
    self.train, self.test = train, test

  @classmethod
  def build(cls, inputs: Inputs, s: dict) -> "DenseProbe":
    fn = getattr(inputs.objective, "patch_features", lambda: None)()
    if fn is None:
      raise NotApplicable("the objective gives no patch features (patch_features() is None)")
    splits = (inputs.probe_split, inputs.eval_split)
    if any(sp is None or "region_boxes" not in sp.fields for sp in splits):
      raise NotApplicable("the dense probe needs regions (config.data.regions_key) in the "
                          "probe and eval splits")
    fn = inputs.jit(fn)
    return cls(*(inputs.embedded(sp, fn, s["batch_size"]) for sp in splits))

  def run(self, variables) -> dict[str, float]:
    (tx, tr), (ex, te) = self.train.all(variables), self.test.all(variables)
    n = tx.shape[1]
    grid = math.isqrt(n)
    if grid * grid != n:
      raise ValueError(f"dense_probe: {n} patch features an image are not a square grid")
    train_y, test_y = (region_lib.patch_labels(f["region_boxes"], grid).reshape(-1)
                       for f in (tr, te))
    flat = lambda x: x.reshape(-1, x.shape[-1])
    pred = linear_probe_predict(flat(tx), train_y, flat(ex), test_y)
    fg = test_y > 0
    return {"dense_probe_top1": float(np.mean(pred == test_y)),
            "dense_probe_fg_top1": float(np.mean(pred[fg] == test_y[fg])) if fg.any()
            else float("nan")}


@register("audio")
class Audio:
  """Audio bound to a frozen image-text space (ImageBind's emergent evaluations), from the
  objective's modality_encoders()['audio'] (fn(variables, audio [b, T]) -> unit-norm [b, e])
  and the eval split's 'audio' [n, T]:

  audio_image_r1, audio_image_r5: audio i's nearest images by cosine, correct = image i
    (retrieval_match 'label': any image of its class);
  audio_text_zeroshot_top1: audio i's nearest class embedding (the image zero-shot's prompts
    and templates through the text tower: no (audio, text) pair seen) is its label;
  audio_text_r1: audio i's nearest caption is caption i (or an identical one; 'label': one of
    its class), the retrieval evaluator's matching.
  The zero-shot needs class names and labels, audio_text_r1 captions: left out without them.
  """
  options = ("retrieval_match", "templates", "batch_size")

  def __init__(self, audio: Embedded, images: Embedded, *, match: str = "pair",
               zeroshot: ZeroShot | None = None, pairs: Pairs | None = None):
    if match not in ("pair", "label"):
      raise ValueError(f"retrieval_match must be 'pair' or 'label'; got {match!r}")
    self.audio, self.images, self.match = audio, images, match
    self.zeroshot, self.pairs = zeroshot, pairs

  @classmethod
  def build(cls, inputs: Inputs, s: dict) -> "Audio":
    hooks = getattr(inputs.objective, "modality_encoders", lambda: {})() or {}
    if "audio" not in hooks:
      raise NotApplicable("the objective encodes no audio (modality_encoders() has no 'audio')")
    if "audio" not in inputs.eval_split.fields:
      raise NotApplicable("the audio evaluator needs the split's 'audio' "
                          "(config.data.audio_ext)")
    images = inputs.image_embeddings(s["batch_size"])
    if s["retrieval_match"] == "label":
      _need_labels(inputs.eval_split, "retrieval_match='label'")
    audio = inputs.embedded(inputs.eval_split, inputs.jit(hooks["audio"]), s["batch_size"],
                            "audio")
    return cls(audio, images, match=s["retrieval_match"],
               zeroshot=(_optional(ZeroShot.build, inputs, s)
                         if s.get("templates") or inputs.templates else None),
               pairs=_optional(Pairs.build, inputs, s))

  def run(self, variables) -> dict[str, float]:
    aud, fields = self.audio.all(variables)            # [n, e], fields of the same n rows
    img, _ = self.images.all(variables)                # [n, e]
    ids = (np.asarray(fields["label"]) if self.match == "label" else np.arange(len(aud)))
    r = retrieval_recall(aud, img, img_ids=ids, txt_ids=ids, ks=(1, 5))
    out = {"audio_image_r1": r["i2t_r1"], "audio_image_r5": r["i2t_r5"]}
    if self.zeroshot is not None:
      cls = self.zeroshot.class_embeddings(variables)   # [C, e]
      pred = np.argmax(aud @ cls.T, axis=1)
      out["audio_text_zeroshot_top1"] = float(np.mean(pred == np.asarray(fields["label"])))
    if self.pairs is not None:
      p = self.pairs(variables)                         # p.match [n, m]: audio i ~ text j
      out["audio_text_r1"] = retrieval_recall(aud, p.txt, match=p.match, ks=(1,))["i2t_r1"]
    return out


def _optional(build: Callable, inputs: Inputs, s: dict):
  """build(inputs, s), or None where it does not apply."""
  try:
    return build(inputs, s)
  except NotApplicable:
    return None
