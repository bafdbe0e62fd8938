"""Runs one experiment: `python main.py --config configs/NAME.py[:ARGS] --workdir DIR [--config.a.b=V]`.

All logic lives in `labeleff_jax.train.train_and_evaluate`; this file only parses flags. Running it again
on the same workdir resumes from the latest checkpoint.
"""

import errno
import logging as std_logging
import os
import signal
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", "configs/quickstart.py", "Experiment config file.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, plots and the summary.")
flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() with JAX's cluster auto-detection "
                  "(Cloud TPU, SLURM, Open MPI); also when JAX_COORDINATOR_ADDRESS is in the environment.")
flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0, for a cluster JAX cannot detect "
                    "(give --num_processes and --process_id too).")
flags.DEFINE_integer("num_processes", None, "Number of processes of the run (with --coordinator_address).")
flags.DEFINE_integer("process_id", None,
                     "This process's index, 0..num_processes-1 (with --coordinator_address).")

flags.DEFINE_bool("allow_config_change", False, "Continue the run in --workdir although its config differs "
                  "from the one that wrote the checkpoints (recorded in WORKDIR/config_changes.jsonl).")

_CLUSTER_FLAGS = ("coordinator_address", "num_processes", "process_id")


def initialize_distributed(values: dict, multihost: bool, environment: dict) -> dict | None:
  """The keyword arguments of jax.distributed.initialize for these flags, or None for one process.

  The three cluster flags go together; --multihost alone (or JAX_COORDINATOR_ADDRESS) means auto-detection.
  """
  given = {name: values[name] for name in _CLUSTER_FLAGS if values.get(name) is not None}
  if given:
    missing = [f"--{name}" for name in _CLUSTER_FLAGS if name not in given]
    if missing:
      raise app.UsageError(f"{', '.join(missing)} missing: --coordinator_address, --num_processes and "
                           "--process_id are given together (or none, with --multihost for auto-detection)")
    if ":" not in given["coordinator_address"]:
      raise app.UsageError(f"--coordinator_address={given['coordinator_address']!r} must read HOST:PORT")
    if given["num_processes"] < 1:
      raise app.UsageError(f"--num_processes={given['num_processes']} must be at least 1")
    if not 0 <= given["process_id"] < given["num_processes"]:
      raise app.UsageError(f"--process_id={given['process_id']} must be in 0..{given['num_processes'] - 1} "
                           f"(--num_processes={given['num_processes']})")
    return given
  if multihost or environment.get("JAX_COORDINATOR_ADDRESS"):
    return {}
  return None


class _QuietLibraries(std_logging.Filter):
  """Drops the INFO chatter of orbax and tfds (every checkpoint write) and keeps their warnings."""

  def filter(self, record):
    noisy = any(part in record.pathname for part in ("/orbax/", "/tensorflow_datasets/"))
    return record.levelno >= std_logging.WARNING or not noisy


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  cluster = initialize_distributed({name: getattr(flags.FLAGS, name) for name in _CLUSTER_FLAGS},
                                   flags.FLAGS.multihost, dict(os.environ))
  import jax  # pylint: disable=g-import-not-at-top
  if cluster is not None:
    jax.distributed.initialize(**cluster)
  from labeleff_jax import train  # pylint: disable=g-import-not-at-top
  # SIGTERM (a scheduler's or `kill`'s stop): the run checkpoints at its next log step and ends cleanly.
  signal.signal(signal.SIGTERM, lambda signum, frame: train.request_stop())
  try:
    run_experiment(train)
  except train.RunStopped as stopped:
    logging.warning("%s", stopped)
    sys.exit(128 + signal.SIGTERM)
  except _known_failures() as error:
    # A failure the library diagnosed: its message is the whole story. Leaving through os._exit skips the
    # interpreter shutdown, where orbax's and grain's background threads would otherwise bury it under
    # pages of noise; the run's clean-up (input workers, workdir lock) has already happened.
    _exit_with(f"{type(error).__name__}: {error}")
  except Exception as error:  # pylint: disable=broad-except
    if not _out_of_space(error):
      raise
    first_line = str(error).strip().splitlines()[0][:600]
    _exit_with(f"writing the run's files failed: the disk is full or a file size limit was hit "
               f"({first_line}). "
               "Free space (or choose another --workdir) and run the same command again: the run resumes "
               "from its last complete checkpoint.")


def _exit_with(message: str) -> None:
  print(f"\nerror: {message}", file=sys.stderr, flush=True)
  os._exit(1)  # pylint: disable=protected-access


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _out_of_space(error: BaseException) -> bool:
  """Whether `error` (or what it was raised from) is a write that found no space: orbax reports those
  from its writer threads as ValueErrors carrying the OS error code in the message."""
  while error is not None:
    if isinstance(error, OSError) and error.errno in _NO_SPACE:
      return True
    if any(f"os_error_code='{code}'" in str(error) for code in _NO_SPACE) or \
        any(os.strerror(code) in str(error) for code in _NO_SPACE):
      return True
    error = error.__cause__ or error.__context__
  return False


def _known_failures() -> tuple[type[Exception], ...]:
  # pylint: disable=g-import-not-at-top
  from labeleff_jax import checkpoint, train, transfer, workdir
  from labeleff_jax.data import splits
  from labeleff_jax.experiments import runner
  return (train.NonFiniteLossError, checkpoint.NonFiniteStateError, checkpoint.DamagedCheckpointError,
          workdir.ConfigChangedError, workdir.WorkdirInUseError, runner.StaleRunsError,
          transfer.TransferError, splits.DamagedDatasetError)


def run_experiment(train):
  """One training run, or a runner of many (label-fraction sweep, modality ablation), as the config says."""
  import jax  # pylint: disable=g-import-not-at-top
  config = flags.FLAGS.config
  workdir = flags.FLAGS.workdir or os.path.join("workdirs", "run")
  logging.info("devices: %s", jax.devices())
  if config.get("experiment", None):  # a runner of many trainings (label-fraction sweep, modality ablation)
    from labeleff_jax import experiments  # pylint: disable=g-import-not-at-top
    results = experiments.run(config, workdir)
    if jax.process_index() == 0:
      print(f"\n{results['markdown']}\nresults: {os.path.abspath(results['results_md'])}")
    return
  summary = train.train_and_evaluate(config, workdir, allow_config_change=flags.FLAGS.allow_config_change)
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
