"""Captioning metrics: whether a caption names its image's class, and corpus BLEU (sacrebleu)."""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np
import sacrebleu

# Number words: a caption may name such a class by its numeral too ("the digit 7").
_NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def _words(class_names: Sequence[str]) -> list[set[str]]:
  out = []
  for i, name in enumerate(class_names):
    words = {str(name).lower()}
    if str(name).lower() in _NUMBERS:
      words.add(str(_NUMBERS.index(str(name).lower())))
    out.append(words)
  return out


def class_word_match(captions: Sequence[str], labels, class_names: Sequence[str]) -> float:
  """The share of captions that name their label's class and no other class (as whole
  words, case-insensitive; a number word's numeral counts as it: 'seven' or '7').

  captions: n strings; labels: [n] ints into class_names.
  """
  labels = np.asarray(labels)
  if len(captions) != len(labels):
    raise ValueError(f"{len(captions)} captions for {len(labels)} labels")
  words = _words(class_names)
  hits = 0
  for caption, label in zip(captions, labels):
    tokens = set(re.findall(r"[a-z0-9]+", caption.lower()))
    named = {c for c, w in enumerate(words) if tokens & w}
    hits += named == {int(label)}
  return hits / max(len(labels), 1)


def corpus_bleu(captions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
  """sacrebleu's corpus BLEU (0-100, its default 13a tokenisation) of captions against
  each caption's references (one or more strings; shorter lists are padded by repeating
  their last reference, which changes neither the clipped counts nor the closest length)."""
  if len(captions) != len(references) or any(len(r) == 0 for r in references):
    raise ValueError(f"{len(captions)} captions need as many non-empty reference lists; got "
                     f"{len(references)}")
  k = max(len(r) for r in references)
  streams = [[r[min(i, len(r) - 1)] for r in references] for i in range(k)]
  return float(sacrebleu.corpus_bleu(list(captions), streams).score)
