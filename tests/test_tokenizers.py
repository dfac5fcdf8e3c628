"""mmjax.data.tokenizers.get_tokenizer: every spec kind against its reference (offline).

Sentencepiece models and a `tokenizers` BPE are trained here on generated captions: a T5/c4_en
id layout (pad 0, eos 1, unk 2, no bos) for `sentencepiece:`, a Gemma one (pad 0, eos 1, bos 2,
unk 3, BPE with byte fallback) for `gemma:`, mmjax's own (pad 0, unk 1, bos 2, eos 3, BPE with
byte fallback, trained on lower-cased captions) for `trained:`.
"""

import io
import pickle
import re

import numpy as np
import pytest
import sentencepiece as spm

from mmjax.data.clip_tokenizer import ClipTokenizer
from mmjax.data.tokenizers import (BOS, EOS, PAD, UNK, TrainedTokenizer, get_tokenizer,
                                   tokenizer_for_tower, trained_spec)
from tests.open_clip_peer import import_transformers

WORDS = ("a an the of on in with dog dogs cat cats photo picture small big red blue green old "
         "young running sitting standing grass table man woman child car street sky tree house "
         "water beach city night snow bird birds flying two three players field ball kitchen "
         "café naïve über façade 42 2024 3.5 x-ray t-shirt").split()

# Edge cases: punctuation, case, whitespace runs, unicode, digits, empty, sentencepiece's '▁',
# literal special tokens, strings longer than 16 and 64 ids.
EDGE = ["", " ", "!!!", "a", "A", "A Photo, of a DOG!", "  lots   of \t spaces  ", "tab\tnew\nline",
        "über NAÏVE Façade", "ÉCOLE", "ΑΒΓ δέλτα", "日本語 text", "1,234.5 and 42", "a.b,c;d:e",
        "it's a 'quoted' \"string\"", "emoji 😀 cat", "mixed-Case-HYPHEN", "x▁y", "▁lead",
        "a </s> b",
        "<unk>", "ends with </s>", "</s> starts", "<pad> token", "\u00a0nbsp\u00a0here",
        "trailing space ", "a" * 50, "dog " * 30, "The Red Car " * 40, "café, Café, CAFÉ!"]


def captions(rng, n):
  """n random captions from WORDS with random casing, punctuation and spacing."""
  out = []
  for _ in range(n):
    words = [str(w) for w in rng.choice(WORDS, size=int(rng.integers(1, 14)))]
    words = [w.upper() if rng.random() < 0.1 else w.capitalize() if rng.random() < 0.2 else w
             for w in words]
    sep = "  " if rng.random() < 0.1 else " "
    out.append(sep.join(words) + str(rng.choice(["", ".", "!", "?", " ,", "..."])))
  return out


def train_sentencepiece(path, texts, vocab_size=200, **kwargs):
  """Trains a small sentencepiece model on `texts` (lower-cased) and writes it to `path`."""
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter([t.lower() for t in texts] + ["a a a"] * 20), model_writer=model,
      vocab_size=vocab_size, hard_vocab_limit=False, character_coverage=1.0, num_threads=1,
      minloglevel=2, **kwargs)
  path.write_bytes(model.getvalue())
  return str(path), spm.SentencePieceProcessor(model_proto=model.getvalue())


def t5_model(tmp_path, rng):
  return train_sentencepiece(tmp_path / "c4_like.model", captions(rng, 300), model_type="unigram",
                             pad_id=0, eos_id=1, unk_id=2, bos_id=-1)


def gemma_model(tmp_path, rng):
  return train_sentencepiece(tmp_path / "gemma_like.model", captions(rng, 300), model_type="bpe",
                             vocab_size=400, byte_fallback=True, add_dummy_prefix=False,
                             pad_id=0, eos_id=1, bos_id=2, unk_id=3)


