"""Scanned encoder blocks (Encoder scan=True) and remat policies: the same params (stacked), values
and gradients as the unrolled towers; stack / unstack round trips; converters taking either
tree; MAE's decoder; init_from between the forms; a train run with config.model.scan."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mmjax import convert
from mmjax.convert import common, openclip
from mmjax.models import mae, text, two_tower, vit
from mmjax.models.scan import is_scanned, match_blocks, stack_blocks, unstack_blocks
from mmjax.nn.layers import REMAT_POLICIES, Encoder, remat_policy
from mmjax.train import checkpoint, config as config_lib, init_from, loop
from tests.configs import tiny_config

TINY = dict(width=32, depth=2, mlp_dim=64, num_heads=2)
POLICIES = [None, "dots_saveable"]


def _shapes(tree):
  return jax.tree.map(lambda x: (tuple(x.shape), jnp.dtype(x.dtype).name), tree)


def _checkpoints(jaxpr) -> list:
  """The policy of every remat (jax.checkpoint) equation in a jaxpr and those nested in it."""
  out = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in ("checkpoint", "remat", "remat2"):
      out.append(eqn.params["policy"])
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      out += _checkpoints(sub)
  return out


def _loss(model, inputs):
  def f(p):
    pooled, out = model.apply({"params": p}, *inputs)
    return jnp.sum(pooled ** 2) + jnp.mean(jnp.sin(out["encoded"])), (pooled, out["encoded"])
  return f


def _check_same(unrolled, scanned, params, *inputs) -> list:
  """scanned on stack_blocks(params) == unrolled (no remat) on params: the init's tree, the
  outputs and the gradients (of a loss of the pooled and encoded outputs), f32. Returns the policies of
  the remat equations in the scanned model's gradient."""
  stacked = stack_blocks(params)
  want = jax.eval_shape(scanned.init, jax.random.PRNGKey(0), *inputs)["params"]
  assert _shapes(stacked) == _shapes(want)
  grad = lambda m: jax.jit(jax.value_and_grad(_loss(m, inputs), has_aux=True))
  (l1, (p1, e1)), g1 = grad(unrolled)(params)
  (l2, (p2, e2)), g2 = grad(scanned)(stacked)
  np.testing.assert_allclose(l2, l1, rtol=1e-5)
  np.testing.assert_allclose(p2, p1, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(e2, e1, rtol=1e-5, atol=1e-6)
  got = unstack_blocks(g2)
  assert jax.tree.structure(got) == jax.tree.structure(g1)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, g1)
  jaxpr = jax.make_jaxpr(jax.grad(lambda p: _loss(scanned, inputs)(p)[0]))(stacked)
  return _checkpoints(jaxpr.jaxpr)


@pytest.mark.parametrize("policy", POLICIES)
def test_scanned_vit_matches_unrolled(policy, rng):
  image = jnp.asarray(rng.normal(size=(2, 16, 16, 3)), jnp.float32)
  kw = dict(**TINY, patch_size=(4, 4), pool_type="tok", posemb="learn", posemb_cls=True,
            ln_pre=True)
  unrolled, scanned = vit.Model(**kw), vit.Model(**kw, scan=True, remat_policy=policy)
  params = unrolled.init(jax.random.PRNGKey(0), image)["params"]
  assert "block1" in params["encoder"] and "blocks" not in params["encoder"]
  assert params["encoder"]["block0"]["attn"]["query"]["kernel"].shape == (32, 2, 16)
  # The whole stack is one scan: one remat (inside it) per tower, not one per block.
  want = [] if policy is None else [remat_policy(policy)]
  assert _check_same(unrolled, scanned, params, image) == want


