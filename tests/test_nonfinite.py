"""Non-finite steps: a finite loss whose gradient is not (the train step's guard, against a
float64 reference of the same steps), and config.nan_policy through the loop: the skip count
and the streak across a resume, checkpoints written again after a fallback to an older one,
each against the uninterrupted run."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from mmjax.models.resnet import BN_MOMENTUM
from tests.configs import tiny_config


# ------------------------------------------------------------------ the train step

class _NormObjective:
  """Least squares by the residual's norm, loss = ||x w - y||: its gradient x^T r / ||r|| is
  0/0 = NaN at a zero residual, where the loss is a finite 0. batch_stats['mean'] is a
  running mean of x, moved and returned as 'batch_stats' (as a BatchNorm tower moves its
  statistics), and the EMA follows w (as MoCo's momentum encoder)."""
  batch_keys = ("x", "y")
  frozen = None

  def init_variables(self, rng, batch):
    d = batch["x"].shape[1]
    return {"params": {"w": jnp.zeros(d)}, "batch_stats": {"mean": jnp.zeros(d)}}

  def grad_fn(self, params, ema, batch, rng, batch_stats=None):
    m = BN_MOMENTUM
    moved = {"mean": (1 - m) * batch_stats["mean"] + m * batch["x"].mean(0)}

    def loss(p):
      r = batch["x"] @ p["w"] - batch["y"]
      return jnp.sqrt(jnp.sum(r * r)), {"batch_stats": moved}
    return jax.value_and_grad(loss, has_aux=True)(params)

  def ema_init(self, params):
    return {"w": params["w"]}

  def ema_update(self, ema, params, step):
    return {"w": 0.5 * ema["w"] + 0.5 * params["w"]}


def test_finite_loss_with_a_non_finite_gradient_changes_nothing_but_the_step(rng):
  """Steps bad, good, bad, good (bad: a zero residual, loss 0 and a NaN gradient): each
  state equals a float64 walk of the same steps in which a bad step changes nothing (not w,
  not the running mean, not the EMA, not the momentum, not the optimizer's count, so the
  schedule's factor), and metrics['finite'] says which were bad."""
  from mmjax.train import state as state_lib
  n, d, lr, decay = 6, 3, 0.1, 0.5
  tx = optax.chain(optax.trace(decay=decay), optax.scale_by_schedule(lambda c: -lr * (1.0 + c)))
  objective = _NormObjective()
  x0 = rng.normal(size=(n, d)).astype(np.float32)
  state = state_lib.init_state(objective, tx, jax.random.PRNGKey(0), {"x": x0, "y": x0[:, 0]})
  step = jax.jit(state_lib.make_train_step(objective, tx, schedule=lambda s: lr * (1.0 + s)))

  def good():
    x = rng.normal(size=(n, d)).astype(np.float32)
    return {"x": x, "y": rng.normal(size=n).astype(np.float32)}
  batches = [  # the first step starts at w = 0: y = 0 is a zero residual for any x
      ({"x": rng.normal(size=(n, d)).astype(np.float32), "y": np.zeros(n, np.float32)}, False),
      (good(), True),
      ({"x": np.zeros((n, d), np.float32), "y": np.zeros(n, np.float32)}, False),
      (good(), True)]
  w, mean, ema, trace, count = np.zeros(d), np.zeros(d), np.zeros(d), np.zeros(d), 0
  m = BN_MOMENTUM
  for i, (batch, finite) in enumerate(batches):
    state, metrics = step(state, batch)
    x, y = (np.asarray(batch[k], np.float64) for k in ("x", "y"))
    r = x @ w - y
    assert bool(metrics["finite"]) == finite, i
    # The lr the optimizer applies (its count's), not the step count's.
    np.testing.assert_allclose(float(metrics["lr"]), lr * (1.0 + count), rtol=1e-6, err_msg=i)
    assert np.isfinite(float(metrics["loss"]))     # finite either way: only the gradient is not
    np.testing.assert_allclose(float(metrics["loss"]), np.linalg.norm(r), rtol=1e-5, atol=1e-6)
    if finite:
      g = x.T @ r / np.linalg.norm(r)
      np.testing.assert_allclose(float(metrics["grad_norm"]), np.linalg.norm(g), rtol=1e-5)
      trace = g + decay * trace
      w = w - lr * (1.0 + count) * trace
      count += 1
      mean = (1 - m) * mean + m * x.mean(0)
      ema = 0.5 * ema + 0.5 * w
    else:
      assert not np.isfinite(float(metrics["grad_norm"])), i
    assert int(state.step) == i + 1
    tr, sched = state.opt_state
    for got, want, name in ((state.params["w"], w, "w"), (state.batch_stats["mean"], mean,
                            "running mean"), (state.ema["w"], ema, "ema"),
                            (tr.trace["w"], trace, "momentum")):
      np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6,
                                 err_msg=f"{name} after step {i + 1}")
    assert int(sched.count) == count, i


