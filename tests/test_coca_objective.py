"""The CoCa objective and the evaluator's CoCa parts through their public entry points
(mmjax.objectives.make(config).grad_fn, .captioner(); mmjax.evaluate.Evaluator), against
independent references: the loss terms recomputed in float64 from the model's own forward on
explicit (image, text) pairs, the hard negatives' distribution, the best caption by brute force
over every sequence of a 6-id vocabulary, and the ITM re-ranking by an explicit loop."""

import itertools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mmjax.evaluate.captioning import corpus_bleu
from mmjax.evaluate.evaluator import Evaluator
from mmjax import objectives
from tests.configs import tiny_config
from tests.reference import assert_close, ref_clip, rel_err

BOS, EOS = 2, 3   # config.coca's defaults; pad 0
WEIGHTS = dict(contrastive_weight=0.7, caption_weight=1.3, itm_weight=0.6)


def coca_objective(*, vocab=20, text_len=6, **coca):
  """A tiny CoCa objective (mu towers, 16 px images: 4 patches), its own weights per term."""
  c = tiny_config("unused", loss="coca", **{
      "model.image.pool_type": "none", "coca.n_queries": 5, "coca.pool_heads": 2,
      "data.image_size": 16, "data.text_len": text_len,
      **{f"coca.{k}": v for k, v in {**WEIGHTS, "label_smoothing": 0.1, **coca}.items()}})
  return objectives.make(c, vocab_size=vocab)


def init_params(objective, rng, images, texts):
  """Params off the init: every vector (LayerNorms, biases, the ITM head's bias) moved, so
  that a dropped or swapped one shows up."""
  params = jax.jit(objective.init)(jax.random.PRNGKey(int(rng.integers(1 << 30))),
                                   {"image": images, "text": texts})
  return jax.tree.map(lambda x: x + 0.3 * rng.standard_normal(x.shape).astype(np.float32)
                      if x.ndim <= 1 else x, params)


def random_texts(rng, n, length, vocab, lengths):
  """[n, length] int32: random ids >= 4 then EOS (a text of `length` ids ends in EOS), pad."""
  out = np.zeros((n, length), np.int32)
  for i, k in enumerate(lengths):
    out[i, :k] = rng.integers(4, vocab, k)
    out[i, k - 1] = EOS
  return out


def with_scale(params, scale):
  return {**params, "t": jnp.float32(np.log(scale))}


_APPLY = {}


def forward(model, params, images, texts):
  """The model's own forward on explicit pairs (image i with text i): float64 zimg, ztxt,
  teacher-forced logits [n, L, V] and decoder states [n, L, width]."""
  apply = _APPLY.setdefault(id(model), jax.jit(model.apply))
  zimg, ztxt, out = apply({"params": params}, images, texts)
  return tuple(np.asarray(x, np.float64) for x in (zimg, ztxt, out["logits"], out["hidden"]))


def all_pairs(model, params, images, texts):
  """The forward on every (image i, text j): zimg [n, e], ztxt [m, e], logits [n, m, L, V] and
  hidden [n, m, width], the decoder's state at the EOS input position (inputs [bos, tokens]:
  the EOS token's input index is the text's length, or the last input when the text fills
  the length); float64."""
  n, m, length = len(images), len(texts), texts.shape[1]
  ii, jj = np.divmod(np.arange(n * m), m)
  zimg, ztxt, logits, h = forward(model, params, images[ii], texts[jj])
  pos = np.minimum((texts[jj] != 0).sum(1), length - 1)
  return (zimg[::m], ztxt[:m], logits.reshape(n, m, *logits.shape[1:]),
          h[np.arange(n * m), pos].reshape(n, m, -1))


def log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def itm_nll(params, hidden):
  """[n, m, width] -> ([n, m] -log p(match), [n, m] -log p(no match)), float64."""
  head = params["itm_head"]
  z = hidden @ np.asarray(head["kernel"], np.float64) + np.asarray(head["bias"], np.float64)
  lp = z - np.logaddexp(z[..., :1], z[..., 1:])
  return -lp[..., 1], -lp[..., 0]


def caption_nll(logits, texts, smoothing):
  """Mean over the real targets (the tokens themselves: bos is prepended) of the smoothed CE."""
  v = logits.shape[-1]
  lp = log_softmax(logits)
  target = (1 - smoothing) * np.eye(v)[texts] + smoothing / v
  per = -(target * lp).sum(-1)
  return per[texts != 0].mean()