@pytest.mark.parametrize("policy", [None, "nothing_saveable"])
def test_scanned_text_tower_matches_unrolled(policy, rng):
  """Causal, with a key-padding mask (pad_id 0) and 'eos' pooling: the broadcast arguments;
  remat=True with and without a policy."""
  tokens = np.asarray(rng.integers(1, 50, size=(3, 10)), np.int32)
  tokens[0, 6:] = 0
  tokens[1, 3:] = 0
  kw = dict(**TINY, vocab_size=50, max_len=12, causal=True, pool_type="eos")
  unrolled = text.Model(**kw)   # no remat: the reference
  scanned = text.Model(**kw, scan=True, remat=True, remat_policy=policy)
  params = unrolled.init(jax.random.PRNGKey(1), tokens)["params"]
  policies = _check_same(unrolled, scanned, params, jnp.asarray(tokens))
  # remat=True with no policy: jax's default (nothing saved), as the unscanned remat.
  assert policies == [None if policy is None else remat_policy(policy)]


def test_scanned_blocks_each_have_their_init_and_dropout_applies(rng):
  """Params blocks/... with a leading [depth] axis, each layer its own draw (split_rngs); in
  training dropout is on (a different output from evaluation's), the same for the same key."""
  x = jnp.asarray(rng.normal(size=(2, 5, 32)), jnp.float32)
  enc = Encoder(num_heads=2, mlp_dim=64, depth=2, scan=True, dropout=0.5)
  params = jax.jit(enc.init)(jax.random.PRNGKey(0), x)["params"]
  k = params["blocks"]["mlp"]["Dense_0"]["kernel"]
  assert k.shape == (2, 32, 64) and not np.allclose(k[0], k[1])
  apply = jax.jit(lambda key, train: enc.apply({"params": params}, x, train=train,
                                               rngs={"dropout": key}), static_argnums=1)
  y1, y2 = apply(jax.random.PRNGKey(3), True), apply(jax.random.PRNGKey(3), True)
  np.testing.assert_array_equal(y1, y2)
  assert not np.allclose(y1, apply(jax.random.PRNGKey(3), False))
  assert not np.allclose(y1, apply(jax.random.PRNGKey(4), True))


def test_bad_remat_policy_is_named():
  x = jnp.zeros((1, 4, 32))
  with pytest.raises(ValueError, match=r"remat_policy='dots' is not one of \('nothing_saveable'"):
    Encoder(num_heads=2, mlp_dim=64, remat_policy="dots").init(jax.random.PRNGKey(0), x)
  c = config_lib.defaults()
  c.model.remat_policy = "dots"
  with pytest.raises(ValueError, match=r"config.model.remat_policy must be None or one of"):
    config_lib.validate(c)
  for name in REMAT_POLICIES:
    c.model.remat_policy = name
    config_lib.validate(c)


# ---------------------------------------------------------------- stack / unstack

def _tiny_clip_config():
  """open_clip's CLIP layout (any size passes to_open_clip's checks) at a tiny size."""
  config = openclip.open_clip_config("ViT-B-32")
  config["image"].update(TINY, patch_size=(8, 8))
  config["text"].update(TINY, vocab_size=64, max_len=8)
  config["embed_dim"] = 16
  return config


def _init(config, image_size=16, shapes_only=False):
  model = two_tower.Model(**config)
  init = lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, image_size, image_size, 3)),
                            jnp.zeros((1, config["text"]["max_len"]), jnp.int32))["params"]
  return model, jax.eval_shape(init) if shapes_only else jax.jit(init)()


def _scan(config, scan=True):
  return {**config, "image": {**config["image"], "scan": scan},
          "text": {**config["text"], "scan": scan}}


