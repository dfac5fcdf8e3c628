"""Config keys checked by their effect: the weight-decay mask, the warmup-cosine schedule and
gradient clipping (against float64 NumPy AdamW), model.temperature_init / bias_init, model.remat,
model.dtype=bfloat16; and through loop.train: evaluate.every / at_init, retrieval_match,
checkpoint.keep, accum_steps, data.num_workers and data.flip."""

import json
import math
import os

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mmjax.data import pipeline
from mmjax.evaluate import retrieval_recall
from mmjax.nn.layers import Encoder, MlpBlock
from mmjax.nn.linear import Dense
from mmjax import objectives
from mmjax.train import checkpoint, optimizer
from tests import reference as ref
from tests.configs import tiny_config

VOCAB = 64


def _optim(**kw):
  return ml_collections.ConfigDict({**dict(lr=0.1, warmup_steps=0, end_lr_fraction=0.1,
                                           weight_decay=0.5, b1=0.9, b2=0.95, grad_clip=1.0),
                                    **kw})


def _lr(s, lr, warmup, total, end_fraction):
  """The closed form: linear warmup from 0, then cosine from lr to end_fraction * lr at total."""
  if s < warmup:
    return lr * s / warmup
  end = lr * end_fraction
  frac = min(s - warmup, total - warmup) / (total - warmup)
  return end + (lr - end) * 0.5 * (1 + math.cos(math.pi * frac))


def _np_adamw(params, grads, o, total):
  """float64 updates of clip-by-global-norm + AdamW (optax's eps 1e-8), decay on ndim >= 2."""
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  m = {k: np.zeros_like(v) for k, v in p.items()}
  v2 = {k: np.zeros_like(v) for k, v in p.items()}
  out = []
  for c, g in enumerate(grads):
    g = {k: np.asarray(x, np.float64) for k, x in g.items()}
    norm = math.sqrt(sum(float((x ** 2).sum()) for x in g.values()))
    if o.grad_clip and norm >= o.grad_clip:
      g = {k: x * (o.grad_clip / norm) for k, x in g.items()}
    lr, u = _lr(c, o.lr, o.warmup_steps, total, o.end_lr_fraction), {}
    for k in p:
      m[k] = o.b1 * m[k] + (1 - o.b1) * g[k]
      v2[k] = o.b2 * v2[k] + (1 - o.b2) * g[k] ** 2
      mh, vh = m[k] / (1 - o.b1 ** (c + 1)), v2[k] / (1 - o.b2 ** (c + 1))
      u[k] = -lr * (mh / (np.sqrt(vh) + 1e-8) + o.weight_decay * p[k] * (p[k].ndim >= 2))
      p[k] = p[k] + u[k]
    out.append(u)
  return out


def _apply(tx, params, grads):
  """The optimizer's updates for a sequence of gradients, params moving as in training."""
  state, out = tx.init(params), []
  update = jax.jit(tx.update)
  for g in grads:
    u, state = update(g, state, params)
    params = jax.tree.map(lambda p, d: p + d, params, u)
    out.append(u)
  return out


# ------------------------------------------------------------------ optimizer (unit)

def _two_tower_params(data_dir, rng):
  """The real two-tower param tree of the tiny config, random values (shapes from eval_shape)."""
  obj = objectives.make(tiny_config(data_dir), vocab_size=VOCAB)
  batch = {"image": jnp.zeros((1, 32, 32, 3)), "text": jnp.zeros((1, 16), jnp.int32)}
  shapes = jax.eval_shape(obj.init, jax.random.PRNGKey(0), batch)
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape), jnp.float32), shapes)


def _decays(tx, params):
  """name -> (update, param) of one AdamW step with zero gradients: only weight decay moves."""
  zeros = jax.tree.map(jnp.zeros_like, params)
  (u,) = _apply(tx, params, [zeros])
  flat = jax.tree_util.tree_leaves_with_path(u)
  return {optimizer.param_path(k): (np.asarray(x), np.asarray(p))
          for (k, x), p in zip(flat, jax.tree.leaves(params))}


