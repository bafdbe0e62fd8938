"""Runs a list of experiment configs one after another, skipping every run whose results already exist.

A run is finished when its workdir holds `summary.json` (the engine writes it last). Finished runs of the
same config (same fingerprint, labeleff_jax/workdir.py) are read, not retrained; finished runs of another
config are refused by name before anything trains; an interrupted run is simply started again and the
engine resumes it from its latest checkpoint. So an experiment command can be stopped and repeated.
"""

import copy
import dataclasses
import json
import os
import pathlib
import time
from collections.abc import Callable, Mapping, Sequence

import jax
import ml_collections
import tqdm

from labeleff_jax import workdir as workdir_lib
from labeleff_jax import writers

SUMMARY = "summary.json"
# Runs of one experiment compile the same step functions again and again (same shapes, new closures):
# XLA's persistent cache turns every repeat into a cache read.
CACHE_SUBDIR = ".jax_cache"


@dataclasses.dataclass
class Run:
  """One training run of an experiment: where it writes, what it trains, and its row in the tables."""
  name: str  # workdir relative to the experiment directory, e.g. 'finetune/frac0.1/seed0'
  config: ml_collections.ConfigDict
  keys: dict  # identity in the tables, e.g. {'method': 'finetune', 'fraction': 0.1, 'seed': 0}


def read_summary(workdir: str | pathlib.Path) -> dict | None:
  """The run's summary, or None while the run is unfinished (no or unreadable summary.json)."""
  path = pathlib.Path(workdir) / SUMMARY
  try:
    return json.loads(path.read_text())
  except (FileNotFoundError, json.JSONDecodeError):
    return None


class StaleRunsError(RuntimeError):
  """Finished runs in the experiment folder whose config is not the one the experiment would run."""


def stale_runs(runs: Sequence[Run], root: pathlib.Path) -> list[str]:
  """Names of the finished runs whose summary carries another config fingerprint than the run's config."""
  stale = []
  for run in runs:
    summary = read_summary(root / run.name)
    wanted = workdir_lib.fingerprint(workdir_lib.identity(run.config))
    if summary is not None and summary.get("config_fingerprint") != wanted:
      stale.append(run.name)
  return stale


def final_metrics(summary: Mapping, split: str = "test") -> dict:
  """The final metrics of one split of a summary, e.g. {'lulc_top/accuracy': 0.53, ...}."""
  final = summary.get("final", {})
  if split not in final:
    raise KeyError(f"summary has no final metrics for split {split!r} (splits: {sorted(final)})")
  return {key: value for key, value in final[split].items() if isinstance(value, (int, float))}


def override(config: ml_collections.ConfigDict, section: str, values: Mapping) -> None:
  """Sets `config.<section>.<key>` for every key of `values`, naming the key when the section lacks it."""
  target = config[section]
  for key, value in values.items():
    if key not in target:
      raise KeyError(f"{section}.{key} is not a key of the run configs (their {section} keys: "
                     f"{sorted(target)}); remove it from the experiment config")
    if isinstance(value, ml_collections.ConfigDict):
      override(target, key, value)
    else:
      target[key] = copy.deepcopy(value)


def clone(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  return copy.deepcopy(config)


def enable_compilation_cache(directory: str | pathlib.Path) -> None:
  """Turns on XLA's persistent compilation cache, unless the user already chose a directory.

  JAX initialises the cache once per process, so this only takes effect before the first compilation
  that reads it; later calls are harmless no-ops.
  """
  if jax.config.jax_compilation_cache_dir or os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return
  pathlib.Path(directory).mkdir(parents=True, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", str(directory))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def open_experiment(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> pathlib.Path:
  """Makes the experiment's root directory, turns on the compilation cache there (unless the config says
  `compilation_cache=False`) and records the experiment's config in `experiment_config.json`."""
  root = pathlib.Path(workdir)
  root.mkdir(parents=True, exist_ok=True)
  if config.get("compilation_cache", True):
    enable_compilation_cache(root / CACHE_SUBDIR)
  writers.write_text(root / "experiment_config.json",
                     config.to_json_best_effort(indent=2, sort_keys=True) + "\n")
  return root


def default_train_fn(config, workdir):
  from labeleff_jax import train  # pylint: disable=g-import-not-at-top  (keeps table code import-light)
  return train.train_and_evaluate(config, workdir)


def execute(runs: Sequence[Run], root: str | pathlib.Path, *, split: str = "test", desc: str = "runs",
            train_fn: Callable | None = None, before_run: Callable[[Run], None] | None = None) -> list[dict]:
  """Runs (or reads) every run in order; returns one record per run: its keys plus its final metrics.

  `before_run(run)` is called for every run before any trains: runners use it to fill in what depends
  on the data (e.g. a batch size that fits the labelled subset). A finished run is reused only when its
  summary's config fingerprint matches the run's config; otherwise StaleRunsError names the stale runs
  before anything trains.
  Records also carry `workdir`, `skipped` and the run's `seconds` (its own wall clock).
  """
  root = pathlib.Path(root)
  train_fn = train_fn or default_train_fn
  if before_run is not None:
    for run in runs:
      before_run(run)
  stale = stale_runs(runs, root)
  if stale:
    raise StaleRunsError(
        f"{len(stale)} finished run(s) under {root} were made by another config than this experiment would "
        f"use now: {', '.join(stale[:8])}{' ...' if len(stale) > 8 else ''}. Their results would be mixed "
        "into the tables: delete those run folders to retrain them, or give the experiment another workdir.")
  records, ran, skipped = [], 0, 0
  progress = tqdm.tqdm(runs, desc=desc, unit="run", dynamic_ncols=True, position=0,
                       disable=not writers.is_writer())
  for run in progress:
    workdir = root / run.name
    summary = read_summary(workdir)
    if summary is None:
      start = time.time()
      # The returned summary, not the file: with several processes only process 0 writes summary.json,
      # and the others may get here before it has.
      summary = train_fn(run.config, workdir) or read_summary(workdir)
      if summary is None:
        raise RuntimeError(f"run {run.name} finished without writing {workdir / SUMMARY}")
      ran += 1
      outcome = f"trained in {time.time() - start:.0f} s"
    else:
      skipped += 1
      outcome = "done before, skipped"
    metrics = final_metrics(summary, split) if split in summary.get("final", {}) else {}
    records.append({**run.keys, **metrics, "workdir": run.name, "skipped": outcome.startswith("done"),
                    "seconds": summary.get("wall_clock_seconds")})
    progress.set_postfix(trained=ran, skipped=skipped)
    if writers.is_writer():
      progress.write(f"{run.name}: {outcome}")
  progress.close()
  return records


def write_records(records: Sequence[Mapping], path: str | pathlib.Path) -> pathlib.Path:
  """Every run's record as JSON lines (the raw material of the tables, one line per run and seed)."""
  path = pathlib.Path(path)
  writers.write_text(path, "".join(json.dumps(dict(record), sort_keys=True) + "\n" for record in records))
  return path
