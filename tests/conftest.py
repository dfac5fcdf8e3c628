"""Shared fixtures: one offline build of the embedded digits per test session."""

import os

import jax
import pytest

# Eight simulated CPU devices for the sharded tests; must precede any JAX op.
jax.config.update("jax_num_cpu_devices", 8)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """A TFDS data dir shared by the session's tests (digits are built into it on first use)."""
  d = tmp_path_factory.mktemp("tfds")
  return str(d)


os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
