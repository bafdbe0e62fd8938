"""Temporary: the previous input pipeline (host_batches worker processes), kept only until
benchmarks/input_pipeline.py has measured it next to the grain-based labeleff_jax/data/pipeline.py.

The input pipeline: a ben-ge split (tfds.data_source) -> grain -> global jax.Array batches on the mesh.

Design, in short:
- Every batch is a pure function of (seed, step): the step picks the epoch and the slice of that epoch's
  permutation, and each example's augmentation draws from a generator seeded by (seed, epoch, example
  index, view). Resuming from a saved step, changing the number or type of workers or the number of hosts
  therefore never changes what the model sees.
- Reading ahead: `data.num_workers` worker processes (`data.worker_type='process'`, the default) fill
  training batches straight into shared memory (host_batches.ProcessReader); with 'thread', a grain
  `MapDataset` of step -> batch is read ahead by that many threads (evaluation passes always use threads);
  0 workers make each batch in the caller's thread. Processes, because the per-example decoding and
  bookkeeping hold the GIL: on two cores two threads made 1.07-1.15x the batches of the caller alone,
  two processes 1.49-1.69x (benchmarks/input_pipeline.py, which also times a reference-style loader).
- Rows are transformed straight into batch buffers (geometry as strided views of the raw rasters, then one
  fused float32 conversion), so each image is copied once on the host; the buffers are recycled once no
  array refers to them (host_batches.BufferPool), so the kernel does not fault in fresh pages per batch.
- Each process builds only its own rows of the global batch and hands them to
  `jax.make_array_from_process_local_data`, which yields one global array sharded over the mesh's `data`
  axis.
- Training drops the incomplete last batch of every epoch and reshuffles per epoch; evaluation visits every
  example exactly once in a fixed order and pads the last batch with rows marked `valid=False`, `index=-1`.

The batch format is fixed in docs/architecture.md ("Batches").
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping, Sequence

import grain
import jax
import numpy as np

from labeleff_jax import sharding
from labeleff_jax.data import constants, host_batches, label_fraction, preprocess
from labeleff_jax.data.preprocess import compute_normalization_stats  # noqa: F401  (public re-export)

BUILDER_NAME = "ben_ge"
NORMALIZATIONS = ("reference", "standardize")
AUGMENT_KEYS = ("flip", "rot90", "brightness", "contrast", "noise_std", "blur_prob")
SUBSETS = ("labelled", "unlabelled", "all")
WORKER_TYPES = ("process", "thread")
SPLIT_ALIASES = {"val": "validation", "valid": "validation"}

# Tags keep the random streams of shuffling and augmentation apart although both derive from config.seed.
_SHUFFLE_TAG = 0x5F1E
_AUGMENT_TAG = 0xA06E
# The training stream is "infinite": grain only needs a length, and no run takes 2**62 steps.
_MAX_STEPS = 2**62


# ---------------------------------------------------------------------------------------------------------
# Opening a prepared split.
# ---------------------------------------------------------------------------------------------------------
def _data_dir(config) -> str:
  data_dir = config.data.get("data_dir", None)
  if not data_dir:
    data_dir = os.environ.get("TFDS_DATA_DIR", os.path.join("~", "tensorflow_datasets"))
  return os.path.expanduser(str(data_dir))


def _version_key(name: str) -> tuple:
  try:
    return tuple(int(part) for part in name.split("."))
  except ValueError:
    return ()


def prepared_dataset_dir(config) -> str:
  """Directory of the newest prepared version of `data.name` under `data.data_dir`; raises if absent."""
  name = config.data.get("name", None)
  if not name:
    raise ValueError("data.name is not set (e.g. 'ben-ge-800').")
  data_dir = _data_dir(config)
  dataset_root = os.path.join(data_dir, BUILDER_NAME, name)
  versions = []
  if os.path.isdir(dataset_root):
    for entry in os.listdir(dataset_root):
      if _version_key(entry) and os.path.isfile(os.path.join(dataset_root, entry, "dataset_info.json")):
        versions.append(entry)
  if not versions:
    manual_dir = config.data.get("manual_dir", None) or "PATH_TO_RAW_BEN_GE"
    raise FileNotFoundError(
        f"No prepared dataset '{name}' under {dataset_root} (data.data_dir={data_dir}, data.name={name}). "
        f"Prepare it with:\n  python -m data_builders.ben_ge.build --manual_dir {manual_dir} "
        f"--data_dir {data_dir} --config {name}")
  return os.path.join(dataset_root, max(versions, key=_version_key))


def open_split(config, split: str):
  """A random-access data source (len, [i] -> raw example dict) over one split of the prepared dataset.

  The examples are what TFDS's own data source returns, decoded by `RecordDecoder` where it can.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (heavy, only needed here)

  split = SPLIT_ALIASES.get(split, split)
  builder = tfds.builder_from_directory(prepared_dataset_dir(config))
  if split not in builder.info.splits:
    raise ValueError(f"Split '{split}' not in the prepared dataset; it has {sorted(builder.info.splits)}.")
  decoder = RecordDecoder.for_features(builder.info.features)
  if decoder is None:
    return builder.as_data_source(split=split)
  records = builder.as_data_source(split=split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
  source = DecodedSource(records, decoder)
  # One example checked against TFDS itself, so that a TFDS release that decodes differently costs speed,
  # never correctness.
  if len(source):
    try:
      same = _same_example(source[0], builder.info.features.deserialize_example_np(records[0]))
    except (ValueError, TypeError, KeyError, AttributeError):
      same = False
    if not same:
      logging.warning("open_split: RecordDecoder disagrees with TFDS on split '%s'; using TFDS's decoding.",
                      split)
      return builder.as_data_source(split=split)
  return source


class RecordDecoder:
  """Decodes a serialised example exactly as TFDS does, without TFDS's generic tf.Example parser.

  That parser spends ~0.2 ms of Python bookkeeping per ben-ge example, a fifth of the training pipeline's
  whole per-example cost. Each feature the builder writes is one value of the tf.Example (a tensor as raw
  bytes, a class label, a scalar or a text), which the protobuf parser hands over as it is; tensors become
  read-only `np.frombuffer` views, as in TFDS.
  """

  def __init__(self, plan: Sequence[tuple]):
    from tensorflow_datasets.proto import tf_example_pb2  # pylint: disable=g-import-not-at-top

    self._parse = tf_example_pb2.Example.FromString
    self._plan = tuple(plan)  # (name, tf.Example list field, value dtype, tensor shape or None)

  def __reduce__(self):  # for worker processes: the parser is rebuilt, not pickled
    return RecordDecoder, (self._plan,)

  @classmethod
  def for_features(cls, features) -> RecordDecoder | None:
    """The decoder of a FeaturesDict, or None if a feature needs TFDS's own decoding."""
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    serialized = features.get_serialized_info()
    plan = []
    for name, feature in features.items():
      info = serialized.get(name)
      if not isinstance(info, tfds.features.TensorInfo) or info.shape != () or info.sequence_rank:
        return None
      dtype = np.dtype(info.np_dtype)
      if dtype.kind in "OSU":
        field = "bytes_list"
      elif dtype.kind == "f":
        field = "float_list"
      elif dtype.kind in "iub" and dtype != np.uint64:  # TFDS bit-casts uint64 through int64
        field = "int64_list"
      else:
        return None
      if isinstance(feature, (tfds.features.ClassLabel, tfds.features.Scalar)) or (
          isinstance(feature, tfds.features.Text) and feature.encoder is None):
        plan.append((name, field, dtype, None))
      elif (type(feature) is tfds.features.Tensor  # pylint: disable=unidiomatic-typecheck
            and getattr(feature, "_encoding", None) == tfds.features.Encoding.BYTES
            and feature.shape and None not in feature.shape):
        plan.append((name, field, np.dtype(feature.np_dtype), tuple(feature.shape)))
      else:
        return None
    return cls(plan)

  def __call__(self, record: bytes) -> dict:
    fields = self._parse(record).features.feature
    example = {}
    for name, field, dtype, shape in self._plan:
      value = getattr(fields[name], field).value[0]
      if shape is not None:
        example[name] = np.frombuffer(value, dtype).reshape(shape)
      else:  # TFDS returns np.array([value], dtype).item(): a Python int, float, bool or bytes
        example[name] = value if dtype.kind == "O" else dtype.type(value).item()
    return example


class DecodedSource:
  """A random-access source of decoded examples over a source of serialised records."""

  def __init__(self, records, decoder: RecordDecoder):
    self._records = records
    self._decoder = decoder

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int) -> dict:
    return self._decoder(self._records[index])


