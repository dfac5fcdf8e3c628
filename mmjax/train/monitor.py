"""Watching a run: examples per second, the non-finite-step guard (config.nan_policy) and the
one-line summary of an evaluation."""

from __future__ import annotations

import time

import jax
import numpy as np
import tqdm


class NonFiniteError(RuntimeError):
  """A step's loss or gradient norm was not finite (config.nan_policy)."""


class Speed:
  """Examples per second, the first step (compile) excluded; per log interval and overall."""

  def __init__(self, batch_size: int):
    self.batch_size, self.t_first, self.steps = batch_size, None, 0
    self.t_log, self.n_log = time.time(), 0

  def step(self, state) -> None:
    if self.t_first is None:
      jax.block_until_ready(state)
      self.t_first = self.t_log = time.time()
    else:
      self.steps += 1
    self.n_log += 1

  def interval(self) -> float:
    now = time.time()
    rate = self.n_log * self.batch_size / max(now - self.t_log, 1e-9)
    self.t_log, self.n_log = now, 0
    return rate

  def overall(self) -> float | None:
    if not self.steps:
      return None
    return self.steps * self.batch_size / (time.time() - self.t_first)


class Guard:
  """Acts on the train step's `finite` flag (config.nan_policy): 'stop' raises
  NonFiniteError at the first non-finite step, 'skip' counts it and raises after
  nan_skip_limit in a row. Each step's flag is read when the next step has been
  queued (push), so the host never waits on the step it just dispatched;
  `flush` reads the last one (before a checkpoint, a log line, an evaluation)."""

  def __init__(self, policy: str, limit: int, skipped: int = 0, in_a_row: int = 0):
    self.policy, self.limit, self.skipped, self.in_a_row = policy, limit, skipped, in_a_row
    self.pending = None

  def push(self, step: int, metrics: dict) -> None:
    previous, self.pending = self.pending, (step, metrics)
    if previous is not None:
      self._check(*previous)

  def flush(self) -> None:
    if self.pending is not None:
      self._check(*self.pending)
      self.pending = None

  def _check(self, step: int, metrics: dict) -> None:
    if bool(metrics["finite"]):
      self.in_a_row = 0
      return
    keys = ("loss", "lr", "grad_norm")
    m = {k: float(v) for k, v in jax.device_get(metrics).items() if k in keys}
    bad = "loss" if not np.isfinite(m["loss"]) else "grad_norm"
    others = ", ".join(f"{k} {m[k]:.4g}" for k in ("loss", "lr", "grad_norm") if k != bad)
    what = f"{bad} is {m[bad]} at step {step} ({others})"
    if self.policy == "stop":
      raise NonFiniteError(f"{what}; the run stops here (config.nan_policy='stop'), its newest "
                           "checkpoint is from before this step")
    self.skipped += 1
    self.in_a_row += 1
    tqdm.tqdm.write(f"mmjax: warning: {what}; update skipped ({self.skipped} so far)")
    if self.in_a_row >= self.limit:
      raise NonFiniteError(f"{what}: {self.in_a_row} non-finite steps in a row "
                           f"(config.nan_skip_limit={self.limit}); the run stops here")


KEY_METRICS = ("zeroshot_top1", "retrieval_i2t_r1", "retrieval_t2i_r1", "linear_probe_top1",
                "knn_top1", "transfer_top1")


def summary(results: dict) -> str:
  """The key evaluation numbers, one line: 'zeroshot_top1 0.912, retrieval_i2t_r1 ...'."""
  keys = [k for k in KEY_METRICS if k in results] or sorted(
      k for k, v in results.items() if isinstance(v, float))[:5]
  return ", ".join(f"{k} {results[k]:.3f}" for k in keys)
