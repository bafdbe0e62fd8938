"""Benchmark: the input pipeline vs a per-sample GeoTIFF loader like the reference's, and the builder.

    python benchmarks/input_pipeline.py [--data_root /tmp/labeleff-bench] [--workers 0,2] [--repeats 7]
        [--builder_sizes 800,8000] [--writer_options_variants "group_size:1;group_size:1,snappy"]
        [--out benchmarks/results/input_pipeline.json]

What it measures (one JSON object on stdout and in --out; benchmarks/README.md explains the fields):
1. `reference`: a torch-free imitation of the lecture's Dataset + DataLoader. Every sample opens its 12 S2
   band GeoTIFFs (`read(out_shape=(1, 120, 120), resampling=Resampling.bilinear)`), S1 VH/VV, DEM and
   WorldCover with rasterio, looks its labels up in the CSVs, normalises like the reference (float64, then
   float32 as `torch.from_numpy(x).float()` does) and is collated into batches of 32. Worker processes
   build whole batches and keep 2 each in flight, as torch's DataLoader does.
2. `pipeline`: `labeleff_jax.data.pipeline.make_train_iterator` over the prepared TFDS dataset, same
   modalities (s2, s1, dem, lulc: the class map, one-hot in the model) and batch 32, the same number of
   workers (grain's worker processes), every batch device arrays on a mesh of the CPU devices
   (block_until_ready). No augmentation, as in the reference: the same work. `pipeline_augmented`: the
   same with training's random flips and rotations. `pipeline_threads` (workers > 0): `pipeline` with
   data.worker_type='thread' (grain threads instead of processes). They take turns window by window, so
   they share the machine's load.
3. `speedup`: pipeline / reference in samples/s (wall) and in CPU time per sample, per worker count;
   `goal`: whether `pipeline` reaches goal_speedup(workers) in samples/s at every worker count.
4. `writer_options_variants`: the same records re-encoded with other array_record writer options
   (compression): size on disk and the pipeline's speed on each (taking turns in the same way).
5. `builder`: `python -m data_builders.ben_ge.build` in a child process on 800 and 8,000 synthetic patches:
   patches/s (wall and CPU) and peak RSS (ru_maxrss of the child, from os.wait4).

Synthetic data (`data_builders.ben_ge.synthetic.write_dataset`, seed 0) and its prepared form are cached
under --data_root, so a second run only measures. The machine may be shared: every measurement records
wall and CPU time, and the load average around it.
"""

import argparse
import contextlib
import csv
import dataclasses
import datetime
import functools
import json
import multiprocessing
import os
import pathlib
import platform
import queue
import shutil
import statistics
import subprocess
import sys
import time
from typing import Callable

import numpy as np
import rasterio
from rasterio.enums import Resampling

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere: the project's packages live in the repo root
  sys.path.insert(0, str(REPO))

BATCH_SIZE = 32
# Environment variables that change how the loaders run, recorded with the result.
_ENVIRONMENT_KEYS = ("LD_PRELOAD", "GLIBC_TUNABLES", "MALLOC_ARENA_MAX", "XLA_FLAGS", "OMP_NUM_THREADS")
MODALITIES = ("s2", "s1", "dem", "lulc")
# What the reference's sample carries besides the rasters: the climate zone, the dominant land cover, the
# season and the land-cover mask; the pipeline is asked for the same labels.
LABELS = ("climatezone", "lulc_top", "season", "lulc")
PIPELINE_NAME = "ben-ge-800"
PIPELINE_PATCHES = 800
SYNTHETIC_SEED = 0


def goal_speedup(workers: int) -> float:
  """The pipeline's goal in samples/s against the reference at the same worker count."""
  return 20.0 if workers == 0 else 15.0


# ---------------------------------------------------------------------------------------------------------
# The reference loader. Its constants are restated here rather than imported from the project, so that it
# stays an independent imitation of the lecture's code (docs/reference.md, sections 1 and 2).
# ---------------------------------------------------------------------------------------------------------
REF_S2_BANDS = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12")
REF_S1_BANDS = ("VH", "VV")
REF_WORLDCOVER_COLUMNS = ("tree_cover", "shrubland", "grassland", "cropland", "built-up",
                          "bare/sparse_vegetation", "snow_and_ice", "permanent_water_bodies",
                          "herbaceous_wetland", "mangroves", "moss_and_lichen")
