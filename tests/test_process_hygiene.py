"""The library leaves the process alone: importing it or building a model changes no environment variable,
re-executes nothing and starts no backend of its own choosing."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Prints a marker first: a re-executed interpreter would print it twice.
PROBE = """
import json, os, sys
print("started", flush=True)
before = dict(os.environ)
import labeleff_jax, labeleff_jax.train, labeleff_jax.experiments, labeleff_jax.data.pipeline
from flax import nnx
from labeleff_jax import models
from configs import quickstart
model = models.create_model(quickstart.get_config("tiny"), rngs=nnx.Rngs(0))
after = dict(os.environ)
print(json.dumps({"added": sorted(set(after) - set(before)), "removed": sorted(set(before) - set(after)),
                  "changed": sorted(k for k in before if k in after and before[k] != after[k])}))
"""


def test_import_and_model_construction_leave_the_environment_unchanged():
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "GLIBC_TUNABLES", "LD_PRELOAD")}
  env["JAX_PLATFORMS"] = "cpu"
  result = subprocess.run([sys.executable, "-c", PROBE], env=env, cwd=REPO, capture_output=True, text=True,
                          check=True, timeout=300)
  lines = result.stdout.strip().splitlines()
  assert lines.count("started") == 1, result.stdout  # no re-execution
  assert json.loads(lines[-1]) == {"added": [], "removed": [], "changed": []}