def hf_json(tmp_path, rng):
  """A `tokenizers` BPE with '[BOS] $A [EOS]', and padding/truncation in the file that
  get_tokenizer must ignore (pad to 40 with [UNK]'s id, truncate at 6)."""
  tokenizers = pytest.importorskip("tokenizers")
  from tokenizers import models, pre_tokenizers, processors, trainers
  tok = tokenizers.Tokenizer(models.BPE(unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  specials = ["[PAD]", "[BOS]", "[EOS]", "[UNK]"]
  tok.train_from_iterator(captions(rng, 300),
                          trainers.BpeTrainer(vocab_size=200, special_tokens=specials))
  ids = {s: tok.token_to_id(s) for s in specials}
  tok.post_processor = processors.TemplateProcessing(
      single="[BOS] $A [EOS]", special_tokens=[("[BOS]", ids["[BOS]"]), ("[EOS]", ids["[EOS]"])])
  tok.enable_padding(pad_id=ids["[UNK]"], pad_token="[UNK]", length=40)
  tok.enable_truncation(max_length=6)
  path = tmp_path / "tokenizer.json"
  tok.save(str(path))
  return str(path), ids


@pytest.mark.filterwarnings("ignore:This sequence already has")   # SiglipTokenizer on "... </s>"
def trained_reference(texts, vocab_size):
  """mmjax's trained BPE made with sentencepiece directly: (model bytes, processor)."""
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter([t.lower() for t in texts]), model_writer=model, model_type="bpe",
      vocab_size=vocab_size, hard_vocab_limit=False, byte_fallback=True, pad_id=0, unk_id=1,
      bos_id=2, eos_id=3, character_coverage=1.0, num_threads=1, minloglevel=2)
  return model.getvalue(), spm.SentencePieceProcessor(model_proto=model.getvalue())


def trained_ids(sp, text, max_len):
  """The trained kind's row: lower-case, ids, cut to max_len-1, EOS (3), pad 0."""
  ids = sp.encode(text.lower())[:max_len - 1] + [3]
  return ids + [0] * (max_len - len(ids))


def test_trained_is_trained_once_cached_and_matches_sentencepiece(tmp_path, rng):
  """`trained:` trains on train_texts() on a miss, saves the model at the trainer's cache path
  (<data_dir>/<name>/tokenizer-bpe-v<N>.model), loads it afterwards without the captions, and
  encodes as the reference: the same model bytes and ids as sentencepiece trained directly."""
  corpus = captions(rng, 400)
  proto, sp = trained_reference(corpus, 300)
  spec = trained_spec(str(tmp_path), "my_set", 300)
  path = tmp_path / "my_set" / "tokenizer-bpe-v300.model"
  assert spec == f"trained:{path}?vocab_size=300"
  calls = []
  tok = get_tokenizer(spec, train_texts=lambda: calls.append(1) or iter(corpus))
  assert calls == [1] and path.read_bytes() == proto

  def no_training():
    raise AssertionError("the cached model must be loaded, not retrained")
  cached = get_tokenizer(spec, train_texts=no_training)
  assert get_tokenizer(f"trained:{path}").spec == f"trained:{path}"   # a file, no training
  texts = EDGE + captions(rng, 30)
  for max_len in (1, 4, 16, 64):
    want = np.array([trained_ids(sp, t, max_len) for t in texts], np.int32)
    for t in (tok, cached):
      np.testing.assert_array_equal(t.encode(texts, max_len), want, err_msg=f"{max_len}")
  assert (want[:, -1] == 3).any() and (want[:, -1] == 0).any()   # some cut, some padded
  assert (tok.spec, tok.vocab_size, tok.pad_id, tok.eos_id) == (spec, sp.get_piece_size(), 0, 3)
  assert (PAD, UNK, BOS, EOS) == (0, 1, 2, 3)
  want = [sp.decode(sp.encode(t.lower())[:63]) for t in texts]
  assert tok.decode(tok.encode(texts, 64)) == want
  assert [tok.num_tokens(t) for t in texts] == [len(sp.encode(t.lower())) + 1 for t in texts]


def test_trained_kind_equals_the_class_trained_directly(tmp_path, rng):
  """get_tokenizer's trained kind == TrainedTokenizer.train on the same sentences (the
  trainer's tokenizer before specs existed): same vocabulary and ids."""
  corpus = captions(rng, 300)
  direct = TrainedTokenizer.train(corpus, vocab_size=400)
  tok = get_tokenizer(trained_spec(str(tmp_path), "set", 400), train_texts=lambda: corpus)
  texts = EDGE + captions(rng, 20)
  assert tok.vocab_size == direct.vocab_size
  np.testing.assert_array_equal(tok.encode(texts, 16), direct.encode(texts, 16))


def test_tokenizer_for_tower(tmp_path, rng):
  """The override wins over the checkpoint's spec; no spec at all, a bad spec and more ids
  than the tower embeds raise one ValueError naming the field."""
  path, sp = t5_model(tmp_path, rng)
  n = sp.get_piece_size()
  tok = tokenizer_for_tower(None, checkpoint_spec=f"sentencepiece:{path}", vocab_size=n,
                            field="--tokenizer")
  assert tok.spec == f"sentencepiece:{path}"
  assert tokenizer_for_tower("clip", checkpoint_spec=f"sentencepiece:{path}",
                             vocab_size=49408, field="--tokenizer").spec == "clip"
  with pytest.raises(ValueError, match=r"^--tokenizer: the checkpoint names no tokenizer"):
    tokenizer_for_tower(None, checkpoint_spec=None, vocab_size=n, field="--tokenizer")
  with pytest.raises(ValueError, match=r"^config.data.tokenizer: tokenizer spec 'nonsense'"):
    tokenizer_for_tower("nonsense", checkpoint_spec=None, vocab_size=n,
                        field="config.data.tokenizer")
  with pytest.raises(ValueError, match=rf"^--tokenizer='clip' has 49408 ids; .* embeds {n}$"):
    tokenizer_for_tower("clip", checkpoint_spec=f"sentencepiece:{path}", vocab_size=n,
                        field="--tokenizer")


def test_sentencepiece_canonicalize_matches_siglip_tokenizer(tmp_path, rng):
  """`sentencepiece:P?canonicalize=true` == transformers' SiglipTokenizer(vocab_file=P) with
  padding="max_length", truncation=True, at L=16 and 64 (sticky EOS, pad = '</s>')."""
  transformers = import_transformers()
  path, _ = t5_model(tmp_path, rng)
  hf = transformers.SiglipTokenizer(vocab_file=path)
  tok = get_tokenizer(f"sentencepiece:{path}?canonicalize=true")
  texts = EDGE + captions(rng, 70)
  for max_len in (16, 64):
    want = np.array([hf(t, padding="max_length", max_length=max_len, truncation=True)["input_ids"]
                     for t in texts], np.int32)
    got = tok.encode(texts, max_len)
    assert got.dtype == np.int32 and got.shape == (len(texts), max_len)
    for text, g, w in zip(texts, got, want):
      np.testing.assert_array_equal(g, w, err_msg=f"{text!r} at max_len={max_len}")
  assert (tok.vocab_size, tok.pad_id, tok.eos_id) == (hf.vocab_size, hf.pad_token_id,
                                                      hf.eos_token_id)


def ascii_lower(text):
  """tf.strings.lower(text) (no encoding): only A-Z change."""
  return "".join(chr(ord(c) + 32) if "A" <= c <= "Z" else c for c in text)


def big_vision_reference(sp, texts, max_len, pad=1):
  """big_vision tokenize(max_len, eos="sticky", pad_value=pad, lower=True) on SentencePiece:
  tf.strings.lower (ASCII letters only), ids + [eos]; >= max_len ids: first max_len-1 + eos."""
  rows = []
  for text in texts:
    ids = sp.encode_as_ids(ascii_lower(text)) + [sp.eos_id()]
    ids = ids[:max_len - 1] + [sp.eos_id()] if len(ids) >= max_len else ids
    rows.append(ids + [pad] * (max_len - len(ids)))
  return np.array(rows, np.int32)


def test_sentencepiece_matches_big_vision_rules(tmp_path, rng):
  """`sentencepiece:P` == big_vision's SigLIP tokenize rules written out on SentencePiece, and
  get_pp_tokenize's docstring cases (max_len=3, eos sticky, pad_value=1)."""
  path, sp = t5_model(tmp_path, rng)
  tok = get_tokenizer(f"sentencepiece:{path}")
  texts = EDGE + captions(rng, 70)
  for max_len in (1, 3, 16, 64):
    want = big_vision_reference(sp, texts, max_len)
    np.testing.assert_array_equal(tok.encode(texts, max_len), want)
  a, eos = sp.piece_to_id("▁a"), sp.eos_id()
  assert sp.encode_as_ids("a a a") == [a, a, a] and eos == 1 and a not in (0, 1, 2)
  np.testing.assert_array_equal(tok.encode(["a", "a a", "A a A"], 3),
                                [[a, eos, 1], [a, a, eos], [a, a, eos]])
  assert (tok.vocab_size, tok.pad_id, tok.eos_id) == (sp.get_piece_size(), 1, 1)
  custom = get_tokenizer(f"sentencepiece:{path}?pad_id=7&lower=false")
  np.testing.assert_array_equal(custom.encode(["A photo"], 8)[0],
                                (sp.encode_as_ids("A photo") + [eos] + [7] * 8)[:8])


def test_gemma_lower_no_bos_sticky_eos_pad(tmp_path, rng):
  """`gemma:P`: upper and lower case give the same ids, no BOS anywhere, EOS last (sticky when
  cut), padded with sp.pad_id() (0); equal to the big_vision rules with that pad."""
  path, sp = gemma_model(tmp_path, rng)
  assert (sp.pad_id(), sp.eos_id(), sp.bos_id()) == (0, 1, 2)
  tok = get_tokenizer(f"gemma:{path}")
  texts = EDGE + captions(rng, 50)
  for max_len in (4, 16, 64):
    got = tok.encode(texts, max_len)
    np.testing.assert_array_equal(got, big_vision_reference(sp, texts, max_len, pad=0))
    np.testing.assert_array_equal(tok.encode([t.upper() for t in texts if t.isascii()], max_len),
                                  tok.encode([t.lower() for t in texts if t.isascii()], max_len))
    assert not (got == sp.bos_id()).any()
    lengths = [len(sp.encode_as_ids(ascii_lower(t))) + 1 for t in texts]
    for row, n in zip(got, lengths):
      end = min(n, max_len)
      assert row[end - 1] == sp.eos_id() and (row[end:] == 0).all() and (row[:end] != 0).all()
  assert any(n > 64 for n in lengths) and (tok.pad_id, tok.eos_id) == (0, 1)
  assert get_tokenizer(f"gemma:{path}?pad_id=5").encode(["a"], 4)[0, -1] == 5


def test_hf_tokenizers_json(tmp_path, rng):
  """`hf:P` == the library's own post-processing ([BOS] $A [EOS]) with its own truncation and
  padding set to max_len (sticky EOS) and the file's pad id; the file's length 40 and
  truncation at 6 are ignored."""
  import tokenizers
  path, ids = hf_json(tmp_path, rng)
  tok = get_tokenizer(f"hf:{path}")
  assert (tok.pad_id, tok.eos_id) == (ids["[UNK]"], ids["[EOS]"])
  texts = [t for t in EDGE if t.isascii()] + captions(rng, 50)
  ref = tokenizers.Tokenizer.from_file(path)
  for max_len in (3, 16, 64):
    ref.enable_truncation(max_length=max_len)
    ref.enable_padding(pad_id=ids["[UNK]"], pad_token="[UNK]", length=max_len)
    want = np.array([e.ids for e in ref.encode_batch(texts)], np.int32)
    np.testing.assert_array_equal(tok.encode(texts, max_len), want)
  got = tok.encode(texts, 16)
  assert max(len(e) for e in tokenizers.Tokenizer.from_file(path).encode_batch(texts)) == 40
  assert (got[:, 0] == ids["[BOS]"]).all()
  long = np.array([len(tok._tok.encode(t).ids) > 16 for t in texts])
  assert long.any() and (got[long, -1] == ids["[EOS]"]).all()
  # No pad id in the file: option pad_id, else 0.
  plain = tokenizers.Tokenizer.from_file(path)
  plain.no_padding()
  plain.save(str(tmp_path / "nopad.json"))
  assert get_tokenizer(f"hf:{tmp_path / 'nopad.json'}").encode(["a"], 8)[0, -1] == 0
  assert get_tokenizer(f"hf:{tmp_path / 'nopad.json'}?pad_id=9").encode(["a"], 8)[0, -1] == 9


def test_clip_matches_open_clip_tokenizer(rng):
  """`clip` == open_clip's tokenizer (OpenAI's SimpleTokenizer: ftfy, HTML unescape, lower
  case, BPE; SOT ... EOT, cut with the EOT kept, padded with 0) at context lengths 5, 16 and
  77, with its vocabulary size and special ids."""
  from tests.open_clip_peer import import_open_clip
  ref = import_open_clip().get_tokenizer("ViT-B-32")
  tok = get_tokenizer("clip")
  texts = EDGE + captions(rng, 20)
  for max_len in (5, 16, 77):
    want = ref(texts, context_length=max_len).numpy()
    got = tok.encode(texts, max_len)
    assert got.dtype == np.int32 and got.shape == want.shape == (len(texts), max_len)
    for text, g, w in zip(texts, got, want):
      np.testing.assert_array_equal(g, w, err_msg=f"{text!r} at max_len={max_len}")
  assert (want[:, -1] != 0).any() and (want[:, -1] == 0).any()   # some cut, some padded
  assert (tok.spec, tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (
      "clip", ref.vocab_size, 0, ref.sot_token_id, ref.eot_token_id)
  assert isinstance(tok, ClipTokenizer)


@pytest.mark.parametrize("kind", ["clip", "sentencepiece", "siglip", "gemma", "hf", "trained"])
def test_pickle_round_trip(kind, tmp_path, rng):
  """pickle.loads(pickle.dumps(tok)) keeps spec, ids, pad and eos (grain workers pickle it)."""
  spec = {"clip": lambda: "clip",
          "sentencepiece": lambda: f"sentencepiece:{t5_model(tmp_path, rng)[0]}?pad_id=3",
          "siglip": lambda: f"sentencepiece:{t5_model(tmp_path, rng)[0]}?canonicalize=true",
          "gemma": lambda: f"gemma:{gemma_model(tmp_path, rng)[0]}?lower=false",
          "hf": lambda: f"hf:{hf_json(tmp_path, rng)[0]}?pad_id=5",
          "trained": lambda: trained_spec(str(tmp_path), "c4_like", 300)}[kind]()
  tok = get_tokenizer(spec, train_texts=lambda: captions(rng, 300))
  texts = EDGE + captions(rng, 10)
  want = tok.encode(texts, 16)
  for f in tmp_path.rglob("*.model"):   # the copy must not need the file
    f.unlink()
  back = pickle.loads(pickle.dumps(tok))
  assert back.spec == spec and (back.pad_id, back.eos_id, back.vocab_size) == (
      tok.pad_id, tok.eos_id, tok.vocab_size)
  np.testing.assert_array_equal(back.encode(texts, 16), want)


def test_spec_errors(tmp_path, rng):
  """Unknown kinds, missing files, unknown or malformed options and a single string raise
  ValueError naming the offending part."""
  path, _ = t5_model(tmp_path, rng)
  with pytest.raises(ValueError, match=r"'bogus:/x'.*unknown kind 'bogus'.*clip, sentencepiece"):
    get_tokenizer("bogus:/x")
  with pytest.raises(ValueError, match=r"unknown kind 'spm'.*gemma:PATH, hf:PATH, trained:PATH"):
    get_tokenizer(f"spm:{path}")
  missing = str(tmp_path / "nope.model")
  for kind in ("sentencepiece", "gemma", "hf"):
    with pytest.raises(ValueError, match=rf"'{kind}:.*nope\.model'.*'.*nope\.model' is not a file"):
      get_tokenizer(f"{kind}:{missing}")
  with pytest.raises(ValueError, match=r"is not a file"):
    get_tokenizer(f"sentencepiece:{tmp_path}")   # a directory
  with pytest.raises(ValueError, match=r"option 'canonicalise'.*canonicalize, lower, pad_id"):
    get_tokenizer(f"sentencepiece:{path}?canonicalise=true")
  with pytest.raises(ValueError, match=r"unknown option 'canonicalize'.*for hf: pad_id"):
    get_tokenizer(f"hf:{path}?canonicalize=true")
  with pytest.raises(ValueError, match=r"canonicalize='yes'.*true or false"):
    get_tokenizer(f"gemma:{path}?canonicalize=yes")
  with pytest.raises(ValueError, match=r"pad_id='one'.*integer"):
    get_tokenizer(f"sentencepiece:{path}?pad_id=one")
  with pytest.raises(ValueError, match=r"'pad_id' needs one"):
    get_tokenizer(f"sentencepiece:{path}?pad_id=1&pad_id=2")
  with pytest.raises(ValueError, match=r"'clip' takes no path"):
    get_tokenizer("clip:/some/vocab")
  with pytest.raises(ValueError, match=r"one string"):
    get_tokenizer(f"sentencepiece:{path}").encode("a photo", 8)
  with pytest.raises(ValueError, match=r"one string"):
    get_tokenizer("clip").encode("a photo", 8)


def test_trained_spec_errors(tmp_path):
  """A trained spec that cannot give a model raises one ValueError naming the spec and why."""
  missing = re.escape(str(tmp_path / "set" / "tokenizer-bpe-v300.model"))
  with pytest.raises(ValueError, match=rf"^tokenizer spec 'trained:{missing}': '{missing}' is not "
                                       r"a file \(add \?vocab_size=N to train it"):
    get_tokenizer(f"trained:{tmp_path}/set/tokenizer-bpe-v300.model", train_texts=lambda: ["a"])
  spec = trained_spec(str(tmp_path), "set", 300)
  with pytest.raises(ValueError, match=rf"^tokenizer spec '{re.escape(spec)}': .* no train_texts"):
    get_tokenizer(spec)
  with pytest.raises(ValueError, match=r"'trained:/x\?vocab_size=big'.*vocab_size='big'.*integer"):
    get_tokenizer("trained:/x?vocab_size=big", train_texts=lambda: ["a cat"])
  with pytest.raises(ValueError, match=r"'trained:.*vocab_size=8'.*cannot train.*[Vv]ocabulary"):
    get_tokenizer(trained_spec(str(tmp_path), "small", 8), train_texts=lambda: ["a cat"] * 50)
  with pytest.raises(ValueError, match=r"unknown option 'vocab'.*for trained: vocab_size"):
    get_tokenizer("trained:/x?vocab=300")
  with pytest.raises(ValueError, match=r"one string"):
    get_tokenizer(spec, train_texts=lambda: ["a cat"] * 50).encode("a photo", 8)
  assert not list(tmp_path.rglob("*.tmp*"))