def _same_example(ours: Mapping, theirs: Mapping) -> bool:
  """Same keys, and for each the same Python type, dtype and values."""
  if ours.keys() != theirs.keys():
    return False
  for key, value in ours.items():
    other = theirs[key]
    if type(value) is not type(other) or np.asarray(value).dtype != np.asarray(other).dtype:
      return False
    if not np.array_equal(value, other):
      return False
  return True


# ---------------------------------------------------------------------------------------------------------
# Config -> pieces.
# ---------------------------------------------------------------------------------------------------------
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


def train_batch_size(config) -> int:
  return _positive_int(config.train.batch_size, "train.batch_size")


def eval_batch_size(config) -> int:
  eval_config = config.get("eval", None)
  batch_size = eval_config.get("batch_size", None) if eval_config is not None else None
  if batch_size is None:
    return train_batch_size(config)
  return _positive_int(batch_size, "eval.batch_size")


def _positive_int(value, key: str) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
    raise ValueError(f"{key} must be a positive integer, got {value!r}.")
  return int(value)


def _normalization(config) -> str:
  normalization = config.data.get("normalization", "reference")
  if normalization not in NORMALIZATIONS:
    raise ValueError(f"data.normalization must be one of {NORMALIZATIONS}, got '{normalization}'.")
  return normalization


