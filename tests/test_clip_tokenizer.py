"""The CLIP BPE tokenizer: the same ids as open_clip's on any text; padding, truncation, decode."""

import numpy as np
import pytest

from mmjax.data.clip_tokenizer import ClipTokenizer


@pytest.fixture(scope="module")
def tok():
  return ClipTokenizer()


FIXED = [
    "", " ", "a photo of a cat.", "A PHOTO OF A CAT.", "Hello,   World!!!\n\tIt's me",
    "don't WON'T i'll we've they'd she's", "naïve café résumé São Paulo", "東京タワー 2024 年",
    "&amp;lt;b&amp;gt;bold&amp;lt;/b&amp;gt; &quot;quoted&quot; &#39;x&#39;",
    "<p>&amp;amp; &amp;lt;</p>",   # with a '<' ftfy leaves entities to the two unescapes
    "mojibake: Ã©tÃ© â€œquotesâ€\x9d", "emoji 😀🎉👍🏽 family 👨‍👩‍👧", "ﬁancé Ⅻ ½ ² ①",
    "!", "! ! !!", "0 1 23 456", "<start_of_text> hi <end_of_text>", "a_b-c.d,e;f:g",
    "İstanbul ǅ ß ẞ Σσς", "\u0345\u0301a\u200b b\u00a0c", "tab\tnew\nline\r\nend",
    "x" * 200, "The quick brown fox jumps over the lazy dog. " * 20,
]


def random_texts(rng, n: int) -> list[str]:
  """Mixed scripts, symbols, whitespace and punctuation, 0-150 characters."""
  pool = ([chr(c) for c in rng.integers(0x20, 0x2FFFF, 3000) if not 0xD800 <= c < 0xE000]
          + list("abcdefghij klmnop ABC  '!?.,;:-_\n\t0123456789") * 20)
  return ["".join(rng.choice(pool, size=rng.integers(0, 150))) for _ in range(n)]


def test_same_ids_as_open_clip(tok, rng):
  from tests.open_clip_peer import import_open_clip
  open_clip = import_open_clip()
  ref = open_clip.get_tokenizer("ViT-B-32")
  texts = FIXED + random_texts(rng, 400)
  got, want = tok.encode(texts), ref(texts).numpy()
  assert got.shape == want.shape == (len(texts), 77) and got.dtype == np.int32
  for text, g, w in zip(texts, got, want):
    np.testing.assert_array_equal(g, w, err_msg=repr(text))
  assert (want[:, -1] != 0).any(), "no text was truncated: the test lost its long texts"
  short = texts[:40]
  np.testing.assert_array_equal(tok.encode(short, max_len=8), ref(short, context_length=8).numpy())


def test_layout_padding_and_truncation(tok):
  assert tok.vocab_size == 49408 and (tok.bos_id, tok.eos_id, tok.pad_id) == (49406, 49407, 0)
  out = tok.encode(["a photo of a cat.", "", "word " * 100], max_len=16)
  assert out.shape == (3, 16)
  n = len(tok.text_ids("a photo of a cat."))
  assert out[0, 0] == tok.bos_id and out[0, n + 1] == tok.eos_id and (out[0, n + 2:] == 0).all()
  np.testing.assert_array_equal(out[1, :3], [tok.bos_id, tok.eos_id, 0])
  assert out[2, 0] == tok.bos_id and out[2, -1] == tok.eos_id and (out[2, 1:-1] != 0).all()
  with pytest.raises(ValueError, match="not one string"):
    tok.encode("a photo")
  with pytest.raises(ValueError, match="max_len=1"):
    tok.encode(["a"], max_len=1)


def test_decode_inverts_encode_on_clean_text(tok):
  texts = ["a photo of a cat .", "naïve café , 東京 !", "it 's 2 0 2 4"]
  assert tok.decode(tok.encode(texts)) == texts


def test_decode_matches_open_clip(tok, rng):
  """decode(rows) == open_clip's SimpleTokenizer.decode of each row's ids between the start
  token and the first end token (stripped: open_clip leaves a space after the last word), on
  rows cut mid-text (context 12) and padded ones. Texts that spell the special tokens are left
  out: decode drops every start token, open_clip writes them out."""
  from tests.open_clip_peer import import_open_clip
  ref = import_open_clip().tokenizer._tokenizer
  texts = [t for t in FIXED if "_of_text>" not in t] + random_texts(rng, 60)
  for max_len in (12, 77):
    rows = tok.encode(texts, max_len)
    want = []
    for row in rows.tolist():
      ids = row[1:row.index(tok.eos_id)]
      want.append(ref.decode(ids).strip())
    assert tok.decode(rows) == want
  assert any("\ufffd" in t for t in tok.decode(tok.encode(texts, 12)))   # a cut character
