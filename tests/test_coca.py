"""CoCa: the cached decoder against the full forward, greedy and beam search, the caption
and matching losses against float64 NumPy, hard negatives, ITM re-ranking, caption metrics."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.evaluate.captioning import class_word_match, corpus_bleu
from mmjax.evaluate.retrieval import rerank_recall
from mmjax.losses.captioning import caption_loss, hard_negatives, itm_loss
from mmjax.models import coca
from tests.reference import assert_close

BOS, EOS, VOCAB, LEN = 2, 3, 37, 9   # LEN: tokens per text; the tower reads LEN + 1 (bos)


def tiny(correct_cls_mask=False, itm=True):
  return coca.Model(
      image=dict(variant="mu/8", pool_type="none"),
      text=dict(vocab_size=VOCAB, max_len=LEN + 1, width=32, depth=2, mlp_dim=48, num_heads=2,
                correct_cls_mask=correct_cls_mask),
      decoder=dict(depth=2, mlp_dim=48, num_heads=2), embed_dim=24, n_queries=5, pool_heads=2,
      bos_id=BOS, itm=itm)


def params_of(model, rng, b=3):
  image = jnp.asarray(rng.normal(size=(b, 16, 16, 3)), jnp.float32)
  tokens = jnp.asarray(rng.integers(4, VOCAB, (b, LEN)), jnp.int32)
  params = model.init(jax.random.PRNGKey(int(rng.integers(1 << 30))), image, tokens)["params"]
  # Off the init: random LayerNorms / biases, and a sharper vocabulary head, so that the
  # search has something to choose between.
  params = jax.tree.map(lambda x: x + 0.3 * rng.standard_normal(x.shape).astype(np.float32)
                        if x.ndim <= 1 else x, params)
  params["dec"]["head"]["kernel"] = params["dec"]["head"]["kernel"] * 4
  return params, image


def full_logits(model, params, image, seq):
  """Uncached: the decoder's logits at every position of seq [b, S] (bos first)."""
  _, image_tokens = model.apply({"params": params}, image, method="encode_image_tokens")
  _, states = model.apply({"params": params}, seq, method=lambda m, s: m.txt(s))
  return model.apply({"params": params}, states, image_tokens, method="decode_states")[0]


@pytest.mark.parametrize("correct_cls_mask", [False, True])
def test_cached_steps_equal_the_full_forward(correct_cls_mask, rng):
  """Step t of the KV-cached decoder = position t of the full forward, for a sequence with
  padding and eos inside (the text tower's padding mask reads the prefix)."""
  model = tiny(correct_cls_mask)
  params, image = params_of(model, rng)
  seq = rng.integers(4, VOCAB, (3, LEN + 1)).astype(np.int32)
  seq[:, 0] = BOS
  seq[0, 4], seq[1, 2:4], seq[2, 6] = EOS, 0, 0
  seq = jnp.asarray(seq)
  want = full_logits(model, params, image, seq)
  dec = model.clone(decode=True)
  _, image_tokens = model.apply({"params": params}, image, method="encode_image_tokens")
  shapes = jax.eval_shape(lambda: dec.apply({"params": params}, seq, image_tokens,
                                            method="init_cache", mutable=["cache"])[1])
  cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)["cache"]
  step = jax.jit(lambda c, tok, t: dec.apply({"params": params, "cache": c}, tok, t, seq,
                                             image_tokens, method="decode_step",
                                             mutable=["cache"]))
  got = []
  for t in range(LEN + 1):
    logits, new = step(cache, seq[:, t], jnp.int32(t))
    cache = new["cache"]
    got.append(logits)
  assert_close(jnp.stack(got, 1), want, dtype=jnp.float32, name="cached logits")
  # The prefix alone gives the same: the logits are causal.
  assert_close(full_logits(model, params, image, seq[:, :5]), want[:, :5], dtype=jnp.float32)


