"""Encoder stacks past ten blocks, at tiny widths: where 'block10' < 'block2' as strings, a
reversed scan or an off-by-one in a layer index shows. Scanned (Encoder scan=True) against
unrolled towers, values and gradients, both ways between the trees; stack_blocks /
unstack_blocks / match_blocks checked layer by layer against the definition (layer i of the
stack is block{i}). The converters at this depth against the reference libraries:
tests/test_convert_depth.py."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mmjax.convert import common
from mmjax.models import text, two_tower, vit
from mmjax.models.scan import is_scanned, match_blocks, stack_blocks, unstack_blocks

DEPTH = 12           # the image tower's; the text tower's is DEPTH + 1 (the towers' differ)
BLOCKS = [f"block{i}" for i in range(DEPTH)]
TINY = dict(width=16, mlp_dim=24, num_heads=2)


def _loss(model, inputs):
  """A scalar of the pooled and the encoded outputs (every position's gradient matters)."""
  def f(p):
    pooled, out = model.apply({"params": p}, *inputs)
    return jnp.sum(pooled ** 2) + jnp.mean(jnp.sin(3 * out["encoded"])), (pooled, out["encoded"])
  return jax.jit(jax.value_and_grad(f, has_aux=True))


def _perturbed(params, rng, scale=0.2):
  """params with noise on every leaf: LayerNorms and biases start equal in every block, where a
  permutation of the blocks would not show."""
  return jax.tree.map(lambda x: np.asarray(x + scale * rng.standard_normal(x.shape), np.float32),
                      params)


def _random_params(model, rng, *inputs):
  """Random params of the model's shapes (traced, not compiled: a jitted init of 12 unrolled
  blocks takes seconds), every block different: LayerNorm scales 1 + N(0, 0.25^2), every other
  leaf N(0, 0.25^2) (unit-scale activations at width 16)."""
  def draw(path, s):
    x = 0.25 * rng.standard_normal(s.shape).astype(np.float32)
    return x + 1 if jax.tree_util.keystr(path).endswith("['scale']") else x
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), *inputs)["params"]
  return jax.tree_util.tree_map_with_path(draw, shapes)


def _assert_layers(stacked, per_layer, depth, rtol=0.0, atol=0.0):
  """Layer i of every stacked leaf is block{i}'s leaf (exactly by default); nothing else in
  either."""
  assert sorted(per_layer) == sorted(f"block{i}" for i in range(depth))
  for i in range(depth):
    want = per_layer[f"block{i}"]
    got = jax.tree.map(lambda x, i=i: x[i], stacked)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(g, w, rtol=rtol, atol=atol,
                                 err_msg=f"layer {i}{jax.tree_util.keystr(path)}")
  for leaf in jax.tree.leaves(stacked):
    assert leaf.shape[0] == depth


def _blocks(encoder):
  """An unscanned encoder's block{i} subtrees (without its final LayerNorm)."""
  return {k: v for k, v in encoder.items() if k != "ln_final"}


def _check_scan_both_ways(unrolled, scanned, rng, *inputs):
  """scanned(stack_blocks(p)) == unrolled(p) and unrolled(unstack_blocks(q)) == scanned(q), p
  and q random trees of each model's own shapes: values, and the gradients mapped to the other
  form."""
  per_layer = _random_params(unrolled, rng, *inputs)
  own = _random_params(scanned, rng, *inputs)
  f_unrolled, f_scanned = _loss(unrolled, inputs), _loss(scanned, inputs)
  for p_unrolled, p_scanned, what in ((per_layer, stack_blocks(per_layer), "stack_blocks"),
                                      (unstack_blocks(own), own, "unstack_blocks")):
    (l1, (pool1, enc1)), g1 = f_unrolled(p_unrolled)
    (l2, (pool2, enc2)), g2 = f_scanned(p_scanned)
    np.testing.assert_allclose(l2, l1, rtol=2e-5, err_msg=what)
    np.testing.assert_allclose(pool2, pool1, rtol=2e-5, atol=2e-5, err_msg=what)
    np.testing.assert_allclose(enc2, enc1, rtol=2e-5, atol=2e-5, err_msg=what)
    got = unstack_blocks(g2)
    assert jax.tree.structure(got) == jax.tree.structure(g1)
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(g1)):
      np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5,
                                 err_msg=f"{what} grad{jax.tree_util.keystr(path)}")
    _assert_layers(g2["encoder"]["blocks"], _blocks(g1["encoder"]), unrolled.depth,
                   rtol=1e-4, atol=1e-5)
  return per_layer


def test_scanned_vit_depth12_matches_unrolled(rng):
  """open_clip's ViT layout (class token, ln_pre, 'tok' pooling), 12 blocks."""
  image = jnp.asarray(rng.normal(size=(2, 8, 8, 3)), jnp.float32)
  kw = dict(TINY, depth=DEPTH, patch_size=(4, 4), pool_type="tok", posemb="learn",
            posemb_cls=True, ln_pre=True)
  params = _check_scan_both_ways(vit.Model(**kw), vit.Model(**kw, scan=True), rng, image)
  assert sorted(_blocks(params["encoder"])) == sorted(BLOCKS)


