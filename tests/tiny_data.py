"""A tiny prepared synthetic ben-ge dataset shared by every test worker of one pytest run."""

import fcntl
import pathlib

NUM_PATCHES = 48  # the `tiny` configs' size: 36 / 6 / 6 patches by the builder's split rule
SPLIT_SIZES = {"train": 36, "validation": 6, "test": 6}
NAME = "ben-ge-800"


def prepared(tmp_path_factory) -> dict:
  """{'data_dir', 'manual_dir'} of the tiny dataset, written and prepared once (file-locked across workers)."""
  from data_builders.ben_ge import ben_ge, synthetic  # pylint: disable=g-import-not-at-top
  # xdist gives each worker its own base temp (.../pytest-N/popen-gwK): share their parent, one per run.
  base = pathlib.Path(tmp_path_factory.getbasetemp())
  root = (base.parent if base.name.startswith("popen-gw") else base) / "tiny-ben-ge"
  root.mkdir(parents=True, exist_ok=True)
  manual_dir, data_dir = root / "manual", root / "tfds"
  with open(root / ".lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not (manual_dir / NAME).exists():
      synthetic.write_dataset(manual_dir, name=NAME, num_patches=NUM_PATCHES, seed=0)
    ben_ge.prepare(manual_dir, data_dir, NAME)
  return {"data_dir": str(data_dir), "manual_dir": str(manual_dir)}


def point_at(config, data_dirs: dict):
  """Points `config` at the tiny prepared dataset; returns it for chaining."""
  config.data.data_dir = data_dirs["data_dir"]
  config.data.manual_dir = data_dirs["manual_dir"]
  return config