def _num_views(config) -> int:
  num_views = config.data.get("num_views", 1)
  if num_views not in (1, 2):
    raise ValueError(f"data.num_views must be 1 or 2, got {num_views!r}.")
  return int(num_views)


def _augment_options(config) -> tuple[bool, bool, preprocess.SpectralAugment]:
  augment = config.data.get("augment", None)
  augment = {} if augment is None else dict(augment)
  unknown = sorted(set(augment) - set(AUGMENT_KEYS))
  if unknown:
    raise ValueError(f"data.augment: unknown option(s) {unknown}; known: {list(AUGMENT_KEYS)}.")
  for key in ("flip", "rot90"):
    if not isinstance(augment.get(key, True), bool):
      raise ValueError(f"data.augment.{key} must be a boolean, got {augment[key]!r}.")
  spectral = preprocess.SpectralAugment(
      brightness=augment.get("brightness", 0.0), contrast=augment.get("contrast", 0.0),
      noise_std=augment.get("noise_std", 0.0), blur_prob=augment.get("blur_prob", 0.0))
  return augment.get("flip", True), augment.get("rot90", True), spectral


def _image_size(config) -> int | None:
  image_size = config.data.get("image_size", None)
  if image_size is None:
    return None
  return _positive_int(image_size, "data.image_size")


def make_transform(config, *, labels: Sequence[str], train: bool,
                   stats: Mapping | None = None) -> preprocess.ExampleTransform:
  """The per-example transform a config asks for (augmentation only when `train`)."""
  flip, rot90, spectral = _augment_options(config)
  threshold = float(config.data.get("multilabel_threshold", 0.05))
  if not 0.0 <= threshold < 1.0:
    raise ValueError(f"data.multilabel_threshold must be in [0, 1), got {threshold}.")
  return preprocess.ExampleTransform(
      modalities=preprocess.check_modalities(config.data.modalities),
      labels=preprocess.check_labels(labels),
      stats=preprocess.prepare_stats(stats),
      image_size=_image_size(config),
      train=train, flip=flip and train, rot90=rot90 and train,
      spectral=spectral if train else preprocess.SpectralAugment(),
      multilabel_threshold=threshold)


@dataclasses.dataclass(frozen=True)
class WorkerOptions:
  """How batches are read ahead: data.num_workers, data.prefetch and data.worker_type."""
  num_workers: int = 0  # 0: every batch is made in the caller's thread when it is asked for
  prefetch: int = 2
  worker_type: str = "process"

  @property
  def read_ahead(self) -> int:
    """Batches in flight."""
    return max(self.prefetch, self.num_workers) if self.num_workers else 0

  @property
  def uses_processes(self) -> bool:
    return self.num_workers > 0 and self.worker_type == "process"

  def grain_read_options(self) -> grain.ReadOptions:
    if self.num_workers == 0:
      return grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)  # synchronous, in the caller's thread
    return grain.ReadOptions(num_threads=self.num_workers, prefetch_buffer_size=self.read_ahead)