def test_scanned_text_tower_depth13_matches_unrolled(rng):
  """Causal with a key-padding mask and 'eos' pooling (the broadcast arguments of the scan), 13
  blocks, remat under the scan."""
  tokens = np.asarray(rng.integers(1, 40, size=(3, 7)), np.int32)
  tokens[0, 4:] = 0
  tokens[1, 2:] = 0
  kw = dict(TINY, depth=DEPTH + 1, vocab_size=40, max_len=8, causal=True, pool_type="eos")
  _check_scan_both_ways(text.Model(**kw), text.Model(**kw, scan=True, remat=True), rng,
                        jnp.asarray(tokens))


def _two_tower_config(scan=False):
  return dict(image=dict(TINY, depth=DEPTH, patch_size=(4, 4), pool_type="map", scan=scan),
              text=dict(TINY, depth=DEPTH + 1, vocab_size=40, max_len=8, scan=scan),
              embed_dim=8)


def _two_tower_shapes(scan=False):
  model = two_tower.Model(**_two_tower_config(scan))
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)),
                        jnp.zeros((1, 8), jnp.int32))["params"]


def test_stack_unstack_depth12_layer_by_layer(rng):
  """Both towers of a two-tower tree (12 and 13 blocks): layer i of each stacked leaf is
  block{i}'s, the stacked tree is the scanned model's, unstack_blocks gives back block0 ..
  block12 exactly; match_blocks both ways; an AdamW state (namedtuples) as its params."""
  shapes = _two_tower_shapes()
  params = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes)
  stacked = stack_blocks(params)
  scanned_shapes = _two_tower_shapes(scan=True)
  assert jax.tree.map(np.shape, stacked) == jax.tree.map(lambda s: s.shape, scanned_shapes)
  for tower, depth in (("img", DEPTH), ("txt", DEPTH + 1)):
    enc = params[tower]["encoder"]
    assert sorted(stacked[tower]["encoder"]) == ["blocks", "ln_final"]
    _assert_layers(stacked[tower]["encoder"]["blocks"], _blocks(enc), depth)
  back = unstack_blocks(stacked)
  assert jax.tree.structure(back) == jax.tree.structure(params)
  jax.tree.map(np.testing.assert_array_equal, back, params)
  assert is_scanned(stacked) and not is_scanned(params)
  # match_blocks: to the other form by a reference tree of that form (what init_from does).
  jax.tree.map(np.testing.assert_array_equal, match_blocks(params, scanned_shapes), stacked)
  jax.tree.map(np.testing.assert_array_equal, match_blocks(stacked, shapes), params)
  # A scanned tree whose layers carry their index: unstacked, block{i} holds i everywhere.
  marked = jax.tree.map(lambda s: np.broadcast_to(
      np.arange(s.shape[0], dtype=np.float32).reshape(-1, *[1] * (len(s.shape) - 1)),
      s.shape).copy(), scanned_shapes["txt"]["encoder"]["blocks"])
  per_layer = unstack_blocks({"encoder": {"blocks": marked}})["encoder"]
  assert sorted(per_layer) == sorted(f"block{i}" for i in range(DEPTH + 1))
  for name, block in per_layer.items():
    assert {float(np.unique(x)[0]) for x in jax.tree.leaves(block)} == {int(name[5:])}, name
  tx = optax.adamw(1e-3)
  opt = jax.tree.map(lambda x: np.asarray(x) + 1, tx.init(params))
  opt_stacked = stack_blocks(opt)
  _assert_layers(opt_stacked[0].mu["img"]["encoder"]["blocks"],
                 _blocks(opt[0].mu["img"]["encoder"]), DEPTH)
  jax.tree.map(np.testing.assert_array_equal, unstack_blocks(opt_stacked), opt)


def test_converted_with_scan_depth12_keeps_layer_order(rng):
  """Converted.with_scan (how a converted checkpoint goes into a scan=True model): the scanned
  two-tower model on its params computes what the per-layer one does on the original."""
  config = _two_tower_config()
  params = _perturbed(jax.tree.map(lambda s: np.zeros(s.shape, np.float32),
                                   _two_tower_shapes()), rng, scale=0.3)
  ckpt = common.Converted(config, params, None, None).with_scan(True)
  assert ckpt.config["image"]["scan"] and ckpt.config["text"]["scan"]
  for tower, depth in (("img", DEPTH), ("txt", DEPTH + 1)):
    _assert_layers(ckpt.params[tower]["encoder"]["blocks"],
                   _blocks(params[tower]["encoder"]), depth)
  image = jnp.asarray(rng.normal(size=(2, 8, 8, 3)), jnp.float32)
  tokens = jnp.asarray(rng.integers(0, 40, size=(2, 8)), jnp.int32)
  want = jax.jit(two_tower.Model(**config).apply)({"params": params}, image, tokens)
  got = jax.jit(two_tower.Model(**ckpt.config).apply)({"params": ckpt.params}, image, tokens)
  for g, w in zip(got[:2], want[:2]):
    np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-6)
  back = ckpt.with_scan(False)
  jax.tree.map(np.testing.assert_array_equal, back.params, params)


@pytest.mark.parametrize("bad", ["off_by_one", "gap"])
def test_block_names_must_be_0_to_depth_minus_1(bad):
  """A group whose block{i} names are not 0 .. n-1 is not stacked (not mistaken for a stack of
  fewer layers): block1 .. block12 (an off-by-one) or a gap."""
  ids = range(1, DEPTH + 1) if bad == "off_by_one" else [*range(5), *range(6, 12)]
  tree = {"encoder": {f"block{i}": {"w": np.full((2,), i, np.float32)} for i in ids}}
  out = stack_blocks(tree)
  assert "blocks" not in out["encoder"]
  jax.tree.map(np.testing.assert_array_equal, out, tree)
