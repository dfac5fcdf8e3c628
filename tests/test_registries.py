"""The registries a new piece joins by name, against explicit values and float64 NumPy: a
contrastive loss registered only in mmjax.losses.registry trains the two-tower objective; the
registry's shard_map wrapping of the sharded impls over a tuple of batch axes; the image tower
a variant selects when several kinds claim it."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import objectives
from mmjax.losses import registry as loss_registry, siglip_loss
from mmjax.models import image as image_lib
from tests.configs import tiny_config
from tests.reference import REFS, assert_close, inputs, make_mesh, term_sizes


def test_a_contrastive_loss_registered_in_the_losses_trains_two_towers(monkeypatch, rng):
  """register_contrastive alone makes a value of config.loss: objectives.get falls back to the
  two-tower objective, whose model starts at the loss's temperature and bias inits and whose
  loss is the registered function's (half SigLIP here, against float64)."""
  monkeypatch.setattr(loss_registry, "CONTRASTIVE", dict(loss_registry.CONTRASTIVE))
  name = "test_half_siglip"
  assert name not in objectives.names()
  loss_registry.register_contrastive(
      name, lambda zi, zt, scale, bias, **kw: 0.5 * siglip_loss(zi, zt, scale, bias, **kw),
      temperature_init=5.0, bias_init=-3.0, impls=("global",))
  assert name in objectives.names()
  assert objectives.get(name) is objectives.get("siglip")
  config = tiny_config("/nonexistent", loss=name)
  obj = objectives.make(config, vocab_size=64)
  params = obj.model.init(jax.random.PRNGKey(0), None, None)["params"]   # t and b only
  assert_close([params["t"], params["b"]], [math.log(5.0), -3.0], dtype=jnp.float32,
               name=["t", "b"])
  x, y, s, b = inputs(6, 8, rng)
  got = obj.loss_of(x, y, {"scale": s, "bias": b})
  want = 0.5 * REFS["siglip"](*(np.asarray(a, np.float64) for a in (x, y, s, b)))[0]
  assert_close(got, want, dtype=jnp.float32, name="half siglip")
  config.loss_impl = "ring"   # not among the impls it registered
  with pytest.raises(ValueError, match=r"config.loss_impl must be one of \('global',\)"):
    objectives.get(name).check_config(config)


@pytest.mark.parametrize("name,impl", [("clip", "gather"), ("siglip", "ring")])
def test_the_registrys_sharded_losses_over_two_batch_axes_match_float64(name, impl, rng):
  """loss_registry.contrastive(impl=gather | ring) over a ('data', 'fsdp') 2 x 4 mesh: the
  global batch's loss and its gradients (embeddings, scale, bias) are the float64 dense
  loss's (shard_map's batch specs and the loss's axis_name cover both axes; scale and bias
  are replicated)."""
  mesh = make_mesh((2, 4), ("data", "fsdp"))
  fn = loss_registry.contrastive(name, impl, mesh=mesh, axes=("data", "fsdp"))
  x, y, s, b = inputs(8 * 5, 8, rng)
  value, grads = jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2, 3)))(x, y, s, b)
  x64, y64, s64, b64 = (np.asarray(a, np.float64) for a in (x, y, s, b))
  want_value, want_grads = REFS[name](x64, y64, s64, b64)
  grads = grads if name == "siglip" else grads[:3]   # CLIP takes no bias
  assert_close([value, *grads], [want_value, *want_grads], dtype=jnp.float32,
               name=["loss", "d_img", "d_txt", "d_scale", "d_bias"][:1 + len(grads)],
               scale=(0.0, *term_sizes(name, x64, y64, s64, b64)))


def _tower(name, claims):
  return image_lib.ImageTower(name, claims=claims, config=lambda variant, **f: dict(width=4),
                              module=lambda **f: nn.Dense(4))


def test_the_latest_image_tower_claiming_a_variant_wins(monkeypatch):
  """kind(): the default ('vit') only where no registered kind claims the variant; among
  claimants, the latest registration; fields naming their kind ('tower') select it."""
  monkeypatch.setattr(image_lib, "TOWERS", dict(image_lib.TOWERS))
  assert image_lib.kind({}, "RN50").name == "resnet"
  assert image_lib.kind({}, "B/16").name == "vit"
  assert image_lib.kind({"layers": (1, 1, 1, 1)}).name == "resnet"   # claimed by its fields
  mine = image_lib.register(_tower("test_rn50", lambda variant, fields: variant == "RN50"))
  image_lib.register(_tower("test_nothing", lambda variant, fields: False))
  assert image_lib.kind({}, "RN50") is mine
  assert image_lib.config(variant="RN50") == {"width": 4, "tower": "test_rn50"}
  assert image_lib.kind({}, "RN101").name == "resnet"   # claimed by resnet alone
  assert image_lib.kind({}, "B/16").name == "vit"
  assert image_lib.kind({"tower": "resnet"}, "RN50").name == "resnet"
  with pytest.raises(ValueError, match=r"tower='nope' is not a registered image tower"):
    image_lib.kind({"tower": "nope"})