def test_weight_decay_on_kernels_and_embeddings_not_norms_biases_t_b(data_dir, rng):
  """One AdamW step with zero gradients: kernels, token/position embeddings and the MAP probe
  move by exactly -lr*wd*p; LayerNorm scales and biases, the 1-D biases, t and b stay put."""
  o = _optim()
  tx, _ = optimizer.make_optimizer(o, 10)
  seen = _decays(tx, _two_tower_params(data_dir, rng))
  decayed = [n for n in seen if n.endswith(("kernel", "embedding", "probe"))]
  kept = [n for n in seen if n in ("t", "b") or n.endswith("scale")
          or (n.endswith("bias") and seen[n][1].ndim == 1)]
  assert {"txt/pos_embedding", "txt/token_embedding/embedding", "img/map_head/probe",
          "img_proj/kernel", "img/embedding/kernel"} <= set(decayed)
  assert {"t", "b", "img/encoder/ln_final/scale", "img/embedding/bias"} <= set(kept)
  for n in decayed:
    u, p = seen[n]
    ref.assert_close(u, -o.lr * o.weight_decay * np.float64(p), dtype=jnp.float32, name=n)
  for n in kept:
    np.testing.assert_array_equal(seen[n][0], 0.0, err_msg=n)


def test_weight_decay_never_on_attention_biases(data_dir, rng):
  """The [heads, head_dim] query/key/value biases are biases: no weight decay."""
  tx, _ = optimizer.make_optimizer(_optim(), 10)
  seen = _decays(tx, _two_tower_params(data_dir, rng))
  biases = [n for n in seen if n.endswith("bias") and seen[n][1].ndim >= 2]
  assert len(biases) == 9   # q, k, v in the image and text blocks and the MAP head
  for n in biases:
    np.testing.assert_array_equal(seen[n][0], 0.0, err_msg=n)


def test_warmup_cosine_schedule_matches_the_closed_form(rng):
  """The schedule, and the lr the optimizer applies (weight decay alone, zero gradients),
  equal linear warmup then cosine to end_lr_fraction * lr, at every step and beyond the end."""
  o, total = _optim(lr=0.2, warmup_steps=4, end_lr_fraction=0.05, grad_clip=0.0), 12
  tx, schedule = optimizer.make_optimizer(o, total)
  for s in (0, 2, 4, 8, 11, 12, 20):   # start, mid-warmup, peak, mid-decay, end, after
    want = _lr(s, o.lr, o.warmup_steps, total, o.end_lr_fraction)
    ref.assert_close(schedule(s), want, dtype=jnp.float32, name=f"lr({s})")
  assert _lr(12, o.lr, 4, total, o.end_lr_fraction) == pytest.approx(o.lr * o.end_lr_fraction)
  params = {"kernel": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)}
  zeros = [{"kernel": jnp.zeros((3, 4))}] * (total + 2)
  got = _apply(tx, params, zeros)
  want = _np_adamw(params, zeros, o, total)
  for c, (g, w) in enumerate(zip(got, want)):
    ref.assert_close(g["kernel"], w["kernel"], dtype=jnp.float32, name=f"update {c}")


