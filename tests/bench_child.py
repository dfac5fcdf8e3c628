"""A benchmark child for tests/test_gpu_bench.py: points that succeed, raise, die or hang.

  python -m tests.bench_child --points JSON [--deadline T]   (as benchmarks.run_points starts it)
"""

import argparse
import os
import time

from benchmarks import add_child_args, child_main, partial


def point(kind: str, value: int = 0) -> dict:
  if kind == "ok":
    return {"value": value}
  if kind == "oom":
    raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.0TiB")
  if kind == "die":
    partial({"measured_before_dying": value})
    os._exit(3)
  if kind == "hang":
    time.sleep(600)
  raise ValueError(f"kind={kind!r}")


if __name__ == "__main__":
  p = argparse.ArgumentParser()
  add_child_args(p)
  a = p.parse_args()
  child_main(point, a.points, a.deadline)