def itm_reference(params, hidden, neg_txt, neg_img):
  """BLIP's matching loss: n positives (i, i), then image i with text neg_txt[i], then image
  neg_img[j] with text j, all labelled 'no match'; the mean over the 3n pairs."""
  pos, neg = itm_nll(params, hidden)
  n = len(neg_txt)
  return (np.trace(pos) + neg[np.arange(n), neg_txt].sum() + neg[neg_img, np.arange(n)].sum()
          ) / (3 * n)


def test_objective_losses_equal_a_float64_recomputation_from_explicit_pairs(rng):
  """grad_fn's loss terms and total against float64 from the model's forward on explicit
  pairs; its gradients against jax.grad of that recomputation. At a large logit scale the
  hard negatives are deterministic: image i's is the most similar text whose caption differs
  from i's (an identical caption is no negative, even when it is the most similar), text j's
  the most similar image whose caption differs from j's."""
  obj = coca_objective()
  model = obj.model
  n, length = 5, 6
  images = rng.normal(size=(n, 16, 16, 3)).astype(np.float32)
  pool = random_texts(rng, 6, length, 20, lengths=[2, 3, 4, 5, 6, 6])
  params = init_params(obj, rng, images, pool[:n])
  zimg, z_pool, pool_logits, pool_hidden = all_pairs(model, params, images, pool)
  # Rows 0 and 1 carry image 0's favourite caption: its two most similar texts are excluded.
  best = int(np.argmax(zimg[0] @ z_pool.T))
  rest = [j for j in range(6) if j != best]
  pick = np.array([best, best, *rng.permutation(rest)[:n - 2]])
  texts, ztxt, logits = pool[pick], z_pool[pick], pool_logits[np.arange(n), pick]
  hidden = pool_hidden[:, pick]                     # [n, n, width]: image i with text j
  same = (texts[:, None] == texts[None]).all(-1)
  sim = zimg @ ztxt.T
  masked = np.where(same, -np.inf, sim)
  neg_txt, neg_img = masked.argmax(1), masked.argmax(0)
  # A scale that makes every draw the most similar candidate (gap x scale >= 80).
  gaps = [np.diff(np.sort(r[np.isfinite(r)]))[-1:] for r in (*masked, *masked.T)]
  scale = 80.0 / max(min(float(g[0]) for g in gaps if len(g)), 1e-6)
  params = with_scale(params, scale)
  batch = {"image": jnp.asarray(images), "text": jnp.asarray(texts)}
  (value, aux), grads = jax.jit(obj.grad_fn)(params, None, batch, jax.random.PRNGKey(7))

  want = {"contrastive_loss": ref_clip(zimg, ztxt, scale)[0],
          "caption_loss": caption_nll(logits, texts, 0.1),
          "itm_loss": itm_reference(params, hidden, neg_txt, neg_img)}
  assert neg_txt[0] not in (0, 1) and neg_img[1] != 0   # the identical caption was skipped
  for k, v in want.items():
    assert_close(aux[k], v, dtype=jnp.float32, name=k)
  assert float(aux["scale"]) == pytest.approx(scale, rel=1e-5)
  total = sum(WEIGHTS[k.replace("loss", "weight")] * v for k, v in want.items())
  assert_close(value, total, dtype=jnp.float32, name="total")

  # Gradients: the same terms through one model.apply on the 3n explicit pairs (positives,
  # image i with text neg_txt[i], image neg_img[j] with text j), differentiated.
  idx = np.arange(n)
  ii, jj = np.r_[idx, idx, neg_img], np.r_[idx, neg_txt, idx]

  def reference(p):
    zi, zt, o = model.apply({"params": p}, images[ii], texts[jj])
    z = jnp.exp(p["t"]) * zi[:n] @ zt[:n].T
    clip = 0.5 * (jnp.mean(jax.nn.logsumexp(z, 1) - jnp.diag(z))
                  + jnp.mean(jax.nn.logsumexp(z, 0) - jnp.diag(z)))
    lp = jax.nn.log_softmax(o["logits"][:n])
    target = 0.9 * jax.nn.one_hot(texts, 20) + 0.1 / 20
    real = texts != 0
    cap = (-(target * lp).sum(-1) * real).sum() / real.sum()
    pos = np.minimum((texts[jj] != 0).sum(1), length - 1)
    zz = o["hidden"][np.arange(3 * n), pos] @ p["itm_head"]["kernel"] + p["itm_head"]["bias"]
    itm = -jax.nn.log_softmax(zz)[np.arange(3 * n), (np.arange(3 * n) < n).astype(int)].mean()
    return 0.7 * clip + 1.3 * cap + 0.6 * itm

  want_grads = jax.jit(jax.grad(reference))(params)
  # Per leaf, relative to the largest gradient of its module (the tower's: the keys' biases
  # have none, softmax ignores them, only round-off).
  norms = {}
  for path, w in jax.tree_util.tree_leaves_with_path(want_grads):
    norms[path[0]] = max(norms.get(path[0], 0.0), float(np.linalg.norm(np.ravel(w))))
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(grads),
                          jax.tree.leaves(want_grads)):
    err = rel_err(g, w, scale=1e-3 * norms[path[0]])
    assert err < 1e-4, f"grad{jax.tree_util.keystr(path)}: relative error {err:.3g}"


