"""Training from webdataset shards: the digits written as shards and damaged (truncated
images, missing captions, a truncated shard, a file that is not a tar) train the same on one
process x 2 devices and on two processes x 1 device (config.data.streams=2: the same global
batches), and the two processes, one SIGKILLed after step 5, resume with the uninterrupted
run's per-step losses and skip counts."""

import json
import os
import time

import numpy as np
import pytest

from tests.configs import tiny_config
from tests.test_multihost import _launch
from tests.wds_digits import corrupt_shards, wds_overrides, write_digits_shards

OVERRIDES = {"data.streams": 2, "data.shuffle_buffer": 32, "data.shard_cycle": 2,
             "total_steps": 6, "checkpoint.every": 3, "data.label_key": "",
             "evaluate.retrieval_match": "pair"}


@pytest.fixture(scope="module")
def damaged_shards(data_dir, tmp_path_factory):
  out = tmp_path_factory.mktemp("digits_wds")
  shards = write_digits_shards(data_dir, str(out), shard_size=60)
  return shards, corrupt_shards(shards["train"])


def _rows(workdir):
  """{step: metrics row} of the train steps (a resumed run's rows replace the dead run's)."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r for r in map(json.loads, f) if "loss" in r}


def test_damaged_shards_train_alike_on_one_and_two_processes_and_resume_after_sigkill(
    damaged_shards, data_dir, tmp_path):
  from mmjax.train import loop
  shards, damaged = damaged_shards
  overrides = {**OVERRIDES, **wds_overrides(shards)}
  loop.train(tiny_config(data_dir, num_devices=2, **overrides), str(tmp_path / "one"))
  two = str(tmp_path / "two")
  procs = _launch(data_dir, two, die_at=5, devices=1, overrides=overrides)
  procs[1].wait(timeout=600)
  assert procs[1].returncode == -9, procs[1].communicate()[0][-3000:]
  died = time.time()
  out = procs[0].communicate(timeout=240)[0]
  assert procs[0].returncode != 0, out[-3000:]
  assert time.time() - died < 180
  assert not os.path.exists(os.path.join(two, "results.json"))
  procs = _launch(data_dir, two, devices=1, overrides=overrides)
  outs = [p.communicate(timeout=600)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outs)
  with open(os.path.join(two, "results.json")) as f:
    assert json.load(f)["resumed_from_step"] in (1, 3)
  ref, got = _rows(tmp_path / "one"), _rows(two)
  assert sorted(got) == sorted(ref) == list(range(1, 7))
  np.testing.assert_allclose([got[s]["loss"] for s in ref], [ref[s]["loss"] for s in ref],
                             rtol=2e-4, atol=2e-5)
  kinds = ("image", "caption", "tar")
  for s in ref:   # the same batches: the same skips, step by step, summed over the processes
    assert [got[s][f"data/skipped_{k}"] for k in kinds] == [
        ref[s][f"data/skipped_{k}"] for k in kinds], s
  final = ref[6]
  assert final["data/skipped_image"] > 0 and final["data/skipped_caption"] > 0, final
  assert all(final[f"data/skipped_{k}"] <= damaged[k] * 2 for k in kinds)   # <= 2 epochs' worth
  assert 0 < final["data/epoch"] < 2
