"""CatLIP: the image tower and a linear head classify each image's caption labels
(multi-label binary cross-entropy over the V labels of a vocabulary built from the training
captions; the text itself is not read)."""

from __future__ import annotations

import os

import jax
import ml_collections
import numpy as np

from mmjax.data import catlip_vocab
from mmjax.losses import multilabel_bce_loss
from mmjax.models import catlip, factory
from mmjax.objectives.base import Context, Objective, register, train_apply, with_stats

VOCAB_FILE = "catlip_vocab.json"


@register("catlip")
class CatLIP(Objective):
  batch_keys = ("image", "targets")
  settings_path = "model.catlip"

  @staticmethod
  def default_settings():
    # labels 'words' (content words) | 'wordnet' (their first noun synsets; needs nltk and
    # its WordNet data); stop_words 'sklearn' (scikit-learn's English list) | 'none';
    # keep_words: words never removed as stop words (scikit-learn's list holds 'one' ..
    # 'nine'); a label must be in >= min_count training captions; the max_labels most
    # frequent are kept (0: all).
    return dict(labels="words", stop_words="sklearn", keep_words=(), min_count=5,
                max_labels=1000)

  @classmethod
  def check_config(cls, config):
    settings = config.model.catlip
    if settings.labels not in catlip_vocab.LABELS:
      raise ValueError(f"config.model.catlip.labels must be one of {catlip_vocab.LABELS}; "
                       f"got {settings.labels!r}")
    if settings.stop_words not in ("sklearn", "none"):
      raise ValueError(f"config.model.catlip.stop_words must be 'sklearn' or 'none'; "
                       f"got {settings.stop_words!r}")
    words = settings.keep_words
    if isinstance(words, str) or not all(isinstance(w, str) for w in words):
      raise ValueError(f"config.model.catlip.keep_words must be a tuple of words; "
                       f"got {settings.keep_words!r}")
    for key, low in (("min_count", 1), ("max_labels", 0)):
      v = settings[key]
      if not isinstance(v, int) or isinstance(v, bool) or v < low:
        raise ValueError(f"config.model.catlip.{key} must be an int >= {low}; got {v!r}")
    if config.data.name == "wds":
      raise ValueError("config.loss='catlip' reads its caption labels through the TFDS "
                       "pipeline; config.data.name='wds' is not supported for it yet")

  def __init__(self, config: ml_collections.ConfigDict, context: Context,
               vocab: catlip_vocab.Vocabulary | None = None):
    """vocab: the labels; None: built from context.train_texts() by config.model.catlip."""
    self.vocab = vocab if vocab is not None else self._build_vocab(config, context)
    self.model = catlip.Model(image=factory.tower_config(config, "image"),
                              num_labels=len(self.vocab), **factory.dtypes(config))

  @staticmethod
  def _build_vocab(config, context) -> catlip_vocab.Vocabulary:
    if context.train_texts is None:
      raise ValueError("config.loss='catlip' builds its labels from the training captions: "
                       "pass Context(train_texts=...)")
    settings = config.model.catlip
    vocab = catlip_vocab.build_vocabulary(
        context.train_texts(), labels=settings.labels,
        stop_words=() if settings.stop_words == "none" else settings.stop_words,
        keep_words=tuple(settings.keep_words), min_count=settings.min_count,
        max_labels=settings.max_labels)
    if jax.process_index() == 0:
      print(f"mmjax: CatLIP: {len(vocab)} labels from the training captions, most frequent "
            f"{', '.join(vocab.labels[:8])}", flush=True)
    return vocab

  def caption_fields(self):
    return {"targets": self.vocab}   # caption -> float32 [V] multi-hot

  def init_variables(self, rng, batch):
    return self.model.init(rng, batch["image"])

  def grad_fn(self, params, ema, batch, rng, batch_stats=None):
    del ema

    def loss(p):
      logits, stats = train_apply(self.model, self._freeze(p), batch["image"],
                                  batch_stats=batch_stats, rngs={"dropout": rng})
      return multilabel_bce_loss(logits, batch["targets"]), with_stats({}, stats)
    return jax.value_and_grad(loss, has_aux=True)(params)

  def features(self, variables, image):
    return self.model.apply(variables, image, method="image_features")

  def transfer_head(self, variables, class_names):
    """Each class's row: the mean of the head's rows (kernel columns) and biases of the
    labels of its name's words; zeros for a class none of whose words is a label."""
    head = jax.device_get(variables["params"]["head"])
    kernel, bias = np.asarray(head["kernel"], np.float64), np.asarray(head["bias"], np.float64)
    ids = catlip_vocab.class_label_ids(self.vocab, class_names)
    w = np.zeros((kernel.shape[0], len(ids)))
    b = np.zeros(len(ids))
    for c, rows in enumerate(ids):
      if rows:
        w[:, c], b[c] = kernel[:, rows].mean(1), bias[rows].mean()
    return w, b, sum(bool(r) for r in ids)

  def save_or_check(self, workdir):
    path = os.path.join(workdir, VOCAB_FILE)
    if not os.path.exists(path):
      if jax.process_index() == 0:
        self.vocab.save(path)
      return
    saved = catlip_vocab.Vocabulary.load(path)
    if saved.to_json() != self.vocab.to_json():
      diff = sorted(set(saved.labels) ^ set(self.vocab.labels))[:5]
      raise ValueError(f"config.model.catlip: the label vocabulary built now ({len(self.vocab)} "
                       f"labels) differs from the one in {path} ({len(saved)} labels; e.g. "
                       f"{diff or 'the same labels, another order or word map'}): resume with "
                       "that run's config.model.catlip and data, or use another --workdir")
