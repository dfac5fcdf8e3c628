"""Benchmark scripts: each prints one JSON object per measurement.

Shared here: `emit` (print a line, append it to a file), `timed` (warm median timing),
`device_peak_mib`, and `run_points`, which runs a benchmark's points in child processes
so that a crash, an out-of-memory kill or a hung compile costs one point, not the run.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable


def emit(line: str, out: str | None = None) -> None:
  """Prints one JSON line and, given a path, appends it there too."""
  print(line, flush=True)
  if out:
    with open(out, "a") as f:
      f.write(line + "\n")


def timed(run: Callable[[], object], *, repeats: int, budget_s: float | None = None,
          min_s: float = 0.0) -> dict:
  """Warm timing of run(), which returns JAX arrays (dispatched, maybe not ready).

  One untimed call first (the warm-up; compile beforehand). Each timed sample runs `inner`
  calls back to back and waits for the last one's result (one device stream runs them in
  order), `inner` enough to last about `min_s` by the warm-up's time, so sub-millisecond GPU
  kernels are not timed as dispatch and sync overhead. At least one sample, at most `repeats`,
  stopping once `budget_s` is spent. Returns the median seconds per call, the samples, `inner`
  and the last call's result.
  """
  import jax
  t = time.perf_counter()
  out = jax.block_until_ready(run())
  warm = time.perf_counter() - t
  inner = max(1, min(1000, int(min_s / max(warm, 1e-6))))
  times = []
  while len(times) < repeats and (budget_s is None or not times or sum(times) < budget_s):
    t = time.perf_counter()
    for _ in range(inner):
      out = run()
    jax.block_until_ready(out)
    times.append((time.perf_counter() - t) / inner)
  return {"median_s": sorted(times)[len(times) // 2], "times_s": times, "inner": inner,
          "out": out}


def device_peak_mib() -> float | None:
  """The process's peak device memory (allocator's `peak_bytes_in_use`) in MiB, where the
  backend reports it (GPU, TPU; not XLA:CPU). A process-wide high-water mark: measure one
  point per fresh process."""
  import jax
  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  return None if peak is None else peak / 2 ** 20


def error_text(e: BaseException) -> str:
  """One line for a JSON row: the exception's type and first non-empty line, shortened."""
  lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
  return f"{type(e).__name__}: {lines[0] if lines else ''}"[:400]


def is_oom(text: str) -> bool:
  return any(s in text for s in ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory",
                                 "OOM"))


# ------------------------------------------------------------ points in child processes
#
# A benchmark module exposes point(**params) -> dict and calls child_main(point) when run
# with --points JSON --deadline T. The child prints one JSON line per point: rows with
# "partial": true are what it measured so far (the compiled size survives an OOM kill),
# the next row without it finishes the point. An exception in a point becomes that point's
# row with an "error"; a point not started by the deadline becomes a "skipped" row.


def add_child_args(p) -> None:
  """The hidden arguments of a child (argparse parser p)."""
  import argparse
  p.add_argument("--points", default=None, help=argparse.SUPPRESS)
  p.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)


def child_main(point: Callable[..., dict], points_json: str, deadline: float | None) -> None:
  for params in json.loads(points_json):
    if deadline is not None and time.time() > deadline:
      row = {**params, "skipped": "the part's time budget was spent"}
    else:
      try:
        row = {**params, **point(**params)}
      except Exception as e:   # noqa: BLE001: a failed point is a result, not a crash
        row = {**params, "error": error_text(e)}
        row["oom"] = is_oom(row["error"])
    print(json.dumps(row), flush=True)


def partial(row: dict) -> None:
  """From inside point(): prints what is measured so far (kept if the process dies)."""
  print(json.dumps({**row, "partial": True}), flush=True)


def run_points(module: str, points: list[dict], *, fresh: bool, budget_s: float | None,
               out: str | None = None, extra: dict | None = None,
               on_row: Callable[[dict], tuple[list[dict], str] | None] | None = None,
               quiet: bool = False) -> list[dict]:
  """Runs `python -m module --points ...` children over points; emits and returns one row each.

  fresh: one child per point (process-wide peaks, RSS, a clean allocator), else one child
  for all points, started again after the point it died in. budget_s: children are killed
  at the deadline, the point in flight recorded as an error and the rest as skipped.
  extra: fields added to every row. on_row(row) may return (points, reason): points to drop
  from the rest (e.g. larger dense batches once one ran out of memory), as "skipped" rows.
  quiet: return the rows without printing them.
  """
  deadline = None if budget_s is None else time.time() + budget_s
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", ""),
         "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "3")}
  todo, rows = list(points), []

  def finish(row: dict) -> None:
    row = {**row, **(extra or {})}
    row.pop("partial", None)
    rows.append(row)
    if not quiet:
      emit(json.dumps(row), out)
    drops, why = (on_row(row) if on_row else None) or ([], "")
    for drop in drops:
      if drop in todo:
        todo.remove(drop)
        finish({**drop, "skipped": why})

  while todo:
    if deadline is not None and time.time() > deadline:
      for p in list(todo):
        todo.remove(p)
        finish({**p, "skipped": "the part's time budget was spent"})
      break
    batch = todo[:1] if fresh else list(todo)
    cmd = [sys.executable, "-m", module, "--points", json.dumps(batch)]
    if deadline is not None:
      cmd += ["--deadline", str(deadline)]
    with tempfile.TemporaryFile("w+") as err:
      proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=err,
                              text=True)
      lines: queue.Queue = queue.Queue()
      threading.Thread(target=lambda: ([lines.put(ln) for ln in proc.stdout], lines.put(None)),
                       daemon=True).start()
      last_partial, killed = None, None
      while True:
        wait = None if deadline is None else max(0.0, deadline - time.time())
        try:
          line = lines.get(timeout=wait)
        except queue.Empty:
          proc.kill()
          killed = f"killed at the part's time budget ({budget_s:.0f} s)"
          break
        if line is None:
          break
        if not line.startswith("{"):
          continue
        row = json.loads(line)
        if row.get("partial"):
          last_partial = row
          continue
        done, last_partial = batch.pop(0), None
        if done in todo:   # else on_row dropped it while this child was running it
          todo.remove(done)
          finish(row)
      proc.wait()
      if batch:   # the child died (or was killed) in batch[0]
        err.seek(0)
        tail = [ln for ln in err.read().strip().splitlines() if ln.strip()][-1:] or [""]
        why = killed or f"exit status {proc.returncode}: {tail[0][-300:]}"
        if batch[0] in todo:
          todo.remove(batch[0])
          row = {**(last_partial or {}), **batch[0], "error": why}
          row["oom"] = is_oom(why) or (proc.returncode in (-9, 137) and not killed)
          finish(row)
  return rows
