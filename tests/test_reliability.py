"""Failures a real run meets, each reproduced first: a diverged run, broken and foreign
checkpoints, a finished workdir, data without labels, bad paths and fields, NaN embeddings."""

import csv
import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tests.configs import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _launch(*args, env=None, cwd=ROOT, timeout=300):
  return subprocess.run([sys.executable, "-m", "experiments.train", *args], cwd=cwd,
                        capture_output=True, text=True, timeout=timeout,
                        env={**os.environ, **(env or {})})


def _tiny_flags(data_dir, workdir, *more):
  """The launcher's flags for tiny_config's model (mu towers, one block each)."""
  return ["--config", os.path.join(ROOT, "experiments/configs/siglip_digits.py"),
          "--workdir", workdir, f"--config.data.data_dir={data_dir}",
          "--config.model.image.variant=mu/8", "--config.model.text.variant=mu",
          "--config.model.image.depth=1", "--config.model.text.depth=1",
          "--config.model.embed_dim=16", "--config.batch_size=16", "--config.total_steps=12",
          "--config.log_every=2", "--config.optim.warmup_steps=2",
          "--config.checkpoint.every=4", "--config.evaluate.every=0",
          "--config.evaluate.probes=False", *more]


def _one_error_line(proc, *needles):
  assert proc.returncode != 0, proc.stdout[-2000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("mmjax: error: "), proc.stderr[-3000:]
  for n in needles:
    assert n in last, last
  return last


def _steps(workdir):
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


# ------------------------------------------------------------------ a diverged run

def test_diverged_run_stops_at_the_bad_step_and_keeps_good_checkpoints(tmp_path):
  """lr=1e6 used to train on in NaN, save NaN checkpoints over the good ones and score
  1.0 everywhere. Now: exit 1 at the first non-finite step, one line, the newest
  checkpoint is older and finite, no results.json. (A cold data dir: no TFDS noise.)"""
  data_dir, workdir = str(tmp_path / "data"), str(tmp_path / "run")
  proc = _launch(*_tiny_flags(data_dir, workdir, "--config.optim.lr=1e6",
                              "--config.checkpoint.every=1", "--config.evaluate.probes=False"))
  last = _one_error_line(proc, "loss is nan at step", "lr ", "grad_norm ")
  bad = int(re.search(r"at step (\d+)", last).group(1))
  assert 1 < bad < 12
  assert not os.path.exists(os.path.join(workdir, "results.json"))
  assert max(_steps(workdir)) == bad - 1          # every step saved: the last good one stays
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(r) for r in f]
  assert rows and all(np.isfinite(r["loss"]) for r in rows) and rows[-1]["step"] < bad
  from mmjax.train import checkpoint
  params, step = checkpoint.load_params(workdir)
  import jax
  assert step == bad - 1 and all(np.isfinite(x).all() for x in jax.tree.leaves(params))
  out = proc.stdout + proc.stderr
  for noise in ("Downloading and preparing", "OpenCV", "dataset_info.json", "Generating"):
    assert noise not in out, out[-3000:]
  assert "mmjax: preparing dataset 'mmjax_digits'" in proc.stdout


def test_train_step_leaves_the_state_unchanged_on_a_non_finite_loss(data_dir):
  """The guard inside the jitted step: a NaN batch changes nothing but the step count."""
  import jax
  import jax.numpy as jnp
  from mmjax.train import loop
  from mmjax.train import state as state_lib
  built = loop.build(tiny_config(data_dir))
  state = built.init_state()
  step = jax.jit(state_lib.make_train_step(built.objective, built.tx, schedule=built.schedule))
  batch = {k: jnp.asarray(v) for k, v in next(built.data_iter).items()
           if k in built.objective.batch_keys}
  batch = state_lib.images_to_float(batch)   # uint8 from the source: a NaN needs floats
  bad = {**batch, "image": batch["image"].at[0, 0, 0, 0].set(jnp.nan)}
  before = jax.tree.map(np.asarray, (state.params, state.opt_state))
  after, m = step(state, bad)
  assert not bool(m["finite"]) and not np.isfinite(float(m["loss"]))
  assert int(after.step) == int(state.step) + 1
  for x, y in zip(jax.tree.leaves(before), jax.tree.leaves((after.params, after.opt_state))):
    np.testing.assert_array_equal(x, np.asarray(y))
  # The optimizer's own count (its lr schedule) did not advance either: its first good
  # step has lr 0 in warmup, the next one moves the params.
  after3, m3 = step(*step(after, batch)[:1], batch)
  assert bool(m3["finite"])
  assert any(not np.array_equal(x, np.asarray(y))
             for x, y in zip(jax.tree.leaves(before[0]), jax.tree.leaves(after3.params)))


