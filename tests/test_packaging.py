"""The installable package: a wheel built from pyproject.toml holds the library and the dataset builder."""

import os
import pathlib
import shutil
import subprocess
import sys
import zipfile

import labeleff_jax

REPO = pathlib.Path(__file__).resolve().parent.parent


def test_wheel_installs_the_library_and_the_builder_importable_from_elsewhere(tmp_path):
  source, wheels = tmp_path / "source", tmp_path / "wheels"
  target, elsewhere = tmp_path / "site", tmp_path / "elsewhere"
  elsewhere.mkdir()
  # Built from a copy of what the package is made of (setuptools writes build/ and *.egg-info next to
  # the sources, which must not land in the checkout).
  source.mkdir()
  for name in ("pyproject.toml", "README.md"):
    shutil.copy(REPO / name, source / name)
  for name in ("labeleff_jax", "data_builders"):
    shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
  build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels),
                          str(source)], capture_output=True, text=True, timeout=600)
  assert build.returncode == 0, build.stderr[-3000:]
  (wheel,) = wheels.glob("labeleff_jax-*.whl")
  assert wheel.name.startswith(f"labeleff_jax-{labeleff_jax.__version__}-")
  names = zipfile.ZipFile(wheel).namelist()
  top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
  assert top_level == {"labeleff_jax", "data_builders"}  # no tests/, configs/ or benchmarks/
  assert "data_builders/ben_ge/CITATIONS.bib" in names and "labeleff_jax/cpu/convolutions.py" in names

  # Installed without dependencies next to this environment's ones, then imported from another folder:
  # the copies in `target` must be the ones found, and the builder must register with TFDS.
  install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                            str(wheel)], capture_output=True, text=True, timeout=600)
  assert install.returncode == 0, install.stderr[-3000:]
  script = (f"import sys; sys.path.insert(0, {str(target)!r})\n"
            "import labeleff_jax, data_builders.ben_ge as builder\n"
            "import tensorflow_datasets as tfds\n"
            "from labeleff_jax import train, models\n"
            "print(labeleff_jax.__file__); print(builder.__file__)\n"
            "print('ben_ge' in tfds.list_builders(with_community_datasets=False))\n")
  result = subprocess.run([sys.executable, "-c", script], cwd=elsewhere, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ""})
  assert result.returncode == 0, result.stderr[-3000:]
  library, builder, registered = result.stdout.split()
  assert pathlib.Path(library).is_relative_to(target) and pathlib.Path(builder).is_relative_to(target)
  assert registered == "True"
