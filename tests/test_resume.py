"""Exact resumption beyond the plain two-tower run: MoCo's momentum encoder, MAE's mask
rng, CatLIP's caption targets, CoCa's captioning and matching losses, a ResNet's BatchNorm
statistics, an FSDP-sharded state on 8 devices and GradCache accumulation.

Each case trains 6 steps once, checkpointing every 2 steps. A copy of that workdir
is cut back to the step-2 checkpoint (later checkpoints, results.json and the later
metrics rows removed, as an interruption there leaves it) and resumed from disk: its
steps 3-6 must have the uninterrupted run's losses, and its final checkpoint the same
state (params, optimizer state, MoCo's EMA, rng, data position).
"""

import json
import os
import shutil

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest


from tests.configs import tiny_config

STEPS, EVERY, RESUME_AT = 6, 2, 2

# The final evaluation cut to its cheapest: no probes, no zero-shot (no labels).
CHEAP_EVAL = {"evaluate.probes": False, "data.label_key": "",
              "evaluate.retrieval_match": "pair"}


def _fsdp(config):
  config.num_devices = 8
  config.mesh = ml_collections.ConfigDict(dict(data=2, fsdp=4))
  config.sharding.fsdp_min_size = 256   # the mu towers' kernels and moments get sharded
  return config


# FSDP and GradCache share a case (each start-up costs ~45 s): two micro-batches of 8 rows,
# each split over the 8 devices, with the bidirectional ring of tiled blocks on the 2 x 4 mesh;
# its per-step losses are also those of one device (test_sharded_train.py has the gather impl).
CASES = {
    "moco": lambda d: tiny_config(d, loss="moco"),
    "mae": lambda d: tiny_config(d, loss="mae"),
    "catlip": lambda d: tiny_config(d, loss="catlip"),
    # CoCa with the matching head: the hard negatives' rng and the decoder's dropout key.
    "coca": lambda d: tiny_config(d, loss="coca", **{
        "model.image.pool_type": "none", "coca.n_queries": 5, "coca.pool_heads": 2,
        "coca.itm_weight": 1.0, "coca.rerank_k": 3}),
    # A ResNet with BatchNorm: its running statistics are params moved outside the optimizer.
    "resnet_batchnorm": lambda d: tiny_config(d, loss="siglip", **{
        "model.image.variant": None, "model.image.layers": (1, 1, 1, 1),
        "model.image.width": 8, "model.image.num_heads": 2, "model.image.norm": "batch"}),
    "fsdp_gradcache": lambda d: _fsdp(tiny_config(d, loss="siglip", loss_impl="ring_bidir",
                                                  loss_blocks="tiled", accum_steps=2)),
    # Fine-tuning tools: the weight EMA (a state field, checkpointed) and layer-wise lr decay.
    "ema_layer_decay": lambda d: tiny_config(d, loss="siglip", ema_decay=0.9,
                                             **{"optim.layer_decay": 0.8}),
}
ONE_DEVICE = {"fsdp_gradcache": lambda d: tiny_config(d, loss="siglip")}


def _config(case, data_dir, cases=CASES):
  c = cases[case](data_dir)
  c.total_steps, c.checkpoint.every, c.checkpoint.keep = STEPS, EVERY, STEPS // EVERY
  for k, v in CHEAP_EVAL.items():
    node, (*path, last) = c, k.split(".")
    for p in path:
      node = node[p]
    node[last] = v
  return c


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(r) for r in f if r.strip()]


def _losses(workdir):
  return [(r["step"], r["loss"]) for r in _rows(workdir) if "loss" in r]


def _cut_back(workdir, step):
  """The workdir as a run interrupted just after its checkpoint at `step` leaves it."""
  ckpts = os.path.join(workdir, "checkpoints")
  for name in os.listdir(ckpts):
    if name.isdigit() and int(name) > step:
      shutil.rmtree(os.path.join(ckpts, name))
  os.remove(os.path.join(workdir, "results.json"))
  rows = [r for r in _rows(workdir) if r["step"] <= step]
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)


def _saved(workdir, step):
  """(state, data state) of the checkpoint at `step`, read without a target: the
  arrays come back on the devices and with the shardings they were saved with."""
  with ocp.CheckpointManager(os.path.join(workdir, "checkpoints")) as m:
    r = m.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                data=ocp.args.JsonRestore()))
  return r["state"], r["data"]