# ------------------------------------------------------------------ nan_policy in the loop

class _Poisoned:
  """The run's objective, with a NaN gradient (a finite loss) at the chosen steps, told apart
  by their keys (a step's key is fold_in(state.rng, state.step): mmjax.train.state)."""

  def __init__(self, inner, keys):
    self.inner, self.keys = inner, keys

  def __getattr__(self, name):
    return getattr(self.inner, name)

  def grad_fn(self, params, ema, batch, rng, batch_stats=None):
    (value, aux), grads = self.inner.grad_fn(params, ema, batch, rng, batch_stats)
    bad = jnp.any(jnp.all(jnp.asarray(rng)[None] == self.keys, axis=-1))
    return (value, aux), jax.tree.map(lambda g: jnp.where(bad, jnp.nan, g), grads)


STEPS, EVERY = 6, 2


def _config(data_dir, **overrides):
  return tiny_config(data_dir, total_steps=STEPS, **{
      "nan_policy": "skip", "checkpoint.every": EVERY, "checkpoint.keep": STEPS // EVERY, "evaluate.probes": False,
      "data.label_key": "", "evaluate.retrieval_match": "pair", **overrides})


def _train(config, workdir, bad_steps):
  """loop.build + loop.run with NaN gradients at bad_steps (1-based); (results or the
  NonFiniteError, the per-step `finite` flags seen by a callback)."""
  from mmjax.train import loop
  built = loop.build(config)
  base = jax.random.split(built.rng)[1]    # init_state's state.rng
  keys = jnp.stack([jax.random.fold_in(base, s - 1) for s in bad_steps])
  built.objective = _Poisoned(built.objective, keys)
  flags = {}
  try:
    out = loop.run(built, workdir, callbacks=[lambda s, m: flags.update({s: bool(m["finite"])})])
  except loop.NonFiniteError as e:
    out = e
  return out, flags


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r for r in map(json.loads, f) if "loss" in r}


def _steps(workdir):
  return sorted(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit())


def _saved(workdir, step):
  with ocp.CheckpointManager(os.path.join(workdir, "checkpoints")) as m:
    r = m.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                data=ocp.args.JsonRestore()))
  return r["state"], r["data"]


def _assert_same_checkpoint(dir_a, dir_b, step):
  (a, a_data), (b, b_data) = _saved(dir_a, step), _saved(dir_b, step)
  assert a_data == b_data, step
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(y), np.asarray(x),
                                  err_msg=f"step {step}: {jax.tree_util.keystr(path)}")


def _cut_back(workdir, step):
  """The workdir as a run killed just after its checkpoint at `step` leaves it."""
  for s in _steps(workdir):
    if s > step:
      shutil.rmtree(os.path.join(workdir, "checkpoints", str(s)))
  os.remove(os.path.join(workdir, "results.json"))


BAD = (2, 5)   # one before the step-2 checkpoint, one after; never two in a row


@pytest.fixture(scope="module")
def skipping_run(data_dir, tmp_path_factory):
  """An uninterrupted 6-step run skipping steps 2 and 5 (nan_skip_limit=2: not in a row)."""
  workdir = str(tmp_path_factory.mktemp("skipping") / "ref")
  results, flags = _train(_config(data_dir, nan_skip_limit=2), workdir, BAD)
  return workdir, results, flags