def greedy_reference(model, params, image, max_len):
  """Greedy decoding by the uncached forward on the growing prefix, in Python."""
  seq = np.full((image.shape[0], 1), BOS, np.int32)
  done = np.zeros(image.shape[0], bool)
  logp = np.zeros(image.shape[0])
  for _ in range(max_len - 1):
    lp = np.array(jax.nn.log_softmax(full_logits(model, params, image, jnp.asarray(seq))[:, -1]))
    lp[:, 0] = -np.inf   # a live caption never emits padding
    nxt = np.where(done, 0, lp.argmax(1))
    logp += np.where(done, 0.0, lp.max(1))
    done |= nxt == EOS
    seq = np.concatenate([seq, nxt[:, None].astype(np.int32)], axis=1)
  return seq, logp


def test_greedy_is_beam_one_and_beams_score_at_least_greedy(rng):
  model = tiny()
  params, image = params_of(model, rng, b=2)
  want_seq, want_logp = greedy_reference(model, params, image, LEN + 1)
  seqs, scores, logp = coca.make_generate(model, max_len=LEN + 1, eos_id=EOS, beams=1)(
      params, image)
  np.testing.assert_array_equal(np.asarray(seqs[:, 0]), want_seq)
  assert_close(logp[:, 0], want_logp, dtype=jnp.float32, name="greedy log-prob")
  seqs4, _, logp4 = coca.make_generate(model, max_len=LEN + 1, eos_id=EOS, beams=4)(
      params, image)
  assert seqs4.shape == (2, 4, LEN + 1) and (np.asarray(seqs4[:, :, 0]) == BOS).all()
  assert (np.asarray(logp4[:, 0]) >= np.asarray(logp[:, 0]) - 1e-5).all()
  # The beams of a row differ, and each best beam's score is its sequence's log-probability.
  assert len({tuple(s) for s in np.asarray(seqs4[0])}) == 4
  for i in range(2):
    s = np.asarray(seqs4[i, 0])
    lp = np.asarray(jax.nn.log_softmax(full_logits(model, params, image[i:i + 1],
                                                   jnp.asarray(s[None]))[0]))
    n = (list(s[1:]).index(EOS) + 1) if EOS in s[1:] else LEN
    assert_close(lp[np.arange(n), s[1:n + 1]].sum(), logp4[i, 0], dtype=jnp.float32)


def test_decoding_compiles_once_per_batch_shape(rng):
  model = tiny()
  params, image = params_of(model, rng)
  traces = []
  gen = coca.make_generate(model, max_len=6, eos_id=EOS, beams=2)
  fn = jax.jit(lambda p, x: (traces.append(1), gen(p, x))[1])
  a = fn(params, image)
  b = fn(params, image[::-1] + 0.5)
  assert len(traces) == 1 and a[0].shape == b[0].shape == (3, 2, 6)
  with pytest.raises(ValueError, match="max_len=11 must be in"):
    coca.make_generate(model, max_len=11, eos_id=EOS)


def _np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_caption_loss_matches_float64_and_ignores_padding(smoothing, rng):
  logits = rng.normal(size=(3, 7, 11)) * 3
  labels = rng.integers(1, 11, (3, 7))
  labels[0, 4:], labels[2, 1:] = 0, 0
  got = caption_loss(jnp.asarray(logits, jnp.float32), jnp.asarray(labels), pad_id=0,
                     label_smoothing=smoothing)
  lp = _np_log_softmax(logits)
  target = (1 - smoothing) * np.eye(11)[labels] + smoothing / 11
  per = -(target * lp).sum(-1)
  real = labels != 0
  assert_close(got, per[real].mean(), dtype=jnp.float32, name="caption loss")
  g = jax.grad(lambda x: caption_loss(x, jnp.asarray(labels), label_smoothing=smoothing))(
      jnp.asarray(logits, jnp.float32))
  want_g = (np.exp(lp) - target) * real[..., None] / real.sum()
  assert_close(g, want_g, dtype=jnp.float32, name="caption loss grad")
  # Changing a padded position's logits changes nothing.
  moved = logits.copy()
  moved[0, 5] += 100
  assert float(caption_loss(jnp.asarray(moved, jnp.float32), jnp.asarray(labels),
                            label_smoothing=smoothing)) == pytest.approx(float(got), rel=1e-6)
  with pytest.raises(ValueError, match="labels"):
    caption_loss(jnp.asarray(logits, jnp.float32), jnp.asarray(labels[:, :3]))