def _fsdp_sharded(tree):
  return sum("fsdp" in jax.tree.leaves(tuple(x.sharding.spec)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("case", sorted(CASES))
def test_resume_from_a_checkpoint_reproduces_the_uninterrupted_run(data_dir, tmp_path, case):
  """Steps 3-6 resumed from the step-2 checkpoint on disk: bitwise the uninterrupted
  run's losses and final state (for MoCo its EMA encoder, for MAE its params)."""
  from mmjax.train import loop
  ref_dir, dir_ = str(tmp_path / "ref"), str(tmp_path / "resumed")
  loop.train(_config(case, data_dir), ref_dir)
  shutil.copytree(ref_dir, dir_)
  _cut_back(dir_, RESUME_AT)
  results = loop.train(_config(case, data_dir), dir_)
  assert results["resumed_from_step"] == RESUME_AT and results["steps"] == STEPS

  ref, got = _losses(ref_dir), _losses(dir_)
  assert [s for s, _ in ref] == list(range(1, STEPS + 1))
  assert [s for s, _ in got] == list(range(1, STEPS + 1))   # each step once, in order
  # Same program, same inputs, restored bits: XLA on the CPU gives identical numbers.
  np.testing.assert_array_equal([v for _, v in got], [v for _, v in ref])

  want, want_data = _saved(ref_dir, STEPS)
  have, have_data = _saved(dir_, STEPS)
  assert have_data == want_data
  assert jax.tree.structure(have) == jax.tree.structure(want)
  if case == "moco":
    assert want["ema"], "MoCo's checkpoint holds the momentum encoder"
  if case == "ema_layer_decay":   # the weight EMA is saved, and evaluated at the end
    assert want["params_ema"]
    ema_keys = [k for k in results if k.startswith("ema_")]
    assert ema_keys and all(k[4:] in results for k in ema_keys), sorted(results)
  if case == "resnet_batchnorm":   # the running statistics moved, by the batches' alone,
    mean = np.asarray(want["batch_stats"]["img"]["stem_norm1"]["mean"])
    assert np.abs(mean).max() > 0    # beside the params, where the optimizer never sees them
    assert set(want["params"]["img"]["stem_norm1"]) == {"scale", "bias"}
  if case == "fsdp_gradcache":   # the resumed run's params and Adam moments were sharded
    assert _fsdp_sharded(have["params"]) > 0 and _fsdp_sharded(have["opt_state"]) > 0
  if case in ONE_DEVICE:   # and the sharded run trains like one device (float32 reassociation)
    loop.train(_config(case, data_dir, ONE_DEVICE), str(tmp_path / "one"))
    np.testing.assert_allclose([v for _, v in ref], [v for _, v in _losses(tmp_path / "one")],
                               rtol=2e-4, atol=2e-5)
  for (path, w), h in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(have)):
    np.testing.assert_array_equal(np.asarray(h), np.asarray(w), err_msg=jax.tree_util.keystr(path))


def test_a_resume_keeps_the_first_config_and_refuses_other_data(data_dir, tmp_path, capsys):
  """A resumed run with a changed config: config.json stays the config the run started with,
  the new one goes to config.resumed_at_<step>.json, and one line names the changed fields.
  A checkpoint trained on other data (its data position would be applied to other files) is
  refused with one line naming both."""
  from mmjax.train import loop
  workdir = str(tmp_path / "run")
  first = tiny_config(data_dir, total_steps=4, **{"checkpoint.every": 2})
  loop.train(first, workdir)
  with open(os.path.join(workdir, "config.json")) as f:
    started = json.load(f)
  assert started["total_steps"] == 4
  more = tiny_config(data_dir, total_steps=6, **{"checkpoint.every": 2, "optim.lr": 5e-4})
  loop.train(more, workdir)
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f) == started
  with open(os.path.join(workdir, "config.resumed_at_4.json")) as f:
    assert json.load(f)["total_steps"] == 6
  out = capsys.readouterr().out
  assert "resumed with a changed config (optim.lr: 0.001 -> 0.0005; total_steps: 4 -> 6)" in out
  built = loop.build(tiny_config(data_dir, total_steps=8, **{"checkpoint.every": 2}))
  built.data_id = "wds-0123456789ab"   # as other shard files of the same count would name it
  with pytest.raises(ValueError, match=r"step 6\) was trained on other data \(mmjax_digits\) "
                                       r"than config.data names now \(wds-0123456789ab\)"):
    loop.run(built, workdir)