def test_nan_policy_skip_counts_and_stops_after_the_limit(data_dir, tmp_path):
  from mmjax.train import loop
  config = tiny_config(data_dir, nan_policy="skip", nan_skip_limit=3,
                       **{"optim.lr": 1e6, "evaluate.probes": False})
  with pytest.raises(loop.NonFiniteError, match=r"3 non-finite steps in a row .*nan_skip_limit=3"):
    loop.train(config, str(tmp_path))
  with open(tmp_path / "metrics.jsonl") as f:
    rows = [json.loads(r) for r in f]
  assert all("skipped_steps" in r for r in rows)
  assert not (tmp_path / "results.json").exists()


# ------------------------------------------------------------------ checkpoints

@pytest.fixture(scope="module")
def finished(tmp_path_factory, data_dir):
  """A finished 8-step run (checkpoints at 4 and 8), its console output and results."""
  from mmjax.train import loop
  workdir = str(tmp_path_factory.mktemp("finished"))
  config = tiny_config(data_dir, total_steps=8, **{"evaluate.every": 4, "evaluate.probes": False})
  import contextlib
  import io
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    results = loop.train(config, workdir)
  return workdir, out.getvalue(), results


def test_console_prints_each_evaluation_and_a_summary(finished):
  workdir, out, results = finished
  assert re.search(r"^mmjax: step 4 eval: zeroshot_top1 [\d.]+, retrieval_i2t_r1", out, re.M), out
  assert f"mmjax: results: {os.path.join(workdir, 'results.json')}" in out
  assert f"mmjax: curves: {os.path.join(workdir, 'curves.png')}" in out
  assert f"zeroshot_top1 {results['zeroshot_top1']:.3f}" in out.split("mmjax: done")[1]


def test_finished_workdir_is_reported_and_left_unchanged(finished, data_dir, tmp_path, capsys):
  workdir, _, _ = finished
  from mmjax.train import loop
  copy = str(tmp_path / "w")
  shutil.copytree(workdir, copy)
  files = {n: open(os.path.join(copy, n), "rb").read() for n in ("results.json", "metrics.jsonl")}
  results = loop.train(tiny_config(data_dir, total_steps=8), copy)
  assert "is complete (step 8 of 8)" in capsys.readouterr().out
  assert results["steps"] == 8 and results["examples_per_sec"] is not None
  for n, content in files.items():
    assert open(os.path.join(copy, n), "rb").read() == content, n
  with pytest.raises(ValueError, match=r"config.total_steps=6.*finished 8 steps"):
    loop.train(tiny_config(data_dir, total_steps=6), copy)


def test_broken_newest_checkpoint_falls_back_to_the_older_one(finished, data_dir, tmp_path,
                                                              capsys):
  """A truncated array file in the newest checkpoint: one warning line naming its
  directory, resume from the older step, train on to a larger total_steps. An orphan
  temporary directory of an interrupted save is removed."""
  from mmjax.train import loop
  workdir = str(tmp_path / "w")
  shutil.copytree(finished[0], workdir)
  os.remove(os.path.join(workdir, "results.json"))
  assert _steps(workdir)[-2:] == [4, 8]
  d = os.path.join(workdir, "checkpoints", "8", "state", "ocdbt.process_0", "d")
  biggest = max((os.path.join(d, n) for n in os.listdir(d)), key=os.path.getsize)
  with open(biggest, "r+b") as f:
    f.truncate(100)
  orphan = os.path.join(workdir, "checkpoints", "9.orbax-checkpoint-tmp-1234")
  os.makedirs(orphan)
  results = loop.train(tiny_config(data_dir, total_steps=12), workdir)
  out = capsys.readouterr().out
  warnings = [ln for ln in out.splitlines() if "warning" in ln]
  assert len(warnings) == 1, out
  assert os.path.join(workdir, "checkpoints", "8") in warnings[0]
  assert "does not restore" in warnings[0] and "trying step 4" in warnings[0]
  assert results["resumed_from_step"] == 4 and results["steps"] == 12
  assert not os.path.exists(orphan)
  assert os.path.isdir(os.path.join(workdir, "checkpoints.broken", "8"))   # kept, not deleted
  # The run goes on checkpointing at the configured steps, step 8 again included.
  assert _steps(workdir) == [8, 12]
  from mmjax.train import checkpoint
  assert checkpoint.load_params(workdir)[1] == 12


