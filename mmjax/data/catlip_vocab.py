"""CatLIP's labels: the training captions turned into a vocabulary of content words.

CatLIP (Mehta et al. 2024) trains an image tower as a multi-label classifier over
the nouns of the captions. Here a caption's words are its lowercased letter/digit
runs minus stop words (scikit-learn's English list unless the config gives one);
each word maps to a label, either itself (labels='words') or, when the user has
WordNet data for nltk, its first noun synset ('dog' -> 'dog.n.01'; words with no noun
sense are dropped; no part-of-speech tagging in context). Labels seen in fewer than
min_count captions are dropped, the most frequent max_labels kept, in a fixed order
(count descending, then the label's text). The word -> label map is built once from
the training captions and saved (json) beside the run, so targets need no nltk and
evaluation and resumption use the same labels.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
from typing import Iterable, Sequence

import numpy as np

LABELS = ("words", "wordnet")   # config.model.catlip.labels
_WORD = re.compile(r"[^\W_]+")  # letters and digits; punctuation and '_' split words


def stop_word_set(stop_words: str | Sequence[str], keep_words: Sequence[str] = ()) -> frozenset:
  """'sklearn' (scikit-learn's 318 English stop words) or one's own words, lowercased,
  less keep_words. scikit-learn's list holds number words ('one' .. 'nine' but for
  'seven') and words such as 'fire' or 'system': keep_words puts back the ones a task needs."""
  if isinstance(stop_words, str):
    if stop_words != "sklearn":
      raise ValueError(f"stop_words must be 'sklearn' or a sequence of words; got {stop_words!r}")
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS   # scipy and all: ~0.7 s
    words = set(ENGLISH_STOP_WORDS)
  else:
    words = {str(w).lower() for w in stop_words}
  return frozenset(words - {str(w).lower() for w in keep_words})


def caption_words(caption: str, stop: frozenset) -> list[str]:
  """The caption's lowercased words (letter / digit runs) that are not in `stop`, in order."""
  return [w for w in _WORD.findall(caption.lower()) if w not in stop]


def _nltk_wordnet():
  """nltk's WordNet reader with its data loaded; ValueError when nltk or the data is absent."""
  how = ("config.model.catlip.labels='wordnet' needs nltk and its WordNet data on this machine "
         "(pip install nltk; python -m nltk.downloader wordnet), or use labels='words'")
  try:
    from nltk.corpus import wordnet   # optional: labels='wordnet' only
  except ImportError:
    raise ValueError(f"{how}: nltk is not installed") from None
  try:
    wordnet.ensure_loaded()
  except LookupError:
    raise ValueError(f"{how}: nltk finds no WordNet data (nltk.data.path)") from None
  return wordnet


@dataclasses.dataclass(frozen=True)
class Vocabulary:
  """labels: the V label names in target order; counts: captions holding each; word_to_label:
  word -> label index (only the words of kept labels); stop: the stop words removed."""
  labels: tuple[str, ...]
  counts: tuple[int, ...]
  word_to_label: dict
  stop: frozenset
  settings: dict = dataclasses.field(default_factory=dict)

  def __len__(self) -> int:
    return len(self.labels)

  def label_ids(self, text: str) -> list[int]:
    """The sorted distinct label indices of the words of `text` (unknown words skipped)."""
    ids = {self.word_to_label[w] for w in caption_words(text, self.stop) if w in self.word_to_label}
    return sorted(ids)

  def targets(self, caption: str) -> np.ndarray:
    """caption -> float32 [V] multi-hot: 1 where one of its words has that label."""
    out = np.zeros(len(self.labels), np.float32)
    out[self.label_ids(caption)] = 1.0
    return out

  __call__ = targets   # the train pipeline's per-example `targets` function

  def to_json(self) -> dict:
    return {"labels": list(self.labels), "counts": list(self.counts),
            "word_to_label": dict(sorted(self.word_to_label.items())),
            "stop_words": sorted(self.stop), "settings": self.settings}

  @classmethod
  def from_json(cls, d: dict) -> "Vocabulary":
    return cls(labels=tuple(d["labels"]), counts=tuple(d["counts"]),
               word_to_label={k: int(v) for k, v in d["word_to_label"].items()},
               stop=frozenset(d["stop_words"]), settings=dict(d.get("settings", {})))

  def save(self, path: str) -> None:
    """Written whole or not at all (a temporary file renamed), so a reader never sees half."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
      json.dump(self.to_json(), f, indent=1)
    os.replace(tmp, path)

  @classmethod
  def load(cls, path: str) -> "Vocabulary":
    with open(path) as f:
      return cls.from_json(json.load(f))


def build_vocabulary(captions: Iterable[str], *, labels: str = "words",
                     stop_words: str | Sequence[str] = "sklearn",
                     keep_words: Sequence[str] = (), min_count: int = 1, max_labels: int = 0,
                     wordnet=None) -> Vocabulary:
  """The label vocabulary of the training captions.

  labels: 'words' (each content word is a label) or 'wordnet' (its first noun synset;
  `wordnet`: an object with nltk's `synsets(word, pos='n')` API, default nltk's reader,
  which must find its data). min_count: a label must occur in at least that many
  captions; max_labels: keep the most frequent ones (0: all). Counts are of captions,
  not occurrences (a multi-hot target marks presence).
  """
  if labels not in LABELS:
    raise ValueError(f"config.model.catlip.labels must be one of {LABELS}; got {labels!r}")
  for name, v, low in (("min_count", min_count, 1), ("max_labels", max_labels, 0)):
    if not isinstance(v, int) or isinstance(v, bool) or v < low:
      raise ValueError(f"config.model.catlip.{name} must be an int >= {low}; got {v!r}")
  stop = stop_word_set(stop_words, keep_words)
  if labels == "wordnet" and wordnet is None:
    wordnet = _nltk_wordnet()
  word_label: dict[str, str | None] = {}

  def label_of(word: str) -> str | None:
    if word not in word_label:
      if labels == "words":
        word_label[word] = word
      else:
        senses = wordnet.synsets(word, pos="n")
        word_label[word] = senses[0].name() if senses else None
    return word_label[word]

  counts: collections.Counter = collections.Counter()
  n = 0
  for caption in captions:
    n += 1
    counts.update({lab for w in caption_words(caption, stop) if (lab := label_of(w)) is not None})
  kept = [lab for lab, c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
          if c >= min_count]
  if max_labels:
    kept = kept[:max_labels]
  if not kept:
    raise ValueError(f"no label occurs in >= config.model.catlip.min_count={min_count} of the "
                     f"{n} training captions (labels={labels!r})")
  index = {lab: i for i, lab in enumerate(kept)}
  word_to_label = {w: index[lab] for w, lab in word_label.items() if lab in index}
  settings = dict(labels=labels, min_count=min_count, max_labels=max_labels,
                  keep_words=sorted(str(w).lower() for w in keep_words),
                  stop_words=stop_words if isinstance(stop_words, str) else "custom")
  return Vocabulary(labels=tuple(kept), counts=tuple(counts[lab] for lab in kept),
                    word_to_label=word_to_label, stop=stop, settings=settings)


def class_label_ids(vocab: Vocabulary, class_names: Sequence[str]) -> list[list[int]]:
  """For each class name, the label indices of its words (empty: none in the vocabulary)."""
  return [vocab.label_ids(name) for name in class_names]
