"""Metrics to <workdir>/metrics.jsonl and TensorBoard event files, and a PNG of the curves."""

from __future__ import annotations

import json
import math
import os

import jax


class MetricWriter:
  """Appends {"step": s, ...} lines to metrics.jsonl and scalars to TensorBoard.

  On resume (resume_step > 0) lines logged after the restored checkpoint are
  dropped first, so the file reads like one uninterrupted run.
  """

  def __init__(self, workdir: str, *, resume_step: int = 0):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._primary = jax.process_index() == 0
    self._tb = None
    if not self._primary:
      return
    if os.path.exists(self.path):
      with open(self.path) as f:
        rows = [r for r in f if r.strip() and json.loads(r)["step"] <= resume_step]
      with open(self.path, "w") as f:
        f.writelines(rows)
    from tensorboardX import SummaryWriter  # imported late: it is slow to import
    self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=resume_step + 1)

  def write(self, step: int, metrics: dict[str, float]) -> None:
    if not self._primary:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps({"step": int(step), **metrics}) + "\n")
    for k, v in metrics.items():
      if math.isfinite(v):   # a skipped NaN step stays in metrics.jsonl, not in TensorBoard
        self._tb.add_scalar(k, v, step)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def read_metrics(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(r) for r in f if r.strip()]


def plot_curves(metrics_path: str, png_path: str) -> None:
  """Loss, learning rate, temperature and eval metrics against step, one panel each."""
  import matplotlib   # slow to import: only the end-of-run plot needs it
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt   # after use("Agg"): no display needed

  rows = read_metrics(metrics_path)
  evals = sorted({k for r in rows for k in r
                  if k.startswith(("zeroshot_top1", "retrieval_", "linear_probe", "knn"))
                  and k.endswith(("top1", "_r1"))})
  panels = [("loss", ["loss"]), ("learning rate", ["lr"]), ("logit scale / bias", ["scale", "bias"]),
            ("eval", evals)]
  panels = [(t, keys) for t, keys in panels if any(k in r for r in rows for k in keys)]
  fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
  axes = axes[0]
  for ax, (title, keys) in zip(axes, panels):
    for k in keys:
      pts = [(r["step"], r[k]) for r in rows if k in r]
      if pts:
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker="o" if title == "eval" else None, ms=3, label=k)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if len(keys) > 1:
      ax.legend(fontsize=7)
  axes[0].set_yscale("log")
  fig.tight_layout()
  fig.savefig(png_path, dpi=100)
  plt.close(fig)
