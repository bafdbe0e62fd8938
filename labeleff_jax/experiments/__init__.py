"""Label-efficiency experiments: runners that train many configs and turn their summaries into tables.

An experiment config (e.g. `configs/sweep_label_fraction.py`) names its runner in `config.experiment`;
`main.py` then calls `run(config, workdir)` here instead of training a single model.
"""

import pathlib

import ml_collections

from labeleff_jax.experiments import label_fraction_sweep
from labeleff_jax.experiments import modality_ablation

RUNNERS = {
    "label_fraction_sweep": label_fraction_sweep.run,
    "modality_ablation": modality_ablation.run,
}


def run(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, **kwargs) -> dict:
  """Runs the experiment `config.experiment` into `workdir`; returns its results (paths, rows, markdown)."""
  name = config.get("experiment", None)
  if name not in RUNNERS:
    raise ValueError(f"config.experiment={name!r} is not a runner; choose one of {sorted(RUNNERS)}")
  return RUNNERS[name](config, workdir, **kwargs)