def test_grad_clip_rescales_to_the_global_norm(rng):
  """Huge, small, huge gradients: AdamW's updates are those of the gradients rescaled to global
  norm grad_clip when above it (float64 NumPy); grad_clip=0 leaves them as they are. Adam is
  scale-invariant in one step, so the small step between the huge ones is what shows it."""
  params = {"kernel": jnp.asarray(rng.normal(size=(6, 5)), jnp.float32),
            "bias": jnp.asarray(rng.normal(size=(5,)), jnp.float32)}
  grads = []
  for size in (1e3, 0.2, 3e2):   # global norms, grad_clip 1.0
    g = {k: rng.normal(size=p.shape) for k, p in params.items()}
    n = math.sqrt(sum(float((x ** 2).sum()) for x in g.values()))
    grads.append({k: jnp.asarray(x * size / n, jnp.float32) for k, x in g.items()})
  for clip in (1.0, 0.0):
    o = _optim(grad_clip=clip, lr=0.01, weight_decay=0.1)
    got = _apply(optimizer.make_optimizer(o, 10)[0], params, grads)
    want = _np_adamw(params, grads, o, 10)
    for c, (g, w) in enumerate(zip(got, want)):
      ref.assert_close(g, w, dtype=jnp.float32, name=f"clip={clip} step {c}")
  clipped, plain = (_np_adamw(params, grads, _optim(grad_clip=c, lr=0.01, weight_decay=0.1), 10)
                    for c in (1.0, 0.0))
  assert ref.rel_err(clipped[1]["kernel"], plain[1]["kernel"]) > 0.1   # the check can tell


# ------------------------------------------------------------------ model keys (unit)

def _batch(rng, b=4):
  text = rng.integers(1, VOCAB, size=(b, 16)).astype(np.int32)
  text[:, 10:] = 0
  return {"image": jnp.asarray(rng.uniform(-1, 1, size=(b, 32, 32, 3)), jnp.float32),
          "text": jnp.asarray(text)}


@pytest.fixture(scope="module")
def towers(data_dir):
  """The tiny config (image pool 'gap'), its objective, a fixed batch and params: random,
  LayerNorm scales near 1 (no init to compile)."""
  cfg = tiny_config(data_dir, **{"model.image.pool_type": "gap"})
  obj = objectives.make(cfg, vocab_size=VOCAB)
  g = np.random.default_rng(1234)   # fixed numbers, not a fresh draw per run
  batch = _batch(g)
  shapes = jax.eval_shape(obj.init, jax.random.PRNGKey(0), batch)
  params = jax.tree_util.tree_map_with_path(
      lambda k, s: jnp.asarray((optimizer.param_path(k).endswith("scale")) + 0.05 * g.normal(
          size=s.shape), jnp.float32), shapes)
  return cfg, obj, batch, params


def _forward(obj, params, batch):
  def f(p):
    zimg, ztxt, out = obj.model.apply({"params": p}, batch["image"], batch["text"], train=True)
    return zimg, ztxt, out, obj.loss_of(zimg, ztxt, out)
  return jax.jit(f)(params)


@pytest.mark.parametrize("loss,temperature,bias", [
    ("siglip", None, None), ("clip", None, None), ("clip", 50.0, None), ("siglip", 4.0, 2.5)])
def test_temperature_and_bias_init_defaults(data_dir, loss, temperature, bias):
  """t = log(temperature_init) (the initial scale exp(t)), b = bias_init; None: SigLIP 10 and
  -10, CLIP 1/0.07 and no b. out['scale'] = exp(t), out['bias'] = b."""
  cfg = tiny_config(data_dir, loss=loss, **{"model.temperature_init": temperature,
                                            "model.bias_init": bias})
  model = objectives.make(cfg, vocab_size=VOCAB).model
  params = model.init(jax.random.PRNGKey(0), None, None)["params"]   # t and b only
  scale = temperature or (1 / 0.07 if loss == "clip" else 10.0)
  ref.assert_close(params["t"], math.log(scale), dtype=jnp.float32, name="t")
  _, _, out = model.apply({"params": params}, None, None)
  ref.assert_close(out["scale"], scale, dtype=jnp.float32, name="scale")
  if loss == "clip":
    assert "b" not in params and "bias" not in out
  else:
    want = -10.0 if bias is None else bias
    np.testing.assert_array_equal(params["b"], np.float32(want))
    np.testing.assert_array_equal(out["bias"], np.float32(want))