REF_CLIMATE_CODES = (0, 7, 8, 9, 14, 15, 16, 18, 25, 26, 27, 29)
REF_SIZE = 120


def _read_csv_by_patch(path: pathlib.Path) -> dict:
  with open(path, newline="") as handle:
    return {row["patch_id"]: row for row in csv.DictReader(handle)}


class ReferenceBenGe:
  """The lecture's ben-ge Dataset without torch: one sample = 16 rasterio opens + CSV lookups.

  The reference keeps the CSVs in pandas DataFrames and looks rows up per sample; plain dicts do the same
  lookups a little faster, which only flatters the reference. Like the reference, it draws a random
  600-patch training split with seed 42.
  """

  def __init__(self, folder, name: str = PIPELINE_NAME, num_samples: int = 600, seed: int = 42):
    self.folder = str(folder)
    self.meta = _read_csv_by_patch(pathlib.Path(folder) / f"{name}_meta.csv")
    self.worldcover = _read_csv_by_patch(pathlib.Path(folder) / f"{name}_esaworldcover.csv")
    ids = sorted(self.meta)
    order = np.random.default_rng(seed).permutation(len(ids))
    self.patch_ids = [ids[i] for i in order[:num_samples]]

  def __len__(self) -> int:
    return len(self.patch_ids)

  def __getitem__(self, index: int) -> dict:
    patch_id = self.patch_ids[index]
    meta = self.meta[patch_id]
    s1_id = meta["patch_id_s1"]
    s2 = np.empty((len(REF_S2_BANDS), REF_SIZE, REF_SIZE))  # float64, numpy's default, as in the reference
    for channel, band in enumerate(REF_S2_BANDS):
      with rasterio.open(f"{self.folder}/sentinel-2/{patch_id}/{patch_id}_{band}.tif") as dataset:
        s2[channel] = dataset.read(out_shape=(1, REF_SIZE, REF_SIZE), resampling=Resampling.bilinear)
    s2 = np.clip(s2 / 10000, 0, 1)
    s1 = np.empty((len(REF_S1_BANDS), REF_SIZE, REF_SIZE))
    for channel, band in enumerate(REF_S1_BANDS):
      with rasterio.open(f"{self.folder}/sentinel-1/{s1_id}/{s1_id}_{band}.tif") as dataset:
        s1[channel] = dataset.read(1)
    s1 = (np.clip(s1, -25, 0) + 25) / 25
    with rasterio.open(f"{self.folder}/dem/{patch_id}_dem.tif") as dataset:
      dem = dataset.read(1).astype(float)[None]
    with rasterio.open(f"{self.folder}/esaworldcover/{patch_id}_esaworldcover.tif") as dataset:
      worldcover = dataset.read(1).astype(float)
    worldcover[worldcover == 100] = 110
    worldcover[worldcover == 95] = 100
    worldcover = worldcover / 10 - 1
    fractions = np.array([float(self.worldcover[patch_id][column]) for column in REF_WORLDCOVER_COLUMNS])
    # torch.from_numpy(x).float() / .long(): the float64 work above ends in a float32 copy.
    return {
        "s2": s2.astype(np.float32), "s1": s1.astype(np.float32), "dem": dem.astype(np.float32),
        "lulc": worldcover.astype(np.int64),
        "lulc_top": np.int64(np.argmax(fractions)),
        "climatezone": np.int64(REF_CLIMATE_CODES.index(int(meta["climatezone"]))),
        "season": np.float32(meta["season_s2"]),
    }


def _collate(samples: list) -> dict:
  """torch's default_collate for a list of flat dicts of arrays: stack each key."""
  return {key: np.stack([sample[key] for sample in samples]) for key in samples[0]}


def _reference_worker(dataset, index_queue, result_queue) -> None:
  """A DataLoader worker process: builds whole batches from index lists until told to stop (None)."""
  while True:
    task = index_queue.get()
    if task is None:
      return
    batch_id, indices = task
    start = time.process_time()
    batch = _collate([dataset[i] for i in indices])
    # The CPU this batch cost, so that a timed window counts exactly the batches it received.
    result_queue.put((batch_id, batch, time.process_time() - start))