def _worker_options(config) -> WorkerOptions:
  num_workers = config.data.get("num_workers", 2)
  prefetch = config.data.get("prefetch", 2)
  worker_type = config.data.get("worker_type", "process")
  if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
    raise ValueError(f"data.num_workers must be an integer >= 0, got {num_workers!r}.")
  if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 0:
    raise ValueError(f"data.prefetch must be an integer >= 0, got {prefetch!r}.")
  if worker_type not in WORKER_TYPES:
    raise ValueError(f"data.worker_type must be one of {WORKER_TYPES}, got {worker_type!r}.")
  return WorkerOptions(num_workers, prefetch, worker_type)


def _label_fraction_seed(config) -> int:
  seed = config.data.get("label_fraction_seed", 0)
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
    raise ValueError(f"data.label_fraction_seed must be an integer, got {seed!r}.")
  return int(seed) % 2**63


def _seed(config) -> int:
  seed = config.get("seed", 0)
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
    raise ValueError(f"seed must be an integer, got {seed!r}.")
  return int(seed) % 2**63


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


def select_indices(config, source, subset: str = "labelled") -> np.ndarray:
  """Sorted source indices of the `labelled` subset (per data.label_fraction), its complement, or `all`.

  The labelled subset is class-stratified by `data.stratify_by` (default 'climatezone') and nested across
  fractions for a fixed `data.label_fraction_seed` (default 0; kept apart from `seed`, so runs with
  different training seeds share one labelled subset). With label_fraction 1 no labels need to be read.
  """
  if subset not in SUBSETS:
    raise ValueError(f"subset must be one of {SUBSETS}, got '{subset}'.")
  fraction = label_fraction.check_fraction(config.data.get("label_fraction", 1.0))
  if subset == "all" or (fraction == 1.0 and subset == "labelled"):
    return np.arange(len(source), dtype=np.int64)
  class_labels = read_field(source, config.data.get("stratify_by", "climatezone"))
  seed = _label_fraction_seed(config)
  if subset == "labelled":
    return label_fraction.label_fraction_indices(class_labels, fraction, seed)
  return label_fraction.unlabelled_indices(class_labels, fraction, seed)


def normalization_stats(config, source) -> dict | None:
  """Statistics for data.normalization: None for 'reference', per-band mean/std of `source` otherwise.

  Pass the training split: evaluation reuses the training statistics. The result is JSON-serialisable so
  the engine can keep it in the workdir; `data.normalization_max_examples` (default 1000) bounds the cost.
  """
  if _normalization(config) == "reference":
    return None
  max_examples = config.data.get("normalization_max_examples", 1000)
  return preprocess.compute_normalization_stats(source, config.data.modalities, max_examples=max_examples)


def _stats_for(config, stats, *, may_compute_from=None):
  """The statistics to standardise with: the argument, else data.normalization_stats, else computed."""
  normalization = _normalization(config)
  if normalization == "reference":
    if stats is not None:
      raise ValueError("Normalisation stats were given but data.normalization='reference'; drop them or "
                       "set data.normalization='standardize'.")
    return None
  if stats is None:
    stats = config.data.get("normalization_stats", None)
  if stats is None:
    if may_compute_from is None:
      raise ValueError("data.normalization='standardize' needs the training split's statistics: pass "
                       "stats=train_iterator.stats or set data.normalization_stats "
                       "(from normalization_stats(config, train_source)).")
    stats = normalization_stats(config, may_compute_from)
  if hasattr(stats, "to_dict"):
    stats = stats.to_dict()
  return stats


# ---------------------------------------------------------------------------------------------------------
# Placing host rows on the mesh.
# ---------------------------------------------------------------------------------------------------------
def _probe(transform: preprocess.ExampleTransform, source, index: int, num_views: int = 1) -> dict:
  """One transformed row, made up front: it fixes the batch buffers' layout, and a missing feature or an
  image_size that does not fit the stored rasters fails here, with its message, not in a worker."""
  row = transform.view(source[index], np.random.default_rng(0))
  if num_views == 2:
    row["inputs2"] = row["inputs"]
  row["valid"] = np.bool_(True)
  row["index"] = np.int32(0)
  return row


