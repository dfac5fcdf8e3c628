"""Shared fixtures: one offline build of the embedded digits per test session, and `rng`.

`rng` is a NumPy Generator with a fresh seed every run; a failing test that used it prints
"replay with MMJAX_TEST_SEED=<seed>": set that environment variable to rerun with the same numbers.
"""

import os
import secrets

import jax
import numpy as np
import pytest

# Eight simulated CPU devices for the sharded tests; must precede any JAX op.
jax.config.update("jax_num_cpu_devices", 8)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """A TFDS data dir shared by the session's tests (digits are built into it on first use)."""
  d = tmp_path_factory.mktemp("tfds")
  return str(d)


os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

SEED_VAR = "MMJAX_TEST_SEED"


@pytest.fixture
def rng(request):
  """np.random.default_rng(seed): seed from $MMJAX_TEST_SEED, else fresh; printed if the test fails."""
  seed = int(os.environ[SEED_VAR]) if os.environ.get(SEED_VAR) else secrets.randbits(32)
  request.node._mmjax_seed = seed
  return np.random.default_rng(seed)


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