def test_objective_draws_hard_negatives_independently_from_the_scaled_softmax(rng):
  """3 pairs: each image's negative text and each text's negative image is one of the two
  others, drawn with probability softmax(scale x similarity) over them, all draws
  independent. Over 600 rng keys, which pairs were drawn is read off the ITM head's kernel
  gradient (the sum over the pairs of hidden x (p(match) - label), each pair's hidden from the
  model's forward on it): no positive is ever drawn, each pair as often as
  P(image i draws text j) + P(text j draws image i), and the pairs (i, j) and (j, i) together
  as often as independent draws give (a key shared by both directions would correlate them)."""
  obj = coca_objective()
  model, n = obj.model, 3
  images = rng.normal(size=(n, 16, 16, 3)).astype(np.float32)
  texts = random_texts(rng, n, 6, 20, lengths=[3, 5, 6])
  params = init_params(obj, rng, images, texts)
  zimg, ztxt, _, hidden = all_pairs(model, params, images, texts)    # hidden [n, n, width]
  sim = zimg @ ztxt.T
  others = [[j for j in range(n) if j != i] for i in range(n)]
  gaps = [abs(sim[i, a] - sim[i, b]) for i, (a, b) in enumerate(others)]
  gaps += [abs(sim[a, j] - sim[b, j]) for j, (a, b) in enumerate(others)]
  scale = 1.5 / np.median(gaps)   # draws neither certain nor even
  params = with_scale(params, scale)
  logits = np.where(np.eye(n, dtype=bool), -np.inf, scale * sim)
  p_row = np.exp(logits - logits.max(1, keepdims=True))
  p_row /= p_row.sum(1, keepdims=True)          # image i draws text j
  p_col = np.exp(logits - logits.max(0, keepdims=True))
  p_col /= p_col.sum(0, keepdims=True)          # text j draws image i

  _, nll_no = itm_nll(params, hidden)
  p_match = 1 - np.exp(-nll_no)
  basis = (hidden * p_match[..., None]).reshape(n * n, -1).T         # a negative pair's term
  positives = (hidden * (p_match - 1)[..., None])[np.arange(n), np.arange(n)].sum(0)
  batch = {"image": jnp.asarray(images), "text": jnp.asarray(texts)}
  keys = jax.random.split(jax.random.PRNGKey(int(rng.integers(1 << 30))), 600)
  grad = np.asarray(jax.jit(jax.vmap(
      lambda k: obj.grad_fn(params, None, batch, k)[1]["itm_head"]["kernel"][:, 1]))(keys),
      np.float64)
  terms = grad * 3 * n / WEIGHTS["itm_weight"] - positives            # [keys, width]
  counts = np.linalg.lstsq(basis, terms.T, rcond=None)[0].T
  assert np.abs(counts - np.round(counts)).max() < 0.05, "not a sum of pairs' terms"
  counts = np.round(counts).reshape(-1, n, n)
  assert (counts.sum((1, 2)) == 2 * n).all() and not counts[:, np.arange(n), np.arange(n)].any()

  want = p_row + p_col
  sd = np.sqrt((p_row * (1 - p_row) + p_col * (1 - p_col)) / len(keys))
  np.testing.assert_array_less(np.abs(counts.mean(0) - want), 5 * sd + 1e-9)
  # Q = sum over i < j of count(i, j) count(j, i): its law under independent draws, exactly.
  q_values, q_probs = [], []
  for rows in itertools.product(*others):
    for cols in itertools.product(*others):
      c = np.zeros((n, n))
      c[np.arange(n), rows] += 1
      c[cols, np.arange(n)] += 1
      q_values.append(sum(c[i, j] * c[j, i] for i in range(n) for j in range(i + 1, n)))
      q_probs.append(np.prod(p_row[np.arange(n), rows]) * np.prod(p_col[cols, np.arange(n)]))
  q_values, q_probs = np.array(q_values), np.array(q_probs)
  mean_q = (q_values * q_probs).sum()
  sd_q = np.sqrt(((q_values - mean_q) ** 2 * q_probs).sum() / len(keys))
  got_q = np.mean([sum(c[i, j] * c[j, i] for i in range(n) for j in range(i + 1, n))
                   for c in counts])
  assert abs(got_q - mean_q) < 5 * sd_q, (got_q, mean_q, sd_q)


