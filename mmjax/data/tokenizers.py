"""One `get_tokenizer(spec)` for every vocabulary: a checkpoint's (the converters' specs) or
mmjax's own BPE trained on a dataset's training captions.

  tok = get_tokenizer("sentencepiece:/ckpt/spiece.model?canonicalize=true")
  ids = tok.encode(["A photo of a cat."], max_len=64)   # int32 [1, 64]: ids, EOS, pad_id...
  tok.vocab_size, tok.pad_id, tok.eos_id, tok.spec       # pickles (grain workers)
  tok = get_tokenizer(trained_spec(data_dir, "mmjax_digits", 512), train_texts=captions)

Spec grammar: `KIND[:PATH][?KEY=VALUE[&KEY=VALUE...]]` (PATH may not contain '?'):

- `clip`: `mmjax.data.clip_tokenizer.ClipTokenizer()` (OpenAI CLIP's BPE); no path, no options.
- `sentencepiece:PATH`: big_vision's SigLIP text pp, `tokenize(max_len, eos="sticky",
  pad_value=1, lower=True)`: lower-case (ASCII letters only, as `tf.strings.lower`), the
  sentencepiece ids (no BOS), the model's EOS appended; too long (>= max_len ids with the EOS):
  the first max_len-1 ids and the EOS (EOS "sticky"); else right-padded with pad_id (1).
- `gemma:PATH`: big_vision's SigLIP 2 pp, `lower|tok(length, model="gemma", bos="no",
  eos="sticky")`: as `sentencepiece:` but padded with the model's own `pad_id()` (Gemma's: 0).
- `hf:PATH`: a HF `tokenizers` JSON file. Its post-processor adds the special tokens; the file's
  own padding and truncation are switched off and max_len decides: too long keeps the first
  max_len ids, or the first max_len-1 and the last when the last is a special token (sticky
  EOS); padded with option pad_id, else the file's padding pad_id, else 0. `eos_id` is the
  special token the post-processor appends, None when it appends none.
- `trained:PATH`: mmjax's own sentencepiece BPE (`TrainedTokenizer`: lower-cased with
  `str.lower`, the ids, EOS (3) appended and kept when cut, right-padded with PAD (0); it also
  decodes and counts tokens) from the model file PATH. With `?vocab_size=N`, PATH is a cache: a
  missing file is trained on `train_texts()` (the training captions) with N pieces and saved
  there; `trained_spec` gives the trainer's cache, `<data_dir>/<name>/tokenizer-bpe-v<N>.model`.

Options (sentencepiece and gemma): `canonicalize=true|false` (default false), `lower=true|false`
(default true), `pad_id=N`; hf: `pad_id=N`; trained: `vocab_size=N`. `canonicalize=true`
reproduces transformers' `SiglipTokenizer` (HF SigLIP checkpoints): its `canonicalize_text`
(lower-case with Python's `str.lower` when `lower`, drop every `string.punctuation` char,
collapse whitespace runs, strip) on each piece of text between the literal special tokens
"</s>" and "<unk>", which (like transformers) become their ids, whitespace around them
dropped; no second EOS after a trailing "</s>". Without it, "</s>" is text, as in big_vision.
"""

from __future__ import annotations

import io
import os
import re
import string
from typing import Callable, Iterable, Sequence

import numpy as np
import sentencepiece as spm
import tokenizers

from mmjax.data.clip_tokenizer import ClipTokenizer

PAD, UNK, BOS, EOS = 0, 1, 2, 3   # the trained kind's special ids
KINDS = ("clip", "sentencepiece", "gemma", "hf", "trained")
_OPTIONS = {"clip": (), "sentencepiece": ("canonicalize", "lower", "pad_id"),
            "gemma": ("canonicalize", "lower", "pad_id"), "hf": ("pad_id",),
            "trained": ("vocab_size",)}
_ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)
_NO_PUNCTUATION = str.maketrans("", "", string.punctuation)
_SPIECE_UNDERLINE = "\u2581"
_HF_SPECIALS = ("</s>", "<unk>")   # SiglipTokenizer's eos (= its pad) and unk token strings
# transformers' added tokens with lstrip/rstrip: a special token eats the whitespace around it.
_HF_SPECIAL_SPLIT = re.compile(r"\s*(" + "|".join(map(re.escape, _HF_SPECIALS)) + r")\s*")


def _check_texts(texts: Sequence[str], max_len: int) -> None:
  if isinstance(texts, str):
    raise ValueError("texts must be a sequence of strings, not one string")
  if max_len < 1:
    raise ValueError(f"max_len={max_len} must be at least 1")