def test_remat_reaches_every_encoder_block(towers):
  """model.remat=True: the train gradient is traced with a jax.checkpoint per encoder block
  (image and text: 2), remat=False with none; the values are the same (run B below, and
  tests/test_models.py::test_vit_remat_same_values_and_grads)."""
  cfg, obj, batch, params = towers
  key = jax.random.PRNGKey(0)
  counts = {}
  for remat in (False, True):
    c = cfg.copy_and_resolve_references()
    c.model.remat = remat
    o = objectives.make(c, vocab_size=VOCAB)
    jaxpr = jax.make_jaxpr(o.grad_fn)(params, None, batch, key).jaxpr
    counts[remat] = _count_checkpoints(jaxpr)
  assert counts == {False: 0, True: 2}, counts


def _count_checkpoints(jaxpr) -> int:
  """The remat (jax.checkpoint) equations in a jaxpr and the jaxprs nested in it."""
  n = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in ("checkpoint", "remat", "remat2"):
      n += 1
      continue
    n += sum(_count_checkpoints(sub) for sub in jax.extend.core.jaxprs_in_params(eqn.params))
  return n


def test_bfloat16_computes_in_bf16_keeps_f32_params_and_loss(towers):
  """model.dtype=bfloat16: params stay float32 (param_dtype), every encoder's output is
  bfloat16, the embeddings float32; the first-step loss within 2e-2 relative of float32's
  (a whole network in bf16: assert_close's 1e-2 is for single ops)."""
  cfg, obj, batch, params = towers
  c = cfg.copy_and_resolve_references()
  c.model.dtype = "bfloat16"
  bf = objectives.make(c, vocab_size=VOCAB)
  shapes = jax.eval_shape(bf.init, jax.random.PRNGKey(0), batch)
  assert {x.dtype for x in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.float32)}
  seen = []

  def catch(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if isinstance(context.module, (Encoder, Dense)) and context.method_name == "__call__":
      # an MLP's first Dense hands its f32 accumulator to the f32 activation
      first_mlp = isinstance(context.module.parent, MlpBlock) and context.module.name == "Dense_0"
      seen.append((context.module.name, jnp.result_type(out), first_mlp))
    return out

  with nn.intercept_methods(catch):
    zimg, ztxt, _ = jax.eval_shape(
        lambda p: bf.model.apply({"params": p}, batch["image"], batch["text"]), params)
  encoders = [d for name, d, _ in seen if name == "encoder"]
  assert len(encoders) == 2 and len(seen) >= 6, seen
  assert {d for _, d, first in seen if not first} == {jnp.dtype(jnp.bfloat16)}, seen
  assert {d for _, d, first in seen if first} == {jnp.dtype(jnp.float32)}, seen
  assert zimg.dtype == ztxt.dtype == jnp.float32
  *_, loss32 = _forward(obj, params, batch)
  *_, loss16 = _forward(bf, params, batch)
  assert loss16.dtype == jnp.float32
  assert abs(float(loss16) - float(loss32)) <= 2e-2 * abs(float(loss32)), (loss16, loss32)


# ------------------------------------------------------------------ through loop.train

STEPS = 6
# Run A: evaluations at 0 (at_init), 2, 4 and the final 6; label retrieval; checkpoints at
# 2, 4, 6 of which keep=2 stay; a non-default t and b. Run B: the same training with GradCache
# (accum_steps=2), remat and a grain worker process; keep=1, pair retrieval, no evaluations
# before the final one. Both with image pool 'gap' (the smallest program to compile).
RUN_A = {"evaluate.every": 2, "evaluate.at_init": True, "evaluate.retrieval_match": "label",
         "checkpoint.every": 2, "checkpoint.keep": 2, "model.temperature_init": 20.0,
         "model.bias_init": -5.0}
RUN_B = {**RUN_A, "evaluate.every": 0, "evaluate.at_init": False,
         "evaluate.retrieval_match": "pair", "checkpoint.keep": 1, "accum_steps": 2,
         "model.remat": True, "data.num_workers": 1}


def _config(data_dir, keys):
  return tiny_config(data_dir, total_steps=STEPS, **{"evaluate.probes": False,
                                                     "model.image.pool_type": "gap", **keys})


@pytest.fixture(scope="module")
def runs(data_dir, tmp_path_factory):
  """name -> (built run, workdir, results, initial params) of runs A and B (the run's shared
  compilation cache, tests/conftest.py: B loads A's init and evaluation programs)."""
  from mmjax.train import loop
  out = {}
  for name, keys_ in (("A", RUN_A), ("B", RUN_B)):
    built = loop.build(_config(data_dir, keys_))
    first, init = built.init_state, {}

    def init_state(first=first, init=init):   # the params the run starts from (host copy)
      state = first()
      init["params"] = jax.device_get(state.params)
      return state
    built.init_state = init_state
    workdir = str(tmp_path_factory.mktemp(f"run_{name}"))
    out[name] = (built, workdir, loop.run(built, workdir), init["params"])
  return out


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(r) for r in f if r.strip()]


