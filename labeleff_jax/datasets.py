"""Finding, preparing and opening the ben-ge splits an experiment needs.

A run needs the prepared TFDS dataset `data.name` under `data.data_dir`. When it is missing, the run
prepares it from `data.manual_dir` (the extracted folder or the `.tar.gz`); configs with `data.synthetic`
first write a synthetic ben-ge folder there. Everything else fails with the command that fixes it.
"""

import json
import os
import pathlib

from absl import logging
import jax
import ml_collections
import numpy as np

from labeleff_jax.data import pipeline

SPLITS = ("train", "validation", "test")


def is_synthetic(config: ml_collections.ConfigDict) -> bool:
  return bool(config.data.get("synthetic", None))


def ensure_prepared(config: ml_collections.ConfigDict) -> pathlib.Path:
  """Returns the prepared dataset directory, preparing it first when needed (process 0 only)."""
  # Imported here: the builders pull in rasterio and tfds' writer, which plain training never needs.
  from data_builders.ben_ge import ben_ge as builder_lib  # pylint: disable=g-import-not-at-top

  data_dir = pathlib.Path(config.data.data_dir).expanduser()
  name = config.data.name
  prepared = builder_lib.dataset_dir(data_dir, name)
  if (prepared / "dataset_info.json").exists():
    return prepared
  manual_dir = pathlib.Path(config.data.manual_dir).expanduser()
  if is_synthetic(config) and not (manual_dir / name).exists():
    from data_builders.ben_ge import synthetic  # pylint: disable=g-import-not-at-top
    logging.info("writing synthetic %s (%d patches) into %s", name, config.data.synthetic.num_patches,
                 manual_dir)
    if jax.process_index() == 0:
      synthetic.write_dataset(manual_dir, name=name, num_patches=config.data.synthetic.num_patches,
                              seed=config.data.synthetic.get("seed", 0), workers=min(2, os.cpu_count() or 1))
  if not ((manual_dir / name).exists() or (manual_dir / f"{name}.tar.gz").exists()):
    raise FileNotFoundError(
        f"dataset {name!r} is not prepared under {data_dir} and {manual_dir} holds neither {name}/ nor "
        f"{name}.tar.gz. Download the archive (see data_builders/ben_ge/README.md) into {manual_dir}, or "
        f"run: python -m data_builders.ben_ge.build --manual_dir {manual_dir} --data_dir {data_dir} "
        f"--config {name}")
  if jax.process_index() == 0:
    prepared = builder_lib.prepare(manual_dir, data_dir, name)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices("ben_ge prepared")
  return prepared


def open_splits(config: ml_collections.ConfigDict) -> dict:
  """Random-access data sources of the train, validation and test splits."""
  ensure_prepared(config)
  return {split: pipeline.open_split(config, split) for split in SPLITS}


def normalization_stats(config: ml_collections.ConfigDict, train_source, workdir: pathlib.Path):
  """Train-split statistics for `data.normalization='standardize'` (None for the reference constants).

  Kept in the workdir, so a resumed run normalises exactly like the run it continues.
  """
  if config.data.get("normalization", "reference") == "reference":
    return None
  path = workdir / "normalization.json"
  if path.exists():
    return json.loads(path.read_text())
  stats = pipeline.normalization_stats(config, train_source)
  if jax.process_index() == 0:
    path.write_text(json.dumps(stats, indent=2) + "\n")
  return stats
