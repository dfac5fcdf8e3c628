"""Evaluation data as a stream of fixed-size batches through jitted encoders.

A `Split` is read in batches of one size (one compile), the last one padded by repeating its
first row and flagged by 'valid'. An `Embedded` is a split through one encoder: the valid
rows' outputs batch by batch (running sums need no more), or all of them at once (retrieval,
probes). A `Memo` shares what several evaluators of one round compute from the same variables
(the eval images embedded once); outside a round nothing is kept.

  split = Split.from_arrays({"image": images, "label": labels})   # or Split(batches_fn)
  images = Embedded(split, jax.jit(embed_image), batch_size=64)
  for emb, fields in images.stream(variables):   # emb [v, d], fields['label'] [v]
    ...
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Sequence

import numpy as np

# A batch: 'image' [b, S, S, 3] float32, 'valid' [b] bool, and maybe 'label' [b] int and
# 'text' (token rows [b, L] int, or b strings).
Batch = dict


def _pad(x, pad: int):
  """x (an array, a lazy array's slice, a list, or a dict of arrays: a NaFlex tower's input)
  with its first row repeated pad times."""
  if isinstance(x, dict):
    return {k: _pad(v, pad) for k, v in x.items()}
  if isinstance(x, list):
    return x + [x[0]] * pad
  x = np.asarray(x)
  return np.concatenate([x, np.repeat(x[:1], pad, 0)]) if pad else x


def _length(x) -> int:
  """Rows of x (an array, a list, or a dict of arrays)."""
  return len(next(iter(x.values()))) if isinstance(x, dict) else len(x)


def _rows(x, valid: np.ndarray):
  """The rows of x where valid [b] is True (x an array, a list, or a dict of them: a NaFlex
  image batch)."""
  if isinstance(x, dict):
    return {k: _rows(v, valid) for k, v in x.items()}
  if isinstance(x, list):
    return [t for t, v in zip(x, valid) if v]
  return np.asarray(x)[valid]


def _concat(parts: Sequence):
  if isinstance(parts[0], dict):
    return {k: _concat([p[k] for p in parts]) for k in parts[0]}
  if isinstance(parts[0], list):
    return [t for p in parts for t in p]
  return np.concatenate(parts)


def array_batches(arrays: dict, batch_size: int) -> Iterator[Batch]:
  """In-memory (or lazy, e.g. mmjax.data.pipeline.EvalImages) arrays {key: [n, ...]} in
  order, in batches of exactly batch_size, the last padded with its first row ('valid'
  False there)."""
  if batch_size <= 0:
    raise ValueError(f"batch_size={batch_size} must be positive")
  n = len(arrays["image"])
  for i in range(0, n, batch_size):
    chunk = {k: v[i:i + batch_size] for k, v in arrays.items()}
    m = _length(chunk["image"])
    out = {k: _pad(v, batch_size - m) for k, v in chunk.items()}
    out["valid"] = np.arange(batch_size) < m
    yield out


class Split:
  """An evaluation split, readable in fixed-size batches as often as asked.

  Args:
    batches: batch_size -> an iterator over the split once, in order, of batches
      {'image' [b, ...], 'valid' [b] bool[, 'label' [b] int][, 'text' [b, L] int or b str]}.
    fields: the keys besides 'image' and 'valid' its batches carry ('label', 'text').
  """

  def __init__(self, batches: Callable[[int], Iterator[Batch]], fields: Sequence[str]):
    self._batches, self.fields = batches, tuple(fields)

  @classmethod
  def from_arrays(cls, arrays: dict) -> "Split":
    """arrays: {'image' [n, S, S, 3] (maybe lazy)[, 'text' [n, L]][, 'label' [n]]}."""
    return cls(lambda b: array_batches(arrays, b), [k for k in arrays if k != "image"])

  def batches(self, batch_size: int) -> Iterator[Batch]:
    return self._batches(batch_size)


class Memo:
  """What the evaluators of one round compute from the same variables, computed once;
  outside a `round()` nothing is kept (so no round's results outlive it)."""

  def __init__(self):
    self._store: dict | None = None

  @contextlib.contextmanager
  def round(self):
    self._store = {}
    try:
      yield
    finally:
      self._store = None

  @property
  def active(self) -> bool:
    return self._store is not None

  def get(self, key: Any, compute: Callable[[], Any]):
    if self._store is None:
      return compute()
    if key not in self._store:
      self._store[key] = compute()
    return self._store[key]


class Embedded:
  """A split through fn(variables, x [b, ...]) -> [b, ...] (jitted by the caller), x its
  batches' `key` field (key None: the whole batch, a dict, 'valid' left out).

  stream(variables) yields (out [v, ...], fields) per batch, the valid rows only, fields the
  batch's other keys; all(variables) gives them concatenated over the split, once per round
  of `memo` (within a round stream() reads those too).
  """

  def __init__(self, split: Split, fn: Callable, batch_size: int, *, key: str = "image",
               memo: Memo | None = None):
    self.split, self.fn, self.batch_size, self.key = split, fn, batch_size, key
    self.memo = memo or Memo()

  def _compute(self, variables) -> Iterator[tuple[np.ndarray, dict]]:
    for batch in self.split.batches(self.batch_size):
      valid = np.asarray(batch["valid"], bool)
      x = batch[self.key] if self.key else {k: v for k, v in batch.items() if k != "valid"}
      out = np.asarray(self.fn(variables, x))[valid]
      yield out, {k: _rows(v, valid) for k, v in batch.items() if k not in (self.key, "valid")}

  def stream(self, variables) -> Iterator[tuple[np.ndarray, dict]]:
    if self.memo.active:
      yield self.all(variables)
    else:
      yield from self._compute(variables)

  def all(self, variables) -> tuple[np.ndarray, dict]:
    """(out [n, ...], {field: its n rows}) of the whole split."""
    def compute():
      parts = list(self._compute(variables))
      if not parts:
        raise ValueError("the evaluation split is empty")
      return (np.concatenate([p[0] for p in parts]),
              {k: _concat([p[1][k] for p in parts]) for k in parts[0][1]})
    return self.memo.get(self, compute)


class Texts:
  """Texts through fn(variables, tokens [b, L]) -> [b, d] (jitted by the caller) in batches of
  batch_size (the last padded): token rows [n, L] as they are, a list of n strings encoded
  by the tokenizer to text_len tokens."""

  def __init__(self, fn: Callable, batch_size: int, tokenizer=None, text_len: int = 0):
    self.fn, self.batch_size, self.tok, self.text_len = fn, batch_size, tokenizer, text_len

  def __call__(self, variables, texts) -> np.ndarray:
    """texts: [n, L] int token rows or n strings -> [n, d]."""
    out, b = [], self.batch_size
    strings = isinstance(texts, (list, tuple))
    for i in range(0, len(texts), b):
      chunk = texts[i:i + b]
      n = len(chunk)
      tokens = (self.tok.encode(_pad(list(chunk), b - n), self.text_len) if strings
                else _pad(chunk, b - n))
      out.append(np.asarray(self.fn(variables, tokens))[:n])
    return np.concatenate(out)


def caption_ids(texts) -> np.ndarray:
  """[n] ints, equal for identical captions (token rows [n, L] or n strings)."""
  if isinstance(texts, (list, tuple)):
    return np.unique(np.asarray(texts, dtype=object).astype(str), return_inverse=True)[1]
  return np.unique(np.asarray(texts), axis=0, return_inverse=True)[1].reshape(-1)