def _embed(built, params):
  """The eval split's (image, text) embeddings, in the evaluator's fixed padded batches."""
  embed_image, embed_text = (jax.jit(f) for f in built.objective.towers())
  a, b = built.evaluator.arrays, built.config.evaluate.batch_size

  def batched(fn, x):
    out = []
    for i in range(0, len(x), b):
      chunk = x[i:i + b]
      pad = np.repeat(chunk[:1], b - len(chunk), 0)
      out.append(np.asarray(fn({"params": params}, np.concatenate([chunk, pad])))[:len(chunk)])
    return np.concatenate(out)
  return batched(embed_image, a["image"]), batched(embed_text, a["text"])


def _recall(built, params, match):
  """retrieval_recall called directly: ids the class labels ('label') or one per distinct
  caption ('pair': text i goes with image i, identical captions are one text)."""
  img, txt = _embed(built, params)
  a = built.evaluator.arrays
  ids = a["label"] if match == "label" else np.unique(a["text"], axis=0, return_inverse=True)[1]
  return {f"retrieval_{k}": v for k, v in retrieval_recall(img, txt, img_ids=ids,
                                                           txt_ids=ids).items()}


def _retrieval(row):
  return {k: v for k, v in row.items() if k.startswith("retrieval_")}


def test_evaluate_every_and_at_init_evaluate_those_params(runs):
  """evaluate.every=2, at_init: evaluation rows at steps 0, 2, 4 and 6 (the final one), none
  elsewhere; step 0's is the initial params' (also init_* in results.json), step 4's those
  of the step-4 checkpoint, step 6's the final ones'."""
  built, workdir, results, init = runs["A"]
  evals = {r["step"]: r for r in _rows(workdir) if "retrieval_i2t_r1" in r}
  assert sorted(evals) == [0, 2, 4, 6]
  assert "zeroshot_top1" in evals[2]
  for step, params in ((0, init), (4, checkpoint.load_params(workdir, 4)[0]),
                       (6, checkpoint.load_params(workdir, 6)[0])):
    assert _retrieval(evals[step]) == _recall(built, params, "label"), step
  assert {k[len("init_"):]: v for k, v in results.items()
          if k.startswith("init_retrieval_")} == _retrieval(evals[0])
  assert results["init_zeroshot_top1"] == evals[0]["zeroshot_top1"]
  b_rows = [r for r in _rows(runs["B"][1]) if "retrieval_i2t_r1" in r]
  assert [r["step"] for r in b_rows] == [STEPS]   # every=0, at_init=False: only the final one
  assert not any(k.startswith("init_") for k in runs["B"][2])


def test_retrieval_match_label_and_pair(runs):
  """retrieval_match='label' scores any same-class caption as correct: the run's numbers are
  retrieval_recall with label ids, at least pair matching's and above it somewhere;
  'pair' (run B) is retrieval_recall with one id per distinct caption."""
  built, workdir, results, _ = runs["A"]
  params = checkpoint.load_params(workdir, STEPS)[0]
  label, pair = _recall(built, params, "label"), _recall(built, params, "pair")
  assert _retrieval(results) == label
  assert all(label[k] >= pair[k] for k in label) and label != pair, (label, pair)
  built_b, workdir_b, results_b, _ = runs["B"]
  assert _retrieval(results_b) == _recall(built_b, checkpoint.load_params(workdir_b)[0], "pair")