class ReferenceLoader:
  """torch.utils.data.DataLoader imitated: an endless stream of shuffled batches (drop_last=False).

  num_workers=0 loads in the caller. Otherwise worker processes each build whole batches, fed round-robin
  with `prefetch_factor` batches in flight per worker, and batches come back in order through a pickling
  queue (torch passes tensors through shared memory instead; a ~30 MB batch costs a few ms either way,
  small against the ~1 s of reading it). Workers are spawned (the caller runs JAX threads, and forking a
  multithreaded process can deadlock) and persistent across epochs; their start is not timed.
  `worker_cpu_seconds` adds up the workers' CPU time of the batches handed out so far.
  """

  def __init__(self, dataset: ReferenceBenGe, batch_size: int, num_workers: int, seed: int = 0,
               prefetch_factor: int = 2):
    self.dataset, self.batch_size, self.num_workers = dataset, batch_size, num_workers
    self._index_batches = self._generate_index_batches(seed)
    self._workers, self._index_queues = [], []
    self.worker_cpu_seconds = 0.0
    if num_workers:
      context = multiprocessing.get_context("spawn")
      self._result_queue = context.Queue()
      for _ in range(num_workers):
        index_queue = context.Queue()
        worker = context.Process(target=_reference_worker, args=(dataset, index_queue, self._result_queue),
                                 daemon=True)
        worker.start()
        self._workers.append(worker)
        self._index_queues.append(index_queue)
      self._sent = self._received = 0
      self._pending = {}
      for _ in range(prefetch_factor * num_workers):
        self._send()

  def _generate_index_batches(self, seed: int):
    epoch = 0
    while True:
      order = np.random.default_rng([seed, epoch]).permutation(len(self.dataset))
      for start in range(0, len(order), self.batch_size):
        yield [int(i) for i in order[start:start + self.batch_size]]
      epoch += 1

  def _send(self) -> None:
    self._index_queues[self._sent % self.num_workers].put((self._sent, next(self._index_batches)))
    self._sent += 1

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    if not self.num_workers:
      return _collate([self.dataset[i] for i in next(self._index_batches)])
    while self._received not in self._pending:
      self._receive()
    batch, cpu_seconds = self._pending.pop(self._received)
    self.worker_cpu_seconds += cpu_seconds
    self._received += 1
    self._send()
    return batch

  def _receive(self) -> None:
    batch_id, batch, cpu_seconds = self._result_queue.get()
    self._pending[batch_id] = (batch, cpu_seconds)

  def wait_until_idle(self) -> None:
    """Blocks until the workers have finished every batch sent to them (they then wait for more)."""
    if self.num_workers:
      while self._received + len(self._pending) < self._sent:
        self._receive()

  def close(self) -> None:
    for index_queue in self._index_queues:
      index_queue.put(None)
    deadline = time.time() + 30
    # Drain what the workers still send, or their queue feeder threads block their exit.
    while any(worker.is_alive() for worker in self._workers) and time.time() < deadline:
      try:
        self._result_queue.get(timeout=0.1)
      except queue.Empty:
        pass
    for worker in self._workers:
      if worker.is_alive():
        worker.terminate()
      worker.join()
    self._workers = []


# ---------------------------------------------------------------------------------------------------------
# Measuring.
# ---------------------------------------------------------------------------------------------------------
def _load_average() -> list:
  return [round(value, 2) for value in os.getloadavg()]


@dataclasses.dataclass
class Timed:
  """One loader under measurement.

  next_batch() takes a batch and returns its number of samples; cpu_seconds() is the CPU time spent on
  loading so far (this process and any workers); read_ahead is how many batches the loader prepares in
  advance, i.e. how many it has ready after idling; settle() waits until its read-ahead work is done, so
  that it never runs while another loader is timed.
  """
  name: str
  next_batch: Callable[[], int]
  cpu_seconds: Callable[[], float]
  read_ahead: int
  batches_per_window: int
  settle: Callable[[], None]
  close: Callable[[], None]