def _row(buffers: Mapping, row: int) -> dict:
  return jax.tree.map(lambda buffer: buffer[row, ...], buffers)  # [row, ...] keeps 0-d rows writable views


def _augment_rng(seed: int, epoch: int, index: int, view: int) -> np.random.Generator:
  return np.random.default_rng([_AUGMENT_TAG, seed, epoch, index, view])


# ---------------------------------------------------------------------------------------------------------
# What the rows of a batch hold. Picklable, so that worker processes can fill batches too.
# ---------------------------------------------------------------------------------------------------------
class TrainRows:
  """This process's rows of training batch `step`: a pure function of (seed, step).

  The step picks the epoch and the slice of that epoch's permutation; each example's augmentation draws
  from a generator seeded by (seed, epoch, example index, view).
  """

  def __init__(self, source, indices: np.ndarray, transform: preprocess.ExampleTransform, *, seed: int,
               num_views: int, global_batch_size: int, row_start: int, row_stop: int):
    self._source = source
    self.indices = np.asarray(indices, np.int64)
    self._transform = transform
    self._seed = seed
    self._num_views = num_views
    self._global_batch_size = global_batch_size
    self._rows = (row_start, row_stop)
    self.steps_per_epoch = steps_per_epoch(len(self.indices), global_batch_size)
    self._orders = {}  # epoch -> order, the last few epochs

  def epoch_order(self, epoch: int) -> np.ndarray:
    order = self._orders.get(epoch)
    if order is None:
      rng = np.random.default_rng([_SHUFFLE_TAG, self._seed, epoch])
      order = self.indices[rng.permutation(len(self.indices))]
      self._orders[epoch] = order
      for old in [key for key in list(self._orders) if key < epoch - 2]:  # list(): atomic under the GIL
        self._orders.pop(old, None)
    return order

  def fill(self, step: int, out: Mapping) -> None:
    epoch, step_in_epoch = divmod(step, self.steps_per_epoch)
    first = step_in_epoch * self._global_batch_size
    ids = self.epoch_order(epoch)[first + self._rows[0]: first + self._rows[1]]
    for row, index in enumerate(ids):
      example = self._source[int(index)]
      target = _row(out, row)
      self._transform.view(example, _augment_rng(self._seed, epoch, int(index), 0), out=target)
      if self._num_views == 2:
        self._transform.view(example, _augment_rng(self._seed, epoch, int(index), 1), with_labels=False,
                             out={"inputs": target["inputs2"]})
    out["valid"][...] = True
    out["index"][...] = ids


class EvalRows:
  """This process's rows of evaluation batch `batch_index`: examples in index order, padding past the end."""

  def __init__(self, source, transform: preprocess.ExampleTransform, *, global_batch_size: int,
               row_start: int, row_stop: int):
    self._source = source
    self._transform = transform
    self._global_batch_size = global_batch_size
    self._rows = (row_start, row_stop)
    self.num_examples = len(source)

  def fill(self, batch_index: int, out: Mapping) -> None:
    first = batch_index * self._global_batch_size
    positions = np.arange(first + self._rows[0], first + self._rows[1])
    for row, position in enumerate(positions):
      target = _row(out, row)
      if position < self.num_examples:
        self._transform.view(self._source[int(position)], None, out=target)
      else:
        # Padding rows hold zeros (and the ignore value in the mask): the model runs on them, and `valid`
        # keeps them out of every metric.
        for buffer in jax.tree.leaves(target):
          buffer[...] = 0
        if "lulc" in target["labels"]:
          target["labels"]["lulc"][...] = constants.LULC_IGNORE
    valid = positions < self.num_examples
    out["valid"][...] = valid
    out["index"][...] = np.where(valid, positions, -1)