def test_checkpoint_keep(runs):
  """Checkpoints every 2 of 6 steps: keep=2 leaves steps 4 and 6, keep=1 step 6."""
  for name, want in (("A", ["4", "6"]), ("B", ["6"])):
    got = sorted(os.listdir(os.path.join(runs[name][1], "checkpoints")), key=int)
    assert got == want, (name, got)


def test_accum_remat_and_workers_train_like_the_plain_run(runs):
  """accum_steps=2 (GradCache: exact gradients), remat and data.num_workers=1 (the same
  batches from a worker process): run B's per-step losses are run A's (rel 1e-5)."""
  loss = lambda w: {r["step"]: r["loss"] for r in _rows(w) if "loss" in r}
  a, b = loss(runs["A"][1]), loss(runs["B"][1])
  assert sorted(a) == list(range(1, STEPS + 1))
  assert b == pytest.approx(a, rel=1e-5)
  assert a[STEPS] != a[1]   # it trained


def test_loop_logs_the_schedule_and_the_initial_scale_and_bias(runs):
  """The logged lr of step s is the closed-form warmup-cosine lr at s - 1 (the optimizer's
  count); step 1's scale and bias are temperature_init=20 and bias_init=-5."""
  built, workdir, _, _ = runs["A"]
  o = built.config.optim
  rows = {r["step"]: r for r in _rows(workdir) if "loss" in r}
  for s, r in rows.items():
    ref.assert_close(r["lr"], _lr(s - 1, o.lr, o.warmup_steps, STEPS, o.end_lr_fraction),
                     dtype=jnp.float32, name=f"lr at step {s}")
  ref.assert_close(rows[1]["scale"], 20.0, dtype=jnp.float32, name="scale")
  assert rows[1]["bias"] == -5.0


def test_data_flip_mirrors_some_training_images(data_dir):
  """data.flip=True in loop.build: the first batch is the unflipped one with some images
  mirrored left-right (the same crops and captions), not all of them."""
  from mmjax.train import loop
  plain, flipped = (next(loop.build(_config(data_dir, {"data.flip": f})).data_iter)
                    for f in (False, True))
  np.testing.assert_array_equal(flipped["text"], plain["text"])
  mirrored = [bool(np.array_equal(f, p[:, ::-1])) for f, p in zip(flipped["image"],
                                                                  plain["image"])]
  same = [bool(np.array_equal(f, p)) for f, p in zip(flipped["image"], plain["image"])]
  assert all(m != s for m, s in zip(mirrored, same)), (mirrored, same)
  assert 0 < sum(mirrored) < len(mirrored), mirrored


# ------------------------------------------------------------ keys -> what the run builds

def _shapes(built):
  from mmjax.train.optimizer import param_path
  return {param_path(p): (x.shape, x.dtype)
          for p, x in jax.tree_util.tree_leaves_with_path(built.abstract.params)}