def measure_interleaved(loaders: list, *, warmup: int, repeats: int) -> dict:
  """Times `repeats` windows per loader, the loaders taking turns window by window; medians per loader.

  Taking turns puts every loader under the same (shared, fluctuating) machine load. After its window a
  loader finishes its read-ahead (settle), so that it does not compete with the next one; before its next
  window it first hands out those batches untimed, so that a window times steady production.
  """
  for loader in loaders:
    for _ in range(warmup):
      loader.next_batch()
  windows = {loader.name: [] for loader in loaders}
  for _ in range(repeats):
    for loader in loaders:
      for _ in range(loader.read_ahead):
        loader.next_batch()
      load = _load_average()
      cpu_start, wall_start, samples = loader.cpu_seconds(), time.perf_counter(), 0
      for _ in range(loader.batches_per_window):
        samples += loader.next_batch()
      wall, cpu = time.perf_counter() - wall_start, loader.cpu_seconds() - cpu_start
      loader.settle()
      windows[loader.name].append({
          "samples": samples, "wall_s": round(wall, 4), "cpu_s": round(cpu, 4),
          "samples_per_s": round(samples / wall, 2), "cpu_ms_per_sample": round(1e3 * cpu / samples, 4),
          "load_average_1min": load[0]})
  results = {}
  for name, timed in windows.items():
    rates = [window["samples_per_s"] for window in timed]
    cpu_costs = [window["cpu_ms_per_sample"] for window in timed]
    results[name] = {
        "samples_per_s": statistics.median(rates), "samples_per_s_min": min(rates),
        "samples_per_s_max": max(rates), "cpu_ms_per_sample": statistics.median(cpu_costs),
        "samples_per_cpu_s": round(1e3 / statistics.median(cpu_costs), 2), "windows": timed}
  return results


def reference_loader(folder: pathlib.Path, workers: int, args) -> Timed:
  loader = ReferenceLoader(ReferenceBenGe(folder), BATCH_SIZE, workers, prefetch_factor=2)
  return Timed(
      name="reference", next_batch=lambda: len(next(loader)["s2"]),
      cpu_seconds=lambda: time.process_time() + loader.worker_cpu_seconds,
      read_ahead=2 * workers, batches_per_window=args.reference_batches, settle=loader.wait_until_idle,
      close=loader.close)


def _pipeline_config(data_dir: pathlib.Path, workers: int, augment: bool):
  import ml_collections  # pylint: disable=g-import-not-at-top  (kept out of the spawned reference workers)
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.data = ml_collections.ConfigDict(dict(
      name=PIPELINE_NAME, data_dir=str(data_dir), modalities=list(MODALITIES), label_fraction=1.0,
      normalization="reference", num_workers=workers, prefetch=2, augment=dict(flip=augment, rot90=augment)))
  config.train = ml_collections.ConfigDict(dict(batch_size=BATCH_SIZE))
  return config


def _cpu_seconds_of(pids: list) -> float:
  """User + system CPU time of the live processes `pids` (from /proc; a process that ended counts 0)."""
  total = 0
  for pid in pids:
    try:
      with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    except OSError:
      continue
    total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat(5))
  return total / os.sysconf("SC_CLK_TCK")


def _wait_until_idle(pids: list, *, quiet_cpu_s: float = 0.01, interval_s: float = 0.1,
                     timeout_s: float = 30.0) -> None:
  """Waits until the processes `pids` stop using CPU: grain's workers idle once their buffers are full."""
  deadline = time.time() + timeout_s
  before = _cpu_seconds_of(pids)
  while time.time() < deadline:
    time.sleep(interval_s)
    now = _cpu_seconds_of(pids)
    if now - before < quiet_cpu_s:
      return
    before = now


def pipeline_loader(name: str, data_dir: pathlib.Path, workers: int, args, *, augment: bool) -> Timed:
  """`labeleff_jax.data.pipeline`: grain, with grain's worker processes (mp_prefetch)."""
  import jax  # pylint: disable=g-import-not-at-top  (kept out of the spawned reference workers)
  from labeleff_jax import sharding  # pylint: disable=g-import-not-at-top
  from labeleff_jax.data import pipeline, splits  # pylint: disable=g-import-not-at-top
  config = _pipeline_config(data_dir, workers, augment)
  mesh = jax.make_mesh((jax.device_count(),), (sharding.DATA_AXIS,))
  spec = pipeline.DataSpec.from_config(config, labels=LABELS)
  iterator = pipeline.make_train_iterator(spec, splits.open_split(config, "train"), mesh)

  def next_batch():
    return jax.block_until_ready(next(iterator))["valid"].shape[0]

  # The workers start with the first batch; the processes that appear then are this loader's (loaders are
  # made one after another). grain reports no CPU time per batch, so their CPU is read from /proc.
  before = {child.pid for child in multiprocessing.active_children()}
  next_batch()
  workers_pids = [child.pid for child in multiprocessing.active_children()
                  if child.pid not in before and child.name.startswith("grain-")]
  if len(workers_pids) != workers:
    raise RuntimeError(f"{name}: expected {workers} grain worker processes, found {len(workers_pids)}")
  # Per worker: the batch it is making, grain's queue (per_worker_buffer_size=1) and the main process's
  # buffer of it; counted generously, so that a window never starts with batches made before it.
  read_ahead = 4 * workers
  return Timed(name=name, next_batch=next_batch,
               cpu_seconds=lambda: time.process_time() + _cpu_seconds_of(workers_pids),
               read_ahead=read_ahead, batches_per_window=args.pipeline_batches,
               settle=lambda: _wait_until_idle(workers_pids), close=iterator.close)


