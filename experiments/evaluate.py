r"""Zero-shot classification or image-text retrieval of a checkpoint (CLIP_benchmark's protocol).

  python -m experiments.evaluate --checkpoint hf:/ckpt/siglip-base-patch16-224 \
      --dataset folder:/data/imagenet/val --templates openai --output imagenet.json
  python -m experiments.evaluate --checkpoint big_vision:/ckpt/webli_en_b16_224.npz \
      --tokenizer sentencepiece:/ckpt/c4_en.model --dataset tfds:cifar10 --split test

Classification (a dataset with class labels): one embedding per class, the templates' text
embeddings averaged and re-normalised; acc1, acc5 and the mean per-class recall (balanced
accuracy). Retrieval (images with one or more captions each, CLIP_benchmark's retrieval
sets: one caption per line of a sample's .txt): image->text and text->image recall@1/5/10,
each caption a text that goes with its own image (an image counts as found by any of its
captions). Images stream through in fixed-size
batches (running sums: memory does not grow with the dataset for classification; retrieval
keeps one embedding per example). The JSON result goes to --output (written only when the
whole evaluation succeeded) and to stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np

from mmjax import hostmem


def _towers(ckpt):
  """(embed_image, embed_text, variables) of a converted two-tower checkpoint: the hooks the
  evaluators call as fn(variables, x)."""
  import jax
  from mmjax.models import two_tower
  model = two_tower.Model(**ckpt.config)
  return (lambda v, x: model.apply(v, x, method="encode_image"),
          lambda v, t: model.apply(v, t, method="encode_text"),
          jax.device_put(ckpt.variables))   # an open_clip ResNet: its BatchNorm statistics too


class _Clock:
  """Images per second of the streaming loop after its first batch (which compiles)."""

  def __init__(self):
    self.start, self.images, self.end = None, 0, None

  def tick(self, batch):
    now = time.time()
    if self.start is None:
      self.start = now
    else:
      self.images += int(np.sum(batch["valid"]))
    self.end = now

  def rate(self) -> float | None:
    if not self.images:
      return None   # one batch: nothing measured after the compile
    return self.images / max(self.end - self.start, 1e-9)


def evaluate(checkpoint: str, dataset: str, *, split: str = "test", data_dir: str | None = None,
             templates: str | None = None, tokenizer: str | None = None, batch_size: int = 64,
             limit: int | None = None, num_threads: int = 4, progress: bool = True,
             max_patches: int | None = None) -> dict:
  """Evaluates `checkpoint` (a mmjax.convert.load spec, or 'workdir:/run[@step]') on `dataset`
  (mmjax.data.eval_data.open_eval_set spec); returns the result dict. templates: None takes
  the dataset's own (a CLIP_benchmark webdataset folder's), else OpenAI's 80. max_patches: a
  NaFlex checkpoint's sequence length (patches per image; default its own)."""
  import jax
  from tqdm import tqdm
  from mmjax.train import export
  from mmjax.data import eval_data, tokenizers
  from mmjax.evaluate import evaluators, streaming
  t0 = time.time()
  ds = eval_data.open_eval_set(dataset, split=split, data_dir=data_dir)
  temps = None
  if ds.class_names:
    if templates is None and ds.templates:
      temps, templates = ds.templates, "dataset"
    else:
      templates = templates or "openai"
      temps = eval_data.load_templates(templates, class_names=ds.class_names,
                                       dataset=eval_data.dataset_keys(ds.name))
  ckpt = export.load(checkpoint)   # a converter's spec, or a run's 'workdir:/path[@step]'
  if max_patches is not None:
    if not hasattr(ckpt.preprocess, "max_patches"):
      raise ValueError(f"--max_patches={max_patches}: checkpoint {checkpoint!r} is not a NaFlex "
                       "model (its images have a fixed size)")
    ckpt = ckpt._replace(preprocess=ckpt.preprocess._replace(max_patches=max_patches))
  tok = tokenizers.tokenizer_for_tower(tokenizer, checkpoint_spec=ckpt.tokenizer,
                                       vocab_size=ckpt.config["text"]["vocab_size"],
                                       field="--tokenizer")
  embed_image, embed_text, variables = _towers(ckpt)
  n = len(ds.source) if limit is None else min(limit, len(ds.source))
  clock = _Clock()

  def batches(b: int):
    stream = tqdm(eval_data.eval_batches(ds, ckpt.preprocess, b, limit=limit,
                                         num_threads=num_threads),
                  total=math.ceil(n / b), unit="batch", disable=not progress,
                  desc=f"mmjax: evaluating on {ds.name}", file=sys.stderr)
    for batch in stream:
      yield batch
      clock.tick(batch)

  fields = ["label"] if ds.class_names else ["text"]
  images = streaming.Embedded(streaming.Split(batches, fields), jax.jit(embed_image), batch_size)
  texts = streaming.Texts(jax.jit(embed_text), batch_size, tok, ckpt.config["text"]["max_len"])
  # The trainer's evaluators (mmjax.evaluate.evaluators), on a stream of the dataset.
  if ds.class_names:
    metrics = evaluators.ZeroShot(images, texts, ds.class_names, temps).counts(variables).result()
    task = "zeroshot_classification"
  else:
    r = evaluators.Retrieval(evaluators.Pairs(images, texts, "pair")).recall(variables)
    metrics = {f"image_retrieval_recall@{k}": r[f"t2i_r{k}"] for k in (1, 5, 10)}
    metrics.update({f"text_retrieval_recall@{k}": r[f"i2t_r{k}"] for k in (1, 5, 10)})
    metrics["n"], task = r["n"], "zeroshot_retrieval"
  out = {"checkpoint": checkpoint, "dataset": ds.name, "split": split, "task": task,
         "metrics": metrics, "tokenizer": tok.spec, "image_size": ckpt.preprocess.size,
         "max_patches": getattr(ckpt.preprocess, "max_patches", None),
         "images_per_second": clock.rate(), "seconds": time.time() - t0}
  if temps is not None:
    prompts = (sum(map(len, temps.values())) if isinstance(temps, dict)
               else len(temps) * len(ds.class_names))
    out.update(templates=templates, num_prompts=prompts, num_classes=len(ds.class_names),
               num_templates=None if isinstance(temps, dict) else len(temps))
  return out


