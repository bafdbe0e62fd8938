"""pytest setup: 8 fake CPU devices, so every test exercises the sharded code paths."""

import os

os.environ.setdefault("XLA_FLAGS", "")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def data_dirs(tmp_path_factory):
  """The tiny synthetic ben-ge dataset, prepared once per test run (see tests/tiny_data.py)."""
  from tests import tiny_data  # pylint: disable=g-import-not-at-top
  return tiny_data.prepared(tmp_path_factory)