def threads_loader(name: str, data_dir: pathlib.Path, workers: int, args) -> Timed:
  """`pipeline` with `data.worker_type='thread'`: the same batches read ahead by grain threads."""
  import jax  # pylint: disable=g-import-not-at-top  (kept out of the spawned reference workers)
  from labeleff_jax import sharding  # pylint: disable=g-import-not-at-top
  from labeleff_jax.data import pipeline, splits  # pylint: disable=g-import-not-at-top
  config = _pipeline_config(data_dir, workers, augment=False)
  config.data.worker_type = "thread"
  mesh = jax.make_mesh((jax.device_count(),), (sharding.DATA_AXIS,))
  spec = pipeline.DataSpec.from_config(config, labels=LABELS)
  iterator = pipeline.make_train_iterator(spec, splits.open_split(config, "train"), mesh)
  read_ahead = max(spec.prefetch, workers)

  def next_batch():
    return jax.block_until_ready(next(iterator))["valid"].shape[0]

  # grain's threads cannot be asked whether they are done: wait as long as they take (~30 ms per batch
  # here), generously.
  return Timed(name=name, next_batch=next_batch, cpu_seconds=time.process_time,
               read_ahead=read_ahead + workers, batches_per_window=args.pipeline_batches,
               settle=lambda: time.sleep(0.25 * read_ahead), close=iterator.close)


def run_interleaved(make_loaders: list, args) -> dict:
  loaders = []
  try:
    for make in make_loaders:
      loaders.append(make())
    return measure_interleaved(loaders, warmup=args.warmup_batches, repeats=args.repeats)
  finally:
    for loader in loaders:
      loader.close()


# ---------------------------------------------------------------------------------------------------------
# Data: synthetic raw folders and their prepared TFDS form, cached under --data_root.
# ---------------------------------------------------------------------------------------------------------
def _dataset_name(num_patches: int) -> str:
  # ben-ge-8k ships split files (the synthetic writer writes them for that name); any other size is built
  # with the ben-ge-800 config, which splits by the documented rule.
  return "ben-ge-8k" if num_patches == 8000 else "ben-ge-800"


def _disk_bytes(path: pathlib.Path) -> int:
  return sum(entry.stat().st_size for entry in pathlib.Path(path).rglob("*") if entry.is_file())


def _slug(options: str) -> str:
  return "".join(ch if ch.isalnum() else "_" for ch in options)


