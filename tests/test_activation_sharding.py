"""Activation sharding constraints (mmjax.nn.partitioning) on 8 simulated devices: the FSDP
step on a data=2 x fsdp=4 mesh equals the single-device one, and its activations are
batch-sharded; without rules constrain() changes nothing. A batch each batch axis divides but
their product does not (12 on 2 x 4) is split over 'data' only, with the same numbers; the
trainer refuses such a config.batch_size."""

import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from mmjax.models import vit
from mmjax.nn import partitioning
from mmjax.nn.partitioning import constrain, logical_rules, logical_spec
from mmjax import objectives
from mmjax.train import sharding
from mmjax.train import state as state_lib
from tests.configs import tiny_config

B, IMAGE, TEXT_LEN, VOCAB = 8, 32, 16, 512


def _mesh():
  return jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)


def _setup(rng, scan: bool):
  """(objective, params on one device, batch) of the tiny two-tower; mu/8 on 32 px: 16 tokens."""
  cfg = tiny_config("/unused", **{"model.scan": scan})
  obj = objectives.make(cfg, vocab_size=VOCAB)
  batch = {"image": jnp.asarray(rng.normal(size=(B, IMAGE, IMAGE, 3)), jnp.float32),
           "text": jnp.asarray(rng.integers(1, VOCAB, (B, TEXT_LEN)), jnp.int32)}
  # Some padding, so the text tower's key mask and EOS pooling take part.
  batch["text"] = batch["text"].at[:, 12:].set(0)
  return obj, jax.jit(obj.init)(jax.random.PRNGKey(0), batch), batch


def _fsdp_shardings(tree, mesh):
  cfg = ml_collections.ConfigDict(dict(fsdp_min_size=256, rules=()))
  return sharding.state_shardings(tree, mesh, cfg)


def _assert_trees_close(got, want, rtol=1e-5):
  """Leafwise, with an absolute floor from the tree's largest entry: some gradients are zero
  up to rounding (a key bias shifts every score of a row alike)."""
  atol = rtol * max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(want))
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=rtol, atol=atol,
                               err_msg=jax.tree_util.keystr(path))


def test_logical_spec_maps_names_through_the_rules():
  mesh = _mesh()
  assert logical_spec((8, 5, 32), ("batch", "seq", "embed"), mesh) == P(("data", "fsdp"),
                                                                        None, None)
  # The mesh axes that divide the dim, in order: a batch of 2 over 'data' only, 1 replicated.
  assert logical_spec((2, 5), ("batch", "embed"), mesh) == P("data", None)
  assert logical_spec((1, 5), ("batch", "embed"), mesh) == P(None, None)
  rules = (("batch", "data"), ("mlp", "fsdp"), ("embed", "fsdp"))
  # A mesh axis serves one dim: 'embed' finds 'fsdp' taken by 'mlp'.
  assert logical_spec((4, 8, 12), ("batch", "mlp", "embed"), mesh, rules) == P("data", "fsdp",
                                                                               None)
  one = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                      devices=jax.devices()[:1])
  assert logical_spec((8, 5), ("batch", "embed"), one) == P("data", None)   # no 'fsdp' there
  with pytest.raises(ValueError, match="axes"):
    logical_spec((8, 5), ("batch",), mesh)
  with pytest.raises(ValueError, match="axes: unknown logical name 'btach'"):
    logical_spec((8, 5), ("btach", "embed"), mesh)
  with pytest.raises(ValueError, match="rules"):
    with logical_rules(mesh, rules=(("batch",),)):
      pass


def test_constrain_is_a_no_op_without_rules(rng):
  x = jnp.asarray(rng.normal(size=(B, 4, 6)), jnp.float32)
  assert constrain(x, "batch", "seq", "embed") is x
  model = vit.Model("mu/8")
  image = jnp.zeros((B, IMAGE, IMAGE, 3), jnp.float32)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), image)

  def constraints(mesh):   # a fresh function each time: jit (and make_jaxpr) cache the trace
    with logical_rules(mesh):
      return str(jax.make_jaxpr(lambda p: model.apply(p, image))(params)).count(
          "sharding_constraint")

  assert constraints(None) == 0
  assert partitioning.active() is None
  assert constraints(_mesh()) > 0
  assert partitioning.active() is None   # the context was left