def canonicalize_text(text: str, lower: bool = True) -> str:
  """transformers' SiglipTokenizer.canonicalize_text (big_vision's prompt_engineering one)."""
  if lower:
    text = text.lower()
  text = text.translate(_NO_PUNCTUATION)
  return re.sub(r"\s+", " ", text).strip()


class SentencePieceTokenizer:
  """big_vision's sticky-EOS sentencepiece tokenisation (`sentencepiece:` and `gemma:` specs)."""

  def __init__(self, spec: str, model_proto: bytes, *, canonicalize: bool = False,
               lower: bool = True, pad_id: int | None = None, model_pad: bool = False):
    self.spec = spec
    self._proto = model_proto
    self._canonicalize, self._lower = canonicalize, lower
    self._pad_option, self._model_pad = pad_id, model_pad
    self._build()

  def _build(self) -> None:
    self._sp = sp = spm.SentencePieceProcessor(model_proto=self._proto)
    self.vocab_size = sp.get_piece_size()
    self.eos_id = sp.eos_id()
    if self.eos_id < 0:
      raise ValueError(f"tokenizer spec {self.spec!r}: the sentencepiece model has no EOS id")
    if self._pad_option is not None:
      self.pad_id = self._pad_option
    elif self._model_pad:
      self.pad_id = sp.pad_id()
      if self.pad_id < 0:
        raise ValueError(f"tokenizer spec {self.spec!r}: the sentencepiece model has no pad id; "
                         "give one with ?pad_id=N")
    else:
      self.pad_id = 1   # big_vision's SigLIP pad_value=1
    # transformers encodes f"<unk>{text}", drops the pieces of "<unk>" (SiglipTokenizer._tokenize).
    self._unk_len = len(sp.encode(_HF_SPECIALS[1], out_type=str))

  def __getstate__(self):
    state = self.__dict__.copy()
    del state["_sp"]
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._build()

  def _big_vision_ids(self, text: str) -> list[int]:
    if self._lower:
      text = text.translate(_ASCII_LOWER)   # tf.strings.lower without encoding: ASCII only
    return self._sp.encode(text) + [self.eos_id]

  def _siglip_ids(self, text: str) -> list[int]:
    """transformers' SiglipTokenizer(text) ids (EOS included, before truncation)."""
    sp = self._sp
    parts = _HF_SPECIAL_SPLIT.split(_SPIECE_UNDERLINE + text.replace(_SPIECE_UNDERLINE, " "))
    pieces = []
    for i, part in enumerate(parts):
      if i % 2:   # the captured special tokens
        pieces.append(part)
      elif part:
        got = sp.encode(_HF_SPECIALS[1] + canonicalize_text(part, self._lower), out_type=str)
        pieces += got[self._unk_len:] if len(got) >= self._unk_len else got
    if len(pieces) > 1 and pieces[0] == _SPIECE_UNDERLINE and pieces[1] in _HF_SPECIALS:
      pieces = pieces[1:]
    ids = [sp.piece_to_id(p) for p in pieces]
    return ids if ids and ids[-1] == self.eos_id else ids + [self.eos_id]

  def encode(self, texts: Sequence[str], max_len: int) -> np.ndarray:
    """n strings -> int32 [n, max_len]: ids, EOS (always kept), then pad_id."""
    _check_texts(texts, max_len)
    out = np.full((len(texts), max_len), self.pad_id, np.int32)
    for row, text in enumerate(texts):
      # One string at a time: the list form starts a thread pool per call (~40x slower).
      if self._canonicalize:
        ids = self._siglip_ids(text)
        # transformers truncates the text ids to max_len-1, then adds EOS unless already last.
        if len(ids) > max_len:
          ids = ids[:max_len - 1]
          ids = ids if ids[-1:] == [self.eos_id] else ids + [self.eos_id]
      else:
        ids = self._big_vision_ids(text)
        if len(ids) > max_len:
          ids = ids[:max_len - 1] + ids[-1:]
      out[row, :len(ids)] = ids
    return out