def test_stack_unstack_round_trip_two_tower():
  """Exact both ways, idempotent, numpy stays numpy; the stacked tree is the scanned model's;
  an AdamW state stacks as its params do."""
  config = _tiny_clip_config()
  _, params = _init(config)
  _, scanned_init = _init(_scan(config), shapes_only=True)
  params = jax.tree.map(np.asarray, params)
  stacked = stack_blocks(params)
  assert _shapes(stacked) == _shapes(scanned_init)
  assert stacked["img"]["encoder"]["blocks"]["ln1"]["scale"].shape == (2, 32)
  assert is_scanned(stacked) and not is_scanned(params)
  assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(stacked))
  np.testing.assert_array_equal(stacked["txt"]["encoder"]["blocks"]["mlp"]["Dense_1"]["bias"][1],
                                params["txt"]["encoder"]["block1"]["mlp"]["Dense_1"]["bias"])
  back = unstack_blocks(stacked)
  assert jax.tree.structure(back) == jax.tree.structure(params)
  jax.tree.map(np.testing.assert_array_equal, back, params)
  jax.tree.map(np.testing.assert_array_equal, stack_blocks(stacked), stacked)   # idempotent
  jax.tree.map(np.testing.assert_array_equal, unstack_blocks(params), params)
  assert jax.tree.structure(match_blocks(params, scanned_init)) == jax.tree.structure(stacked)
  assert jax.tree.structure(match_blocks(stacked, params)) == jax.tree.structure(params)
  # Optimizer states: mu / nu are param-shaped trees inside optax's namedtuples.
  tx = optax.adamw(1e-3)
  opt = jax.tree.map(np.asarray, tx.init(params))
  assert _shapes(stack_blocks(opt)) == _shapes(jax.eval_shape(tx.init, scanned_init))
  jax.tree.map(np.testing.assert_array_equal, unstack_blocks(stack_blocks(opt)), opt)


def test_open_clip_export_of_scanned_equals_unrolled_and_import_stacks(rng):
  """to_open_clip of a scanned model's tree is the state dict of the unrolled one; that state
  dict read back (Converted.with_scan) gives a scanned model the unrolled model's features."""
  config = _tiny_clip_config()
  model, params = _init(config)
  sd = convert.to_open_clip(config, params)
  sd_scanned = convert.to_open_clip(_scan(config), stack_blocks(params))
  assert sorted(sd_scanned) == sorted(sd)
  for k in sd:
    np.testing.assert_array_equal(sd_scanned[k], sd[k], err_msg=k)
  assert "transformer.resblocks.1.attn.in_proj_weight" in sd
  back = common.apply_rules(openclip.rules(config), sd, config=config, image_size=16,
                            what="test")
  ckpt = common.Converted(config, back, None, "clip").with_scan(True)
  assert ckpt.config["image"]["scan"] and ckpt.config["text"]["scan"]
  jax.tree.map(np.testing.assert_array_equal, ckpt.params, stack_blocks(jax.tree.map(np.asarray,
                                                                                     params)))
  image = jnp.asarray(rng.normal(size=(2, 16, 16, 3)), jnp.float32)
  tokens = jnp.asarray(rng.integers(0, 64, size=(2, 8)), jnp.int32)
  want = model.apply({"params": params}, image, tokens)
  got = two_tower.Model(**ckpt.config).apply({"params": ckpt.params}, image, tokens)
  for g, w in zip(got[:2], want[:2]):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
  unrolled = ckpt.with_scan(False)
  jax.tree.map(np.testing.assert_array_equal, unrolled.params, back)


def test_mae_decoder_scans_with_the_encoder(rng):
  """MAE(image=dict(scan=True, ...)): its decoder is scanned too; the loss is the unrolled
  model's on the stacked params."""
  image = jnp.asarray(rng.normal(size=(2, 16, 16, 3)), jnp.float32)
  kw = dict(decoder_width=32, decoder_depth=2, decoder_heads=2, decoder_mlp_dim=64)
  unrolled = mae.Model(image=dict(variant="mu/4", depth=2), **kw)
  scanned = mae.Model(image=dict(variant="mu/4", depth=2, scan=True,
                                 remat_policy="nothing_saveable"), **kw)
  params = jax.eval_shape(unrolled.init, {"params": jax.random.PRNGKey(0),
                                           "mask": jax.random.PRNGKey(1)}, image)["params"]
  params = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape) * 0.1, x.dtype), params)
  stacked = stack_blocks(params)
  assert sorted(stacked["decoder"]) == ["blocks", "ln_final"]
  loss = lambda m, p: jax.jit(lambda p: m.apply({"params": p}, image,
                                                rngs={"mask": jax.random.PRNGKey(2)})[0])(p)
  np.testing.assert_allclose(loss(scanned, stacked), loss(unrolled, params), rtol=1e-5)


