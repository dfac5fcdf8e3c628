"""Host-memory allocation for XLA:CPU: keep freed memory for the next step.

XLA:CPU (jax 0.10.2) allocates each execution's temporaries as one block with posix_memalign
and frees it at the end: a ViT-B-32 CLIP train step at batch 32 asks for 2.98 GB. glibc serves
a block that large with mmap and returns it with munmap (from a worker thread's arena it always
does), so every step faults in and zeroes every page again: 726,640 page faults per step, and
the bf16 step ran 1.2x slower for it (one core, an Intel AMX CPU). `keep_freed_memory()` makes
glibc serve every allocation from the main heap (one arena, no mmap) and never trim it, so the
block is reused. The cost: the process keeps its peak heap (its RSS stays at the high-water
mark instead of falling between steps).

It retunes malloc for the whole process, so `import mmjax` never calls it: the launchers
(experiments/train.py, experiments/evaluate.py) and the benchmark scripts do, first thing. It
must run before JAX starts its CPU client (whose threads pick their arenas on first use); later
it does nothing and returns False. A notebook training on CPU opts in with

  from mmjax import hostmem; hostmem.keep_freed_memory()

as its first cell. $MMJAX_KEEP_FREED_MEMORY=0 turns it off (the launchers' opt-out).
Elsewhere than Linux with glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import os
import sys

_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
applied = False


def _jax_backend_started() -> bool:
  jax_mod = sys.modules.get("jax._src.xla_bridge")
  return bool(getattr(jax_mod, "_backends", None))


def keep_freed_memory() -> bool:
  """Tune glibc's malloc as the module docstring says; True if it did (now or before)."""
  global applied
  if applied:
    return True
  if (os.environ.get("MMJAX_KEEP_FREED_MEMORY") == "0" or not sys.platform.startswith("linux")
      or _jax_backend_started()):
    return False
  try:
    libc = ctypes.CDLL("libc.so.6")
    mallopt = libc.mallopt
  except (OSError, AttributeError):   # not glibc (musl has no mallopt)
    return False
  # -1 as size_t: never trim; no mmap'd chunks; one arena, so worker threads use the main heap
  applied = bool(mallopt(_M_ARENA_MAX, 1) and mallopt(_M_MMAP_MAX, 0)
                 and mallopt(_M_TRIM_THRESHOLD, -1))
  return applied
