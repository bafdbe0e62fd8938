"""The input pipeline: a ben-ge split -> grain -> global jax.Array batches on the mesh, as a DataSpec says.

Design, in short:
- The config is read once, at the boundary: `DataSpec.from_config` checks it (config_checks.check_data)
  and keeps what the pipeline needs; everything here takes that spec.
- Every training batch is a pure function of (seed, step): the step picks the epoch and the slice of that
  epoch's permutation, and each example's augmentation draws from a generator seeded by (seed, epoch,
  example index, view). Resuming from a saved step, the number of workers and the number of hosts
  therefore never change what the model sees.
- Stock grain does the work: a MapDataset of batch indices, mapped to this process's rows of each batch.
  Every row is transformed straight into the batch's memory (each image is copied once on the host) and
  the memory is 64-byte aligned, so jax adopts it without a copy. `data.num_workers` grain worker
  processes (`mp_prefetch`, `data.worker_type='process'`, the default) make whole batches in grain's
  shared memory and hand them over in step order; with 0 workers each batch is made in the caller when
  asked for. Processes by default, because much of the per-example work holds the GIL, so only processes
  scale with a host's cores (`data.worker_type='thread'`: grain threads instead). Each worker reuses its
  batches' shared memory once the caller is done with them (see "Batch memory of worker processes"):
  fresh shared memory for every batch cost more kernel time than making the batch.
  Evaluation passes always read ahead with grain threads: a pass is short and made anew for every
  evaluation, and starting processes for it would cost more than they save.
- Each process builds only its own rows of the global batch and hands them to
  `jax.make_array_from_process_local_data`, which yields one global array sharded over the mesh's `data`
  axis.
- Training drops the incomplete last batch of every epoch and reshuffles per epoch; evaluation visits every
  example exactly once in a fixed order and pads the last batch with rows marked `valid=False`, `index=-1`.

The batch format is fixed in docs/architecture.md ("Batches").
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import itertools
import json
import math
import mmap
import os
import pathlib
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from multiprocessing import resource_tracker
from multiprocessing import shared_memory as multiprocessing_shared_memory

from absl import flags
import grain
import jax
import numpy as np

from labeleff_jax import config_checks
from labeleff_jax import sharding
from labeleff_jax import writers
from labeleff_jax.data import constants
from labeleff_jax.data import label_fraction
from labeleff_jax.data import presets as input_presets
from labeleff_jax.data import transforms

SUBSETS = ("labelled", "unlabelled", "all")

# Tags keep the random streams of shuffling and augmentation apart although both derive from the seed.
_SHUFFLE_TAG = 0x5F1E
_AUGMENT_TAG = 0xA06E
# The training stream is endless: grain only needs a length, and no run takes 2**40 steps.
_MAX_STEPS = 2**40
# jax's CPU client adopts a numpy array as a device buffer without copying it when the data is 64-byte
# aligned; numpy's own allocations are only 16-byte aligned.
_HOST_ALIGNMENT = 64
# Arrays smaller than this travel from worker processes pickled: a shared-memory segment costs more.
_MIN_SHARED_BYTES = 1 << 16


# ---------------------------------------------------------------------------------------------------------
# The spec: what the pipeline reads from a config, read once.
# ---------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class DataSpec:
  """Everything the input pipeline takes from an experiment config, checked (see `from_config`)."""
  modalities: tuple[str, ...]  # data.modalities
  labels: tuple[str, ...]  # the labels batches carry (constants.LABELS); may be empty
  train_batch_size: int  # train.batch_size, global
  eval_batch_size: int  # eval.batch_size, global (default: train.batch_size)
  seed: int = 0  # seed: shuffling and augmentation
  image_size: int | None = None  # data.image_size: crop to this (None keeps the stored size)
  flip: bool = True  # data.augment.flip (training only)
  rot90: bool = True  # data.augment.rot90 (training only)
  spectral: transforms.SpectralAugment = transforms.SpectralAugment()  # data.augment's spectral strengths
  num_views: int = 1  # data.num_views: 2 adds `inputs2`, a second augmentation of each example
  normalization: str = "reference"  # data.normalization: 'reference' or 'standardize'
  normalization_stats: Mapping | None = None  # data.normalization_stats (JSON form), if given
  normalization_max_examples: int = 1000  # data.normalization_max_examples: examples read for the stats
  presets: tuple[tuple[str, str], ...] = ()  # data.presets: (modality, preset) of published weights' scaling
  multilabel_threshold: float = 0.05  # data.multilabel_threshold
  label_fraction: float = 1.0  # data.label_fraction
  label_fraction_seed: int = 0  # data.label_fraction_seed
  stratify_by: str = "climatezone"  # data.stratify_by
  num_workers: int = 0  # data.num_workers: grain workers for training batches (evaluation: threads)
  worker_type: str = "process"  # data.worker_type: 'process' (grain's mp_prefetch) or 'thread'
  prefetch: int = 2  # data.prefetch: batches read ahead

  @classmethod
  def from_config(cls, config, *, labels: Sequence[str] | None = None) -> DataSpec:
    """The spec of `config` (data.*, seed, train.batch_size, eval.batch_size), after check_data.

    `labels` defaults to config_checks.required_labels(config), the labels the config's tasks and probe need.
    """
    config_checks.check_data(config)
    get = config_checks.get
    data = config.data
    augment = dict(get(data, "augment", {}))
    labels = config_checks.required_labels(config) if labels is None else labels
    stats = get(data, "normalization_stats", None)
    train_batch_size = int(config.train.batch_size)
    return cls(
        modalities=tuple(data.modalities),
        labels=config_checks.check_labels(labels),
        train_batch_size=train_batch_size,
        eval_batch_size=int(get(config.get("eval", None), "batch_size", train_batch_size)),
        seed=int(get(config, "seed", 0)) % 2**63,
        image_size=None if get(data, "image_size", None) is None else int(data.image_size),
        flip=augment.get("flip", True),
        rot90=augment.get("rot90", True),
        spectral=transforms.SpectralAugment(**{key: float(augment.get(key, 0.0)) for key in (
            "brightness", "contrast", "noise_std", "blur_prob")}),
        num_views=int(get(data, "num_views", 1)),
        normalization=get(data, "normalization", "reference"),
        normalization_stats=stats.to_dict() if hasattr(stats, "to_dict") else stats,
        normalization_max_examples=int(get(data, "normalization_max_examples", 1000)),
        presets=tuple(sorted(input_presets.check(dict(get(data, "presets", {}))).items())),
        multilabel_threshold=float(get(data, "multilabel_threshold", 0.05)),
        label_fraction=float(get(data, "label_fraction", 1.0)),
        label_fraction_seed=int(get(data, "label_fraction_seed", 0)) % 2**63,
        stratify_by=get(data, "stratify_by", "climatezone"),
        num_workers=int(get(data, "num_workers", 0)),
        worker_type=get(data, "worker_type", "process"),
        prefetch=int(get(data, "prefetch", 2)))


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  """Full batches in one epoch: training drops the incomplete remainder."""
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}.")
  return num_examples // batch_size


def num_eval_batches(num_examples: int, batch_size: int) -> int:
  """Batches of one complete evaluation pass (the last one padded)."""
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}.")
  return -(-num_examples // batch_size)


def make_transform(spec: DataSpec, *, train: bool,
                   stats: Mapping | None = None) -> transforms.ExampleTransform:
  """The per-example transform of `spec` (augmentation only when `train`)."""
  return transforms.ExampleTransform(
      modalities=spec.modalities, labels=spec.labels, stats=transforms.prepare_stats(stats),
      image_size=spec.image_size, train=train, flip=spec.flip and train, rot90=spec.rot90 and train,
      spectral=spec.spectral if train else transforms.SpectralAugment(),
      multilabel_threshold=spec.multilabel_threshold, presets=spec.presets)


# ---------------------------------------------------------------------------------------------------------
# Which examples train: label fractions and normalisation statistics.
# ---------------------------------------------------------------------------------------------------------
def read_field(source, key: str) -> np.ndarray:
  """The integer feature `key` (a class label) of every example of `source` ([N] int64), in index order."""
  values = np.empty(len(source), np.int64)
  for index in range(len(source)):
    example = source[index]
    if key not in example:
      raise KeyError(f"data.stratify_by='{key}' is not a feature of the examples ({sorted(example)}).")
    values[index] = int(np.asarray(example[key]))
  return values


def select_indices(spec: DataSpec, source, subset: str = "labelled") -> np.ndarray:
  """Sorted source indices of the `labelled` subset (per spec.label_fraction), its complement, or `all`.

  The labelled subset is class-stratified by `stratify_by` and nested across fractions for a fixed
  `label_fraction_seed` (kept apart from `seed`, so runs with different training seeds share one labelled
  subset). With label_fraction 1 no labels need to be read.
  """
  if subset not in SUBSETS:
    raise ValueError(f"subset must be one of {SUBSETS}, got '{subset}'.")
  if subset == "all" or (spec.label_fraction == 1.0 and subset == "labelled"):
    return np.arange(len(source), dtype=np.int64)
  class_labels = read_field(source, spec.stratify_by)
  if subset == "labelled":
    return label_fraction.label_fraction_indices(class_labels, spec.label_fraction, spec.label_fraction_seed)
  return label_fraction.unlabelled_indices(class_labels, spec.label_fraction, spec.label_fraction_seed)


def normalization_stats(spec: DataSpec, source, *, workdir: str | pathlib.Path | None = None) -> dict | None:
  """Statistics for spec.normalization: None for 'reference', per-band mean/std of `source` otherwise.

  Pass the training split: evaluation reuses the training statistics. The result is JSON-serialisable;
  with `workdir` it is kept in workdir/normalization.json (written by process 0) and read back from there,
  so a resumed run normalises exactly like the run it continues.
  """
  if spec.normalization == "reference":
    return None
  path = None if workdir is None else pathlib.Path(workdir) / "normalization.json"
  if path is not None and path.exists():
    return json.loads(path.read_text())
  stats = transforms.compute_normalization_stats(source, spec.modalities,
                                                 max_examples=spec.normalization_max_examples)
  if path is not None:
    writers.write_text(path, json.dumps(stats, indent=2) + "\n")
  return stats


def _stats_for(spec: DataSpec, stats: Mapping | None, *, may_compute_from=None) -> Mapping | None:
  """The statistics to standardise with: the argument, else spec.normalization_stats, else computed."""
  if spec.normalization == "reference":
    if stats is not None:
      raise ValueError("Normalisation stats were given but data.normalization='reference'; drop them or "
                       "set data.normalization='standardize'.")
    return None
  if stats is None:
    stats = spec.normalization_stats
  if stats is None:
    if may_compute_from is None:
      raise ValueError("data.normalization='standardize' needs the training split's statistics: pass "
                       "stats=train_iterator.stats or set data.normalization_stats "
                       "(from normalization_stats(spec, train_source)).")
    stats = normalization_stats(spec, may_compute_from)
  return stats.to_dict() if hasattr(stats, "to_dict") else stats


# ---------------------------------------------------------------------------------------------------------
# Batches. The row makers are picklable: grain's worker processes run them.
# ---------------------------------------------------------------------------------------------------------
def _augment_rng(seed: int, epoch: int, index: int, view: int) -> np.random.Generator:
  return np.random.default_rng([_AUGMENT_TAG, seed, epoch, index, view])


def _aligned_empty(shape: tuple, dtype: np.dtype) -> np.ndarray:
  dtype = np.dtype(dtype)
  num_bytes = math.prod(shape) * dtype.itemsize
  memory = np.empty(num_bytes + _HOST_ALIGNMENT, np.uint8)
  start = -memory.ctypes.data % _HOST_ALIGNMENT
  return memory[start:start + num_bytes].view(dtype).reshape(shape)


def empty_batch(template: Mapping, rows: int, *, shared_memory: str | None = None,
                reuse: bool = False) -> dict:
  """`rows` rows shaped like `template` (one row), uninitialised and 64-byte aligned, which jax adopts
  without a copy. With `shared_memory`, a segment name prefix (in grain's worker processes), the large
  arrays are grain SharedMemoryArrays instead (page-aligned): grain then hands them to the caller as they
  are. With `reuse` they are this worker's arrays that the caller returned, where it has some that fit."""
  # Listed once per batch: the returned segments its arrays may claim.
  returned = _returned_segments(shared_memory) if shared_memory is not None and reuse else None

  def empty(leaf):
    leaf = np.asarray(leaf)
    shape = (rows,) + leaf.shape
    if shared_memory is not None and leaf.nbytes * rows >= _MIN_SHARED_BYTES:
      return _shared_array(shape, leaf.dtype, prefix=shared_memory, returned=returned)
    return _aligned_empty(shape, leaf.dtype)
  return jax.tree.map(empty, dict(template))


def _row(batch: Mapping, row: int) -> dict:
  return jax.tree.map(lambda array: array[row, ...], batch)  # [row, ...] keeps 0-d rows writable views


class _Rows:
  """Batch k of this process's rows (`__call__`), written row by row straight into the batch's memory."""
  # Set on the copy that grain's worker processes run: batches in shared memory, reused once returned.
  shared_memory = None
  reuse_shared_memory = False

  def __call__(self, batch_index: int) -> dict:
    batch = empty_batch(self.template, self.local_batch_size, shared_memory=self.shared_memory,
                        reuse=self.reuse_shared_memory)
    self.fill(int(batch_index), batch)
    return batch


class TrainRows(_Rows):
  """This process's rows of training batch `step`: a pure function of (seed, step).

  The step picks the epoch and the slice of that epoch's permutation; each example's augmentation draws
  from a generator seeded by (seed, epoch, example index, view).
  """

  def __init__(self, source, indices: np.ndarray, transform: transforms.ExampleTransform, *, seed: int,
               num_views: int, layout: sharding.BatchLayout):
    self._source = source
    self.indices = np.asarray(indices, np.int64)
    self._transform = transform
    self._seed = seed
    self._num_views = num_views
    self._global_batch_size = layout.global_batch_size
    self._row_start = layout.row_start
    self.local_batch_size = layout.local_batch_size
    self.steps_per_epoch = steps_per_epoch(len(self.indices), layout.global_batch_size)
    self._orders = {}  # epoch -> order, the last few epochs
    self.template = _template_row(self, int(self.indices[0]))

  def epoch_order(self, epoch: int) -> np.ndarray:
    order = self._orders.get(epoch)
    if order is None:
      rng = np.random.default_rng([_SHUFFLE_TAG, self._seed, epoch])
      order = self.indices[rng.permutation(len(self.indices))]
      self._orders[epoch] = order
      for old in [key for key in self._orders if key < epoch - 2]:
        del self._orders[old]
    return order

  def row(self, index: int, epoch: int = 0, out: Mapping | None = None) -> dict:
    """The batch row of example `index` in epoch `epoch` (written into `out`, a row of a batch, if given)."""
    example = self._source[index]

    def rng(view):
      return _augment_rng(self._seed, epoch, index, view) if self._transform.uses_rng else None
    result = self._transform.view(example, rng(0), out=out)
    if self._num_views == 2:
      second = None if out is None else {"inputs": out["inputs2"]}
      result["inputs2"] = self._transform.view(example, rng(1), with_labels=False, out=second)["inputs"]
    result["valid"] = np.bool_(True)
    result["index"] = np.int32(index)
    return result

  def fill(self, step: int, out: Mapping) -> None:
    epoch, step_in_epoch = divmod(step, self.steps_per_epoch)
    first = step_in_epoch * self._global_batch_size + self._row_start
    ids = self.epoch_order(epoch)[first:first + self.local_batch_size]
    for row, index in enumerate(ids):
      self.row(int(index), epoch, out=_row(out, row))
    out["valid"][...] = True
    out["index"][...] = ids


class EvalRows(_Rows):
  """This process's rows of evaluation batch k: examples in index order, then padding rows."""

  def __init__(self, source, transform: transforms.ExampleTransform, *, layout: sharding.BatchLayout):
    self._source = source
    self._transform = transform
    self._global_batch_size = layout.global_batch_size
    self._row_start = layout.row_start
    self.local_batch_size = layout.local_batch_size
    self.num_examples = len(source)
    self.template = _template_row(self, 0)

  def row(self, position: int, out: Mapping | None = None) -> dict:
    """The batch row of example `position` (written into `out` when given)."""
    result = self._transform.view(self._source[position], None, out=out)
    result["valid"] = np.bool_(True)
    result["index"] = np.int32(position)
    return result

  def fill(self, batch_index: int, out: Mapping) -> None:
    first = batch_index * self._global_batch_size + self._row_start
    positions = np.arange(first, first + self.local_batch_size)
    for row, position in enumerate(positions):
      target = _row(out, row)
      if position < self.num_examples:
        self.row(int(position), out=target)
      else:
        # Padding rows hold zeros (and the ignore value in land-cover maps): the model runs on them, and
        # `valid` keeps them out of every metric.
        for array in jax.tree.leaves(target):
          array[...] = 0
        for part in ("inputs", "labels"):
          if "lulc" in target[part]:
            target[part]["lulc"][...] = constants.LULC_IGNORE
    valid = positions < self.num_examples
    out["valid"][...] = valid
    out["index"][...] = np.where(valid, positions, -1)


def _template_row(rows: TrainRows | EvalRows, index: int) -> dict:
  """Row `index`, made up front in the caller: its arrays fix the shapes and dtypes of the batch memory,
  and a missing feature or an image_size that does not fit the stored rasters fails here, with its
  message, rather than later in a worker."""
  return rows.row(index)


def _allow_grain_worker_processes() -> None:
  """grain 0.2.18 reads one of its absl flags whenever it starts worker processes, which raises in programs
  that never parse absl flags (tests, notebooks): google/grain#1355, fixed upstream after 0.2.18. Marking
  that one flag as given makes it read its default; no other flag changes."""
  try:
    flag = flags.FLAGS["grain_enable_multiprocess_worker_profiling"]
  except KeyError:  # a grain without the flag
    return
  if not flags.FLAGS.is_parsed() and not flag.present:
    flag.present = 1


# Batch memory of worker processes. A shared-memory segment that a worker maps anew costs the kernel a
# page fault per 4 KiB when the worker first writes it (and a zeroed page, when the segment is new): for a
# 30 MB batch several times the cost of writing it. So each worker keeps its segments mapped and reuses
# them: when the caller's arrays of a batch are garbage, the caller returns the segment by renaming its
# file in Linux's shm folder to NAME_free, and the worker that made it, the only one that looks for its
# names, renames it back and writes the next batch into it. The file system is the back channel that
# grain's worker processes lack. Where segments are not files in /dev/shm (macOS) every batch gets fresh
# segments, as in grain.
# Segment names: 'lej_PARENT_STREAM_WORKER_N', so that a stream's or a dead parent's can be found.
_SHARED_MEMORY_PREFIX = "lej_"  # short: macOS allows 31 characters
_SHARED_MEMORY_FOLDER = pathlib.Path("/dev/shm")
_RETURNED = "_free"
_streams = itertools.count()  # in the caller
_shared_memory_blocks = itertools.count()  # in a worker
# In a worker: its shared arrays by segment name, each in a batch in flight or returned to it.
_worker_arrays: dict[str, grain.multiprocessing.SharedMemoryArray] = {}


def _returned_segments(prefix: str) -> list:
  """The file paths of this worker's segments of stream `prefix` that the caller has returned."""
  return list(_SHARED_MEMORY_FOLDER.glob(f"{prefix}{os.getpid()}_*{_RETURNED}"))


def _shared_array(shape: tuple, dtype: np.dtype, *, prefix: str,
                  returned: list | None) -> grain.multiprocessing.SharedMemoryArray:
  """An uninitialised array in shared memory: one of the `returned` segments (claimed and taken off the
  list) if one fits, else a new one, kept for reuse unless `returned` is None."""
  for path in returned or ():
    name = path.name[:-len(_RETURNED)]
    array = _worker_arrays.get(name)
    if array is not None and array.shape == shape and array.dtype == dtype:
      returned.remove(path)
      os.rename(path, _SHARED_MEMORY_FOLDER / name)
      # In flight again: the resource tracker unlinks it if nobody else does (see _SegmentReturns).
      resource_tracker.register(f"/{name}", "shared_memory")
      return array
  size = math.prod(shape) * np.dtype(dtype).itemsize
  segment = multiprocessing_shared_memory.SharedMemory(f"{prefix}{os.getpid()}_{next(_shared_memory_blocks)}",
                                                       create=True, size=size)
  array = grain.multiprocessing.SharedMemoryArray.from_shared_memory(segment, shape, dtype)
  if returned is not None:
    _worker_arrays[segment.name] = array  # also keeps grain from closing the mapping after handing it over
  return array


class _SegmentReturns:
  """The caller's end of segment reuse for one stream of worker batches (see `_shared_array`).

  `adopt` takes each batch as grain hands it over: its segments go back to their worker when its arrays
  are garbage, instead of being unlinked by grain. When this object is garbage (after the stream, its
  workers and every batch it made) or the program ends, the stream's segments that are left are removed:
  returned ones nobody claimed, and those a worker held when it was stopped.
  """

  def __init__(self, prefix: str):
    self.prefix = prefix
    weakref.finalize(self, _remove_segments, prefix)

  def adopt(self, batch: dict) -> dict:
    for leaf in jax.tree.leaves(batch):
      if (isinstance(leaf, grain.multiprocessing.SharedMemoryArray) and isinstance(leaf.base, mmap.mmap)
          and leaf.shm.name.startswith(self.prefix)):  # ours, not one grain copied a leaf into
        leaf._unlink_on_del = False  # pylint: disable=protected-access  (returned by us, not unlinked by grain)
        weakref.finalize(leaf, self._return, leaf.shm.name)
    return batch

  def _return(self, name: str) -> None:
    """Returns a segment to its worker. A method, so that every batch in use keeps this object alive."""
    # Not tracked while returned (this object removes it if nobody claims it); the worker tracks it again
    # when it claims it. Unregistered before the rename, so that the two messages reach the tracker in
    # this order.
    resource_tracker.unregister(f"/{name}", "shared_memory")
    try:
      os.rename(_SHARED_MEMORY_FOLDER / name, _SHARED_MEMORY_FOLDER / f"{name}{_RETURNED}")
    except FileNotFoundError:  # removed already (by hand, or a cleaner of /dev/shm): nothing to return
      pass


@functools.cache
def _segments_are_files() -> bool:
  """Whether this system's shared-memory segments are files in /dev/shm (Linux), which their reuse needs."""
  if not _SHARED_MEMORY_FOLDER.is_dir():
    return False
  probe = multiprocessing_shared_memory.SharedMemory(create=True, size=1)
  try:
    return (_SHARED_MEMORY_FOLDER / probe.name).is_file()
  finally:
    probe.close()
    probe.unlink()


def _remove_segments(prefix: str, *, untrack: bool = True) -> None:
  """Unlinks every segment whose name starts with `prefix`: a stream's leftovers, or (untrack=False: the
  resource tracker was the parent's) a dead parent's."""
  for path in _SHARED_MEMORY_FOLDER.glob(f"{prefix}*"):
    path.unlink(missing_ok=True)
    if untrack and not path.name.endswith(_RETURNED):
      # In flight when its worker stopped, so tracked; unless the worker was killed between making and
      # tracking it. Tracking it first makes untracking it safe either way.
      resource_tracker.register(f"/{path.name}", "shared_memory")
      resource_tracker.unregister(f"/{path.name}", "shared_memory")


def _exit_with_parent(worker_index: int, worker_count: int) -> None:  # pylint: disable=unused-argument
  """grain worker init: the worker ends itself within a second of its parent's death, however it died.

  A parent killed by SIGKILL cannot stop its workers; left alone they would block forever, keeping
  Python's resource tracker alive, and the batches made but never read would stay in /dev/shm (grain
  hands their ownership to the reader, so no tracker removes them). So the worker removes them, by name,
  and exits. The parent is polled rather than watched with prctl(PR_SET_PDEATHSIG), which fires when the
  *thread* that started the worker ends, and is Linux-only.
  """
  parent = os.getppid()

  def watch():
    while os.getppid() == parent:
      time.sleep(0.5)
    _remove_segments(f"{_SHARED_MEMORY_PREFIX}{parent}_", untrack=False)  # what it never read or returned
    os._exit(1)  # pylint: disable=protected-access  (nothing else is worth running without the parent)

  threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _check_picklable(rows: _Rows) -> None:
  import cloudpickle  # pylint: disable=g-import-not-at-top  (grain's own serialiser for its workers)
  try:
    cloudpickle.dumps(rows)
  except Exception as error:  # pylint: disable=broad-except
    raise TypeError(f"data.num_workers > 0 runs the input pipeline in worker processes, which need a "
                    f"picklable data source; this one is not ({error}). Use data.num_workers=0.") from error


def _stream(rows: _Rows, first: int, stop: int, *, num_workers: int, prefetch: int, processes: bool):
  """A grain iterator over batches first..stop-1 (numpy, this process's rows).

  `processes`: read ahead by `num_workers` grain worker processes, else by that many threads.
  """
  dataset = grain.MapDataset.range(first, stop)
  if num_workers == 0:
    return iter(dataset.map(rows).to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)))
  if not processes:
    return iter(dataset.map(rows).to_iter_dataset(
        grain.ReadOptions(num_threads=num_workers, prefetch_buffer_size=max(prefetch, num_workers))))
  _allow_grain_worker_processes()
  in_shared_memory = copy.copy(rows)
  in_shared_memory.shared_memory = prefix = f"{_SHARED_MEMORY_PREFIX}{os.getpid()}_{next(_streams)}_"
  in_shared_memory.reuse_shared_memory = reuse = _segments_are_files()
  # Each worker makes whole batches, one at a time; grain hands them over in order.
  stream = dataset.map(in_shared_memory).to_iter_dataset(
      grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
  stream = grain.experimental.WithOptionsIterDataset(
      stream, grain.experimental.DatasetOptions(min_shm_size=_MIN_SHARED_BYTES))
  stream = stream.mp_prefetch(grain.MultiprocessingOptions(
      num_workers=num_workers, per_worker_buffer_size=max(1, -(-prefetch // num_workers))),
      worker_init_fn=_exit_with_parent)
  return iter(stream.map(_SegmentReturns(prefix).adopt) if reuse else stream)


# ---------------------------------------------------------------------------------------------------------
# Training.
# ---------------------------------------------------------------------------------------------------------
class TrainIterator(grain.DatasetIterator):
  """Endless training batches: reshuffled every epoch, incomplete last batch dropped, resumable.

  `next(it)` returns the batch dict of docs/architecture.md as global jax.Arrays. `get_state()` is a small
  JSON dict; `set_state` makes the iterator continue with exactly the batch that followed the saved state.
  Being a grain DatasetIterator, it also checkpoints through orbax with `grain.checkpoint.CheckpointSave`.
  Worker processes start with the first batch asked for (or `start_prefetch`) and end with `close()`; an
  error while making a batch, in a worker or not, reaches the caller and closes the iterator.
  """

  def __init__(self, source, indices: np.ndarray, transform: transforms.ExampleTransform,
               layout: sharding.BatchLayout, *, seed: int, num_views: int, num_workers: int, prefetch: int,
               worker_type: str = "process", stats: Mapping | None = None):
    super().__init__()
    self._stream = None
    self._rows = TrainRows(source, indices, transform, seed=seed, num_views=num_views, layout=layout)
    self._processes = worker_type == "process"
    if num_workers and self._processes:
      _check_picklable(self._rows)
    self._layout = layout
    self._seed = seed
    self._workers = (num_workers, prefetch)
    self.stats = stats
    self.steps_per_epoch = self._rows.steps_per_epoch
    self._step = 0

  @property
  def num_examples(self) -> int:
    return len(self._rows.indices)

  @property
  def indices(self) -> np.ndarray:
    return self._rows.indices.copy()

  @property
  def global_batch_size(self) -> int:
    return self._layout.global_batch_size

  @property
  def step(self) -> int:
    """Batches returned so far (the step of the next batch)."""
    return self._step

  @property
  def epoch(self) -> int:
    """Epoch of the next batch (= completed epochs)."""
    return self._step // self.steps_per_epoch

  def epoch_order(self, epoch: int) -> np.ndarray:
    """Source indices in the order epoch `epoch` visits them (the tail that fills no batch is skipped)."""
    return self._rows.epoch_order(epoch).copy()

  def host_batch(self, step: int) -> dict:
    """This process's rows of batch `step` as numpy arrays, made in the caller (a pure function of step)."""
    return self._rows(step)

  def start_prefetch(self) -> None:
    """Starts the worker processes (if any) now rather than at the first batch."""
    self._open().start_prefetch()

  def _open(self):
    if self._closed:
      raise RuntimeError("The training iterator was closed (by close(), or after an error in the input "
                         "pipeline); make a new one.")
    if self._stream is None:
      num_workers, prefetch = self._workers
      self._stream = _stream(self._rows, self._step, _MAX_STEPS, num_workers=num_workers,
                              prefetch=prefetch, processes=self._processes)
    return self._stream

  def __next__(self) -> dict:
    stream = self._open()
    try:
      host_batch = next(stream)
    except Exception as error:
      self.close()
      if self._workers[0] and self._processes:
        error.add_note(f"(in the input pipeline's {self._workers[0]} worker processes, data.num_workers)")
      raise
    batch = self._layout.to_global(host_batch)
    self._step += 1
    return batch

  def get_state(self) -> dict:
    return {"step": self._step, "epoch": self.epoch, "seed": self._seed,
            "num_examples": self.num_examples, "global_batch_size": self.global_batch_size}

  def set_state(self, state: Mapping) -> None:
    expected = {"seed": self._seed, "num_examples": self.num_examples,
                "global_batch_size": self.global_batch_size}
    for key, value in expected.items():
      if key in state and state[key] != value:
        raise ValueError(f"Iterator state was saved with {key}={state[key]}, but this iterator has "
                         f"{key}={value}: resuming would not reproduce the same batches.")
    step = state["step"]
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
      raise ValueError(f"Iterator state 'step' must be an integer >= 0, got {step!r}.")
    if int(step) != self._step and self._stream is not None:
      # The batches read ahead belong to the old position: start over from the new one.
      self._stream.close()
      self._stream = None
    self._step = int(step)

  def close(self) -> None:
    """Ends the worker processes (if any); the iterator cannot be used afterwards."""
    if getattr(self, "_stream", None) is not None:  # absent when __init__ failed; grain's __del__ closes
      self._stream.close()
      self._stream = None
    super().close()


def make_train_iterator(spec: DataSpec, source, mesh: jax.sharding.Mesh, *,
                        indices: Sequence[int] | None = None, stats: Mapping | None = None) -> TrainIterator:
  """Endless, reshuffled, augmented training batches of `source` as global arrays on `mesh`.

  Args:
    spec: the data spec (`DataSpec.from_config(config)`); train_batch_size is the global batch.
    source: random-access training split (`splits.open_split(config, 'train')` or any len/getitem of
      example dicts; picklable when spec.num_workers > 0).
    mesh: the device mesh; batches are sharded over its 'data' axis.
    indices: the source indices to train on. None means the labelled subset of spec.label_fraction
      (`select_indices(spec, source, 'labelled')`); pass `select_indices(spec, source, 'all')` for
      self-supervised pretraining on every image.
    stats: normalisation statistics for normalization='standardize'; when None, spec.normalization_stats,
      else computed from `source` (either way available as `iterator.stats`).
  """
  if indices is None:
    indices = select_indices(spec, source, "labelled")
  indices = np.asarray(indices, np.int64)
  if indices.ndim != 1 or (indices.size and (indices.min() < 0 or indices.max() >= len(source))):
    raise ValueError(f"indices must be a list of source indices in 0..{len(source) - 1}.")
  if spec.train_batch_size > len(indices):
    raise ValueError(f"train.batch_size={spec.train_batch_size} exceeds the {len(indices)} training examples "
                     f"(data.label_fraction={spec.label_fraction}): no full batch exists.")
  layout = sharding.batch_layout(mesh, spec.train_batch_size, "train.batch_size")
  stats = _stats_for(spec, stats, may_compute_from=source)
  transform = make_transform(spec, train=True, stats=stats)
  return TrainIterator(source, indices, transform, layout, seed=spec.seed, num_views=spec.num_views,
                       num_workers=spec.num_workers, prefetch=spec.prefetch, worker_type=spec.worker_type,
                       stats=stats)


# ---------------------------------------------------------------------------------------------------------
# Evaluation.
# ---------------------------------------------------------------------------------------------------------
class EvalBatches:
  """One complete pass over a split in index order; the last batch is padded with valid=False rows.

  An iterator (`next`) with a known length, so a progress bar or a metric accumulator can size itself.
  """

  def __init__(self, source, transform: transforms.ExampleTransform, layout: sharding.BatchLayout, *,
               num_workers: int, prefetch: int):
    self._rows = EvalRows(source, transform, layout=layout)
    self._layout = layout
    self.num_examples = len(source)
    self.num_batches = num_eval_batches(self.num_examples, layout.global_batch_size)
    self._stream = _stream(self._rows, 0, self.num_batches, num_workers=num_workers, prefetch=prefetch,
                            processes=False)

  def __len__(self) -> int:
    return self.num_batches

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    return self._layout.to_global(next(self._stream))

  def close(self) -> None:
    self._stream.close()


def make_eval_batches(spec: DataSpec, source, mesh: jax.sharding.Mesh, *,
                      stats: Mapping | None = None) -> EvalBatches:
  """One pass over `source`: fixed order, no augmentation (centre crop if spec.image_size is smaller),
  every example exactly once, the last batch padded to spec.eval_batch_size.

  With normalization='standardize', the training split's statistics come from `stats`
  (train_iterator.stats) or spec.normalization_stats.
  """
  if len(source) == 0:
    raise ValueError("make_eval_batches: the split has no examples.")
  layout = sharding.batch_layout(mesh, spec.eval_batch_size, "eval.batch_size")
  stats = _stats_for(spec, stats)
  transform = make_transform(spec, train=False, stats=stats)
  return EvalBatches(source, transform, layout, num_workers=spec.num_workers, prefetch=spec.prefetch)