@pytest.mark.parametrize("scan", [False, True])
def test_fsdp_grads_equal_one_device_and_activations_are_batch_sharded(rng, scan):
  obj, params, batch = _setup(rng, scan)
  mesh, key = _mesh(), jax.random.PRNGKey(1)

  def grads(p, b, mesh=None):
    with logical_rules(mesh):
      (loss, _), g = obj.grad_fn(p, None, b, key)
    return loss, g

  want_loss, want = jax.jit(grads)(params, batch)
  param_sh = _fsdp_shardings({"params": params}, mesh)["params"]
  assert param_sh["img"]["map_head"]["mlp"]["Dense_0"]["kernel"].spec != P()   # FSDP is on
  sharded = jax.jit(lambda p, b: grads(p, b, mesh),
                    in_shardings=(param_sh, sharding.batch_sharding(mesh)))
  lowered = sharded.lower(params, batch)
  compiled = lowered.compile()
  got_loss, got = compiled(params, batch)
  np.testing.assert_allclose(float(got_loss), float(want_loss), rtol=1e-5)
  _assert_trees_close(got, want)

  # The constraints as lowered: residual streams [b, n, d] and q/k/v [b, n, h, hd] split over
  # both batch axes, the blocks' ones inside the scan body too.
  txt = lowered.as_text()
  kinds = re.findall(r"sdy.sharding_constraint %\S+ <@mesh, \[([^\]]*)\]> : tensor<([0-9x]+)x",
                     txt)
  stream = {s for s, t in kinds if t in (f"{B}x16x32", f"{B}x{TEXT_LEN}x32")}
  assert stream == {'{"data", "fsdp"}, {}, {}'}, kinds
  assert ('{"data", "fsdp"}, {}, {}, {}', f"{B}x16x2x16") in kinds
  # The blocks' MLP hidden [b, 16, mlp_dim]: only in the blocks, so inside the scan's body.
  assert ('{"data", "fsdp"}, {}, {}', f"{B}x16x128") in kinds
  assert ("stablehlo.while" in txt) == scan
  # Compiled: the per-device residual stream is one example's; no device holds the batch's.
  hlo = compiled.as_text()
  assert "f32[1,16,32]" in hlo and "f32[8,16,32]" not in hlo


def test_train_step_with_mesh_equals_one_device(rng):
  """make_train_step(mesh=...) (what the trainer jits) against the step without constraints on
  one device: the same loss, gradient norm and updated params."""
  obj, _, batch = _setup(rng, scan=True)
  tx = optax.sgd(0.1)   # params linear in the gradients (Adam's first step is their sign)
  state = jax.jit(lambda r: state_lib.init_state(obj, tx, r, batch))(jax.random.PRNGKey(0))
  schedule = optax.constant_schedule(0.1)
  mesh = _mesh()
  want_state, want = jax.jit(state_lib.make_train_step(obj, tx, schedule=schedule))(state, batch)
  state_sh = _fsdp_shardings(state, mesh)
  step = jax.jit(state_lib.make_train_step(obj, tx, schedule=schedule, mesh=mesh),
                 in_shardings=(state_sh, sharding.batch_sharding(mesh)),
                 out_shardings=(state_sh, None))
  lowered = step.lower(state, batch)
  assert "sharding_constraint" in lowered.as_text()
  got_state, got = lowered.compile()(state, batch)
  for k in ("loss", "grad_norm"):
    np.testing.assert_allclose(float(got[k]), float(want[k]), rtol=1e-5)
  _assert_trees_close(got_state.params, want_state.params)


# ------------------------------------------------------------ batches the axes divide one by one