def test_skip_count_carries_across_a_resume(skipping_run, data_dir, tmp_path, capsys):
  """The uninterrupted run skips exactly the NaN-gradient steps (each warned, naming the
  gradient norm) and trains on; resumed from its step-2 checkpoint, the run has its per-step
  losses and skip counts, its results' skipped_steps and its final checkpoint, bit for bit."""
  ref, results, flags = skipping_run
  assert flags == {s: s not in BAD for s in range(1, STEPS + 1)}
  assert results["skipped_steps"] == len(BAD)
  want = {s: sum(b <= s for b in BAD) for s in range(1, STEPS + 1)}   # counted by hand
  assert {s: r["skipped_steps"] for s, r in _rows(ref).items()} == want
  workdir = str(tmp_path / "resumed")
  shutil.copytree(ref, workdir)
  _cut_back(workdir, EVERY)
  capsys.readouterr()
  got, flags = _train(_config(data_dir, nan_skip_limit=2), workdir, BAD)
  out = capsys.readouterr()
  assert got["resumed_from_step"] == EVERY and got["skipped_steps"] == len(BAD)
  assert sorted(flags) == list(range(EVERY + 1, STEPS + 1))
  assert "grad_norm is nan at step 5 (loss " in out.out + out.err
  assert "update skipped (2 so far)" in out.out + out.err
  rows, ref_rows = _rows(workdir), _rows(ref)
  assert sorted(rows) == list(range(1, STEPS + 1))
  assert {s: r["skipped_steps"] for s, r in rows.items()} == want
  assert [rows[s]["loss"] for s in rows] == [ref_rows[s]["loss"] for s in rows]
  # The logged lr is the one AdamW applied: the schedule at the optimizer's count, which
  # the skipped steps before step s held back (AdamW, as make_optimizer builds it).
  from mmjax.train import optimizer
  _, schedule = optimizer.make_optimizer(_config(data_dir).optim, STEPS)
  for s, r in rows.items():
    np.testing.assert_allclose(r["lr"], float(schedule(s - 1 - sum(b < s for b in BAD))),
                               rtol=1e-6, err_msg=s)
  _assert_same_checkpoint(ref, workdir, STEPS)


def test_checkpoints_are_written_again_after_falling_back_to_an_older_one(
    skipping_run, data_dir, tmp_path, capsys):
  """A run killed after its step-4 checkpoint, whose files were then damaged: the resume
  falls back to step 2 and writes the checkpoints at 4 and 6 again, equal to the
  uninterrupted run's (state, data position, skip count)."""
  ref = skipping_run[0]
  workdir = str(tmp_path / "w")
  shutil.copytree(ref, workdir)
  _cut_back(workdir, 4)
  d = os.path.join(workdir, "checkpoints", "4", "state", "ocdbt.process_0", "d")
  biggest = max((os.path.join(d, n) for n in os.listdir(d)), key=os.path.getsize)
  with open(biggest, "r+b") as f:
    f.truncate(100)
  capsys.readouterr()
  results, _ = _train(_config(data_dir, nan_skip_limit=2), workdir, BAD)
  assert "trying step 2" in capsys.readouterr().out
  assert results["resumed_from_step"] == 2 and results["skipped_steps"] == len(BAD)
  assert _steps(workdir) == [2, 4, 6]
  assert os.path.isdir(os.path.join(workdir, "checkpoints.broken", "4"))
  for step in (4, 6):
    _assert_same_checkpoint(ref, workdir, step)


def test_a_streak_of_non_finite_steps_counts_across_a_resume(data_dir, tmp_path):
  """NaN gradients at steps 3, 4, 5 and nan_skip_limit=3: the run stops at step 5, its
  newest checkpoint (step 4) taken mid-streak. Resumed there, it stops at step 5 again, as
  the uninterrupted run did: the streak is part of the saved state, like the skip count."""
  from mmjax.train import loop
  workdir = str(tmp_path / "w")
  err, flags = _train(_config(data_dir, nan_skip_limit=3), workdir, (3, 4, 5))
  assert isinstance(err, loop.NonFiniteError), err
  assert "grad_norm is nan at step 5" in str(err) and "3 non-finite steps in a row" in str(err)
  assert flags == {1: True, 2: True, 3: False, 4: False, 5: False}
  assert _steps(workdir) == [1, 2, 4] and not os.path.exists(os.path.join(workdir, "results.json"))
  assert _saved(workdir, 4)[1]["skipped_steps"] == 2
  again, flags = _train(_config(data_dir, nan_skip_limit=3), workdir, (3, 4, 5))
  assert isinstance(again, loop.NonFiniteError), again
  assert "grad_norm is nan at step 5" in str(again) and "3 non-finite steps in a row" in str(again)
  assert flags == {5: False}


def test_nan_policy_stop_stops_at_a_non_finite_gradient(data_dir, tmp_path):
  """nan_policy='stop': the first NaN-gradient step (loss finite) ends the run, naming the
  gradient norm; the checkpoints before it stay, none after, no results."""
  from mmjax.train import loop
  workdir = str(tmp_path / "w")
  err, flags = _train(_config(data_dir, nan_policy="stop"), workdir, (3,))
  assert isinstance(err, loop.NonFiniteError), err
  assert str(err).startswith("grad_norm is nan at step 3 (loss ") and "nan_policy='stop'" in str(err)
  assert _steps(workdir) == [1, 2] and not os.path.exists(os.path.join(workdir, "results.json"))