def test_no_restorable_checkpoint_is_one_error_naming_the_workdir(finished, data_dir, tmp_path,
                                                                  capsys):
  from mmjax.train import loop
  workdir = str(tmp_path / "w")
  shutil.copytree(finished[0], workdir)
  os.remove(os.path.join(workdir, "results.json"))
  rng = np.random.default_rng(0)
  for step in _steps(workdir):
    with open(os.path.join(workdir, "checkpoints", str(step), "state", "_METADATA"), "wb") as f:
      f.write(rng.bytes(64))
  with pytest.raises(ValueError, match=rf"no checkpoint in {re.escape(repr(workdir))} restores"):
    loop.train(tiny_config(data_dir, total_steps=12), workdir)
  warnings = [ln for ln in capsys.readouterr().out.splitlines() if "warning" in ln]
  assert len(warnings) == len(os.listdir(os.path.join(workdir, "checkpoints.broken"))) >= 2


def test_workdir_of_another_model_names_the_parameter(finished, data_dir):
  from mmjax.train import loop
  with pytest.raises(ValueError, match=r"holds a different model: params\.img_proj\.kernel is "
                                       r"\(\d+, 16\) in its checkpoint .* \(\d+, 24\) in this"):
    loop.train(tiny_config(data_dir, total_steps=12, **{"model.embed_dim": 24}), finished[0])


# ------------------------------------------------------------------ own data, config, paths