def test_model_data_and_eval_keys_reach_what_the_run_builds(data_dir):
  """loop.build (no compile) with every tower, MAE, MoCo, split and evaluation key off its
  default: each lands in the built model's parameter shapes and dtypes, its module fields
  (the model tests check what those fields do), the evaluator's arrays and prompts."""
  from mmjax.train import loop
  keys = {"model.image.variant": "mu/4", "model.image.pool_type": "map",
          "model.image.posemb": "learn", "model.image.patch_size": 8, "model.image.width": 24,
          "model.image.depth": 3, "model.image.mlp_dim": 40, "model.image.num_heads": 3,
          "model.image.patch_dropout": 0.25, "model.text.variant": "mu",
          "model.text.width": 20, "model.text.depth": 2, "model.text.mlp_dim": 36,
          "model.text.num_heads": 5, "model.text.pool_type": "first", "model.text.causal": True,
          "model.param_dtype": "bfloat16", "model.embed_dim": 12,
          "data.train_split": "test", "data.eval_split": "train",
          "evaluate.probe_train_examples": 50, "evaluate.templates": ("digit {}", "a {}"),
          "evaluate.probes": True}
  built = loop.build(tiny_config(data_dir, **keys))
  s = _shapes(built)
  assert s["img/embedding/kernel"] == ((8, 8, 3, 24), jnp.bfloat16)      # patch_size, width
  assert s["img/pos_embedding"][0] == (1, 16, 24)                      # posemb 'learn'
  assert sum(k.startswith("img/encoder/block") and k.endswith("ln1/scale") for k in s) == 3
  assert s["img/encoder/block2/mlp/Dense_0/kernel"][0] == (24, 40)
  assert s["img/encoder/block0/attn/query/kernel"][0] == (24, 3, 8)    # num_heads
  assert "img/map_head/probe" in s                                     # pool_type 'map'
  assert s["txt/encoder/block0/attn/query/kernel"][0] == (20, 5, 4)
  assert sum(k.startswith("txt/encoder/block") and k.endswith("ln1/scale") for k in s) == 2
  assert s["txt/encoder/block1/mlp/Dense_0/kernel"][0] == (20, 36)
  assert s["img_proj/kernel"] == ((24, 12), jnp.bfloat16) and s["txt_proj/kernel"][0] == (20, 12)
  img, txt = built.objective.model.image, built.objective.model.text
  assert (img["patch_dropout"], img["pool_type"], img["posemb"]) == (0.25, "map", "learn")
  assert (txt["pool_type"], txt["causal"]) == ("first", True)
  assert img["param_dtype"] == txt["param_dtype"] == jnp.bfloat16
  # The splits and the evaluation keys: eval on train (1,437 images), the probe's train set
  # the first 50 of the test split, the given prompts.
  ev = built.evaluator
  assert len(ev.arrays["image"]) == 1437 and len(ev.probe["image"]) == 50
  # Lazy: the evaluation decodes one batch of images at a time (test_data checks the values).
  assert isinstance(ev.arrays["image"], pipeline.EvalImages)
  assert ev.zeroshot[1] == ["digit {}", "a {}"]
  plain = loop.build(tiny_config(data_dir, **{"data.eval_split": "test"}))
  np.testing.assert_array_equal(ev.probe["image"], plain.evaluator.arrays["image"][:50])
  assert plain.evaluator.zeroshot[1] != ev.zeroshot[1]

  mae = loop.build(tiny_config(data_dir, loss="mae", **{
      "model.mae.mask_ratio": 0.5, "model.mae.decoder_width": 24, "model.mae.decoder_depth": 3,
      "model.mae.decoder_heads": 3, "model.mae.decoder_mlp_dim": 30,
      "model.mae.norm_pix_loss": False}))
  s, m = _shapes(mae), mae.objective.model
  assert s["decoder_embed/kernel"][0][1] == 24
  assert sum(k.startswith("decoder/block") and k.endswith("ln1/scale") for k in s) == 3
  assert s["decoder/block0/attn/query/kernel"][0] == (24, 3, 8)
  assert s["decoder/block0/mlp/Dense_0/kernel"][0] == (24, 30)
  assert (m.mask_ratio, m.norm_pix_loss) == (0.5, False)

  moco = loop.build(tiny_config(data_dir, loss="moco", **{
      "model.moco.hidden": 20, "model.moco.out_dim": 6, "model.moco.temperature": 0.5,
      "model.moco.momentum": 0.9}))
  s = _shapes(moco)
  assert s["projector/dense0/kernel"][0][1] == 20 and s["projector/dense2/kernel"][0] == (20, 6)
  assert s["predictor/dense0/kernel"][0] == (6, 20)
  assert (moco.objective.temperature, moco.objective.base_momentum) == (0.5, 0.9)
