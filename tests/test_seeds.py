"""Replayable randomness: `rng` (tests/conftest.py) draws from one seed per run and the test's id:
the same numbers for the same $MMJAX_TEST_SEED (with or without xdist), other numbers in another
test; the run ends by printing its seed, and a failing test's report says it too."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

INNER = '''
import json, os

def _record(rng, name):
  draws = rng.random(4).tolist() + rng.integers(0, 1 << 30, 3).tolist()
  with open(os.environ["DRAWS"] + "." + name, "w") as f:
    json.dump(draws, f)
  return draws

def test_passes(rng):
  _record(rng, "passes")

def test_fails(rng):
  assert _record(rng, "fails")[0] > 2
'''


def _run(tmp_path: Path, seed: str | None, name: str, xdist: bool = False):
  """Pytest on INNER with a copy of the real conftest; returns ({test: its draws}, report)."""
  env = {k: v for k, v in os.environ.items()
         if k not in ("MMJAX_TEST_SEED", "PYTEST_ADDOPTS") and not k.startswith("PYTEST_XDIST")}
  env["DRAWS"] = str(tmp_path / f"{name}.json")
  env["JAX_PLATFORMS"] = "cpu"
  if seed is not None:
    env["MMJAX_TEST_SEED"] = seed
  workers = ["-n", "2"] if xdist else ["-p", "no:xdist"]
  proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *workers,
                         "-p", "no:randomly", str(tmp_path / "test_inner.py")],
                        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
  out = proc.stdout + proc.stderr
  assert proc.returncode == 1, out                  # test_draws passes, test_fails fails
  assert "1 failed, 1 passed" in out, out
  draws = {t: json.loads((tmp_path / f"{name}.json.{t}").read_text()) for t in ("passes", "fails")}
  return draws, out


@pytest.fixture
def inner(tmp_path):
  shutil.copy(Path(__file__).with_name("conftest.py"), tmp_path / "conftest.py")
  (tmp_path / "test_inner.py").write_text(INNER)
  return tmp_path


def test_printed_seed_replays_the_draws(inner):
  # Unset: each test draws from a fresh seed, and the failing one names its seed.
  fresh, out = _run(inner, None, "fresh")
  seeds = re.findall(r"replay with MMJAX_TEST_SEED=(\d+)", out)
  assert len(seeds) == 1, out                       # only the failing test reports a seed
  assert f"mmjax test seed {seeds[0]} (replay the run" in out   # the run's summary line
  assert fresh["passes"] != fresh["fails"]          # one seed per run, other numbers per test
  # Set to that seed: the failing test draws the same numbers, again and again.
  replay, out2 = _run(inner, seeds[0], "replay")
  again, _ = _run(inner, seeds[0], "again")
  assert replay["fails"] == fresh["fails"] == again["fails"]
  assert replay["passes"] == again["passes"]
  assert f"replay with MMJAX_TEST_SEED={seeds[0]}" in out2
  # Under xdist the workers take the controller's seed: the same numbers as one process.
  spread, out3 = _run(inner, seeds[0], "xdist", xdist=True)
  assert spread == replay, out3
  # Another seed, other numbers.
  other, _ = _run(inner, str(int(seeds[0]) + 1), "other")
  assert other["fails"] != fresh["fails"]