class _BatchStream:
  """Batches 0, 1, ... of a row filler as global arrays, read ahead by worker processes or threads.

  Processes (`host_batches.ProcessReader`) write each batch into shared memory; threads (grain) also place
  the batches on the devices, overlapping the transfer with the training step. Either way the host memory
  comes from a `host_batches.BufferPool`, so batches reuse it once no array refers to it.
  """

  def __init__(self, rows, template: Mapping, layout: sharding.BatchLayout, workers: WorkerOptions,
               num_batches: int):
    self._rows = rows
    self._layout = layout
    memory = host_batches.BufferLayout.from_template(template, layout.local_batch_size)
    self._pool = host_batches.BufferPool(memory, shared=workers.uses_processes)
    self._reader = self._batches = None
    if workers.uses_processes:
      self._reader = host_batches.ProcessReader(rows, self._pool, num_workers=workers.num_workers,
                                                depth=workers.read_ahead, num_batches=num_batches)
    else:
      dataset = grain.MapDataset.range(num_batches).map(
          lambda index: layout.to_global(self.host_batch(index)))
      self._batches = iter(dataset.to_iter_dataset(workers.grain_read_options()))

  def host_batch(self, index: int) -> dict:
    _, batch = self._pool.take()
    self._rows.fill(index, batch)
    return batch

  def __next__(self) -> dict:
    if self._reader is not None:
      return self._layout.to_global(next(self._reader))
    return next(self._batches)

  @property
  def worker_cpu_seconds(self) -> float:
    """CPU time worker processes spent on the batches returned so far (0 without worker processes)."""
    return self._reader.worker_cpu_seconds if self._reader is not None else 0.0

  def wait_until_idle(self) -> None:
    """Blocks until worker processes have filled the batches they read ahead (no-op otherwise)."""
    if self._reader is not None:
      self._reader.wait_until_idle()

  def seek(self, index: int) -> None:
    if self._reader is not None:
      self._reader.seek(index)
    else:
      self._batches.set_state({"next_index": index})

  def close(self) -> None:
    if self._reader is not None:
      self._reader.close()
    if self._batches is not None:
      self._batches.close()


# ---------------------------------------------------------------------------------------------------------
# Training.
# ---------------------------------------------------------------------------------------------------------
class TrainIterator(grain.DatasetIterator):
  """Endless training batches: reshuffled every epoch, incomplete last batch dropped, resumable.

  `next(it)` returns the batch dict of docs/architecture.md as global jax.Arrays. `get_state()` is a small
  JSON dict; `set_state` makes the iterator continue with exactly the batch that followed the saved state.
  Being a grain DatasetIterator, it also checkpoints through orbax with `grain.checkpoint.CheckpointSave`.
  Every batch is a pure function of (seed, step), so resuming, the number or type of workers and the number
  of hosts never change what the model sees.
  """

  def __init__(self, source, indices: np.ndarray, transform: preprocess.ExampleTransform,
               layout: sharding.BatchLayout, *, seed: int, num_views: int, workers: WorkerOptions,
               stats: dict | None = None):
    super().__init__()
    self._stream = None
    self._rows = TrainRows(source, indices, transform, seed=seed, num_views=num_views,
                           global_batch_size=layout.global_batch_size, row_start=layout.row_start,
                           row_stop=layout.row_stop)
    template = _probe(transform, source, int(self._rows.indices[0]), num_views)
    self._layout = layout
    self._seed = seed
    self.stats = stats
    self.steps_per_epoch = self._rows.steps_per_epoch
    self._stream = _BatchStream(self._rows, template, layout, workers, _MAX_STEPS)
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
    """This process's rows of batch `step` as numpy arrays (a pure function of seed and step)."""
    return self._stream.host_batch(step)

  @property
  def worker_cpu_seconds(self) -> float:
    """CPU time worker processes spent on the batches returned so far (0 without worker processes)."""
    return self._stream.worker_cpu_seconds

  def wait_until_idle(self) -> None:
    """Blocks until worker processes have filled the batches they read ahead (no-op otherwise)."""
    self._stream.wait_until_idle()

  def __next__(self) -> dict:
    batch = next(self._stream)
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
    self._stream.seek(int(step))
    self._step = int(step)

  def close(self) -> None:
    if self._stream is not None:  # None when __init__ failed; grain's __del__ still closes
      self._stream.close()
    super().close()


