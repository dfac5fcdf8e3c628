"""Data-parallel + FSDP training on 8 simulated devices equals single-device training."""

import json
import os

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from mmjax.train import sharding
from tests.configs import tiny_config


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r["loss"] for r in map(json.loads, f) if "loss" in r]


def test_fsdp_spec_picks_largest_divisible_dim():
  assert sharding.fsdp_spec((64, 256), 4, 1) == P(None, "fsdp")
  assert sharding.fsdp_spec((256, 6), 4, 1) == P("fsdp", None)
  assert sharding.fsdp_spec((7, 9), 4, 1) == P()
  assert sharding.fsdp_spec((64, 256), 4, 10 ** 6) == P()
  assert sharding.fsdp_spec((64, 256), 1, 1) == P()


def test_mesh_errors_name_the_field():
  c = tiny_config("/unused")
  c.num_devices = 8
  c.mesh.fsdp = 3
  with pytest.raises(ValueError, match="config.mesh"):
    sharding.make_mesh(c)


# The ring with dense blocks is the siglip_digits_fsdp.py config; the loss tests cover every
# impl x blocks combination, so the trainer's runs take the sharded wrapper's two kinds: the
# gather of dense blocks here, the bidirectional ring of tiled blocks (with GradCache) in
# tests/test_resume.py's fsdp_gradcache case.
@pytest.mark.parametrize("loss,impl,kind", [("clip", "gather", "dense")])
def test_fsdp_training_matches_one_device(data_dir, tmp_path, loss, impl, kind):
  from mmjax.train import loop
  steps = dict(total_steps=6, **{"checkpoint.every": 3})
  ref = loop.train(tiny_config(data_dir, loss=loss, **steps), str(tmp_path / "one"))
  cfg = tiny_config(data_dir, loss=loss, loss_impl=impl, loss_blocks=kind, num_devices=8, **steps)
  cfg.mesh = ml_collections.ConfigDict(dict(data=2, fsdp=4))
  cfg.sharding.fsdp_min_size = 256
  got = loop.train(cfg, str(tmp_path / "eight"))
  assert got["devices"] == 8
  np.testing.assert_allclose(_losses(tmp_path / "eight"), _losses(tmp_path / "one"),
                             rtol=2e-4, atol=2e-5)
  np.testing.assert_allclose(got["zeroshot_top1"], ref["zeroshot_top1"], atol=0.02)


def test_state_shardings_shard_large_arrays_over_fsdp():
  mesh = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  tree = {"params": {"big": jax.ShapeDtypeStruct((64, 32), np.float32),
                     "norm": jax.ShapeDtypeStruct((32,), np.float32),
                     "keep": jax.ShapeDtypeStruct((64, 32), np.float32)},
          "opt_state": {"mu": {"big": jax.ShapeDtypeStruct((64, 32), np.float32)}}}
  cfg = ml_collections.ConfigDict(dict(fsdp_min_size=512, rules=((r"/keep$", "replicate"),)))
  sh = sharding.state_shardings(tree, mesh, cfg)
  assert sh["params"]["big"].spec == P("fsdp", None)
  assert sh["opt_state"]["mu"]["big"].spec == P("fsdp", None)
  assert sh["params"]["norm"].spec == P()
  assert sh["params"]["keep"].spec == P()