# ---------------------------------------------------------------- captioner and evaluator

V6, LEN3 = 6, 3   # 6 ids (pad 0, 1, BOS 2, EOS 3, 4, 5), 3 tokens per text: 85 captions


def all_captions(length=LEN3):
  """Every caption a live beam can make: `length` tokens, none pad, padding after EOS
  (85 of 3 tokens, 21 of 2)."""
  out = [[EOS] + [0] * (length - 1)]
  for k in range(1, length + 1):
    for ids in itertools.product((1, 2, 4, 5), repeat=k):
      rest = [EOS] if k < length else []
      out.append(list(ids) + rest + [0] * (length - k - len(rest)))
  return np.array(out, np.int32)


def brute_force_best(model, params, images, penalty, length=LEN3, start=None):
  """[b, length] the caption maximising sum log p / n ** penalty (n: tokens, EOS included),
  each image's log-probabilities from the model's full forward on every caption (after
  `start`, for a model that prepends no bos)."""
  caps = all_captions(length)
  lengths = np.where((caps == EOS).any(1), (caps == EOS).argmax(1) + 1, length)
  inputs = caps if start is None else np.c_[np.full(len(caps), start, np.int32), caps]
  best = []
  for x in images:
    _, _, logits, _ = forward(model, params, np.repeat(x[None], len(caps), 0), inputs)
    tok = np.take_along_axis(log_softmax(logits), caps[..., None], 2)[..., 0]
    logp = np.where(np.arange(length)[None] < lengths[:, None], tok, 0.0).sum(1)
    best.append(caps[np.argmax(logp / lengths ** penalty)])
  return np.array(best)


class SpyTokenizer:
  """Decodes id t as the word 'w<t>' (pad dropped, BOS and EOS kept: a caption that keeps
  its start token reads differently); records what it was asked to decode."""

  def __init__(self, bos_id=None):
    self.decoded, self.bos_id = [], bos_id

  def decode(self, rows):
    rows = np.asarray(rows)
    self.decoded.append(rows)
    return [" ".join(f"w{t}" for t in r if t != 0) for r in rows]


def settings(batch_size, match="pair"):
  return ml_collections.ConfigDict(dict(batch_size=batch_size, retrieval_match=match,
                                        knn_k=1, probe_shots=()))


def test_captioner_and_evaluator_equal_brute_force_and_an_explicit_rerank_loop(rng):
  """eval_beams=85 keeps every caption of a 6-id vocabulary: the captioner's output is the
  caption with the best length-penalised log-probability over all 85 (the model's full
  forward on each), start token dropped. The evaluator (batches of 2 over 5 pairs: padded)
  decodes exactly those captions and scores them against each image's own caption; its
  itm_retrieval R@1 is a loop over queries scoring each one's top k texts with itm_score."""
  penalty = 2.0
  obj = coca_objective(vocab=V6, text_len=LEN3, eval_beams=85, eval_length_penalty=penalty,
                       rerank_k=3)
  model, n = obj.model, 5
  images = rng.normal(size=(n, 16, 16, 3)).astype(np.float32)
  texts = all_captions()[rng.choice(np.arange(1, 85), n, replace=False)]
  for _ in range(10):   # params for which the length penalty changes some image's best
    params = init_params(obj, rng, images, texts)
    want = brute_force_best(model, params, images, penalty)
    if (want != brute_force_best(model, params, images, 0.0)).any():
      break
  else:
    pytest.fail("no draw where the length penalty matters")
  tok = SpyTokenizer()
  evaluator = Evaluator(obj, settings(batch_size=2), {"image": images, "text": texts},
                        tokenizer=tok, text_len=LEN3)
  out = evaluator({"params": params})
  np.testing.assert_array_equal(tok.decoded[0], want)   # what obj.captioner() gave
  words = lambda rows: [" ".join(f"w{t}" for t in r if t) for r in rows]
  assert out["caption_bleu"] == pytest.approx(corpus_bleu(words(want),
                                                          [[t] for t in words(texts)]))
  zimg, ztxt, _, _ = forward(model, params, images, texts)
  apply = jax.jit(model.apply, static_argnames="method")
  _, tokens = apply({"params": params}, images, method="encode_image_tokens")
  ii, jj = np.divmod(np.arange(n * n), n)
  table = np.asarray(apply({"params": params}, tokens[ii], texts[jj],
                           method="itm_score")).reshape(n, n)
  want = rerank_loop(np.asarray(zimg @ ztxt.T, np.float32), lambda i, j: table[i, j], 3,
                     np.arange(n))
  assert (out["itm_retrieval_i2t_r1"], out["itm_retrieval_t2i_r1"]) == pytest.approx(want,
                                                                                     abs=1e-6)


