"""The webdataset train iterator's bookkeeping, in-process and in seconds: the skip counts per
kind, the epoch and the max_skip_fraction budget, each against a walk of the shard sequence
or numbers worked out by hand, and through get_state / set_state at every batch, across an
epoch boundary, as an uninterrupted read has them (what tests/test_wds_train.py sees with
two processes and a SIGKILL, minutes later in the suite)."""

import json

import numpy as np
import pytest

from mmjax.data import wds
from mmjax.data import wds_pipeline as wp
from tests.test_wds import _RowTokenizer, _data, _jpeg

# How a sample is broken -> the kind it is counted as (data/skipped_<kind>).
DEFECTS = {"truncated_image": "image", "no_image": "image", "no_caption": "caption",
           "empty_caption": "caption", "caption_not_utf8": "caption"}


def _sample(rng, row, defect=None):
  s = {"__key__": f"{row:06d}", "jpg": _jpeg(rng, *rng.integers(20, 48, size=2)),
       "txt": f"caption {row}".encode()}
  if defect == "truncated_image":
    s["jpg"] = s["jpg"][:len(s["jpg"]) // 3]
  elif defect == "no_image":
    s["tif"] = s.pop("jpg")   # an image under an extension the run does not read
  elif defect == "no_caption":
    del s["txt"]
  elif defect == "empty_caption":
    s["txt"] = b"  \n"
  elif defect == "caption_not_utf8":
    s["txt"] = b"caption \xff\xfe"
  return s


def _write_shards(rng, tmp_path, n_shards, per, defects, cut=None):
  """Shards written by webdataset's TarWriter: rows s * per .. s * per + per - 1 in shard s,
  row r broken as defects[r]; shard `cut` truncated half way; then a file that is not a tar."""
  from tests.open_clip_peer import _patch_torchvision
  _patch_torchvision()   # webdataset imports torch where it is installed
  webdataset = pytest.importorskip("webdataset")
  paths = []
  for s in range(n_shards):
    path = str(tmp_path / f"{s:05d}.tar")
    with webdataset.TarWriter(path) as w:
      for row in range(s * per, (s + 1) * per):
        w.write(_sample(rng, row, defects.get(row)))
    if s == cut:
      data = open(path, "rb").read()
      open(path, "wb").write(data[:len(data) // 2])
    paths.append(path)
  if cut is not None:
    paths.append(str(tmp_path / "not_a.tar"))
    (tmp_path / "not_a.tar").write_bytes(rng.bytes(1500))
  return paths


def _random_defects(rng, rows, n):
  """{row: defect} for n random rows of range(rows), every defect at least once."""
  picked = rng.choice(rows, size=n, replace=False)
  kinds = list(DEFECTS) + list(rng.choice(list(DEFECTS), size=n - len(DEFECTS)))
  return {int(r): k for r, k in zip(picked, kinds)}


def _read(paths, data, batch, n, *, seed, state=None):
  """n batches read by a fresh iterator (from `state`): [(batch, metrics, JSON state)] after
  each, and the metrics right after set_state."""
  it = wp.make_train_iterator(paths, data, tokenizer=_RowTokenizer(), global_batch_size=batch,
                              seed=seed)
  try:
    if state is not None:
      it.set_state(json.loads(state))
    first = it.metrics()
    out = []
    for _ in range(n):
      out.append((next(it), it.metrics(), json.dumps(it.get_state())))
    return out, first
  finally:
    it.close()


def _walk(paths, seed, streams, per, defects, n_batches):
  """The reference: each stream's shard sequence (items k, k + streams, ... of ShardOrder) read
  in order with wds.read_shard, each sample classified by how it was written; per global
  batch, its rows (streams in order) and the metrics after it."""
  n = len(paths)
  order = wp.ShardOrder(paths, seed)

  def pulled(k):
    for item in range(k, 10 ** 6, streams):
      for sample, _ in wds.read_shard(order[item].path):
        kind = "tar" if "__skip__" in sample else DEFECTS.get(defects.get(int(sample["__key__"])))
        yield item / n, kind, None if kind else int(sample["__key__"])

  gens = [pulled(k) for k in range(streams)]
  counts, epoch, out = dict.fromkeys(wp.KINDS, 0), 0.0, []
  for _ in range(n_batches):
    rows = []
    for g in gens:
      got = 0
      while got < per:
        e, kind, row = next(g)
        epoch = max(epoch, e)
        if kind:
          counts[kind] += 1
        else:
          rows.append(row)
          got += 1
    out.append((rows, {"data/epoch": epoch, **{f"data/skipped_{k}": c for k, c in counts.items()}}))
  return out


def test_skip_counts_and_epoch_equal_a_walk_of_the_shard_sequence(rng, tmp_path):
  """Two streams, each reading its shards in order (no shuffle): every batch's rows, and the
  per-kind skip counts and the epoch after it, equal the reference walk's, through the
  first epoch boundary; every kind is met."""
  n_shards, per = 5, 6
  defects = _random_defects(rng, n_shards * per, 8)
  cut = int(rng.integers(n_shards))
  paths = _write_shards(rng, tmp_path, n_shards, per, defects, cut=cut)
  seed = int(rng.integers(1000))
  data = _data(streams=2, shard_cycle=1, shuffle_buffer=1, max_skip_fraction=0.9)
  n = 8
  got, first = _read(paths, data, 6, n, seed=seed)
  want = _walk(paths, seed, 2, 3, defects, n)
  assert first == {"data/epoch": 0.0, **{f"data/skipped_{k}": 0 for k in wp.KINDS}}
  for j, ((batch, metrics, _), (rows, ref)) in enumerate(zip(got, want)):
    assert batch["text"][:, 0].tolist() == rows, j
    assert metrics == ref, j
  final = want[-1][1]
  assert all(final[f"data/skipped_{k}"] > 0 for k in wp.KINDS), final
  assert final["data/epoch"] > 1, final   # the read crossed an epoch boundary


def test_resume_at_every_batch_reads_and_counts_as_the_uninterrupted_read(rng, tmp_path):
  """Shuffled, interleaved, two streams, broken samples of every kind: a JSON round trip of
  the state after any batch, into a fresh iterator, gives the metrics of that point (skip
  counts, epoch) and then the uninterrupted read's batches, metrics and states to the end,
  across the epoch boundary; so does a second resume one batch later; the epoch never goes
  down."""
  n_shards, per = 4, 6
  defects = _random_defects(rng, n_shards * per, 7)
  paths = _write_shards(rng, tmp_path, n_shards, per, defects, cut=int(rng.integers(n_shards)))
  seed = int(rng.integers(1000))
  data = _data(streams=2, shard_cycle=2, shuffle_buffer=5, max_skip_fraction=0.9)
  n = 9
  ref, _ = _read(paths, data, 4, n, seed=seed)
  epochs = [m["data/epoch"] for _, m, _ in ref]
  assert epochs == sorted(epochs) and int(epochs[0]) < int(epochs[-1]), epochs   # a boundary
  assert all(ref[-1][1][f"data/skipped_{k}"] > 0 for k in wp.KINDS), ref[-1][1]
  for i in range(n - 1):
    got, first = _read(paths, data, 4, n - 1 - i, seed=seed, state=ref[i][2])
    assert first == ref[i][1], i
    # And resumed once more, one batch later (a run preempted twice).
    twice, _ = _read(paths, data, 4, n - 2 - i, seed=seed, state=got[0][2])
    for j, ((b, m, s), (rb, rm, rs)) in enumerate(zip(got, ref[i + 1:]), i + 1):
      np.testing.assert_array_equal(b["text"], rb["text"], err_msg=f"resumed after {i}: {j}")
      np.testing.assert_array_equal(b["image"], rb["image"], err_msg=f"resumed after {i}: {j}")
      assert m == rm and s == rs, (i, j)
    for j, ((b, m, _), (rb, rm, _)) in enumerate(zip(twice, ref[i + 2:]), i + 2):
      np.testing.assert_array_equal(b["text"], rb["text"], err_msg=f"resumed after {i}, {i + 1}: {j}")
      assert m == rm, (i, j)


def test_epoch_is_the_furthest_position_read_so_far(rng, tmp_path):
  """One shard of 6 rows in shuffle windows of 5: a window never holds a row twice, so a row's
  k-th appearance is from epoch k, and windows straddle epochs, so a batch (of one) may come
  from an earlier epoch than the one before it. data/epoch after each batch is the furthest
  epoch of any row read so far, never less."""
  paths = _write_shards(rng, tmp_path, 1, 6, {})
  data = _data(streams=1, shard_cycle=1, shuffle_buffer=5)
  got, _ = _read(paths, data, 1, 16, seed=0)
  seen, batch_epochs = {}, []
  for batch, _, _ in got:
    row = int(batch["text"][0, 0])
    seen[row] = seen.get(row, -1) + 1
    batch_epochs.append(seen[row])
  furthest = [max(batch_epochs[:j + 1]) for j in range(len(batch_epochs))]
  assert batch_epochs != furthest, batch_epochs   # the case this test is for: a step back
  assert [m["data/epoch"] for _, m, _ in got] == furthest


# One shard of 12 rows, read in order, 3 good samples a batch: worked out by hand,
#   batch 0 pulls rows 0-3        good 3, bad 1 (row 1: image)           bad share 1/4
#   batch 1 pulls rows 4-6        good 6, bad 1                          1/7
#   batch 2 pulls 7-11, epoch 1's row 0: good 9, bad 4 (+ 7, 9 caption; 8 image)   4/13
#   batch 3 pulls rows 1-4        good 12, bad 5                         5/17
#   batch 4 pulls rows 5-10       good 15, bad 8                         8/23
BUDGET_DEFECTS = {1: "truncated_image", 7: "no_caption", 8: "no_image", 9: "empty_caption"}


def test_max_skip_fraction_is_a_budget_over_the_whole_read_across_resumes(rng, tmp_path):
  """max_skip_fraction=1/4: batch 0's share is exactly 1/4 and passes (more than the share
  stops); batch 2's 4/13 stops the run, uninterrupted and resumed after batch 0 or 1 alike
  (the counts carried over, not reset), with the same message. 0.35: five batches pass (the
  highest share 8/23), resumed at any batch too."""
  paths = _write_shards(rng, tmp_path, 1, 12, BUDGET_DEFECTS)
  seed = int(rng.integers(1000))
  data = _data(streams=1, shard_cycle=1, shuffle_buffer=1, max_skip_fraction=0.25)
  ok, _ = _read(paths, data, 3, 2, seed=seed)
  assert [m for _, m, _ in ok] == [
      {"data/epoch": 0.0, "data/skipped_image": 1, "data/skipped_caption": 0, "data/skipped_tar": 0}
  ] * 2
  with pytest.raises(wp.DataError) as stop:
    _read(paths, data, 3, 3, seed=seed)
  msg = str(stop.value)
  assert "max_skip_fraction=0.25: 4 of the 13 samples and shards read were bad" in msg, msg
  assert "image 2 (first: " in msg and "000001.jpg" in msg and "caption 2 (first: " in msg, msg
  for i in range(2):
    with pytest.raises(wp.DataError) as resumed:
      _read(paths, data, 3, 2 - i, seed=seed, state=ok[i][2])
    assert str(resumed.value) == msg, i
  data.max_skip_fraction = 0.35
  ref, _ = _read(paths, data, 3, 5, seed=seed)
  assert ref[-1][1] == {"data/epoch": 1.0, "data/skipped_image": 4, "data/skipped_caption": 4,
                        "data/skipped_tar": 0}
  for i in range(4):
    got, _ = _read(paths, data, 3, 4 - i, seed=seed, state=ref[i][2])
    assert [(m, s) for _, m, s in got] == [(m, s) for _, m, s in ref[i + 1:]], i


def test_a_resumed_wds_run_logs_the_uninterrupted_runs_skip_counts(data_dir, tmp_path):
  """The launcher's loop on damaged digits shards, one process: resumed from its step-2
  checkpoint, every step's data/skipped_<kind> and data/epoch, its losses and its final
  checkpoint's data position equal the uninterrupted run's (tests/test_wds_train.py: the
  same with two processes and a SIGKILL)."""
  import os
  import shutil
  from mmjax.train import loop
  from tests.configs import tiny_config
  from tests.test_nonfinite import _cut_back, _rows, _saved
  from tests.wds_digits import corrupt_shards, wds_overrides, write_digits_shards
  shards = write_digits_shards(data_dir, str(tmp_path / "shards"), shard_size=20)
  corrupt_shards(shards["train"], every=1)
  config = lambda: tiny_config(data_dir, total_steps=4, **{
      "checkpoint.every": 2, "data.shuffle_buffer": 16, "data.shard_cycle": 2,
      "data.label_key": "", "evaluate.retrieval_match": "pair", **wds_overrides(shards)})
  ref, workdir = str(tmp_path / "ref"), str(tmp_path / "resumed")
  loop.train(config(), ref)
  shutil.copytree(ref, workdir)
  _cut_back(workdir, 2)
  assert loop.train(config(), workdir)["resumed_from_step"] == 2
  want, got = _rows(ref), _rows(workdir)
  keys = ["loss", "data/epoch"] + [f"data/skipped_{k}" for k in wp.KINDS]
  assert sorted(got) == sorted(want) == [1, 2, 3, 4]
  assert [[got[s][k] for k in keys] for s in got] == [[want[s][k] for k in keys] for s in got]
  assert want[4]["data/skipped_image"] > 0 and want[4]["data/skipped_caption"] > 0, want[4]
  assert _saved(workdir, 4)[1] == _saved(ref, 4)[1]
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "4"))
