"""Peak memory and time of contrastive loss + grad against batch size, one device.

  python -m benchmarks.loss_scaling [--batch 4096 ... 131072] [--dim 512] [--impl dense tiled open_clip]
  python -m benchmarks.loss_scaling --out [PATH]   # also append to PATH (default benchmarks/results/loss_scaling_cpu.jsonl)
  python -m benchmarks.loss_scaling --plot     # that file -> benchmarks/results/loss_scaling_cpu.png

Each point runs in a fresh subprocess and prints one JSON object: the process's
peak RSS above its baseline (the RSS once the float32 embeddings exist, before
compiling; the kernel's peak counter is reset there, /proc/self/clear_refs) and
the median wall time of the compiled loss + grad (wrt both embeddings, scale and
bias; compile time separate). impl "dense" and "tiled" are mmjax's blocks= values; "open_clip"
is the peer, open_clip.loss.ClipLoss / SigLipLoss on torch CPU (torch and
open_clip are not mmjax dependencies: `pip install torch open-clip-torch`).
A dense point that would need more than 70% of the memory available is
skipped with a reason: mmjax's dense by XLA's compiled temporaries (3 x 4 B^2
bytes for SigLIP, 4 x 4 B^2 for CLIP), open_clip's by 6 (SigLIP) or 5 (CLIP)
x 4 B^2 bytes, its peak measured at batch 4096.
"""

import argparse
import ctypes
import gc
import json
import os
import pathlib
import resource
import subprocess
import sys
import time

from benchmarks import emit
from mmjax import hostmem

IMPLS = ("dense", "tiled", "open_clip")
# Run a point only if it needs at most this fraction of MemAvailable.
_FREE_FRACTION = 0.7
# open_clip's peak over 4 B^2 bytes (one [B, B] float32), measured at B = 4096:
# labels, logits, their product and the gradients are each [B, B].
_OPEN_CLIP_LOGITS = {"siglip": 6, "clip": 5}
RESULTS = pathlib.Path(__file__).parent / "results"
JSONL = RESULTS / "loss_scaling_cpu.jsonl"


def _status(field: str) -> float:
  """A /proc/self/status memory field (VmRSS, VmHWM) in MiB."""
  for line in open("/proc/self/status"):
    if line.startswith(field + ":"):
      return int(line.split()[1]) / 1024
  raise KeyError(field)


def _settle() -> float:
  """The RSS in MiB once freed memory is back with the OS (the baseline)."""
  gc.collect()
  try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except OSError:
    pass
  return _status("VmRSS")


