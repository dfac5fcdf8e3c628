"""Large-batch SigLIP digits training: tiled loss + GradCache against dense, peak RSS and step time.

  python -m benchmarks.large_batch [--big 16384] [--micro 512] [--dense 2048 4096 8192 16384]
      [--steps 3] [--big_steps 2] [--cap_gib 14] [--out benchmarks/results/large_batch_cpu.jsonl]

Each run is `mmjax.train.loop.train` on experiments/configs/siglip_digits.py (its towers, data and
optimizer; no evaluation until the final one, which runs as in any job) in a fresh subprocess,
and prints one JSON line: global batch, accum_steps, loss_blocks, the median seconds of the steps
after the first (which compiles; a step is timed from one step's metrics being ready to the
next's, the input pipeline included), the child's peak RSS (VmHWM, the final evaluation
included) and whether the last loss was finite. Runs:
  (a) loss_blocks='tiled' with accum_steps = big / micro at --big;
  (b) dense blocks without accumulation at each --dense batch, smallest first, until one would
      exceed --cap_gib (predicted from the previous runs' RSS, linear in the batch, and enforced:
      the parent polls the child's RSS and kills it above the cap);
  (c) tiled + GradCache (micro-batch --micro) at the largest batch (b) fitted: the step-time
      ratio at equal batch.
The digits train split has 1,437 examples: a batch of 16,384 holds each about 11 times. The
learning rate warms up in one step: the losses are no training curve, but dense and tiled +
GradCache runs of one batch size see the same data and gradients, so the same final loss.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from mmjax import hostmem

MIN_FREE_GIB = 1.5      # a child is also killed when the machine has less than this available


def _status_kib(field: str, pid: str = "self") -> int:
  """A /proc/<pid>/status field in KiB (VmRSS, VmHWM); 0 once the process is gone."""
  try:
    with open(f"/proc/{pid}/status") as f:
      for line in f:
        if line.startswith(field + ":"):
          return int(line.split()[1])
  except OSError:
    pass
  return 0


def _meminfo_kib(field: str) -> int:
  with open("/proc/meminfo") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1])
  return 0


def _config(batch: int, accum: int, blocks: str, steps: int, data_dir: str):
  from experiments.configs import siglip_digits
  c = siglip_digits.get_config()
  c.batch_size, c.accum_steps, c.loss_blocks = batch, accum, blocks
  c.total_steps, c.log_every = steps, steps
  c.optim.warmup_steps = 1
  c.evaluate.every = 0                          # only the final evaluation
  c.checkpoint.every, c.checkpoint.keep = steps, 1
  c.data.data_dir = data_dir
  return c


def child(batch: int, accum: int, blocks: str, steps: int, data_dir: str) -> dict:
  """One run in this process: loop.train with a callback timing each step."""
  import jax
  import numpy as np
  from mmjax.train import loop
  times, losses = [], []

  def on_step(step, metrics):
    losses.append(float(jax.block_until_ready(metrics["loss"])))
    times.append(time.perf_counter())

  with tempfile.TemporaryDirectory() as workdir:
    loop.train(_config(batch, accum, blocks, steps, data_dir), workdir, callbacks=[on_step])
  peak = _status_kib("VmHWM") / 2 ** 20
  steps_s = np.diff(times)
  return {"benchmark": "large_batch", "global_batch": batch, "accum_steps": accum,
          "micro_batch": batch // accum, "loss_blocks": blocks, "steps": steps,
          "median_step_s": float(np.median(steps_s)) if len(steps_s) else None,
          "step_s": [round(float(s), 3) for s in steps_s],
          "examples_per_s": batch / float(np.median(steps_s)) if len(steps_s) else None,
          "peak_rss_gib": round(peak, 3), "final_loss": losses[-1],
          "final_loss_finite": bool(np.isfinite(losses[-1])), "backend": jax.default_backend()}


def launch(batch: int, accum: int, blocks: str, steps: int, data_dir: str, cap_gib: float) -> dict:
  """child() in a fresh subprocess, killed when its RSS passes cap_gib."""
  cmd = [sys.executable, "-m", "benchmarks.large_batch", "--child", str(batch), str(accum),
         blocks, "--steps", str(steps), "--data_dir", data_dir]
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
  t0 = time.time()
  proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, text=True)
  polled, killed = 0, None
  while proc.poll() is None:
    polled = max(polled, _status_kib("VmRSS", str(proc.pid)))
    free = _meminfo_kib("MemAvailable")
    if polled > cap_gib * 2 ** 20 or free < MIN_FREE_GIB * 2 ** 20:
      proc.kill()
      killed = (f"RSS passed --cap_gib {cap_gib}" if polled > cap_gib * 2 ** 20 else
                f"the machine's MemAvailable fell under {MIN_FREE_GIB} GiB")
      break
    time.sleep(0.05)
  out = proc.communicate()[0]
  base = {"benchmark": "large_batch", "global_batch": batch, "accum_steps": accum,
          "loss_blocks": blocks, "steps": steps, "wall_s": round(time.time() - t0, 1)}
  if killed:
    return {**base, "error": f"killed: {killed}", "polled_peak_rss_gib": polled / 2 ** 20}
  lines = [ln for ln in out.splitlines() if ln.startswith("{")]
  if proc.returncode or not lines:
    return {**base, "error": f"exit status {proc.returncode}"}
  return {**json.loads(lines[-1]), "wall_s": base["wall_s"],
          "polled_peak_rss_gib": round(polled / 2 ** 20, 3)}


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--big", type=int, default=16384, help="run (a)'s global batch")
  p.add_argument("--micro", type=int, default=512, help="GradCache micro-batch of (a) and (c)")
  p.add_argument("--dense", type=int, nargs="*", default=[2048, 4096, 8192, 16384],
                 help="run (b)'s batches, smallest first")
  p.add_argument("--steps", type=int, default=3, help="train steps per run (the first compiles)")
  p.add_argument("--big_steps", type=int, default=2, help="train steps of run (a)")
  p.add_argument("--cap_gib", type=float, default=14.0,
                 help="a run's RSS limit (predicted, and enforced by killing it)")
  p.add_argument("--runs", default="abc", help="which of the runs (a), (b), (c)")
  p.add_argument("--data_dir", default=None, help="TFDS data dir (default: a fresh temp dir)")
  p.add_argument("--out", default=None, help="also append the JSON lines here")
  p.add_argument("--child", nargs=3, metavar=("BATCH", "ACCUM", "BLOCKS"), default=None,
                 help=argparse.SUPPRESS)
  a = p.parse_args()
  if a.child:
    print(json.dumps(child(int(a.child[0]), int(a.child[1]), a.child[2], a.steps, a.data_dir)),
          flush=True)
    return
  if min(a.steps, a.big_steps) < 2:
    p.error("--steps and --big_steps must be >= 2 (the first step compiles and is not timed)")
  if a.big % a.micro:
    p.error(f"--big {a.big} must be a multiple of --micro {a.micro}")
  tmp = tempfile.TemporaryDirectory()
  data_dir = a.data_dir or tmp.name
  rows = []

  command = " ".join(["python -m benchmarks.large_batch", *sys.argv[1:]])

  def emit(row):
    row = {**row, "command": command}
    rows.append(row)
    print(json.dumps(row), flush=True)
    if a.out:
      with open(a.out, "a") as f:
        f.write(json.dumps(row) + "\n")

  run = lambda b, k, blocks: emit(launch(b, k, blocks, a.steps, data_dir, a.cap_gib))
  if "a" in a.runs:
    emit(launch(a.big, a.big // a.micro, "tiled", a.big_steps, data_dir, a.cap_gib))
  fitted = []                                  # (batch, peak RSS GiB) of the dense runs
  if "b" in a.runs or "c" in a.runs:
    for b in sorted(a.dense):
      if fitted:
        (b0, r0), (b1, r1) = (fitted[-2] if len(fitted) > 1 else (0, 0)), fitted[-1]
        predicted = r1 + (r1 - r0) / (b1 - b0) * (b - b1)
        if predicted > a.cap_gib:
          emit({"benchmark": "large_batch", "global_batch": b, "accum_steps": 1,
                "loss_blocks": "dense", "skipped": f"predicted peak RSS {predicted:.1f} GiB > "
                                                   f"--cap_gib {a.cap_gib}"})
          break
      run(b, 1, "dense")
      if "error" in rows[-1]:
        break
      fitted.append((b, rows[-1]["peak_rss_gib"]))
  if "c" in a.runs and fitted:
    b = fitted[-1][0]
    if b % a.micro:
      print(f"(c) skipped: batch {b} is not a multiple of --micro {a.micro}", flush=True)
    else:
      run(b, b // a.micro, "tiled")
  tmp.cleanup()


if __name__ == "__main__":
  hostmem.keep_freed_memory()   # timed as the launcher runs: mmjax/hostmem.py
  main()
