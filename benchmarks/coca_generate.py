"""CoCa captioning speed: coca.make_generate (KV-cached greedy / beam search under jit).

  python -m benchmarks.coca_generate [--model coca_ViT-B-32] [--batch 8] [--beams 1 3]
      [--max_len 20] [--repeats 3] [--open_clip] [--out FILE]

A random-init model of open_clip's config (mmjax.convert.open_clip_coca_config; nothing
downloaded), float32. One JSON line per beam count: compile seconds, the median seconds per
batch of captions, captions/s, and the decoder's tokens/s (batch x beams x (max_len - 1)
decoding steps). --open_clip adds a line for open_clip's model captioning the same weights
greedily as its `generate` does (the image encoded once, then at every step the text tower
and decoder re-run on the whole prefix: no KV cache), max_len tokens each as here, torch on
as many threads as this process may use. (open_clip's `generate` itself needs transformers'
BeamSearchScorer, which transformers 5 no longer has, so its loop is written out here.)
"""

import argparse
import json
import time

from benchmarks import emit, timed
from mmjax import hostmem


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model", default="coca_ViT-B-32")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--beams", type=int, nargs="+", default=[1, 3])
  p.add_argument("--max_len", type=int, default=20)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--open_clip", action="store_true")
  p.add_argument("--out", default=None)
  args = p.parse_args()

  import jax
  import jax.numpy as jnp
  import numpy as np

  from mmjax.convert import open_clip_coca_config, OPEN_CLIP_COCA_MODELS
  from mmjax.models import coca

  config = open_clip_coca_config(args.model)
  model = coca.Model(**config)
  size = OPEN_CLIP_COCA_MODELS[args.model].image_size
  image = jax.random.normal(jax.random.PRNGKey(1), (args.batch, size, size, 3))
  tokens = jnp.zeros((1, config["text"]["max_len"]), jnp.int32)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), image[:1], tokens)["params"]
  for beams in args.beams:
    gen = coca.make_generate(model, max_len=args.max_len, eos_id=49407, beams=beams,
                             first=49406)
    t = time.perf_counter()
    compiled = gen.lower(params, image).compile()
    compile_s = time.perf_counter() - t
    r = timed(lambda: compiled(params, image), repeats=args.repeats)
    if beams == 1:
      greedy = np.asarray(r["out"][0][:, 0])
    steps = args.batch * beams * (args.max_len - 1)
    emit(json.dumps({"bench": "coca_generate", "impl": "mmjax", "model": args.model,
                     "batch": args.batch,
                     "beams": beams, "max_len": args.max_len, "compile_s": round(compile_s, 2),
                     "median_s": round(r["median_s"], 4),
                     "captions_per_s": round(args.batch / r["median_s"], 2),
                     "decoder_tokens_per_s": round(steps / r["median_s"], 1),
                     "backend": jax.default_backend()}), args.out)
  if args.open_clip:
    if 1 not in args.beams:
      raise SystemExit("--open_clip compares greedy captions: --beams must include 1")
    emit(json.dumps(_open_clip_row(args, config, params, image, greedy)), args.out)


def _agree(a, b, stop=(0, 49407)) -> bool:
  """Two token rows equal up to and including the first stop token (padding or EOS)."""
  for x, y in zip(a, b):
    if x != y:
      return False
    if x in stop:
      return True
  return True


def _open_clip_row(args, config, params, image, greedy) -> dict:
  """open_clip's greedy captioning of the same weights, timed as `timed` does (median)."""
  import os
  import statistics

  import numpy as np
  import torch

  from mmjax.convert import to_open_clip
  from tests.open_clip_peer import import_open_clip
  threads = len(os.sched_getaffinity(0))
  open_clip = import_open_clip()   # (sets torch to one thread: set it back)
  torch.set_num_threads(threads)
  oc = open_clip.create_model(args.model, pretrained=None).eval()
  oc.load_state_dict(to_open_clip(config, params, as_torch=True))
  x = torch.from_numpy(np.asarray(image).transpose(0, 3, 1, 2).copy())

  @torch.no_grad()
  def run():
    latent, embs = oc._encode_image(x)
    out = torch.full((x.shape[0], 1), 49406, dtype=torch.long)
    for _ in range(args.max_len - 1):
      logits = oc(x, out, image_latent=latent, image_embs=embs, output_labels=False)["logits"]
      out = torch.cat([out, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return out

  out = run()
  times = []
  for _ in range(args.repeats):
    t = time.perf_counter()
    run()
    times.append(time.perf_counter() - t)
  median = statistics.median(times)
  return {"bench": "coca_generate", "impl": "open_clip", "model": args.model,
          "batch": args.batch, "beams": 1, "max_len": int(out.shape[1]),
          "median_s": round(median, 4), "captions_per_s": round(args.batch / median, 2),
          "torch_threads": threads,
          # mmjax's greedy never emits padding (id 0) in a live caption; open_clip's may.
          "same_greedy_captions": sum(map(_agree, out.numpy().tolist(), greedy.tolist())),
          "captions": args.batch}


if __name__ == "__main__":
  hostmem.keep_freed_memory()   # timed as the launcher runs: mmjax/hostmem.py
  main()