def test_itm_loss_matches_float64(rng):
  logits = rng.normal(size=(6, 2)) * 2
  match = np.array([1, 1, 0, 0, 0, 0], bool)
  want = -_np_log_softmax(logits)[np.arange(6), match.astype(int)].mean()
  assert_close(itm_loss(jnp.asarray(logits, jnp.float32), jnp.asarray(match)), want,
               dtype=jnp.float32)


def test_hard_negatives_never_pick_excluded_and_follow_the_softmax(rng):
  n = 6
  sim = jnp.asarray(rng.normal(size=(n, n)) * 2, jnp.float32)
  exclude = np.eye(n, dtype=bool)
  exclude[0, 3] = exclude[3, 0] = True   # an identical caption
  keys = jax.random.split(jax.random.PRNGKey(int(rng.integers(1 << 30))), 4000)
  picks = np.asarray(jax.vmap(lambda k: hard_negatives(k, sim, jnp.asarray(exclude)))(keys))
  assert not exclude[np.arange(n)[None], picks].any()
  p = np.where(exclude, 0.0, np.exp(np.asarray(sim, np.float64)))
  p /= p.sum(1, keepdims=True)
  freq = np.stack([np.bincount(picks[:, i], minlength=n) for i in range(n)]) / len(keys)
  assert np.abs(freq - p).max() < 0.04
  # A row with nothing left draws from all of them (no NaN, a valid index).
  out = hard_negatives(keys[0], sim[:1], jnp.ones((1, n), bool))
  assert 0 <= int(out[0]) < n


def test_rerank_with_a_perfect_scorer_gives_r1_of_one(rng):
  n = 12
  ids = np.arange(n)
  sim = rng.normal(size=(n, n)).astype(np.float32)
  off = np.sort(np.where(np.eye(n, dtype=bool), -np.inf, sim), axis=1)
  sim[ids, ids] = (off[:, -2] + off[:, -3]) / 2   # the right one third by similarity: R@1 < 1
  perfect = lambda i, j: (i == j).astype(np.float32)
  assert rerank_recall(sim, perfect, k=3) == {"i2t_r1": 1.0, "t2i_r1": pytest.approx(
      np.mean([ids[j] in np.argsort(-sim[:, j])[:3] for j in ids]))}
  # k=1 cannot re-rank: first-stage R@1; an adversarial scorer picks a wrong one.
  assert rerank_recall(sim, perfect, k=1)["i2t_r1"] == 0.0
  assert rerank_recall(sim, lambda i, j: -perfect(i, j), k=3)["i2t_r1"] == 0.0


def test_caption_metrics():
  names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
  caps = ["a handwritten seven", "the digit 7 written by hand", "a seven or a one", "nothing"]
  assert class_word_match(caps, [7, 7, 7, 7], names) == 0.5
  assert class_word_match(["the figure 3"], [3], names) == 1.0
  assert corpus_bleu(["a handwritten seven ."], [["a handwritten seven ."]]) == pytest.approx(100)
  # Reference lists of different lengths (BLEU needs 4-grams: captions of >= 4 words here).
  refs = [["a handwritten seven here", "the figure 7 is here"], ["the figure 2 is here"]]
  both = corpus_bleu(["the figure 7 is here", "the figure 2 is here"], refs)
  assert both == pytest.approx(100) and corpus_bleu(["seven", "two"], refs) < 10


# ---------------------------------------------------------------- beam search, brute force

