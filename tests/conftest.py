"""pytest setup: 8 fake CPU devices, so every test exercises the sharded code paths."""

import os

os.environ.setdefault("XLA_FLAGS", "")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the whole suite, its worker processes and the subprocesses it starts:
# many tests compile the same tiny models, and compiling dominates them on a 2-core CPU. Cached executables
# are the very programs a fresh compile gives, so no result depends on it.
_CACHE_DIR = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"labeleff_jax_tests_xla_cache_{os.getuid()}")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE_DIR)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def data_dirs(tmp_path_factory):
  """The tiny synthetic ben-ge dataset, prepared once per test run (see tests/tiny_data.py)."""
  from tests import tiny_data  # pylint: disable=g-import-not-at-top
  return tiny_data.prepared(tmp_path_factory)