def raw_dataset(data_root: pathlib.Path, num_patches: int) -> tuple:
  """(manual_dir, folder) of a synthetic raw dataset of `num_patches`, written on first use."""
  from data_builders.ben_ge import synthetic  # pylint: disable=g-import-not-at-top
  manual_dir = data_root / "raw" / str(num_patches)
  folder = manual_dir / _dataset_name(num_patches)
  if not folder.is_dir():
    start = time.perf_counter()
    print(f"writing {num_patches} synthetic patches to {folder} ...", file=sys.stderr, flush=True)
    synthetic.write_dataset(manual_dir, _dataset_name(num_patches), num_patches, SYNTHETIC_SEED,
                            workers=os.cpu_count() or 1, progress=True)
    print(f"  done in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
  return manual_dir, folder


def builder_writer_options() -> str:
  """The array_record writer options the builder uses now (the prepared data is cached per value)."""
  from data_builders.ben_ge import ben_ge  # pylint: disable=g-import-not-at-top
  return getattr(ben_ge, "ARRAY_RECORD_OPTIONS", "group_size:1")  # TFDS's own default before it existed


def shard_writer_options(dataset_dir: pathlib.Path) -> str:
  """The writer options recorded in the first shard of a prepared dataset (what is really on disk)."""
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  shard = sorted(pathlib.Path(dataset_dir).glob("*.array_record-*"))[0]
  reader = array_record_module.ArrayRecordReader(str(shard))
  try:
    return reader.writer_options_string()
  finally:
    reader.close()


def prepared_dataset(data_root: pathlib.Path, manual_dir: pathlib.Path) -> tuple:
  """(data_dir, dataset_dir) of the synthetic 800-patch dataset prepared by the builder as it is now."""
  from data_builders.ben_ge import ben_ge  # pylint: disable=g-import-not-at-top
  data_dir = data_root / "prepared" / _slug(builder_writer_options())
  if not ben_ge.dataset_dir(data_dir, PIPELINE_NAME).is_dir():
    print(f"preparing {PIPELINE_NAME} into {data_dir} ...", file=sys.stderr, flush=True)
  with contextlib.redirect_stdout(sys.stderr):  # TFDS prints progress to stdout, which carries the JSON
    return data_dir, ben_ge.prepare(manual_dir, data_dir, PIPELINE_NAME)


def reencoded_dataset(data_root: pathlib.Path, source_dir: pathlib.Path, options: str) -> tuple:
  """(data_dir, dataset_dir): the prepared dataset with every shard rewritten with writer `options`.

  The records (serialised examples) are copied unchanged, so only the file encoding differs.
  """
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  data_dir = data_root / "variants" / _slug(options)
  target = data_dir / source_dir.relative_to(source_dir.parents[2])  # ben_ge/NAME/VERSION
  done = target / ".complete"
  if done.is_file() and done.read_text() == str(source_dir):
    return data_dir, target
  if target.exists():
    shutil.rmtree(target)
  target.mkdir(parents=True)
  for path in sorted(source_dir.iterdir()):
    if ".array_record-" not in path.name:
      shutil.copy(path, target / path.name)
      continue
    reader = array_record_module.ArrayRecordReader(str(path))
    records = [reader.read() for _ in range(reader.num_records())]
    reader.close()
    writer = array_record_module.ArrayRecordWriter(str(target / path.name), options)
    for record in records:
      writer.write(record)
    writer.close()
  done.write_text(str(source_dir))
  return data_dir, target


# ---------------------------------------------------------------------------------------------------------
# The builder.
# ---------------------------------------------------------------------------------------------------------
# Runs the build (argv[2:]) with its output in the file argv[1]; prints its wall time and rusage as JSON.
# Linux carries the peak RSS of the process that forks a child into the child's ru_maxrss (exec keeps it),
# so launched straight from this process (~1 GB with JAX loaded) every build reported ~1 GB. This small
# launcher is what the build forks from instead.
_BUILD_LAUNCHER = """
import json, os, subprocess, sys, time
with open(sys.argv[1], "w") as log:
  start = time.perf_counter()
  child = subprocess.Popen(sys.argv[2:], stdout=log, stderr=subprocess.STDOUT)
  _, status, usage = os.wait4(child.pid, 0)
print(json.dumps({"wall_s": time.perf_counter() - start, "exit_code": os.waitstatus_to_exitcode(status),
                  "cpu_s": usage.ru_utime + usage.ru_stime, "maxrss_kib": usage.ru_maxrss}))
"""


def measure_builder(data_root: pathlib.Path, num_patches: int) -> dict:
  """Runs the build CLI in a child process on `num_patches` synthetic patches; wall, CPU and peak RSS."""
  manual_dir, _ = raw_dataset(data_root, num_patches)
  name = _dataset_name(num_patches)
  out_dir = data_root / "builds" / f"{num_patches}"
  if out_dir.exists():
    shutil.rmtree(out_dir)  # a build must start from nothing, or it returns at once
  out_dir.mkdir(parents=True)
  log = data_root / "builds" / f"{num_patches}.log"
  command = [sys.executable, "-c", _BUILD_LAUNCHER, str(log), sys.executable, "-m",
             "data_builders.ben_ge.build", "--manual_dir", str(manual_dir), "--data_dir", str(out_dir),
             "--config", name]
  print(f"building {name} from {num_patches} patches ...", file=sys.stderr, flush=True)
  load_before = _load_average()
  launched = subprocess.run(command, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                            capture_output=True, text=True, check=True)
  # wait4 in the launcher: the rusage of the build alone (ru_maxrss in KiB on Linux).
  usage = json.loads(launched.stdout)
  if usage["exit_code"]:
    raise RuntimeError(f"build failed ({usage['exit_code']}); see {log}")
  wall, cpu = usage["wall_s"], usage["cpu_s"]
  from data_builders.ben_ge import ben_ge, build  # pylint: disable=g-import-not-at-top
  dataset_dir = ben_ge.dataset_dir(out_dir, name)
  splits = build.split_sizes(dataset_dir)
  patches = sum(splits.values())
  result = {
      "patches": patches, "config": name, "splits": splits, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
      "patches_per_s_wall": round(patches / wall, 2), "patches_per_s_cpu": round(patches / cpu, 2),
      "peak_rss_mib": round(usage["maxrss_kib"] / 1024, 1),
      "prepared_bytes": _disk_bytes(dataset_dir), "writer_options": shard_writer_options(dataset_dir),
      "load_average_before": load_before, "load_average_after": _load_average(),
  }
  shutil.rmtree(out_dir)  # up to several GB; the measurement is what is kept
  return result


# ---------------------------------------------------------------------------------------------------------
# Putting it together.
# ---------------------------------------------------------------------------------------------------------
def _versions() -> dict:
  import array_record  # pylint: disable=g-import-not-at-top
  import grain  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jaxlib  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from importlib import metadata  # pylint: disable=g-import-not-at-top

  def version(module, distribution):
    try:
      return metadata.version(distribution)
    except metadata.PackageNotFoundError:
      return getattr(module, "__version__", "unknown")

  return {"python": platform.python_version(), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
          "grain": version(grain, "grain"), "array_record": version(array_record, "array-record"),
          "tensorflow_datasets": tfds.__version__, "numpy": np.__version__, "rasterio": rasterio.__version__,
          "gdal": rasterio.__gdal_version__}


def _machine() -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  cpu_model = "unknown"
  try:
    with open("/proc/cpuinfo") as handle:
      cpu_model = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
  except (OSError, StopIteration):
    pass
  memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
  return {"cpu_count": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)), "cpu_model": cpu_model,
          "memory_gib": round(memory_gib, 1), "platform": platform.platform(),
          "jax_devices": [str(device) for device in jax.devices()], "versions": _versions()}


