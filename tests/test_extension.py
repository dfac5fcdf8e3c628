"""The extension points, proven: a data source, an image tower and an objective, each defined
and registered in this file (nothing in the package knows them), trained end to end through
the launcher `python -m experiments.train` with checkpoints, an exact resume and an
evaluation. This file is also the run's config file (`get_config`), as a researcher's own
config file would define and register their pieces beside the config.

And the package's side of the bargain: the loop, the train step and the evaluators name no
objective and no data format.
"""

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import objectives
from mmjax.data import sources
from mmjax.models import factory, image as image_lib
from mmjax.nn.linear import Dense

ROOT = pathlib.Path(__file__).parents[1]
N_CLASSES = 4


# ---------------------------------------------------------------- a data source

def _stripes(rng, n: int, size: int) -> list[dict]:
  """n examples: class k is a grey card with horizontal stripes of period k + 2 (uint8), noisy,
  captioned 'stripes of width k'."""
  labels = rng.integers(0, N_CLASSES, n)
  rows = np.arange(size)[None, :, None, None]
  images = ((rows % (labels[:, None, None, None] + 2)) == 0) * 160.0 + 40.0
  images = np.clip(images + rng.normal(0, 20, (n, size, size, 3)), 0, 255).astype(np.uint8)
  return [{"image": x, "text": f"stripes of width {k}", "label": int(k)}
          for x, k in zip(images, labels)]


class _StripeBatches:
  """Batch t of seeded permutations (one per epoch), this process's rows; its state is t."""

  def __init__(self, records, data, *, tokenizer, global_batch_size, seed, process_index,
               process_count, views, caption_fields):
    self.records, self.text_len, self.tok, self.seed = records, data.text_len, tokenizer, seed
    self.local = global_batch_size // process_count
    self.batch, self.first, self.t = global_batch_size, process_index * self.local, 0

  def __next__(self) -> dict:
    n = len(self.records)
    take = []
    for p in range(self.t * self.batch + self.first, self.t * self.batch + self.first + self.local):
      epoch, i = divmod(p, n)
      take.append(self.records[np.random.default_rng([self.seed, epoch]).permutation(n)[i]])
    self.t += 1
    return {"image": np.stack([r["image"] for r in take]),
            "text": self.tok.encode([r["text"] for r in take], self.text_len),
            "label": np.array([r["label"] for r in take], np.int32)}

  def get_state(self) -> dict:
    return {"t": self.t}

  def set_state(self, state: dict) -> None:
    self.t = state["t"]


@sources.register("ext_stripes")
class Stripes(sources.DataSource):
  features = {"image": "image", "text": "text", "label": "label"}
  templates = ["stripes of width {}"]
  tokenizer_name = "ext_stripes"

  def __init__(self, data, data_dir):
    rng = np.random.default_rng(0)
    self.train, self.test = _stripes(rng, 96, data.image_size), _stripes(rng, 32, data.image_size)

  def class_names(self, label_key):
    return [str(k) for k in range(N_CLASSES)] if label_key else None

  def eval_source(self):
    return self.test

  def train_records(self, limit, *, decode=True):
    return self.train[:limit]

  def train_iterator(self, data, **kw):
    return _StripeBatches(self.train, data, **kw)


# ---------------------------------------------------------------- an image tower

class RowConv(nn.Module):
  """image [b, H, W, 3] -> (pooled [b, width], {'encoded': [b, H * W, width]}): one 3 x 1
  convolution (it sees rows: stripes) and a mean."""
  width: int = 16
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, image, *, train: bool = False):
    x = nn.relu(nn.Conv(self.width, (3, 1), dtype=self.dtype, param_dtype=self.param_dtype)(
        image.astype(self.dtype)))
    tokens = x.reshape(x.shape[0], -1, self.width)
    return tokens.mean(1), {"encoded": tokens}


def _row_conv_config(variant=None, *, width=None, dtype=jnp.float32, param_dtype=jnp.float32,
                     **ignored):
  """The tower's complete fields; the runtime settings it has no use for (remat, scan, ...)
  are dropped."""
  return dict(width=width or 16, dtype=dtype, param_dtype=param_dtype)


