"""Runs one experiment: `python main.py --config configs/NAME.py[:ARGS] --workdir DIR [--config.a.b=V]`.

All logic lives in `labeleff_jax.train.train_and_evaluate`; this file only parses flags. Running it again
on the same workdir resumes from the latest checkpoint.
"""

import logging as std_logging
import os

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", "configs/quickstart.py", "Experiment config file.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, plots and the summary.")
flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() (multi-host TPU/GPU slices; "
                  "set automatically when JAX_COORDINATOR_ADDRESS is in the environment).")


class _QuietLibraries(std_logging.Filter):
  """Drops the INFO chatter of orbax and tfds (every checkpoint write) and keeps their warnings."""

  def filter(self, record):
    noisy = any(part in record.pathname for part in ("/orbax/", "/tensorflow_datasets/"))
    return record.levelno >= std_logging.WARNING or not noisy


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  import jax  # pylint: disable=g-import-not-at-top
  if flags.FLAGS.multihost or os.environ.get("JAX_COORDINATOR_ADDRESS"):
    jax.distributed.initialize()
  from labeleff_jax import train  # pylint: disable=g-import-not-at-top
  config = flags.FLAGS.config
  workdir = flags.FLAGS.workdir or os.path.join("workdirs", "run")
  logging.info("devices: %s", jax.devices())
  if config.get("experiment", None):  # a runner of many trainings (label-fraction sweep, modality ablation)
    from labeleff_jax import experiments  # pylint: disable=g-import-not-at-top
    results = experiments.run(config, workdir)
    if jax.process_index() == 0:
      print(f"\n{results['markdown']}\nresults: {os.path.abspath(results['results_md'])}")
    return
  summary = train.train_and_evaluate(config, workdir)
  if jax.process_index() == 0:
    final = summary["final"].get("test", {})
    metric = summary["main_metric"]
    print(f"\nworkdir: {os.path.abspath(workdir)}")
    loss = f"test loss {final['loss']:.4f}, " if "loss" in final else ""
    print(f"test {metric}: {final.get(metric)}  ({loss}{summary['num_params']:,} parameters, "
          f"{summary['wall_clock_seconds']:.0f} s{', synthetic data' if summary['synthetic_data'] else ''})")
    print(f"plots: {os.path.abspath(os.path.join(workdir, 'plots'))}")


if __name__ == "__main__":
  app.run(main)