def _git() -> dict:
  def run(*command):
    return subprocess.run(["git", *command], cwd=REPO, capture_output=True, text=True).stdout.strip()
  # Changes to the code under test make a result unreproducible from the commit alone: name them.
  dirty = run("status", "--porcelain", "--", "labeleff_jax/data", "data_builders", "benchmarks",
              ":(exclude)benchmarks/results")
  return {"commit": run("rev-parse", "HEAD"), "uncommitted_changes": dirty.splitlines()}


def _speedup(reference: dict, pipeline: dict) -> dict:
  return {"samples_per_s": round(pipeline["samples_per_s"] / reference["samples_per_s"], 2),
          "cpu_per_sample": round(reference["cpu_ms_per_sample"] / pipeline["cpu_ms_per_sample"], 2)}


def _int_list(text: str) -> list:
  return [int(value) for value in text.split(",") if value.strip()]


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--data_root", default="/tmp/labeleff-bench",
                      help="cache of synthetic raw and prepared data (reused by later runs)")
  parser.add_argument("--workers", default="0,2", help="worker counts, each measured for both loaders")
  parser.add_argument("--repeats", type=int, default=7, help="timed windows per measurement (median)")
  parser.add_argument("--warmup_batches", type=int, default=3, help="untimed batches before the windows")
  parser.add_argument("--reference_batches", type=int, default=6, help="batches per reference window")
  parser.add_argument("--pipeline_batches", type=int, default=40, help="batches per pipeline window")
  parser.add_argument("--writer_options_variants", default="group_size:1;group_size:1,snappy;"
                      "group_size:1,uncompressed",
                      help="';'-separated array_record writer options to re-encode the prepared data with "
                           "and measure the pipeline on ('' for none)")
  parser.add_argument("--builder_sizes", default="800,8000",
                      help="patch counts to build ('800' skips the ~15 min 8,000-patch build, '' skips all)")
  parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "input_pipeline.json"),
                      help="where to write the JSON result ('' for stdout only)")
  return parser.parse_args(argv)