class HFTokenizer:
  """A HF `tokenizers` JSON file (`hf:` spec); max_len, not the file, truncates and pads."""

  def __init__(self, spec: str, json_text: str, *, pad_id: int | None = None):
    self.spec = spec
    self._json = json_text
    self._pad_option = pad_id
    self._build()

  def _build(self) -> None:
    self._tok = tok = tokenizers.Tokenizer.from_str(self._json)
    file_pad = tok.padding["pad_id"] if tok.padding else None
    tok.no_padding()
    tok.no_truncation()
    if self._pad_option is not None:
      self.pad_id = self._pad_option
    else:
      self.pad_id = file_pad if file_pad is not None else 0
    self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
    empty = tok.encode("")
    ends_special = bool(empty.ids) and empty.special_tokens_mask[-1] == 1
    self.eos_id = empty.ids[-1] if ends_special else None

  def __getstate__(self):
    state = self.__dict__.copy()
    del state["_tok"]
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._build()

  def encode(self, texts: Sequence[str], max_len: int) -> np.ndarray:
    """n strings -> int32 [n, max_len]: the post-processed ids, cut (sticky EOS) or padded."""
    _check_texts(texts, max_len)
    out = np.full((len(texts), max_len), self.pad_id, np.int32)
    for row, text in enumerate(texts):
      enc = self._tok.encode(text)
      ids = enc.ids
      if len(ids) > max_len:
        ids = ids[:max_len - 1] + ids[-1:] if enc.special_tokens_mask[-1] else ids[:max_len]
      out[row, :len(ids)] = ids
    return out


class TrainedTokenizer:
  """mmjax's own BPE (`trained:` spec): lower-cases, splits into sentencepiece ids, appends
  EOS, right-pads with PAD."""

  pad_id, eos_id = PAD, EOS
  spec: str | None = None   # set by get_tokenizer

  def __init__(self, model_proto: bytes):
    self._proto = model_proto
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)

  @classmethod
  def train(cls, sentences: Iterable[str], *, vocab_size: int = 512) -> "TrainedTokenizer":
    """Trains a BPE model in memory; byte fallback keeps unseen characters encodable.

    BPE, not sentencepiece's default unigram: on a small caption corpus the
    unigram model stops far below vocab_size and splits common words into
    letters (19 tokens for 'an ink sketch of the digit seven', 7 with BPE), so
    captions overflow data.text_len and lose their last words.
    """
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=(s.lower() for s in sentences), model_writer=model, model_type="bpe",
        vocab_size=vocab_size, hard_vocab_limit=False, byte_fallback=True,
        pad_id=PAD, unk_id=UNK, bos_id=BOS, eos_id=EOS, character_coverage=1.0,
        num_threads=1, minloglevel=2)
    return cls(model.getvalue())

  @classmethod
  def from_file(cls, path: str) -> "TrainedTokenizer":
    with open(path, "rb") as f:
      return cls(f.read())

  def save(self, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
      f.write(self._proto)
    os.replace(tmp, path)  # atomic: concurrent processes never read half a file

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  def encode(self, texts: Sequence[str], max_len: int) -> np.ndarray:
    """n strings -> int32 [n, max_len]; EOS is always the last real token."""
    _check_texts(texts, max_len)
    out = np.full((len(texts), max_len), PAD, np.int32)
    for i, text in enumerate(texts):
      # One string at a time: the list form starts a thread pool per call (~40x slower here).
      ids = self._sp.encode(text.lower())[:max_len - 1] + [EOS]
      out[i, :len(ids)] = ids
    return out

  def num_tokens(self, text: str) -> int:
    """Length of `text` encoded, EOS included, before padding or truncation."""
    return len(self._sp.encode(text.lower())) + 1

  def decode(self, ids: np.ndarray) -> list[str]:
    """[n, L] ids -> n strings (stops at EOS, drops padding)."""
    out = []
    for row in np.asarray(ids).reshape(-1, np.shape(ids)[-1]).tolist():
      row = row[:row.index(EOS)] if EOS in row else row
      out.append(self._sp.decode([t for t in row if t != PAD]))
    return out


def parse_spec(spec: str) -> tuple[str, str, dict[str, str]]:
  """'KIND:PATH?k=v&k=v' -> (kind, path, {k: v}); checks the kind and the option names."""
  if not isinstance(spec, str):
    raise ValueError(f"tokenizer spec {spec!r} must be a string")
  head, _, query = spec.partition("?")
  kind, sep, path = head.partition(":")
  if kind not in KINDS:
    raise ValueError(f"tokenizer spec {spec!r}: unknown kind {kind!r}; known kinds: "
                     "clip, sentencepiece:PATH, gemma:PATH, hf:PATH, trained:PATH")
  if kind == "clip" and (sep or query):
    raise ValueError(f"tokenizer spec {spec!r}: 'clip' takes no path and no options")
  options: dict[str, str] = {}
  for item in query.split("&") if query else []:
    key, eq, value = item.partition("=")
    if key not in _OPTIONS[kind]:
      raise ValueError(f"tokenizer spec {spec!r}: unknown option {key!r}; known options for "
                       f"{kind}: {', '.join(_OPTIONS[kind])}")
    if not eq or key in options:
      raise ValueError(f"tokenizer spec {spec!r}: option {key!r} needs one {key}=VALUE")
    options[key] = value
  return kind, path, options


def _bool(spec: str, options: dict[str, str], key: str, default: bool) -> bool:
  value = options.get(key)
  if value is None:
    return default
  if value.lower() not in ("true", "false"):
    raise ValueError(f"tokenizer spec {spec!r}: option {key}={value!r}: expected true or false")
  return value.lower() == "true"


def _int(spec: str, options: dict[str, str], key: str) -> int | None:
  value = options.get(key)
  if value is None:
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"tokenizer spec {spec!r}: option {key}={value!r}: expected an integer")