def make_train_iterator(config, source, mesh: jax.sharding.Mesh, *, labels: Sequence[str],
                        indices: Sequence[int] | None = None, stats: Mapping | None = None) -> TrainIterator:
  """Endless, reshuffled, augmented training batches of `source` as global arrays on `mesh`.

  Args:
    config: reads data.* (modalities, image_size, augment, num_views, normalization, label_fraction,
      stratify_by, multilabel_threshold, num_workers, prefetch, worker_type), train.batch_size (global)
      and seed.
    source: random-access training split (`open_split(config, 'train')` or any len/getitem of dicts).
    mesh: the device mesh; batches are sharded over its 'data' axis.
    labels: label names the tasks need (see preprocess.LABELS); may be empty for self-supervision.
    indices: the source indices to train on. None means the labelled subset of data.label_fraction
      (`select_indices(config, source, 'labelled')`); pass `select_indices(config, source, 'all')` for
      self-supervised pretraining on every image.
    stats: normalisation statistics for data.normalization='standardize'; when None, taken from
      data.normalization_stats, else computed from `source` (either way available as `iterator.stats`).
  """
  if indices is None:
    indices = select_indices(config, source, "labelled")
  indices = np.asarray(indices, np.int64)
  if indices.ndim != 1 or (indices.size and (indices.min() < 0 or indices.max() >= len(source))):
    raise ValueError(f"indices must be a list of source indices in 0..{len(source) - 1}.")
  global_batch = train_batch_size(config)
  if global_batch > len(indices):
    raise ValueError(f"train.batch_size={global_batch} exceeds the {len(indices)} training examples "
                     f"(data.label_fraction={config.data.get('label_fraction', 1.0)}): no full batch exists.")
  layout = sharding.batch_layout(mesh, global_batch, "train.batch_size")
  stats = _stats_for(config, stats, may_compute_from=source)
  transform = make_transform(config, labels=labels, train=True, stats=stats)
  return TrainIterator(source, indices, transform, layout, seed=_seed(config),
                       num_views=_num_views(config), workers=_worker_options(config), stats=stats)


# ---------------------------------------------------------------------------------------------------------
# Evaluation.
# ---------------------------------------------------------------------------------------------------------
class EvalBatches:
  """One complete pass over a split in index order; the last batch is padded with valid=False rows.

  An iterator (`next`) with a known length, so a progress bar or a metric accumulator can size itself.
  Evaluation passes read ahead with data.num_workers threads even where training uses processes: a pass
  is short and made anew for every evaluation, and starting processes would cost seconds each time.
  """

  def __init__(self, source, transform: preprocess.ExampleTransform, layout: sharding.BatchLayout,
               workers: WorkerOptions):
    self._rows = EvalRows(source, transform, global_batch_size=layout.global_batch_size,
                          row_start=layout.row_start, row_stop=layout.row_stop)
    self.num_examples = len(source)
    self.num_batches = num_eval_batches(self.num_examples, layout.global_batch_size)
    workers = dataclasses.replace(workers, worker_type="thread")
    self._stream = _BatchStream(self._rows, _probe(transform, source, 0), layout, workers, self.num_batches)

  def __len__(self) -> int:
    return self.num_batches

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    return next(self._stream)

  def host_batch(self, batch_index: int) -> dict:
    """This process's rows of evaluation batch `batch_index` as numpy arrays."""
    return self._stream.host_batch(batch_index)

  def close(self) -> None:
    self._stream.close()


def make_eval_batches(config, source, mesh: jax.sharding.Mesh, *, labels: Sequence[str],
                      stats: Mapping | None = None) -> EvalBatches:
  """One pass over `source`: fixed order, no augmentation (centre crop if data.image_size is smaller),
  every example exactly once, the last batch padded to eval.batch_size (fallback train.batch_size).

  With data.normalization='standardize', the training split's statistics come from `stats`
  (train_iterator.stats) or data.normalization_stats.
  """
  if len(source) == 0:
    raise ValueError("make_eval_batches: the split has no examples.")
  layout = sharding.batch_layout(mesh, eval_batch_size(config), "eval.batch_size")
  stats = _stats_for(config, stats)
  transform = make_transform(config, labels=labels, train=False, stats=stats)
  return EvalBatches(source, transform, layout, _worker_options(config))