def main(argv=None) -> dict:
  args = parse_args(argv)
  data_root = pathlib.Path(args.data_root).expanduser().resolve()
  data_root.mkdir(parents=True, exist_ok=True)
  worker_counts = _int_list(args.workers)
  result = {
      "benchmark": "input_pipeline",
      "command": " ".join(["python", "benchmarks/input_pipeline.py",
                           *(sys.argv[1:] if argv is None else argv)]),
      "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
      "git": _git(), "machine": _machine(),
      "settings": {"batch_size": BATCH_SIZE, "workers": worker_counts, "repeats": args.repeats,
                   "warmup_batches": args.warmup_batches, "reference_batches": args.reference_batches,
                   "pipeline_batches": args.pipeline_batches, "modalities": list(MODALITIES),
                   "labels": list(LABELS), "pipeline_augmented": {"flip": True, "rot90": True},
                   "synthetic_seed": SYNTHETIC_SEED,
                   # The process setup both loaders inherit (scripts/cpu_env.sh sets LD_PRELOAD).
                   "environment": {key: os.environ[key] for key in _ENVIRONMENT_KEYS if key in os.environ}},
  }
  manual_dir, raw_folder = raw_dataset(data_root, PIPELINE_PATCHES)
  data_dir, dataset_dir = prepared_dataset(data_root, manual_dir)
  result["data"] = {"raw_folder": str(raw_folder), "raw_bytes": _disk_bytes(raw_folder),
                    "prepared_dir": str(dataset_dir), "prepared_bytes": _disk_bytes(dataset_dir),
                    "writer_options": shard_writer_options(dataset_dir)}

  # Every worker count: the reference, the pipeline doing the same work, and the pipeline with the random
  # flips and rotations of training (which the reference does not do), timed window by window in turn.
  for key in ("reference", "pipeline", "pipeline_augmented", "pipeline_threads", "speedup"):
    result[key] = {}
  for workers in worker_counts:
    print(f"reference loader and pipelines, {workers} workers ...", file=sys.stderr, flush=True)
    loaders = [
        lambda: reference_loader(raw_folder, workers, args),
        lambda: pipeline_loader("pipeline", data_dir, workers, args, augment=False),
        lambda: pipeline_loader("pipeline_augmented", data_dir, workers, args, augment=True)]
    if workers:
      loaders.append(lambda: threads_loader("pipeline_threads", data_dir, workers, args))
    measured = run_interleaved(loaders, args)
    for name, entry in measured.items():
      kind = "threads" if name == "pipeline_threads" else "processes"
      result[name][str(workers)] = {"workers": workers, "worker_kind": kind if workers else "caller", **entry}
    result["speedup"][str(workers)] = {name: _speedup(measured["reference"], measured[name])
                                       for name in measured if name != "reference"}
  goals = {str(workers): goal_speedup(workers) for workers in worker_counts}
  reached = {key: result["speedup"][key]["pipeline"]["samples_per_s"] for key in goals}
  result["goal"] = {"speedup_samples_per_s_at_equal_workers": goals, "speedup": reached,
                    "met": bool(goals) and all(reached[key] >= goals[key] for key in goals)}

  # The same records under other writer options: size on disk against pipeline speed (no augmentation).
  variants = [text.strip() for text in args.writer_options_variants.split(";") if text.strip()]
  result["writer_options_variants"] = []
  variant_dirs = {}
  for options in variants:
    variant_data_dir, variant_dir = reencoded_dataset(data_root, dataset_dir, options)
    variant_dirs[options] = variant_data_dir
    size = _disk_bytes(variant_dir)
    result["writer_options_variants"].append({
        "options": options, "writer_options": shard_writer_options(variant_dir), "bytes": size,
        "size_vs_prepared": round(size / result["data"]["prepared_bytes"], 3), "pipeline": {}})
  for workers in worker_counts if variants else []:
    print(f"pipeline on re-encoded records, {workers} workers ...", file=sys.stderr, flush=True)
    measured = run_interleaved([
        functools.partial(pipeline_loader, options, variant_dirs[options], workers, args, augment=False)
        for options in variants], args)
    for entry in result["writer_options_variants"]:
      entry["pipeline"][str(workers)] = measured[entry["options"]]

  result["builder"] = [measure_builder(data_root, size) for size in _int_list(args.builder_sizes)]
  result["finished"] = datetime.datetime.now().astimezone().isoformat(timespec="seconds")

  text = json.dumps(result, indent=1)
  print(text)
  if args.out:
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
  return result


if __name__ == "__main__":
  main()
