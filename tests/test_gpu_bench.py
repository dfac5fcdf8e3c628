"""benchmarks/gpu.sh end to end in its --quick mode on this CPU, and run_points' failure handling.

The quick run checks what the rows say, not only that they parse: TFLOP/s are the FLOP count
over the median time, the losses of dense, tiled and pallas blocks equal a float64 NumPy loss
of the same embeddings, cuDNN is a "skipped: no GPU" row here, the train step's loss is finite.
"""

import json
import math
import os
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from benchmarks import run_points
from benchmarks.attention import attention_flops
from benchmarks.loss_memory import embeddings
from tests.reference import ref_clip, ref_siglip

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
  out = tmp_path_factory.mktemp("gpu_bench")
  t0 = time.time()
  r = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu.sh"), str(out), "--quick"],
                     cwd=ROOT, env={**os.environ, "PYTHON": sys.executable}, capture_output=True,
                     text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  with open(out / "bench.jsonl") as f:
    lines = f.read().splitlines()
  rows = [json.loads(line) for line in lines]   # every line is one JSON object
  by = {}
  for row in rows:
    by.setdefault(row["benchmark"], []).append(row)
  return {"rows": by, "summary": (out / "summary.md").read_text(), "wall_s": time.time() - t0,
          "stdout": r.stdout}


def test_quick_env_and_tests_rows(quick):
  (env,) = quick["rows"]["env"]
  assert env["backend"] == jax.default_backend() == "cpu"
  (tests,) = quick["rows"]["tests"]
  assert tests["rc"] == "0" and "skipped" in tests["summary"], tests   # no kernels on a CPU


def test_quick_attention_rows(quick):
  rows = quick["rows"]["attention"]
  seen = {(r["impl"], r["mode"], r["causal"]) for r in rows}
  assert seen == {(i, m, c) for i in ("pallas", "cudnn", "xla") for m in ("fwd", "fwd_bwd")
                  for c in (False, True)}
  for r in rows:
    assert "error" not in r, r
    if r["impl"] == "cudnn":
      assert r["skipped"].startswith("no GPU"), r
      continue
    flops = attention_flops(r["batch"], r["seq"], r["heads"], r["head_dim"], r["causal"],
                            r["mode"])
    assert r["batch"] == max(1, 256 // r["seq"]) and r["heads"] * r["head_dim"] == 128
    assert r["tflop_per_s"] == pytest.approx(flops / r["median_s"] / 1e12, rel=1e-9)
    assert r["median_s"] > 0 and r["compiled_peak_mib"] > 0 and r["dtype"] == "bfloat16"
  causal = {r["causal"]: r["tflop"] for r in rows if (r["impl"], r["mode"]) == ("xla", "fwd")}
  assert causal[True] == pytest.approx(causal[False] / 2)   # the causal count is halved


def test_quick_loss_rows_match_float64(quick):
  rows = quick["rows"]["loss_memory"]
  assert {(r["loss"], r["blocks"]) for r in rows} == {
      (loss, b) for loss in ("siglip", "clip") for b in ("dense", "tiled", "pallas")}
  r0 = rows[0]
  x, y = (np.asarray(a, np.float64) for a in embeddings(r0["batch"], r0["dim"], r0["dtype"]))
  want = {"siglip": ref_siglip(x, y, 10.0, -10.0)[0], "clip": ref_clip(x, y, 10.0)[0]}
  for r in rows:
    assert "error" not in r, r
    assert r["loss_value"] == pytest.approx(want[r["loss"]], rel=1e-5), r
    assert r["per_device_peak_mib"] > 0 and r["median_s"] > 0


def test_quick_train_rows(quick):
  rows = quick["rows"]["train_step"]
  runs = [r for r in rows if not r.get("summary")]
  (summary,) = [r for r in rows if r.get("summary")]
  assert [r["attention_impl"] for r in runs] == ["auto"] and runs[0]["loss"] == "siglip"
  r = runs[0]
  assert r["samples_per_second"] == pytest.approx(r["batch"] / r["step_s"])
  assert math.isfinite(r["final_loss"]) and r["tflop_per_step"] > 0
  assert set(summary["matmul_peak_gflop_per_second"]) == {"float32", "bfloat16"}


def test_quick_summary_tables(quick):
  md = quick["summary"]
  for head in ("## Attention TFLOP/s", "## Contrastive loss + grad", "## Train step",
               "| seq | batch | pallas fwd |", "| loss | batch | dense | tiled | pallas |"):
    assert head in md, head
  assert md in quick["stdout"]   # the script ends by printing it


def test_run_points_keeps_failures_to_their_point():
  pts = [{"kind": "ok", "value": 1}, {"kind": "oom"}, {"kind": "die", "value": 7},
         {"kind": "ok", "value": 2}]
  rows = run_points("tests.bench_child", pts, fresh=False, budget_s=None, quiet=True)
  assert [r["kind"] for r in rows] == ["ok", "oom", "die", "ok"]
  assert rows[0]["value"] == 1 and rows[3]["value"] == 2   # the child restarted after "die"
  assert rows[1]["oom"] is True and "RESOURCE_EXHAUSTED" in rows[1]["error"]
  assert rows[2]["error"].startswith("exit status 3") and rows[2]["measured_before_dying"] == 7
  assert rows[2]["oom"] is False


def test_run_points_budget_kills_a_hang_and_skips_the_rest():
  t0 = time.time()
  rows = run_points("tests.bench_child", [{"kind": "ok"}, {"kind": "hang"}, {"kind": "ok"}],
                    fresh=True, budget_s=8, quiet=True)
  assert time.time() - t0 < 60
  assert "value" in rows[0]
  assert rows[1]["error"].startswith("killed at the part's time budget")
  assert "skipped" in rows[2]


def test_run_points_on_row_drops_points():
  pts = [{"kind": "oom"}, {"kind": "ok", "value": 1}, {"kind": "ok", "value": 2}]
  rows = run_points("tests.bench_child", pts, fresh=True, budget_s=None, quiet=True,
                    on_row=lambda r: ([pts[2]], "after an OOM") if r.get("oom") else None)
  # the dropped point's row comes at once, then the rest run
  assert [(r.get("value"), "error" in r, r.get("skipped")) for r in rows] == [
      (None, True, None), (2, False, "after an OOM"), (1, False, None)]
