"""benchmarks/naflex_packing.py at minimal flags: one JSON object a mode plus a summary, with
the fields docs/performance.md quotes, and token counts that agree with the batch shape."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIELDS = ("mode", "cap", "padding_share", "images_per_step", "real_tokens_per_step", "step_s",
          "real_tokens_per_s", "images_per_s", "compiled_peak_mib", "params_m", "backend",
          "command")


def test_naflex_packing_prints_json_rows():
  cmd = [sys.executable, "-m", "benchmarks.naflex_packing", "--rows", "2", "--seq_len", "64",
         "--caps", "16", "--lookaheads", "4", "--variant", "mu", "--depth", "1",
         "--batches", "2", "--repeats", "1", "--steps_per_sample", "1", "--stream", "100"]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
                     check=False)
  assert r.returncode == 0, r.stderr[-2000:]
  rows = [json.loads(line) for line in r.stdout.strip().splitlines()]
  assert [row.get("mode") for row in rows[:-1]] == ["padded", "packed"]
  for row in rows[:-1]:
    missing = [f for f in FIELDS if f not in row]
    assert not missing, missing
    assert 0.0 <= row["padding_share"] < 1.0
    assert row["step_s"] > 0 and row["compiled_peak_mib"] > 0
    tokens = row["rows"] * row["seq_len"]
    assert abs(row["real_tokens_per_step"] - (1 - row["padding_share"]) * tokens) < 1e-6
  padded, packed = rows[:2]
  assert padded["images_per_step"] == 2            # one image a row
  assert packed["mean_patches_per_image"] <= 16    # the cap holds
  assert packed["images_per_step"] > padded["images_per_step"]
  summary = rows[-1]
  assert summary["summary"] is True
  ratios = summary["packed_cap16_lookahead4"]
  assert set(ratios) >= {"padding_share", "real_tokens_per_s_vs_padded",
                         "images_per_step_vs_padded", "under_5pct_padding"}
