"""The launcher with config.init_from.checkpoint: a converted Hugging Face CLIPModel evaluated
(total_steps=0), fine-tuned LiT-style (image tower frozen) on the digits and resumed; the run
starts from exactly the checkpoint's params. (Fine-tuning every param is the same loop with no
frozen labels.)"""

import json
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import convert
from mmjax.train import checkpoint, init_from, loop
from mmjax.train.state import TrainState
from tests.configs import tiny_config
from tests.open_clip_peer import save_tiny_hf_clip


@pytest.fixture(scope="module")
def hf_clip(tmp_path_factory):
  return save_tiny_hf_clip(tmp_path_factory.mktemp("hf_clip"))


def cfg(data_dir, hf_clip, **kw):
  return tiny_config(data_dir, **{"loss": "clip", "init_from.checkpoint": f"hf:{hf_clip}",
                                  "batch_size": 8, "total_steps": 4, "checkpoint.every": 2,
                                  "optim.warmup_steps": 1,
                                  "evaluate.at_init": True, "data.image_size": 24,
                                  "data.text_len": 12, **kw})   # the checkpoint's: 32, 16


def losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def test_evaluates_fine_tunes_lit_style_and_resumes(data_dir, hf_clip, tmp_path, capsys):
  """total_steps=0 evaluates the converted params (the Evaluator's numbers on them); a LiT
  fine-tune (image tower frozen) starts from them (its step-0 evaluation is that one), keeps
  the image tower bitwise, trains the rest, and resumes after an interruption with the
  uninterrupted run's losses."""
  zero = loop.train(cfg(data_dir, hf_clip, total_steps=0), str(tmp_path / "z"))
  out = capsys.readouterr().out
  assert ("config.data.image_size=32, text_len=16 from config.init_from.checkpoint (the config "
          "said 24, 12)") in out
  assert zero["steps"] == 0 and "zeroshot_top1" in zero
  start = convert.from_hf(hf_clip).params
  built = loop.build(cfg(data_dir, hf_clip, total_steps=0))
  want = built.evaluator({"params": jax.device_put(start)})
  assert {k: zero[k] for k in want} == want
  with open(tmp_path / "z" / "config.json") as f:
    saved = json.load(f)
  assert (saved["data"]["image_size"], saved["data"]["text_len"]) == (32, 16)

  lit = dict(frozen=("img/.*",))
  full = loop.train(cfg(data_dir, hf_clip, **lit), str(tmp_path / "a"))
  assert full["init_zeroshot_top1"] == zero["zeroshot_top1"]
  params, step = checkpoint.load_params(str(tmp_path / "a"))
  assert step == 4
  jax.tree.map(np.testing.assert_array_equal, params["img"], start["img"])
  rest = {k: v for k, v in params.items() if k != "img"}
  moved = jax.tree.map(lambda a, b: bool(np.any(a != b)), rest,
                       {k: start[k] for k in rest})
  assert all(jax.tree.leaves(moved)), moved

  class Stop(Exception):
    pass

  def stop_at_3(step, metrics):   # after step 2's checkpoint
    if step == 3:
      raise Stop

  with pytest.raises(Stop):
    loop.train(cfg(data_dir, hf_clip, **lit), str(tmp_path / "b"), callbacks=[stop_at_3])
  resumed = loop.train(cfg(data_dir, hf_clip, **lit), str(tmp_path / "b"))
  assert resumed["resumed_from_step"] == 2
  assert losses(tmp_path / "b") == losses(tmp_path / "a")


def test_checkpoint_errors_name_the_field(data_dir, hf_clip, tmp_path):
  with pytest.raises(ValueError, match=r"config.loss='siglip', but config.init_from.checkpoint="
                                       r".* is a 'clip' model"):
    loop.train(cfg(data_dir, hf_clip, loss="siglip"), str(tmp_path / "x"))
  with pytest.raises(ValueError, match="config.init_from.checkpoint and config.init_from.workdir"):
    loop.train(cfg(data_dir, hf_clip, **{"init_from.workdir": str(tmp_path)}), str(tmp_path / "y"))
  with pytest.raises(ValueError, match=r"config.init_from.checkpoint='hf:/nowhere': path="):
    loop.train(cfg(data_dir, "/nowhere"), str(tmp_path / "z"))
  with pytest.raises(ValueError, match=r"config.data.tokenizer: .*nonsense"):
    loop.train(cfg(data_dir, hf_clip, **{"data.tokenizer": "nonsense"}), str(tmp_path / "w"))
  with pytest.raises(ValueError, match="total_steps must be a non-negative int"):
    loop.train(cfg(data_dir, hf_clip, total_steps=-1), str(tmp_path / "v"))


def test_from_checkpoint_takes_the_checkpoints_batch_norm_statistics_too(rng):
  """init_from.from_checkpoint on a state with BatchNorm statistics: params and running
  mean / var are the checkpoint's (cast to the run's float32), not the init's zeros / ones;
  a checkpoint without statistics is refused."""
  init = {"params": {"img": {"norm": {"scale": jnp.ones(3), "bias": jnp.zeros(3)}}},
          "batch_stats": {"img": {"norm": {"mean": jnp.zeros(3), "var": jnp.ones(3)}}}}
  state = TrainState(step=jnp.zeros((), jnp.int32), params=init["params"], opt_state=(),
                     rng=jax.random.PRNGKey(0), batch_stats=init["batch_stats"])
  start = jax.tree.map(lambda a: rng.uniform(0.5, 2.0, size=a.shape), init)   # float64
  shardings = types.SimpleNamespace(params=None, batch_stats=None)
  got = init_from.from_checkpoint(state, start, shardings, "test:ckpt")
  for key in ("params", "batch_stats"):
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(getattr(got, key)),
                            jax.tree.leaves(start[key])):
      assert g.dtype == jnp.float32, jax.tree_util.keystr(path)
      np.testing.assert_array_equal(g, np.float32(w), err_msg=f"{key}{jax.tree_util.keystr(path)}")
  with pytest.raises(ValueError, match="keeps BatchNorm statistics and the checkpoint has none"):
    init_from.from_checkpoint(state, {"params": start["params"]}, shardings, "test:ckpt")