def get_tokenizer(spec: str, *, train_texts: Callable[[], Iterable[str]] | None = None):
  """A tokenizer for `spec` (grammar in the module docstring) with encode(texts, max_len) ->
  int32 [n, max_len], vocab_size, pad_id, eos_id (int or None) and spec; it pickles.

  train_texts: () -> the training captions; called only when a `trained:PATH?vocab_size=N`
  file is missing, to train it (every other kind ignores it).
  """
  kind, path, options = parse_spec(spec)
  if kind in ("clip", "trained"):
    if kind == "clip":
      tok = ClipTokenizer()
    else:
      tok = _trained(spec, path, _int(spec, options, "vocab_size"), train_texts)
    tok.spec = spec
    return tok
  if not os.path.isfile(path):
    raise ValueError(f"tokenizer spec {spec!r}: {path!r} is not a file")
  pad_id = _int(spec, options, "pad_id")
  if kind == "hf":
    with open(path, encoding="utf-8") as f:
      return HFTokenizer(spec, f.read(), pad_id=pad_id)
  with open(path, "rb") as f:
    proto = f.read()
  return SentencePieceTokenizer(
      spec, proto, canonicalize=_bool(spec, options, "canonicalize", False),
      lower=_bool(spec, options, "lower", True), pad_id=pad_id, model_pad=kind == "gemma")


def _trained(spec: str, path: str, vocab_size: int | None,
             train_texts: Callable[[], Iterable[str]] | None) -> TrainedTokenizer:
  """The file at path; or, with vocab_size and train_texts, trained and saved there."""
  if os.path.isfile(path):
    return TrainedTokenizer.from_file(path)
  if vocab_size is None:
    raise ValueError(f"tokenizer spec {spec!r}: {path!r} is not a file (add ?vocab_size=N to "
                     "train it on the training captions)")
  if train_texts is None:
    raise ValueError(f"tokenizer spec {spec!r}: {path!r} is not a file, and no train_texts "
                     "were given to train it on")
  texts = train_texts()
  try:
    tok = TrainedTokenizer.train(texts, vocab_size=vocab_size)
  except RuntimeError as e:   # sentencepiece's own checks, e.g. vocab_size below the characters
    raise ValueError(f"tokenizer spec {spec!r}: sentencepiece cannot train it: {e}") from None
  tok.save(path)
  return tok


def trained_spec(data_dir: str, name: str, vocab_size: int) -> str:
  """The trainer's cached BPE for dataset `name`: 'trained:<data_dir>/<name>/
  tokenizer-bpe-v<vocab_size>.model?vocab_size=<vocab_size>' (trained on first use)."""
  path = os.path.join(data_dir, name, f"tokenizer-bpe-v{vocab_size}.model")
  if "?" in path:
    raise ValueError(f"data_dir={data_dir!r}, name={name!r}: a tokenizer path holds no '?'")
  return f"trained:{path}?vocab_size={vocab_size}"


def tokenizer_for_tower(spec: str | None, *, checkpoint_spec: str | None, vocab_size: int,
                        field: str):
  """The tokenizer for a converted checkpoint's text tower: `spec` (the user's override),
  else the checkpoint's own `checkpoint_spec`. Raises ValueError naming `field` (where the
  override is set) when neither is given, the spec is bad, or its ids do not fit the tower's
  `vocab_size` embeddings."""
  spec = spec or checkpoint_spec
  if spec is None:
    raise ValueError(f"{field}: the checkpoint names no tokenizer (big_vision .npz files hold "
                     f"no vocabulary); set {field} to e.g. sentencepiece:/path/to/spiece.model")
  try:
    tok = get_tokenizer(spec)
  except ValueError as e:
    raise ValueError(f"{field}: {e}") from None
  if tok.vocab_size > vocab_size:
    raise ValueError(f"{field}={spec!r} has {tok.vocab_size} ids; the checkpoint's text tower "
                     f"embeds {vocab_size}")
  return tok
