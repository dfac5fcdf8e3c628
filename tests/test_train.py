"""The main job end to end on a tiny config: train, eval, results, exact resume, clear errors."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from tests.configs import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(r) for r in f]
  return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_config_fields_are_independent():
  """Each tower's overrides, and each defaults() call, own their values (ml_collections
  placeholders are shared references: one object in two fields is one value)."""
  from mmjax.train.config import defaults
  from experiments.configs import siglip_digits
  c = siglip_digits.get_config()
  assert (c.model.image.depth, c.model.text.depth) == (4, 2)
  c.model.image.width = 96
  assert c.model.text.width is None
  assert defaults().model.image.depth is None and defaults().model.image.width is None


def test_train_writes_results_metrics_plot(data_dir, tmp_path):
  from mmjax.train import loop
  results = loop.train(tiny_config(data_dir, **{"evaluate.probes": True}), str(tmp_path))
  for key in ("zeroshot_top1", "retrieval_i2t_r1", "retrieval_t2i_r1", "linear_probe_top1",
              "linear_probe_10shot_top1", "knn_top1", "steps", "examples_per_sec"):
    assert key in results
  assert results["steps"] == 12 and results["examples_per_sec"] > 0
  assert 0.0 <= results["zeroshot_top1"] <= 1.0
  with open(tmp_path / "results.json") as f:
    assert json.load(f)["steps"] == 12
  losses = _losses(tmp_path)
  assert sorted(losses) == list(range(1, 13))
  assert (tmp_path / "curves.png").stat().st_size > 1000
  assert any(p.name.startswith("events") for p in (tmp_path / "tensorboard").iterdir())


_KILL_SCRIPT = textwrap.dedent("""
  import os, signal, sys
  sys.path.insert(0, {root!r})
  from tests.configs import tiny_config
  from mmjax.train import loop
  def kill(step, metrics):
    if step == {kill_at}:
      os.kill(os.getpid(), signal.SIGKILL)
  loop.train(tiny_config({data_dir!r}, loss={loss!r}), {workdir!r}, callbacks=[kill])
""")


# One loss: resumption is the loop's (state, rng, data position), the same for every
# contrastive loss; the clip case doubled this test's ~100 s for no other code path.
@pytest.mark.parametrize("loss", ["siglip"])
def test_sigkill_then_resume_gives_identical_losses(data_dir, tmp_path, loss):
  from mmjax.train import loop
  ref_dir, dir_ = str(tmp_path / "ref"), str(tmp_path / "killed")
  loop.train(tiny_config(data_dir, loss=loss), ref_dir)
  script = _KILL_SCRIPT.format(root=ROOT, kill_at=10, data_dir=data_dir, loss=loss, workdir=dir_)
  proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
  assert proc.returncode == -9, proc.stderr[-2000:]
  assert 9 <= max(_losses(dir_)) <= 10   # it really died mid-run
  results = loop.train(tiny_config(data_dir, loss=loss), dir_)
  # Checkpoints every 4 steps, saved asynchronously: the kill at step 10 may
  # land before step 8's save is finalised, and then step 4 is the latest.
  assert results["resumed_from_step"] in (4, 8)
  ref, got = _losses(ref_dir), _losses(dir_)
  assert sorted(got) == list(range(1, 13))
  for step in range(1, 13):
    assert got[step] == pytest.approx(ref[step], rel=1e-6, abs=1e-7), step


def _launch(data_dir, workdir, *overrides, env=None):
  cmd = [sys.executable, "-m", "experiments.train",
         "--config", "experiments/configs/siglip_digits.py", "--workdir", workdir,
         f"--config.data.data_dir={data_dir}", "--config.total_steps=3",
         "--config.optim.warmup_steps=1", *overrides]
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                        env={**os.environ, **(env or {})})


@pytest.mark.parametrize("overrides,env,field", [
    (["--config.model.image.variant=Q/4"], None, "config.model.image.variant"),
    (["--config.data.text_key=caption"], None, "data.text_key"),
    (["--config.batch_size=12"], {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"},
     "config.batch_size"),
    (["--config.nonexistent_key=3"], None, "nonexistent_key"),
    (["--config.model.image.depthh=3"], None, "depthh"),
    (["--config.model.image.pool_type=max"], None, "config.model.image.pool_type"),
    (["--config.loss_blocks=sparse"], None, "config.loss_blocks"),
    (["--config.loss_impl=gather", "--config.loss_blocks=tiled"], None, "config.loss_blocks"),
])
def test_bad_config_fails_fast_with_one_line(data_dir, tmp_path, overrides, env, field):
  proc = _launch(data_dir, str(tmp_path), *overrides, env=env)
  assert proc.returncode != 0
  last = proc.stderr.strip().splitlines()[-1]
  assert field in last, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr
  assert not os.path.exists(tmp_path / "checkpoints")


def test_tiled_loss_blocks_train_like_dense(data_dir, tmp_path):
  """--config.loss_blocks=tiled in the trainer: the same per-step losses as the dense
  blocks (pallas blocks, the same custom VJP, are checked against dense in the loss tests)."""
  from mmjax.train import loop
  steps = dict(total_steps=4, **{"checkpoint.every": 4, "evaluate.probes": False})
  losses = {}
  for kind in ("dense", "tiled"):
    loop.train(tiny_config(data_dir, loss_blocks=kind, **steps), str(tmp_path / kind))
    losses[kind] = _losses(tmp_path / kind)
  assert len(losses["dense"]) == 4
  assert losses["tiled"] == pytest.approx(losses["dense"], rel=1e-5)


def test_losses_nn_and_models_do_not_import_pallas():
  """Pallas loads where a Pallas impl is chosen, not on import (nor with the trainer)."""
  code = ("import sys, mmjax.losses, mmjax.nn.attention, mmjax.nn.layers, mmjax.models.two_tower, "
          "mmjax.models.mae, mmjax.models.moco, mmjax.train.loop; "
          "bad = [m for m in sys.modules if m.startswith(('jax.experimental.pallas', "
          "'mmjax.pallas'))]; assert not bad, bad")
  subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
