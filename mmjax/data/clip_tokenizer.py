"""CLIP's byte-level BPE tokenizer: OpenAI CLIP's ids, as open_clip.get_tokenizer('ViT-B-32').

  tok = ClipTokenizer()
  tok.encode(["a photo of a cat."])   # int32 [1, 77]: <start_of_text> ... <end_of_text> 0 0 ...

Text is cleaned as open_clip's default ('lower') does: ftfy.fix_text, HTML
entities unescaped twice, whitespace runs collapsed to one space, stripped,
lower-cased. The merges are the vendored bpe_simple_vocab_16e6.txt.gz (MIT,
see bpe_simple_vocab_16e6.LICENSE).
"""

from __future__ import annotations

import gzip
import html
import importlib.resources
from typing import Sequence

import ftfy
import numpy as np
import regex

VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
CONTEXT_LENGTH = 77
SOT, EOT = "<start_of_text>", "<end_of_text>"
_NUM_MERGES = 49152 - 256 - 2   # CLIP uses the first 48894 merges of the file

# Pre-tokenizer: the special tokens, English contractions, runs of letters,
# single digits, runs of anything else that is not whitespace.
_SPLIT = regex.compile(
    "|".join([regex.escape(SOT), regex.escape(EOT), r"'(?:s|t|re|ve|m|ll|d)",
              r"\p{L}+", r"\p{N}", r"[^\s\p{L}\p{N}]+"]),
    regex.IGNORECASE)


def _byte_symbols() -> list[tuple[int, str]]:
  """(byte, its one-character symbol) in vocabulary order.

  Printable Latin-1 bytes are their own character and come first; the other 68
  (controls, space, soft hyphen, ...) map to chr(256), chr(257), ... in byte
  order, so no symbol is whitespace.
  """
  printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
  rest = [b for b in range(256) if b not in set(printable)]
  return [(b, chr(b)) for b in printable] + [(b, chr(256 + i)) for i, b in enumerate(rest)]


def clean_text(text: str) -> str:
  """open_clip's 'lower' cleaning: fix mojibake, unescape HTML, collapse whitespace, lower-case."""
  text = html.unescape(html.unescape(ftfy.fix_text(text)))
  return " ".join(text.split()).lower()


class ClipTokenizer:
  """Strings -> CLIP token ids; vocab_size 49408, pad 0 (which is also '!': pad_id
  cannot tell padding from text; CLIP models pool at the EOT instead)."""

  pad_id = 0

  def __init__(self, vocab_path: str | None = None):
    if vocab_path is None:
      data = (importlib.resources.files("mmjax.data") / VOCAB_FILE).read_bytes()
    else:
      with open(vocab_path, "rb") as f:
        data = f.read()
    lines = gzip.decompress(data).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:_NUM_MERGES + 1]]   # line 0: version
    symbols = _byte_symbols()
    self._byte_to_symbol = {b: s for b, s in symbols}
    vocab = [s for _, s in symbols]
    vocab += [s + "</w>" for s in vocab] + ["".join(m) for m in merges] + [SOT, EOT]
    self._ids = {piece: i for i, piece in enumerate(vocab)}
    self._pieces = vocab
    self._rank = {pair: r for r, pair in enumerate(merges)}
    self._symbol_to_byte = {s: b for b, s in symbols}
    self._cache: dict[str, list[int]] = {}
    self.bos_id, self.eos_id = self._ids[SOT], self._ids[EOT]
    self.vocab_size = len(vocab)

  def _word_ids(self, word: str) -> list[int]:
    """BPE ids of one pre-tokenized word."""
    if word in (SOT, EOT):
      return [self._ids[word]]
    ids = self._cache.get(word)
    if ids is not None:
      return ids
    parts = [self._byte_to_symbol[b] for b in word.encode("utf-8")]
    parts[-1] += "</w>"   # the end-of-word marker rides on the last symbol
    while len(parts) > 1:
      # Merge the best-ranked adjacent pair everywhere, left to right, until none is known.
      ranks = [self._rank.get(p, _NUM_MERGES) for p in zip(parts, parts[1:])]
      best = min(ranks)
      if best == _NUM_MERGES:
        break
      j = ranks.index(best)
      pair, merged, i = (parts[j], parts[j + 1]), [], 0
      while i < len(parts):
        if i + 1 < len(parts) and (parts[i], parts[i + 1]) == pair:
          merged.append(parts[i] + parts[i + 1])
          i += 2
        else:
          merged.append(parts[i])
          i += 1
      parts = merged
    ids = [self._ids[p] for p in parts]
    if len(self._cache) > 100_000:   # bound memory on endless streams of new words
      self._cache.clear()
    self._cache[word] = ids
    return ids

  def text_ids(self, text: str) -> list[int]:
    """BPE ids of one text, after cleaning; no start/end tokens, no truncation."""
    return [i for word in _SPLIT.findall(clean_text(text)) for i in self._word_ids(word)]

  def encode(self, texts: Sequence[str], max_len: int = CONTEXT_LENGTH) -> np.ndarray:
    """n strings -> int32 [n, max_len]: SOT, ids, EOT, then 0s.

    Too long: cut to max_len with EOT as the last token (as open_clip).
    """
    if isinstance(texts, str):
      raise ValueError("texts must be a sequence of strings, not one string")
    if max_len < 2:
      raise ValueError(f"max_len={max_len} leaves no room for the start and end tokens")
    out = np.full((len(texts), max_len), self.pad_id, np.int32)
    for row, text in enumerate(texts):
      ids = [self.bos_id, *self.text_ids(text)][:max_len - 1] + [self.eos_id]
      out[row, :len(ids)] = ids
    return out

  def decode(self, ids: np.ndarray) -> list[str]:
    """[n, L] ids -> n strings (from after SOT up to EOT; words joined by spaces)."""
    out = []
    for row in np.asarray(ids).reshape(-1, np.shape(ids)[-1]).tolist():
      if self.eos_id in row:
        row = row[:row.index(self.eos_id)]
      text = "".join(self._pieces[i] for i in row if i != self.bos_id)
      words = text.split("</w>")
      raw = " ".join(bytes(self._symbol_to_byte[c] for c in w).decode("utf-8", "replace")
                     for w in words)
      out.append(raw.strip())
    return out