def _check_positive(args, *names: str) -> None:
  """ValueError naming the first of `names` that is set and not a positive integer."""
  for name in names:
    value = getattr(args, name)
    if value is not None and value < 1:
      raise ValueError(f"--{name}={value}: must be a positive integer")


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m experiments.evaluate", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--checkpoint", required=True,
                 help="hf:/dir | big_vision:/path.npz | open_clip:MODEL_NAME:/path | "
                 "workdir:/path/to/run[@STEP] (an mmjax training run)")
  p.add_argument("--dataset", required=True,
                 help="tfds:NAME | folder:/path | a directory | wds:/dir (CLIP_benchmark's "
                 "webdataset layout: <dir>/<split>/*.tar, classnames.txt) | wds:SHARD_SPEC")
  p.add_argument("--split", default="test",
                 help="the TFDS split, or a wds folder's subfolder (default: test)")
  p.add_argument("--data_dir", default=None, help="TFDS data dir (default: $MMJAX_DATA_DIR "
                 "or ~/.cache/mmjax/datasets)")
  p.add_argument("--templates", default=None,
                 help="openai (80) | simple (7) | a file, one template per line naming the "
                 "class as '{c}' (CLIP_benchmark's) or '{}' | a JSON file as CLIP_benchmark's "
                 "--custom_template_file: a list, per-class prompts {class: [prompt, ...]}, or "
                 "either under the dataset's name (default: the dataset's own, else openai)")
  p.add_argument("--tokenizer", default=None, help="override the checkpoint's tokenizer spec")
  p.add_argument("--batch_size", type=int, default=64)
  p.add_argument("--limit", type=int, default=None, help="the first N examples only")
  p.add_argument("--num_threads", type=int, default=4, help="image decoding threads")
  p.add_argument("--max_patches", type=int, default=None,
                 help="a NaFlex (SigLIP 2) checkpoint's sequence length: patches per image, "
                 "each image resized to at most that many at its aspect ratio (default: the "
                 "checkpoint's preprocessor_config.json, else 256)")
  p.add_argument("--output", default=None, help="write the result JSON here")
  p.add_argument("--no_progress", action="store_true")
  a = p.parse_args(argv)
  try:
    _check_positive(a, "batch_size", "limit", "num_threads", "max_patches")
    result = evaluate(a.checkpoint, a.dataset, split=a.split, data_dir=a.data_dir,
                      templates=a.templates, tokenizer=a.tokenizer, batch_size=a.batch_size,
                      limit=a.limit, num_threads=a.num_threads, progress=not a.no_progress,
                      max_patches=a.max_patches)
  except (ValueError, ImportError, OSError) as e:   # OSError: an unreadable image file
    print(f"mmjax: error: {e}", file=sys.stderr)
    return 1
  text = json.dumps(result, indent=2)
  print(text, flush=True)   # first: a file that cannot be written must not cost the result
  if a.output:
    try:
      write_atomically(os.path.expanduser(a.output), text + "\n")
    except OSError as e:
      print(f"mmjax: error: --output {a.output}: {e.strerror or e}", file=sys.stderr)
      return 1
  return 0


def write_atomically(path: str, text: str) -> None:
  """Writes text to path (its folders made) through a temporary file beside it and os.replace:
  path holds the old or the new text, never a part; the temporary file is removed on failure."""
  parent = os.path.dirname(os.path.abspath(path))
  if not os.path.lexists(parent):   # a file there: open() below says 'Not a directory'
    os.makedirs(parent, exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  try:
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(text)
    os.replace(tmp, path)
  except BaseException:
    if os.path.lexists(tmp):
      os.remove(tmp)
    raise


if __name__ == "__main__":
  hostmem.keep_freed_memory()   # process-wide malloc tuning, before JAX starts: mmjax/hostmem.py
  from mmjax.data import pipeline   # after the malloc tuning: it imports TFDS
  pipeline.quiet_tfds_noise()   # process-wide logging, the launcher's to set
  sys.exit(main())