image_lib.register(image_lib.ImageTower(
    "ext_row_conv", claims=lambda variant, fields: variant == "ext_row_conv",
    config=_row_conv_config, module=RowConv))


# ---------------------------------------------------------------- an objective

class _BagOfWords(nn.Module):
  image: dict
  vocab_size: int

  def setup(self):
    self.img = image_lib.Tower(self.image)
    self.head = Dense(self.vocab_size, name="head")

  def __call__(self, image, *, train: bool = False):
    pooled, _ = self.img(image, train=train)
    return pooled, self.head(pooled)


@objectives.register("ext_bag_of_words")
class BagOfWords(objectives.Objective):
  """The image predicts which token ids its caption holds (sigmoid cross-entropy over the
  vocabulary, padding excluded), weighted by config.ext_bag_of_words.positive_weight."""
  settings_path = "ext_bag_of_words"

  @staticmethod
  def default_settings():
    return dict(positive_weight=2.0)

  @classmethod
  def check_config(cls, config):
    if not config.ext_bag_of_words.positive_weight > 0:
      raise ValueError("config.ext_bag_of_words.positive_weight must be > 0; got "
                       f"{config.ext_bag_of_words.positive_weight!r}")

  def __init__(self, config, context):
    self.weight = config.ext_bag_of_words.positive_weight
    self.model = _BagOfWords(image=factory.tower_config(config, "image"),
                             vocab_size=context.vocab_size)

  def init_variables(self, rng, batch):
    return self.model.init(rng, batch["image"])

  def grad_fn(self, params, ema, batch, rng, batch_stats=None):
    words = jax.nn.one_hot(batch["text"], self.model.vocab_size).max(1).at[:, 0].set(0.0)

    def loss(p):
      _, logits = self.model.apply({"params": self._freeze(p)}, batch["image"], train=True)
      per = -(self.weight * words * jax.nn.log_sigmoid(logits)
              + (1 - words) * jax.nn.log_sigmoid(-logits))
      return per.mean(), {}
    return jax.value_and_grad(loss, has_aux=True)(params)

  def features(self, variables, image):
    return self.model.apply(variables, image)[0]


# ---------------------------------------------------------------- the run's config

def get_config(data_dir: str = "/tmp/mmjax_ext_data"):
  from tests.configs import tiny_config
  c = tiny_config(data_dir, **{
      "data.name": "ext_stripes", "loss": "ext_bag_of_words", "total_steps": 6,
      "checkpoint.every": 2, "checkpoint.keep": 3, "evaluate.probes": True,
      "evaluate.probe_train_examples": 64, "evaluate.probe_shots": (), "evaluate.knn_k": 5,
      "evaluate.retrieval_match": "pair"})
  c.model.image.variant = "ext_row_conv"
  c.model.image.width = 8
  return c