def test_evaluator_captions_texts_that_carry_their_start_token(rng):
  """config.coca.bos_id=None (the texts start with the tokenizer's start token, CLIP's SOT):
  the evaluator captions from its tokenizer's bos_id; eval_beams=21 keeps every caption of 2
  tokens, so they are the brute-force best after that start token."""
  obj = coca_objective(vocab=V6, text_len=LEN3, bos_id=None, eval_beams=21,
                       eval_length_penalty=1.0)
  start, n = 4, 3
  images = rng.normal(size=(n, 16, 16, 3)).astype(np.float32)
  texts = np.c_[np.full(n, start), all_captions(2)[rng.choice(21, n)]].astype(np.int32)
  params = init_params(obj, rng, images, texts)
  tok = SpyTokenizer(bos_id=start)
  evaluator = Evaluator(obj, settings(batch_size=2), {"image": images, "text": texts},
                        tokenizer=tok, text_len=LEN3)
  evaluator.evaluators["captioning"].run({"params": params})
  want = brute_force_best(obj.model, params, images, 1.0, length=2, start=start)
  np.testing.assert_array_equal(tok.decoded[0], want)


def rerank_loop(sim, score, k, ids):
  """R@1 after re-ranking, query by query: the k most similar candidates (ties: the lower
  index first), the best-scoring of them (ties: the earlier in that order), right when its id
  is the query's. score(i, j) for image i, text j. -> (i2t, t2i)."""
  n = sim.shape[0]
  out = []
  for s, pair in ((sim, lambda q, c: (q, c)), (sim.T, lambda q, c: (c, q))):
    hits = 0
    for q in range(n):
      cands = sorted(range(n), key=lambda c: (-s[q, c], c))[:k]
      best = max(cands, key=lambda c: score(*pair(q, c)))   # max keeps the first of equals
      hits += ids[best] == ids[q]
    out.append(hits / n)
  return tuple(out)


class TableObjective(objectives.Objective):
  """A stand-in objective whose embeddings and matching scores are tables in its params:
  image i (all pixels = i) and text j (first id = j) embed as params['img'][i] /
  params['txt'][j], and the pair scores params['itm'][i, j]."""

  def __init__(self, k):
    self.k = k

  def features(self, params, image):
    return params["img"][image[:, 0, 0, 0].astype(jnp.int32)]

  def towers(self):
    return (self.features, lambda p, t: p["txt"][t[:, 0]])

  def reranker(self):
    return (lambda p, x: x[:, :1, :1, 0],
            lambda p, tok, t: p["itm"][tok[:, 0, 0].astype(jnp.int32), t[:, 0]], self.k)


@pytest.mark.parametrize("k", [3, 9])
def test_evaluator_itm_rerank_pairs_and_ranks_like_an_explicit_loop(k, rng):
  """40 random tables through one evaluator (7 pairs in batches of 3, so the last batches are
  padded; k=9 > 7 re-ranks everything): small-integer embeddings and scores, so that ties in
  similarity and in score happen and are exact; two texts identical (one id, one embedding)."""
  n = 7
  images = np.repeat(np.arange(n, dtype=np.float32), 16 * 16 * 3).reshape(n, 16, 16, 3)
  text_ids = np.array([0, 1, 2, 3, 4, 1, 6])        # texts 1 and 5 are one caption
  texts = np.stack([text_ids, np.zeros(n, int)], 1).astype(np.int32)
  evaluator = Evaluator(TableObjective(k), settings(batch_size=3),
                        {"image": images, "text": texts}, text_len=2)
  _, ids = np.unique(texts[:, :1], axis=0, return_inverse=True)
  ids = ids.reshape(-1)
  for _ in range(40):
    params = {"img": rng.integers(-2, 3, (n, 4)).astype(np.float32),
              "txt": rng.integers(-2, 3, (n, 4)).astype(np.float32),
              "itm": rng.integers(0, 3, (n, n)).astype(np.float32)}
    out = evaluator(params)
    sim = params["img"] @ params["txt"][text_ids].T
    want = rerank_loop(sim, lambda i, j: params["itm"][i, text_ids[j]], k, ids)
    assert (out["itm_retrieval_i2t_r1"], out["itm_retrieval_t2i_r1"]) == pytest.approx(want)