# ---------------------------------------------------------------- the trainer

def test_train_with_scan_then_init_a_per_layer_run_from_it(data_dir, tmp_path):
  """A scan=True run (remat_policy dots_saveable) trains and saves stacked params; a per-layer
  run initialised from its image tower (config.init_from.workdir) starts from them unstacked.
  (The other way, per-layer into scan=True: the next test; both go through match_blocks.)"""
  steps = {"total_steps": 2, "checkpoint.every": 2, "optim.warmup_steps": 1,
           "model.image.depth": 2, "model.text.depth": 2}
  a = loop.train(tiny_config(data_dir, **steps, **{"model.scan": True,
                                                   "model.remat_policy": "dots_saveable"}),
                 str(tmp_path / "a"))
  assert a["steps"] == 2 and np.isfinite(a["zeroshot_top1"])
  saved, _ = checkpoint.load_params(str(tmp_path / "a"))
  assert saved["img"]["encoder"]["blocks"]["ln1"]["scale"].shape == (2, 32)
  cfg = tiny_config(data_dir, **steps, **{"init_from.workdir": str(tmp_path / "a")})
  built = loop.build(cfg)
  state = init_from.from_run(built.init_state(), cfg.init_from, built.state_sharding,
                             built.objective)
  assert "block1" in state.params["img"]["encoder"]
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state.params["img"]),
               unstack_blocks(saved["img"]))


def test_init_from_converted_checkpoint_into_scanned_run(data_dir, tmp_path):
  """config.init_from.checkpoint (a per-layer Hugging Face CLIP) into a scan=True run: the
  run's params are the converted ones, stacked."""
  from tests.open_clip_peer import save_tiny_hf_clip
  hf = save_tiny_hf_clip(tmp_path / "hf")
  cfg = tiny_config(data_dir, **{"loss": "clip", "init_from.checkpoint": f"hf:{hf}",
                                 "total_steps": 0, "model.scan": True})
  built = loop.build(cfg)
  state = init_from.from_checkpoint(built.init_state(), built.start, built.state_sharding,
                                    cfg.init_from.checkpoint)
  want = stack_blocks(convert.from_hf(hf).params)
  assert is_scanned(state.params)
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state.params), want)


def test_dot_policies_save_the_bf16_paths_dots(monkeypatch):
  """On the bf16 path the dots are custom-VJP calls, which jax's dots_saveable does not see;
  they carry checkpoint names, so the policies still differ: nothing_saveable keeps fewest
  residuals, dots_with_no_batch_dims_saveable adds the projections' and MLP's results,
  dots_saveable also the attention einsums'."""
  from jax._src.ad_checkpoint import saved_residuals
  monkeypatch.setenv("MMJAX_BF16_DOTS", "1")
  x = jnp.ones((2, 8, 64), jnp.bfloat16)
  counts = {}
  for policy in ("nothing_saveable", "dots_with_no_batch_dims_saveable", "dots_saveable"):
    model = Encoder(num_heads=2, mlp_dim=128, depth=2, dtype=jnp.bfloat16, remat_policy=policy)
    params = model.init(jax.random.PRNGKey(0), x)
    counts[policy] = len(saved_residuals(
        lambda p: model.apply(p, x).astype(jnp.float32).sum(), params))
  assert (counts["nothing_saveable"] < counts["dots_with_no_batch_dims_saveable"]
          < counts["dots_saveable"]), counts
