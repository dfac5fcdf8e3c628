"""Shared fixtures: one offline build of the embedded digits per test session, and `rng`.

One seed per run (fresh, or $MMJAX_TEST_SEED), printed at the end of the run; each test's `rng`
is a NumPy Generator seeded from (that seed, the test's id), so tests draw different numbers
and the same ones again for the same seed, with or without xdist. A failing test that used
`rng` prints "replay with MMJAX_TEST_SEED=<seed>".
"""

import os
import secrets
import shutil
import tempfile
import zlib

# XLA's CPU backend at LLVM optimisation level 0 unless XLA_FLAGS says otherwise: compiling is
# most of a tiny run's time, and a tiny training run takes ~2/3 of the time (measured: 24.7 s at
# the default level, 16.5 s at 0). The same programs, less optimised machine code; the numbers
# the tests check are computed by the same HLO. Set before JAX makes its CPU client; the
# processes the tests start inherit it. XLA_FLAGS=--xla_backend_optimization_level=N picks
# another level (XLA's default is 3).
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_backend_optimization_level=0").strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

# Eight simulated CPU devices for the sharded tests; must precede any JAX op.
jax.config.update("jax_num_cpu_devices", 8)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """A TFDS data dir shared by the session's tests (digits are built into it on first use)."""
  d = tmp_path_factory.mktemp("tfds")
  return str(d)


os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

SEED_VAR = "MMJAX_TEST_SEED"


CACHE_VAR = "JAX_COMPILATION_CACHE_DIR"


def pytest_configure(config):
  """The run's seed: the controller's (xdist workers get it in workerinput), else $MMJAX_TEST_SEED,
  else fresh. And one JAX compilation cache per run, shared by the workers and the processes the
  tests start: most end-to-end tests compile the same tiny train step (a hit skips ~80% of a
  tiny run's wall time); a fresh directory, removed at the end, so no run reuses another's."""
  worker = getattr(config, "workerinput", {})
  if SEED_VAR in worker:
    seed = int(worker[SEED_VAR])
  elif os.environ.get(SEED_VAR):
    seed = int(os.environ[SEED_VAR])
  else:
    seed = secrets.randbits(32)
  config._mmjax_run_seed = seed
  if CACHE_VAR in worker:
    cache = worker[CACHE_VAR]
  else:
    cache = config._mmjax_cache = tempfile.mkdtemp(prefix="mmjax-test-jax-cache-")
  # The environment for the subprocesses (launcher, multi-host, notebooks); the config for this one.
  os.environ.update({CACHE_VAR: cache, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
                     "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"})
  jax.config.update("jax_compilation_cache_dir", cache)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_unconfigure(config):
  if hasattr(config, "_mmjax_cache"):
    shutil.rmtree(config._mmjax_cache, ignore_errors=True)


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):   # xdist, on the controller: every worker gets the seed and cache
  node.workerinput[SEED_VAR] = node.config._mmjax_run_seed
  node.workerinput[CACHE_VAR] = node.config._mmjax_cache


def pytest_terminal_summary(terminalreporter, config):
  if not hasattr(config, "workerinput"):
    seed = config._mmjax_run_seed
    terminalreporter.write_line(f"mmjax test seed {seed} (replay the run with {SEED_VAR}={seed})")


@pytest.fixture
def rng(request):
  """np.random.default_rng from (the run's seed, this test's id); the seed is printed if it fails."""
  seed = request.config._mmjax_run_seed
  request.node._mmjax_seed = seed
  return np.random.default_rng([seed, zlib.crc32(request.node.nodeid.encode())])


@pytest.fixture
def torch_seed(rng):
  """torch's global RNG seeded from `rng` (so from the same printed seed); returns that seed."""
  torch = pytest.importorskip("torch")
  seed = int(rng.integers(2**31))
  torch.manual_seed(seed)
  return seed


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
  outcome = yield
  rep = outcome.get_result()
  seed = getattr(item, "_mmjax_seed", None)
  if rep.failed and seed is not None:
    rep.sections.append(("mmjax seed", f"replay with {SEED_VAR}={seed}"))