def _launch(workdir, data_dir, *overrides):
  out = subprocess.run(
      [sys.executable, "-m", "experiments.train", "--config", f"{__file__}:{data_dir}",
       "--workdir", str(workdir), *overrides],
      cwd=ROOT, capture_output=True, text=True, timeout=600,
      env={**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 0, out.stderr[-3000:]
  return out


def test_a_source_tower_and_objective_defined_here_train_through_the_launcher(tmp_path):
  """The launcher trains the three pieces of this file by name: 6 steps with checkpoints at
  2, 4, 6; results.json has the probes' numbers (features from the new tower through the new
  objective, on the new source's labels); cut back to its step-2 checkpoint, the resumed run
  repeats steps 3-6 with the uninterrupted run's losses and results."""
  from tests.test_resume import _cut_back, _losses
  data_dir, ref, resumed = tmp_path / "data", tmp_path / "ref", tmp_path / "resumed"
  _launch(ref, data_dir)
  with open(ref / "results.json") as f:
    results = json.load(f)
  assert results["steps"] == 6 and results["loss"] == "ext_bag_of_words"
  for key in ("linear_probe_top1", "knn_top1"):
    assert 0.0 <= results[key] <= 1.0, key
  assert "zeroshot_top1" not in results   # no text tower: the evaluators skip what needs one
  with open(ref / "config.json") as f:
    saved = json.load(f)
  assert saved["model"]["image"]["variant"] == "ext_row_conv"
  assert saved["ext_bag_of_words"] == {"positive_weight": 2.0}
  assert sorted(int(n) for n in os.listdir(ref / "checkpoints") if n.isdigit()) == [2, 4, 6]
  losses = _losses(ref)
  assert [s for s, _ in losses] == list(range(1, 7)) and losses[-1][1] < losses[0][1]
  shutil.copytree(ref, resumed)
  _cut_back(str(resumed), 2)
  _launch(resumed, data_dir, "--config.ext_bag_of_words.positive_weight=2.0")
  assert _losses(resumed) == losses
  with open(resumed / "results.json") as f:
    again = json.load(f)
  assert again["resumed_from_step"] == 2
  assert {k: again[k] for k in ("linear_probe_top1", "knn_top1")} == {
      k: results[k] for k in ("linear_probe_top1", "knn_top1")}


def test_the_pieces_are_checked_where_they_are_built():
  """The objective's own config rule runs in config.validate, naming its field; the new tower
  and source are found by name."""
  from mmjax.train import config as config_lib
  c = get_config()
  config_lib.validate(c)
  assert sources.get(c.data) is Stripes and objectives.get(c.loss) is BagOfWords
  assert image_lib.config(variant="ext_row_conv", width=4)["tower"] == "ext_row_conv"
  c.ext_bag_of_words.positive_weight = 0.0
  with pytest.raises(ValueError, match=r"^config.ext_bag_of_words.positive_weight must be > 0"):
    config_lib.validate(c)


# ---------------------------------------------------------------- what the package knows

# Where no objective, no data format and no image tower kind may be named: the loop, the train
# step, the evaluators.
GENERIC = ["mmjax/train/loop.py", "mmjax/train/state.py", "mmjax/evaluate/evaluator.py",
           "mmjax/evaluate/evaluators.py", "mmjax/evaluate/streaming.py"]
NAMES = ["clip", "siglip", "mae", "moco", "catlip", "coca", "wds", "webdataset", "tfds",
         "image2", "targets", "naflex"]   # naflex: an image tower kind with its own batches


def _code(path: pathlib.Path) -> str:
  """The file without comments and docstrings: identifiers and string literals only."""
  import ast
  import io
  import tokenize
  src = path.read_text()
  docs = {(n.body[0].lineno, n.body[0].col_offset) for n in ast.walk(ast.parse(src))
          if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
          and n.body and isinstance(n.body[0], ast.Expr)
          and isinstance(getattr(n.body[0], "value", None), ast.Constant)}
  keep = [t.string for t in tokenize.generate_tokens(io.StringIO(src).readline)
          if t.type not in (tokenize.COMMENT,) and (t.start not in docs)]
  return " ".join(keep)


@pytest.mark.parametrize("path", GENERIC)
def test_the_loop_step_and_evaluators_name_no_objective_or_data_format(path):
  code = _code(ROOT / path).lower()
  found = [n for n in NAMES if re.search(rf"(?<![a-z0-9]){n}(?![a-z0-9])", code)]
  assert not found, f"{path} names {found}"


def test_the_name_check_finds_a_name(tmp_path):
  """The check above can fail: a line that branches on a format is found, while the same
  name in a docstring or a comment is not."""
  probe = tmp_path / "probe.py"
  probe.write_text('"""Doc naming wds is fine."""\nif name == "wds":  # and coca here\n  pass\n')
  code = _code(probe).lower()
  assert re.search(r"(?<![a-z0-9])wds(?![a-z0-9])", code)
  assert "coca" not in code and "doc naming" not in code


def test_a_launch_validates_and_checks_the_workdir_once(tmp_path, monkeypatch):
  """loop.train: config.validate (the key check, every component's rules) and the
  finished-workdir check each run once per launch."""
  from mmjax.train import config as config_lib, loop
  calls = {"validate": 0, "finished": 0}
  validate, finished = config_lib.validate, loop._finished

  def count(name, fn):
    def counted(*a, **kw):
      calls[name] += 1
      return fn(*a, **kw)
    return counted
  monkeypatch.setattr(config_lib, "validate", count("validate", validate))
  monkeypatch.setattr(loop, "_finished", count("finished", finished))
  loop.train(get_config(str(tmp_path / "data")), str(tmp_path / "run"))
  assert calls == {"validate": 1, "finished": 1}