@pytest.mark.parametrize("mesh_shape,batch,want", [
    ((2, 4), 16, ("data", "fsdp")),
    ((2, 4), 12, "data"),    # 2 and 4 each divide 12, their product 8 does not
    ((2, 4), 6, "data"),     # 2 divides, 4 does not
    ((2, 4), 10, "data"),
    ((2, 4), 3, None),
    ((4, 2), 12, "data"),
    ((4, 2), 2, None),       # a prefix of the rule's axes only: not 'fsdp' without 'data'
    ((8, 1), 12, None),
])
def test_logical_spec_uses_the_axes_whose_product_divides(mesh_shape, batch, want):
  """'batch' takes ('data', 'fsdp') while the product of the axes taken so far divides it:
  every axis dividing the batch on its own is not enough (12 on 2 x 4 would need 8)."""
  mesh = jax.make_mesh(mesh_shape, ("data", "fsdp"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  spec = logical_spec((batch, 5, 32), ("batch", "seq", "embed"), mesh)
  assert spec == P(want, None, None)
  x = jnp.zeros((batch, 5, 32))   # a spec jax accepts for the shape
  jax.jit(lambda x: jax.lax.with_sharding_constraint(
      x, jax.sharding.NamedSharding(mesh, spec)))(x).block_until_ready()


def test_train_step_batch_12_on_2x4_equals_one_device(rng):
  """make_train_step(mesh=...) on a global batch of 12 over data=2 x fsdp=4 (2 and 4 divide 12,
  8 does not), scanned towers of 12 blocks, FSDP params: the same loss, gradient norm and
  updated params as one device without constraints; the activations split over 'data' only
  (6 examples per device pair), not replicated and not over both axes."""
  b = 12
  cfg = tiny_config("/unused", **{"model.scan": True, "model.image.depth": 12,
                                  "model.text.depth": 12})
  obj = objectives.make(cfg, vocab_size=VOCAB)
  batch = {"image": jnp.asarray(rng.normal(size=(b, IMAGE, IMAGE, 3)), jnp.float32),
           "text": jnp.asarray(rng.integers(1, VOCAB, (b, TEXT_LEN)), jnp.int32)}
  batch["text"] = batch["text"].at[:, 12:].set(0)
  tx = optax.sgd(0.1)
  state = jax.jit(lambda r: state_lib.init_state(obj, tx, r, batch))(jax.random.PRNGKey(0))
  assert state.params["img"]["encoder"]["blocks"]["ln1"]["scale"].shape == (12, 32)
  schedule = optax.constant_schedule(0.1)
  mesh = _mesh()
  want_state, want = jax.jit(state_lib.make_train_step(obj, tx, schedule=schedule))(state, batch)
  state_sh = _fsdp_shardings(state, mesh)
  batch_sh = jax.sharding.NamedSharding(mesh, P("data"))   # batch_sharding(mesh) needs 8 | b
  step = jax.jit(state_lib.make_train_step(obj, tx, schedule=schedule, mesh=mesh),
                 in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None))
  lowered = step.lower(state, batch)
  kinds = re.findall(r"sdy.sharding_constraint %\S+ <@mesh, \[([^\]]*)\]> : tensor<([0-9x]+)x",
                     lowered.as_text())
  stream = {s for s, t in kinds if t in (f"{b}x16x32", f"{b}x{TEXT_LEN}x32")}
  assert stream == {'{"data"}, {}, {}'}, kinds
  # q/k/v [b, n, h, hd] and the blocks' MLP hidden [b, n, mlp_dim] (inside the scan body) too.
  assert ('{"data"}, {}, {}, {}', f"{b}x16x2x16") in kinds
  assert ('{"data"}, {}, {}', f"{b}x16x128") in kinds
  got_state, got = lowered.compile()(state, batch)
  for k in ("loss", "grad_norm"):
    np.testing.assert_allclose(float(got[k]), float(want[k]), rtol=1e-5)
  _assert_trees_close(got_state.params, want_state.params)


def test_trainer_refuses_a_batch_the_batch_axes_do_not_divide_together(data_dir):
  """loop.build with batch_size 12 on data=2 x fsdp=4: a ValueError naming the batch size and
  the 8 devices (each axis alone divides 12), before any data is read."""
  from mmjax.train import loop
  cfg = tiny_config(data_dir, batch_size=12, num_devices=8)
  cfg.mesh = ml_collections.ConfigDict(dict(data=2, fsdp=4))
  with pytest.raises(ValueError, match=r"config.batch_size=12 must be divisible by the 8 "
                                       r"devices of the batch axes"):
    loop.build(cfg)