PAD, END, START = 0, 1, 2   # the toy decoder's ids


def toy_step(tables, vocab):
  """A decoder whose next-token log-probabilities depend on the whole prefix through its
  cache only (h: the prefix as a base-`vocab` number; row: which batch row's table), so a
  beam whose cache is not reordered with it reads another prefix's; 'calls' is a scalar."""
  def step(cache, token, index, seq):
    h = cache["h"] * vocab + token
    lp = jax.nn.log_softmax(tables[cache["row"], h % tables.shape[1]])
    return lp, {"h": h, "row": cache["row"], "calls": cache["calls"] + 1}
  return step


def toy_cache(batch, beams):
  return {"h": jnp.zeros(batch * beams, jnp.int32),
          "row": jnp.repeat(jnp.arange(batch, dtype=jnp.int32), beams),
          "calls": jnp.int32(0)}


def toy_logp(tables, vocab, row, seq):
  """float64 sum of log p over seq[1:] up to END (included); the rest must be padding."""
  total, h, t = 0.0, 0, 0
  lp_table = np.asarray(tables, np.float64)
  lp_table = lp_table - np.log(np.exp(lp_table).sum(-1, keepdims=True))
  while True:
    h = h * vocab + int(seq[t])
    if t + 1 == len(seq) or (t > 0 and seq[t] == END):
      return total, t
    total += lp_table[row, h % tables.shape[1], seq[t + 1]]
    t += 1


def every_sequence(vocab, max_len):
  """Every sequence a live beam can make: START, then ids != PAD, PAD after END."""
  out = []
  for k in range(1, max_len):
    for ids in itertools.product([i for i in range(vocab) if i != PAD], repeat=k):
      if END in ids[:-1] or (k < max_len - 1 and ids[-1] != END):
        continue
      out.append([START, *ids] + [PAD] * (max_len - 1 - k))
  return out


@pytest.mark.parametrize("penalty", [0.0, 0.6, 1.0, 2.5])
def test_beam_search_keeping_every_sequence_ranks_them_like_brute_force(penalty, rng):
  """vocab 5, 3 steps: 40 sequences, 40 beams keep them all; what comes back is every
  sequence once, each with its log-probability (float64 over the prefix tables) and score
  logp / length ** penalty (length: tokens after START, END included), best first; each
  batch row with its own tables."""
  vocab, max_len, batch = 5, 4, 2
  seqs = every_sequence(vocab, max_len)
  beams = len(seqs)
  assert beams == 40
  tables = jnp.asarray(rng.normal(size=(batch, vocab ** max_len, vocab)) * 2, jnp.float32)
  got_seq, got_score, got_logp = jax.jit(lambda c: coca.beam_search(
      toy_step(tables, vocab), c, START, batch=batch, beams=beams, max_len=max_len,
      eos_id=END, pad_id=PAD, length_penalty=penalty))(toy_cache(batch, beams))
  got_seq, got_score, got_logp = map(np.asarray, (got_seq, got_score, got_logp))
  for b in range(batch):
    assert sorted(map(tuple, got_seq[b])) == sorted(map(tuple, seqs))
    want = [toy_logp(tables, vocab, b, s) for s in got_seq[b]]
    logp = np.array([w[0] for w in want])
    score = logp / np.array([w[1] for w in want], np.float64) ** penalty
    assert_close(got_logp[b], logp, dtype=jnp.float32, name="log-probs")
    assert_close(got_score[b], score, dtype=jnp.float32, name="scores")
    assert (np.diff(score) <= 1e-6).all(), "not best first"