def _reset_peak() -> bool:
  """Resets the kernel's peak-RSS counter (VmHWM) to the current RSS."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def _embeddings(batch: int, dim: int):
  import numpy as np
  rng = np.random.default_rng(0)
  out = []
  for _ in range(2):
    x = rng.standard_normal((batch, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    out.append(x)
  return out


def _timed(run, budget_s: float, repeats: int) -> list[float]:
  """Wall times of run(): at least one, at most `repeats`, stopping once `budget_s` is spent."""
  times = []
  while len(times) < repeats and (not times or sum(times) < budget_s):
    t = time.perf_counter()
    run()
    times.append(time.perf_counter() - t)
  return times


def point_jax(loss: str, impl: str, batch: int, dim: int, block, repeats: int, budget_s: float):
  import jax
  import jax.numpy as jnp

  from mmjax.losses import clip_loss, siglip_loss, tiled

  # impl here names the blocks (the batch is on one device: impl="global").
  kw = dict(blocks=impl) | (dict(block=block) if impl == "tiled" and block else {})

  def f(x, y, s, b):
    return clip_loss(x, y, s, **kw) if loss == "clip" else siglip_loss(x, y, s, b, **kw)

  step = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3)))
  x, y = _embeddings(batch, dim)
  args = jax.block_until_ready((jnp.asarray(x), jnp.asarray(y), jnp.float32(10.0),
                                jnp.float32(-10.0)))
  del x, y   # the device copies stay
  base, reset = _settle(), _reset_peak()
  base_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  t = time.perf_counter()
  compiled = step.lower(*args).compile()
  compile_s = time.perf_counter() - t
  temp = compiled.memory_analysis().temp_size_in_bytes
  if temp > _FREE_FRACTION * _available_bytes():
    return {"skipped": f"XLA needs {temp / 2 ** 30:.1f} GiB of temporaries; "
                       f"{_available_bytes() / 2 ** 30:.1f} GiB available"}
  times = _timed(lambda: jax.block_until_ready(compiled(*args)), budget_s, repeats)
  peak = _status("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  return {"backend": jax.default_backend(), "compile_s": compile_s, "times_s": times,
          "baseline_rss_mib": base, "peak_rss_mib": peak, "peak_counter_reset": reset,
          "maxrss_before_mib": base_maxrss, "xla_temp_mib": temp / 2 ** 20,
          "block": (block or tiled.DEFAULT_BLOCK) if impl == "tiled" else None,
          "version": jax.__version__}


def point_open_clip(loss: str, batch: int, dim: int, repeats: int, budget_s: float):
  import types
  # torchvision's compiled ops expect a CUDA torch; open_clip imports it regardless.
  for m in ("torchvision._meta_registrations", "torchvision._autograd_registrations"):
    sys.modules.setdefault(m, types.ModuleType(m))
  import torch
  from open_clip.loss import ClipLoss, SigLipLoss

  x, y = (torch.from_numpy(a) for a in _embeddings(batch, dim))
  scale, bias = torch.tensor(10.0), torch.tensor(-10.0)
  fn = ClipLoss() if loss == "clip" else SigLipLoss()
  base, reset = _settle(), _reset_peak()
  base_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

  def run():
    leaves = [a.clone().requires_grad_() for a in (x, y, scale, bias)]
    xs, ys, s, b = leaves
    out = fn(xs, ys, s) if loss == "clip" else fn(xs, ys, s, b)
    (out if isinstance(out, torch.Tensor) else sum(out.values())).backward()

  times = _timed(run, budget_s, repeats)
  peak = _status("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  return {"backend": "torch-cpu", "compile_s": None, "times_s": times, "baseline_rss_mib": base,
          "peak_rss_mib": peak, "peak_counter_reset": reset, "maxrss_before_mib": base_maxrss,
          "block": None, "version": torch.__version__, "threads": torch.get_num_threads()}


def point(loss, impl, batch, dim, block, repeats, budget_s) -> dict:
  if impl == "open_clip":
    r = point_open_clip(loss, batch, dim, repeats, budget_s)
  else:
    r = point_jax(loss, impl, batch, dim, block, repeats, budget_s)
  if "skipped" in r:
    return {"loss": loss, "impl": impl, "batch": batch, "dim": dim, **r}
  times = sorted(r["times_s"])
  return {"loss": loss, "impl": impl, "batch": batch, "dim": dim, "dtype": "float32",
          "peak_rss_above_baseline_mib": r["peak_rss_mib"] - r["baseline_rss_mib"],
          "median_s": times[len(times) // 2], **r}


def _available_bytes() -> int:
  for line in open("/proc/meminfo"):
    if line.startswith("MemAvailable:"):
      return int(line.split()[1]) * 1024
  return 0


def plot(path: pathlib.Path = JSONL) -> pathlib.Path:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = [json.loads(line) for line in open(path) if line.strip()]
  rows = [r for r in rows if "median_s" in r]
  # The latest measurement of each point wins.
  latest = {(r["loss"], r["impl"], r["batch"]): r for r in rows}
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
  styles = {"dense": "o-", "tiled": "s-", "open_clip": "^--"}
  for loss, dash in (("siglip", "-"), ("clip", ":")):
    for impl in IMPLS:
      pts = sorted((b, r) for (l, i, b), r in latest.items() if l == loss and i == impl)
      if not pts:
        continue
      batch = [b for b, _ in pts]
      label = f"{loss} {impl}"
      kw = dict(marker=styles[impl][0], linestyle=dash, label=label)
      axes[0].plot(batch, [max(r["peak_rss_above_baseline_mib"], 1.0) for _, r in pts], **kw)
      axes[1].plot(batch, [r["median_s"] for _, r in pts], **kw)
  for ax, title in zip(axes, ("peak RSS above baseline (MiB)", "loss + grad time (s)")):
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch (dim 512, float32)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
  axes[1].legend(fontsize=8)
  fig.suptitle("Contrastive loss + grad on CPU: mmjax dense / tiled vs open_clip")
  fig.tight_layout()
  out = path.with_suffix(".png")
  fig.savefig(out, dpi=120)
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batch", type=int, nargs="+",
                 default=[4096, 8192, 16384, 32768, 65536, 131072])
  p.add_argument("--dim", type=int, default=512)
  p.add_argument("--loss", nargs="+", default=["siglip", "clip"])
  p.add_argument("--impl", nargs="+", default=list(IMPLS), choices=IMPLS)
  p.add_argument("--block", type=int, default=None, help="tile side for impl=tiled")
  p.add_argument("--repeats", type=int, default=3, help="timed runs per point, at most")
  p.add_argument("--budget_s", type=float, default=60.0,
                 help="stop repeating once the timed runs took this long")
  p.add_argument("--out", nargs="?", const=str(JSONL), default=None, metavar="PATH",
                 help=f"also append each JSON line to PATH (bare --out: {JSONL})")
  p.add_argument("--plot", action="store_true", help=f"plot {JSONL} to its .png and exit")
  p.add_argument("--point", action="store_true", help=argparse.SUPPRESS)
  a = p.parse_args()
  if a.plot:
    print(plot())
    return
  if a.point:   # the child: exactly one point
    print(json.dumps(point(a.loss[0], a.impl[0], a.batch[0], a.dim, a.block, a.repeats,
                           a.budget_s)))
    return
  for loss in a.loss:
    for impl in a.impl:
      for batch in a.batch:
        need = 4 * batch ** 2 * _OPEN_CLIP_LOGITS[loss]
        if impl == "open_clip" and need > _FREE_FRACTION * _available_bytes():
          line = json.dumps({"loss": loss, "impl": impl, "batch": batch, "dim": a.dim,
                             "skipped": f"needs ~{need / 2 ** 30:.0f} GiB "
                                        f"({_OPEN_CLIP_LOGITS[loss]} x 4 B^2 bytes); "
                                        f"{_available_bytes() / 2 ** 30:.1f} GiB available"})
        else:
          cmd = [sys.executable, "-m", "benchmarks.loss_scaling", "--point", "--loss", loss,
                 "--impl", impl, "--batch", str(batch), "--dim", str(a.dim),
                 "--repeats", str(a.repeats), "--budget_s", str(a.budget_s)]
          if a.block:
            cmd += ["--block", str(a.block)]
          r = subprocess.run(cmd, capture_output=True, text=True,
                             env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
          if r.returncode:
            line = json.dumps({"loss": loss, "impl": impl, "batch": batch, "dim": a.dim,
                               "error": r.stderr.strip().splitlines()[-1:]})
          else:
            line = r.stdout.strip().splitlines()[-1]
        if a.out:
          pathlib.Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        emit(line, a.out)


if __name__ == "__main__":
  hostmem.keep_freed_memory()   # timed as the launcher runs: mmjax/hostmem.py
  main()