def _folder(root, n, size=40, seed=0):
  """n random PNGs and a captions.csv (no labels) under root."""
  from PIL import Image
  rng = np.random.default_rng(seed)
  os.makedirs(root, exist_ok=True)
  with open(os.path.join(root, "captions.csv"), "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["image", "caption"])
    for i in range(n):
      Image.fromarray(rng.integers(0, 255, (size, size + 8, 3), dtype=np.uint8)).save(
          os.path.join(root, f"{i}.png"))
      w.writerow([f"{i}.png", f"a picture of thing {i % 7} in color {i % 3}"])


def _docs_section(doc, title):
  text = open(os.path.join(ROOT, doc), encoding="utf-8").read()
  return text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_docs_own_data_recipe_runs_as_written(tmp_path):
  """docs/data.md's 'Your own data' recipe, its python and its command, on a generated
  folder: it used to train and then fail with KeyError: 'label' in the final evaluation.
  Only total_steps and warmup_steps are shortened for the test."""
  section = _docs_section("docs/data.md", "Your own data")
  code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
  command = re.search(r"```bash\n(.*?)```", section, re.S).group(1).replace("\\\n", " ")
  _folder(str(tmp_path / "my_pics"), n=72)
  env = {"HOME": str(tmp_path)}
  subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True, timeout=300,
                 env={**os.environ, **env, "PYTHONPATH": ROOT})
  args = [a.replace("~", str(tmp_path)) for a in shlex.split(command)]
  assert args[:3] == ["python", "-m", "experiments.train"], args
  args = [a.replace("experiments/configs/", os.path.join(ROOT, "experiments/configs/"))
          for a in args[3:]]
  proc = _launch(*args, "--config.total_steps=3", "--config.optim.warmup_steps=1", env=env,
                 timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "has no labels" in proc.stdout and "zero-shot" in proc.stdout
  workdir = next(a.split("=", 1)[1] if "=" in a else args[i + 1]
                 for i, a in enumerate(args) if a.startswith("--workdir"))
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  assert 0 <= results["retrieval_i2t_r1"] <= 1 and "zeroshot_top1" not in results


@pytest.fixture(scope="module")
def folder_data(tmp_path_factory):
  from mmjax.data.image_folder import build_image_text_folder
  root = tmp_path_factory.mktemp("folder")
  _folder(str(root / "pics"), n=24)
  ddir = str(root / "data")
  build_image_text_folder(str(root / "pics" / "captions.csv"), data_dir=ddir, name="pics",
                          image_size=32)
  return ddir


@pytest.mark.parametrize("fields,match", [
    ({}, r"config.data.label_key='label': dataset 'pics' has no such feature"),
    ({"data.label_key": ""}, r"config.evaluate.retrieval_match='label' needs labels"),
])
def test_labels_the_dataset_lacks_fail_before_compiling(folder_data, tmp_path, fields, match):
  from mmjax.train import loop
  config = tiny_config(folder_data, **{"data.name": "pics", "batch_size": 8, **fields})
  with pytest.raises(ValueError, match=match):
    loop.build(config)


@pytest.mark.parametrize("key,value", [
    ("evaluate.every", -1), ("log_every", 0), ("checkpoint.every", 0), ("checkpoint.keep", 0),
    ("nan_skip_limit", 0), ("nan_policy", "ignore"),
])
def test_bad_counts_and_policies_name_the_field(key, value):
  from mmjax.train import config as config_lib
  config = tiny_config("/nonexistent", **{key: value})
  with pytest.raises(ValueError, match=rf"^config\.{re.escape(key)} must be"):
    config_lib.validate(config)


def test_missing_config_file_is_one_line(tmp_path):
  proc = _launch("--config", "experiments/configs/no_such.py", "--workdir", str(tmp_path))
  _one_error_line(proc, "--config 'experiments/configs/no_such.py': no such file")


@pytest.mark.skipif(not os.path.isdir("/sys/kernel"), reason="needs /sys: a path nobody can write")
@pytest.mark.parametrize("which", ["workdir", "data_dir"])
def test_unwritable_paths_are_one_line(tmp_path, data_dir, which):
  ro = "/sys/kernel/mmjax_test"     # not writable, even by root
  workdir, ddir = (ro, data_dir) if which == "workdir" else (str(tmp_path), ro)
  proc = _launch(*_tiny_flags(ddir, workdir))
  _one_error_line(proc, "--workdir '/sys/kernel" if which == "workdir"
                  else "config.data.data_dir='/sys/kernel")


# ------------------------------------------------------------------ evaluators

def _nan_rows(rng, n, d, rows):
  x = rng.normal(size=(n, d)).astype(np.float32)
  x[rows] = np.nan
  return x


def test_evaluators_refuse_non_finite_embeddings(rng):
  """All-NaN embeddings used to score zero-shot 1.0 and every recall 1.0."""
  from mmjax.evaluate import (knn_accuracy, linear_probe_accuracy, retrieval_recall,
                              zeroshot_accuracy)
  n, d = 30, 8
  good = rng.normal(size=(n, d)).astype(np.float32)
  labels = rng.integers(0, 3, n)
  bad = _nan_rows(rng, n, d, [1, 5, 7])
  with pytest.raises(ValueError, match=r"retrieval_recall: 3 of 30 rows of img_emb are not finite"):
    retrieval_recall(bad, good)
  with pytest.raises(ValueError, match=r"retrieval_recall: 30 of 30 rows of txt_emb"):
    retrieval_recall(good, np.full((n, d), np.nan, np.float32))
  with pytest.raises(ValueError, match=r"zeroshot_accuracy: 3 of 30 rows of img_emb"):
    zeroshot_accuracy(bad, good[:3], labels)
  inf = good.copy()
  inf[2, 0] = np.inf
  with pytest.raises(ValueError, match=r"zeroshot_accuracy: 1 of 3 rows of class_emb"):
    zeroshot_accuracy(good, inf[:3], labels)
  with pytest.raises(ValueError, match=r"knn_accuracy: 3 of 30 rows of train_x"):
    knn_accuracy(bad, labels, good, labels)
  with pytest.raises(ValueError, match=r"linear_probe_accuracy: 3 of 30 rows of test_x"):
    linear_probe_accuracy(good, labels, bad, labels)
  assert 0 <= retrieval_recall(good, good)["i2t_r1"] <= 1


def test_tilde_paths_expand_in_the_equals_form_too(tmp_path):
  """`--workdir=~/run` (the shell expands `~` only at the start of a word, so it arrives
  unexpanded) writes to $HOME/run, as `--workdir ~/run` and config.data.data_dir do, not to a
  literal ./~/run."""
  home, cwd = tmp_path / "home", tmp_path / "cwd"
  home.mkdir()
  cwd.mkdir()
  flags = _tiny_flags("~/data", "unused", "--config.total_steps=2",
                      "--config.optim.warmup_steps=1")
  i = flags.index("--workdir")
  flags[i:i + 2] = ["--workdir=~/run"]
  proc = _launch(*flags, env={"HOME": str(home), "PYTHONPATH": ROOT}, cwd=cwd)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert (home / "run" / "results.json").exists() and (home / "data").is_dir()
  assert not (cwd / "~").exists()