def python_beam_search(logp_of, beams, max_len, penalty):
  """The documented search in plain Python for one batch row: logp_of(prefix) -> [vocab]
  log-probs; live beams extend by any id but PAD, a beam that emitted END extends by PAD at
  no cost; the `beams` best summed log-probs survive (ties: earlier beam, lower id); the
  result ranked by logp / length ** penalty."""
  alive = [([START], 0.0, False, 0)]
  for _ in range(max_len - 1):
    cand = []
    for seq, lp, done, n in alive:
      if done:
        cand.append((seq + [PAD], lp, True, n))
        continue
      dist = logp_of(seq)
      for tok in range(len(dist)):
        if tok != PAD:
          cand.append((seq + [tok], lp + dist[tok], tok == END, n + 1))
    alive = sorted(cand, key=lambda c: -c[1])[:beams]   # sorted is stable
  return sorted(((s, lp / max(n, 1) ** penalty, lp) for s, lp, _, n in alive),
                key=lambda r: -r[1])


@pytest.mark.parametrize("beams", [1, 3])
def test_beam_search_with_few_beams_equals_the_documented_search(beams, rng):
  """vocab 6, 5 steps, 3 beams (and 1: greedy) against the same search written in Python
  over the float64 prefix tables: the sequences, scores and log-probs, best first."""
  vocab, max_len, batch, penalty = 6, 6, 3, 0.8
  tables = rng.normal(size=(batch, vocab ** max_len, vocab)) * 1.5
  tables[:, :, END] += 1.0   # captions that end early and late
  t32 = jnp.asarray(tables, jnp.float32)
  got = jax.jit(lambda c: coca.beam_search(
      toy_step(t32, vocab), c, START, batch=batch, beams=beams, max_len=max_len,
      eos_id=END, pad_id=PAD, length_penalty=penalty))(toy_cache(batch, beams))
  got_seq, got_score, got_logp = map(np.asarray, got)
  lp_table = np.asarray(t32, np.float64)
  lp_table = lp_table - np.log(np.exp(lp_table).sum(-1, keepdims=True))
  ended = 0
  for b in range(batch):
    def logp_of(seq):
      h = 0
      for tok in seq:
        h = h * vocab + tok
      return lp_table[b, h % tables.shape[1]]
    want = python_beam_search(logp_of, beams, max_len, penalty)
    np.testing.assert_array_equal(got_seq[b], [s for s, _, _ in want])
    assert_close(got_score[b], np.array([s for _, s, _ in want]), dtype=jnp.float32, name="scores")
    assert_close(got_logp[b], np.array([lp for _, _, lp in want]), dtype=jnp.float32, name="log-probs")
    ended += sum(END in s[1:-1] for s, _, _ in want)
  assert ended, "no beam ended before the last step: END handling untested"


def test_rerank_recall_equals_an_explicit_loop(rng):
  """Non-square similarities (5 images, 8 texts), class ids shared by several texts, exact
  ties in similarity and in score, k from 1 to beyond the candidates: R@1 of the loop that
  takes each query's k most similar (ties: lower index) and keeps the best-scoring (ties:
  the earlier of them)."""
  n, m = 5, 8
  for _ in range(30):
    sim = rng.integers(-2, 3, (n, m)).astype(np.float32)
    table = rng.integers(0, 3, (n, m)).astype(np.float32)
    img_ids, txt_ids = rng.integers(0, 3, n), rng.integers(0, 3, m)
    txt_ids[:3] = [0, 1, 2]   # every class has a text, so every image has an answer
    img_ids[:3] = [0, 1, 2]
    for k in (1, 2, 4, 9):
      want = {}
      for name, s, t, q_ids, c_ids in (("i2t", sim, table, img_ids, txt_ids),
                                       ("t2i", sim.T, table.T, txt_ids, img_ids)):
        hits = []
        for q in range(s.shape[0]):
          cands = sorted(range(s.shape[1]), key=lambda c: (-s[q, c], c))[:k]
          best = max(cands, key=lambda c: t[q, c])
          hits.append(c_ids[best] == q_ids[q])
        want[f"{name}_r1"] = float(np.mean(hits))
      got = rerank_recall(sim, lambda i, j: table[i, j], k=k, img_ids=img_ids,
                          txt_ids=txt_ids)
      assert got == pytest.approx(want), (k, got, want)
