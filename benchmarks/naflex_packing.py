"""NaFlex batches padded (one image a row) against packed (several a row) at one token budget.

  python -m benchmarks.naflex_packing [--rows 8] [--seq_len 256] [--patch 16]
      [--caps 256 64] [--lookaheads 1 32] [--max_per_seq 8] [--variant Ti]
      [--depth D] [--batches 16] [--repeats 10] [--seed 0] [--out FILE]

One stream of photo-like images (height and width each uniform in [--min_side, --max_side]
px, so mixed aspect ratios, from --seed; the pixels are random uint8, only the sizes matter
for the token counts, but every image goes through `mmjax.data.naflex.prepare`, so the real
resize and patchify run) fills batches of --rows sequences x --seq_len tokens, two ways:

  padded:  as open_clip / big_vision's SigLIP 2 NaFlex: every image resized to fill a
           sequence (max_patches = seq_len), one image a row (`naflex.pad`), rows images a step.
  packed:  every image kept at or below its native patch count (max_patches = min(native,
           cap), native = ceil(H / p) * ceil(W / p)), packed by `naflex.pack` (first fit
           decreasing, at most --max_per_seq a row): images are taken from the stream while
           they fit in --rows rows, one that does not waiting for the next batch until
           --lookahead images wait (1: the batch ends at the first that does not fit); rows
           the packing leaves empty are all padding, so the step's shape is fixed. One point
           per (--caps, --lookaheads) value.

Each mode builds --batches batches from the same stream (every mode starts at its first
image) and times a jitted train step cycling through them: a NaFlexViT (--variant, --depth,
map pooling) forward + backward + an SGD update (params donated) on a simple loss, the mean
squared pooled output over the real images (padded: pooled [rows, width]; packed: [rows,
k, width], empty slots masked out). The modes are timed in turns (one sample of each, then
the next round, the order rotated each round), so a shared CPU's load falls on all alike;
step_s is the median of --repeats samples. Every mode's step has the same shape ([rows,
seq_len] tokens; only the pooling's slots differ), so its step time should be the same: a
step_s ratio far from 1 is timing noise. One JSON object per mode:

  padding_share           padding tokens / all tokens, over the batches (empty rows count)
  images_per_step         mean images a batch
  real_tokens_per_step    mean non-padding tokens a batch
  real_tokens_per_s       real_tokens_per_step / step_s;  images_per_s likewise
  mean_patches_per_image  the resolution each image got
  compiled_peak_mib       XLA's memory_analysis() of the compiled step: temporaries +
                          arguments + outputs - aliased (donated) bytes; temp_mib the first
  device_peak_mib         the allocator's peak (GPU/TPU only; null on XLA:CPU)
  host_ms_per_batch       prepare + pad/pack of one batch on the host

and a last summary line with packed / padded ratios from the same run (CPU timings are only
comparable within a run).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import statistics
import sys
import time

import numpy as np

from benchmarks import device_peak_mib, emit
from mmjax import hostmem
from mmjax.data import naflex as naflex_data


def image_sizes(n: int, low: int, high: int, seed: int) -> np.ndarray:
  """int [n, 2]: (height, width), each uniform in [low, high] (mixed aspect ratios)."""
  return np.random.default_rng(seed).integers(low, high + 1, size=(n, 2))


def native_patches(height: int, width: int, patch: int) -> int:
  return math.ceil(height / patch) * math.ceil(width / patch)


class ImageStream:
  """Synthetic uint8 images of the given sizes, in order (pixels from `seed`); `defer` puts
  an image back at the front, before the next unseen one (the packer's look-ahead)."""

  def __init__(self, sizes: np.ndarray, seed: int):
    self.sizes, self.next, self.deferred = sizes, 0, []
    self.rng = np.random.default_rng(seed + 1)

  def take(self) -> np.ndarray:
    if self.deferred:
      return self.deferred.pop(0)
    if self.next >= len(self.sizes):
      raise ValueError(f"the stream's {len(self.sizes)} images are spent; raise --stream")
    h, w = (int(s) for s in self.sizes[self.next])
    self.next += 1
    return self.rng.integers(0, 256, (h, w, 3), dtype=np.uint8)

  def defer(self, images: list[np.ndarray]) -> None:
    self.deferred = list(images) + self.deferred


def padded_batch(stream: ImageStream, rows: int, seq_len: int, patch: int) -> dict:
  """rows images, each resized to fill seq_len patches, one a row (naflex.pad)."""
  images = [naflex_data.prepare(stream.take(), patch, seq_len) for _ in range(rows)]
  return naflex_data.pad(images, seq_len)


def packed_batch(stream: ImageStream, rows: int, seq_len: int, patch: int, cap: int,
                 max_per_seq: int, lookahead: int) -> dict:
  """Images at min(native, cap) patches packed into `rows` rows of seq_len (naflex.pack, at
  most max_per_seq a row), then all-padding rows up to `rows`.

  Images come in the stream's order: each joins the batch if first fit decreasing still packs
  all into `rows` rows, else waits at the front of the stream for the next batch; the batch
  is closed once `lookahead` images wait (lookahead=1: it ends at the first image that does
  not fit, the stream's order kept) or it has no free token.
  """
  counts, chosen, waiting = [], [], []
  while len(waiting) < lookahead and sum(counts) < rows * seq_len:
    pixels = stream.take()
    h, w = pixels.shape[:2]
    budget = min(native_patches(h, w, patch), cap)
    gh, gw = naflex_data.size_for_budget(h, w, patch, budget)   # the grid prepare() gives
    trial = counts + [(gh // patch) * (gw // patch)]
    if naflex_data.first_fit_decreasing(trial, seq_len, max_per_seq)[:, 0].max() < rows:
      counts, chosen = trial, chosen + [(pixels, budget)]
    else:
      waiting.append(pixels)
  stream.defer(waiting)
  images = [naflex_data.prepare(pixels, patch, budget) for pixels, budget in chosen]
  if not images:
    raise ValueError(f"no image of the stream fits {rows} rows of seq_len={seq_len}")
  batch, _ = naflex_data.pack(images, seq_len, max_per_seq)
  filler = rows - len(batch["patches"])
  return {k: np.concatenate([v, np.zeros((filler, *v.shape[1:]), v.dtype)]) for k, v in
          batch.items()}


def build_batches(mode: dict, sizes: np.ndarray, a) -> tuple[list[dict], float]:
  """a.batches batches of one mode from the start of the stream; ms per batch on the host."""
  stream = ImageStream(sizes, a.seed)
  t = time.perf_counter()
  if mode["mode"] == "padded":
    batches = [padded_batch(stream, a.rows, a.seq_len, a.patch) for _ in range(a.batches)]
  else:
    batches = [packed_batch(stream, a.rows, a.seq_len, a.patch, mode["cap"], a.max_per_seq,
                            mode["lookahead"]) for _ in range(a.batches)]
  return batches, (time.perf_counter() - t) / a.batches * 1e3


def make_step(model):
  """A jitted SGD step (params donated): loss = mean squared pooled output of the real
  images; patches uint8, normalised on the device as (x / 255 - 0.5) / 0.5."""
  import jax
  import jax.numpy as jnp

  def loss_fn(params, batch):
    image = {**batch, "patches": batch["patches"].astype(jnp.float32) / 127.5 - 1.0}
    pooled, _ = model.apply({"params": params}, image, train=True)
    valid = (batch["shapes"][..., 0] > 0).astype(jnp.float32)       # [b, k]
    if pooled.ndim == 2:                                             # one slot a row
      pooled = pooled[:, None]
    per_image = jnp.mean(jnp.square(pooled.astype(jnp.float32)), axis=-1)
    return jnp.sum(per_image * valid) / jnp.maximum(valid.sum(), 1.0)

  @functools.partial(jax.jit, donate_argnums=(0,))
  def step(params, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    return jax.tree.map(lambda p, g: p - 1e-3 * g, params, grads), loss

  return step


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--rows", type=int, default=8, help="sequences a batch")
  p.add_argument("--seq_len", type=int, default=256, help="tokens a sequence")
  p.add_argument("--patch", type=int, default=16)
  p.add_argument("--caps", type=int, nargs="+", default=[256, 64],
                 help="packed: max patches an image (each <= seq_len), one point each")
  p.add_argument("--max_per_seq", type=int, default=8, help="packed: images a row at most")
  p.add_argument("--lookaheads", type=int, nargs="+", default=[1, 32],
                 help="packed: images that may wait for a later batch, one point each")
  p.add_argument("--min_side", type=int, default=100)
  p.add_argument("--max_side", type=int, default=800)
  p.add_argument("--variant", default="Ti", help="the ViT width/heads/mlp (mmjax.models.vit)")
  p.add_argument("--depth", type=int, default=None, help="overrides the variant's depth")
  p.add_argument("--batches", type=int, default=16, help="host batches a mode (cycled)")
  p.add_argument("--repeats", type=int, default=10, help="timed samples a mode")
  p.add_argument("--steps_per_sample", type=int, default=1)
  p.add_argument("--stream", type=int, default=20000, help="images drawn for the stream")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default=None, help="also append the lines to this file")
  a = p.parse_args()
  for cap in a.caps:
    if not 1 <= cap <= a.seq_len:
      p.error(f"--caps {cap}: must be in [1, seq_len={a.seq_len}]")

  import jax
  from mmjax.models import naflex

  sizes = image_sizes(a.stream, a.min_side, a.max_side, a.seed)
  modes = [{"mode": "padded", "cap": a.seq_len, "lookahead": None}] + [
      {"mode": "packed", "cap": c, "lookahead": n} for c in a.caps for n in a.lookaheads]
  command = " ".join(["python -m benchmarks.naflex_packing", *sys.argv[1:]])
  common = {"benchmark": "naflex_packing", "rows": a.rows, "seq_len": a.seq_len,
            "patch": a.patch, "tokens_per_step": a.rows * a.seq_len,
            "sides_px": [a.min_side, a.max_side], "seed": a.seed,
            "variant": f"{a.variant}/{a.patch}", "pool_type": "map",
            "backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
            "command": command}
  points = []
  for mode in modes:
    batches, host_ms = build_batches(mode, sizes, a)
    k = batches[0]["shapes"].shape[1] if mode["mode"] == "packed" else 1
    depth = {} if a.depth is None else {"depth": a.depth}
    model = naflex.Model(f"{a.variant}/{a.patch}", pool_type="map", **depth)
    step = make_step(model)
    dev = [jax.device_put(b) for b in batches]
    params = jax.jit(model.init)(jax.random.PRNGKey(0), dev[0])["params"]
    t = time.perf_counter()
    compiled = step.lower(params, dev[0]).compile()
    compile_s = time.perf_counter() - t
    mem = compiled.memory_analysis()
    seg = np.stack([b["segment_ids"] for b in batches])
    counts = np.stack([b["shapes"][..., 0] * b["shapes"][..., 1] for b in batches])
    n_images = (counts > 0).sum(axis=(1, 2))
    row = {**mode, "max_patches": ("seq_len" if mode["mode"] == "padded"
                                   else f"min(native, {mode['cap']})"),
           "slots_per_row": k, "batches": a.batches,
           "padding_share": float(np.mean(seg == 0)),
           "images_per_step": float(n_images.mean()),
           "real_tokens_per_step": float((seg > 0).sum(axis=(1, 2)).mean()),
           "mean_patches_per_image": float(counts.sum() / n_images.sum()),
           "host_ms_per_batch": host_ms, "compile_s": compile_s,
           "params_m": sum(x.size for x in jax.tree.leaves(params)) / 1e6,
           "width": model.width, "depth": model.depth, "num_heads": model.num_heads,
           "mlp_dim": model.mlp_dim}
    if mem is not None:
      row["temp_mib"] = mem.temp_size_in_bytes / 2 ** 20
      row["compiled_peak_mib"] = (mem.temp_size_in_bytes + mem.argument_size_in_bytes
                                  + mem.output_size_in_bytes - mem.alias_size_in_bytes) / 2 ** 20
      row["compiled_peak_source"] = ("memory_analysis(): temp + argument + output - alias "
                                     "bytes of the compiled step")
    points.append({"row": row, "compiled": compiled, "params": params, "dev": dev, "i": 0,
                   "times": []})
    print(f"{mode}: compiled in {compile_s:.1f} s", file=sys.stderr, flush=True)

  def run(pt):
    pt["params"], loss = pt["compiled"](pt["params"], pt["dev"][pt["i"] % len(pt["dev"])])
    pt["i"] += 1
    return loss

  for pt in points:   # warm-up
    jax.block_until_ready(run(pt))
  for rep in range(a.repeats):   # in turns, the order rotated: the CPU's load falls on all alike
    for pt in points[rep % len(points):] + points[:rep % len(points)]:
      t = time.perf_counter()
      for _ in range(a.steps_per_sample):
        loss = run(pt)
      jax.block_until_ready(loss)
      pt["times"].append((time.perf_counter() - t) / a.steps_per_sample)
      pt["loss"] = float(loss)

  rows = []
  for pt in points:
    step_s = statistics.median(pt["times"])
    r = pt["row"]
    r.update(step_s=step_s, step_times_s=pt["times"], steps_per_sample=a.steps_per_sample,
             real_tokens_per_s=r["real_tokens_per_step"] / step_s,
             images_per_s=r["images_per_step"] / step_s, final_loss=pt["loss"],
             device_peak_mib=device_peak_mib())
    rows.append({**common, **r})
    emit(json.dumps(rows[-1]), a.out)
  base = rows[0]
  summary = {"benchmark": "naflex_packing", "summary": True, "command": command,
             "backend": common["backend"], "padded_padding_share": base["padding_share"]}
  for r in rows[1:]:
    key = f"packed_cap{r['cap']}_lookahead{r['lookahead']}"
    summary[key] = {"padding_share": r["padding_share"],
                    "under_5pct_padding": r["padding_share"] < 0.05,
                    "real_tokens_per_s_vs_padded": (r["real_tokens_per_s"]
                                                    / base["real_tokens_per_s"]),
                    "images_per_step_vs_padded": r["images_per_step"] / base["images_per_step"],
                    "images_per_s_vs_padded": r["images_per_s"] / base["images_per_s"],
                    "step_s_vs_padded": r["step_s"] / base["step_s"]}
    if "compiled_peak_mib" in r and "compiled_peak_mib" in base:
      summary[key]["compiled_peak_vs_padded"] = r["compiled_peak_mib"] / base["compiled_peak_mib"]
  emit(json.dumps(summary), a.out)


if __name__ == "__main__":
  hostmem.keep_freed_memory()   # timed as the launcher runs: mmjax/hostmem.py
  main()
