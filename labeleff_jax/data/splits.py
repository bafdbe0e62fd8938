"""Finding, preparing and opening the splits of a prepared ben-ge dataset (TFDS array_record, no TensorFlow).

A run needs the prepared TFDS dataset `data.name` under `data.data_dir`. When it is missing, the run
prepares it from `data.manual_dir` (the extracted folder or the `.tar.gz`); configs with `data.synthetic`
first write a synthetic ben-ge folder there. Everything else fails with the command that fixes it. A split
opens as a random-access source (len, [i] -> the raw example dict) that the input pipeline reads.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import pathlib
from collections.abc import Mapping, Sequence

from absl import logging
import jax
import numpy as np

from labeleff_jax import sharding

BUILDER_NAME = "ben_ge"
SPLITS = ("train", "validation", "test")
SPLIT_ALIASES = {"val": "validation", "valid": "validation"}


def is_synthetic(config) -> bool:
  """Whether the config asks for synthetic data (written on first use) instead of the downloaded ben-ge."""
  return bool(config.data.get("synthetic", None))


def ensure_prepared(config) -> pathlib.Path:
  """Returns the prepared dataset directory, preparing it first when needed.

  With several processes, process 0 writes (the synthetic folder, the prepared dataset) and the others
  wait for it; data_dir and manual_dir must be on a file system every process sees.
  """
  # Imported here: the builders pull in rasterio and tfds' writer, which plain training never needs.
  from data_builders.ben_ge import ben_ge as builder_lib  # pylint: disable=g-import-not-at-top

  data_dir = pathlib.Path(config.data.data_dir).expanduser()
  name = config.data.name
  prepared = builder_lib.dataset_dir(data_dir, name)
  if jax.process_count() == 1 and (prepared / "dataset_info.json").exists():
    return prepared
  # Two runs started together on fresh data would both write it: the second waits, then finds it.
  lock = _one_preparer_at_a_time(data_dir) if jax.process_index() == 0 else contextlib.nullcontext()
  with lock:
    return _prepare(config, builder_lib, data_dir, name, prepared)


def _prepare(config, builder_lib, data_dir: pathlib.Path, name: str, prepared: pathlib.Path) -> pathlib.Path:
  """Process 0 writes what is missing; with several processes every process passes the same two barriers,
  whatever it found on disk when it started (one started after process 0 finished finds it all there)."""
  writer = jax.process_index() == 0
  done = (prepared / "dataset_info.json").exists()
  if done and jax.process_count() == 1:
    return prepared  # prepared by another run while this one waited for the lock
  if writer and not done and prepared.is_dir() and any(prepared.glob("*.array_record*")):
    # Record files without the info TFDS writes last: damaged, or a preparation killed half-way that TFDS
    # would take for finished ("Reusing dataset") and then fail on.
    raise DamagedDatasetError(f"{prepared} holds record files but no dataset_info.json.\n"
                              f"{rebuild_advice(config, prepared)}")
  manual_dir = pathlib.Path(config.data.manual_dir).expanduser()
  if writer and not done and is_synthetic(config) and not (manual_dir / name).exists():
    from data_builders.ben_ge import synthetic  # pylint: disable=g-import-not-at-top
    logging.info("writing synthetic %s (%d patches) into %s", name, config.data.synthetic.num_patches,
                 manual_dir)
    synthetic.write_dataset(manual_dir, name=name, num_patches=config.data.synthetic.num_patches,
                            seed=config.data.synthetic.get("seed", 0), workers=min(2, os.cpu_count() or 1))
  sharding.wait_for_every_process("ben_ge raw data")
  if not done:
    if not ((manual_dir / name).exists() or (manual_dir / f"{name}.tar.gz").exists()):
      raise FileNotFoundError(
          f"dataset {name!r} is not prepared under {data_dir} and {manual_dir} holds neither {name}/ nor "
          f"{name}.tar.gz. Download the archive (see data_builders/ben_ge/README.md) into {manual_dir}, or "
          f"run: python -m data_builders.ben_ge.build --manual_dir {manual_dir} --data_dir {data_dir} "
          f"--config {name}")
    if writer:
      prepared = builder_lib.prepare(manual_dir, data_dir, name)
  sharding.wait_for_every_process("ben_ge prepared")
  return prepared


@contextlib.contextmanager
def _one_preparer_at_a_time(data_dir: pathlib.Path):
  """Serialises the runs of this machine that prepare data into `data_dir` (an flock, released at exit)."""
  data_dir.mkdir(parents=True, exist_ok=True)
  with open(data_dir / ".prepare.lock", "w") as handle:
    fcntl.flock(handle, fcntl.LOCK_EX)  # waits while another run writes or prepares
    yield


def open_splits(config) -> dict:
  """Random-access data sources of the train, validation and test splits."""
  ensure_prepared(config)
  return {split: open_split(config, split) for split in SPLITS}


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
  directory = prepared_dataset_dir(config)
  files = sorted(path.name for path in pathlib.Path(directory).glob(f"*-{split}.array_record*"))
  where = f"split '{split}' of the prepared dataset {directory} (files {', '.join(files) or 'missing'})"
  advice = rebuild_advice(config, directory)
  try:
    builder = tfds.builder_from_directory(directory)
    if split not in builder.info.splits:
      raise ValueError(f"Split '{split}' not in the prepared dataset; it has {sorted(builder.info.splits)}.")
    decoder = RecordDecoder.for_features(builder.info.features)
    if decoder is None:
      return DecodedSource(builder.as_data_source(split=split), None, where=where, advice=advice)
    records = builder.as_data_source(split=split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
  except (OSError, ValueError, RuntimeError) as error:
    raise DamagedDatasetError(f"cannot open {where}: {error}\n{advice}") from error
  source = DecodedSource(records, decoder, where=where, advice=advice)
  # One example checked against TFDS itself, so that a TFDS release that decodes differently costs speed,
  # never correctness.
  if len(source):
    try:
      same = _same_example(source[0], builder.info.features.deserialize_example_np(records[0]))
    except (ValueError, TypeError, KeyError, AttributeError, DamagedDatasetError):
      same = False
    if not same:
      logging.warning("open_split: RecordDecoder disagrees with TFDS on split '%s'; using TFDS's decoding.",
                      split)
      return DecodedSource(builder.as_data_source(split=split), None, where=where, advice=advice)
  return source


class DamagedDatasetError(RuntimeError):
  """The prepared dataset's files cannot be read as written."""


def rebuild_advice(config, directory) -> str:
  """The commands that rebuild a damaged prepared dataset from its raw files."""
  data_dir = pathlib.Path(_data_dir(config))
  manual_dir = pathlib.Path(str(config.data.get("manual_dir", "") or "~/ben-ge-downloads")).expanduser()
  return (f"The prepared files are damaged or incomplete; rebuild them from the raw data with:\n"
          f"  rm -rf {directory} && python -m data_builders.ben_ge.build --manual_dir {manual_dir} "
          f"--data_dir {data_dir} --config {config.data.name}")


def _varint(record: bytes, pos: int) -> tuple[int, int]:
  """The base-128 varint at `pos` of a protobuf message, and the position after it."""
  result, shift = 0, 0
  while True:
    byte = record[pos]
    pos += 1
    result |= (byte & 0x7F) << shift
    if byte < 0x80:
      return result, pos
    shift += 7


def _length(record: bytes, pos: int) -> tuple[int, int]:
  """A length-delimited field's length at `pos` (one byte in most fields, so tested first)."""
  byte = record[pos]
  return (byte, pos + 1) if byte < 0x80 else _varint(record, pos)


def _example_features(record: bytes) -> dict:
  """{feature name (bytes): (list kind, start, stop)} of a serialised tf.Example, where the kind is the
  Feature's field number (1 bytes_list, 2 float_list, 3 int64_list) and record[start:stop] the list
  message. Walks the wire format: Example{1: Features{1: repeated entry{1: name, 2: Feature}}}."""
  features = {}
  if not record:
    return features
  if record[0] != 0x0A:  # field 1 (features), length-delimited
    raise ValueError("not a serialised tf.Example")
  length, pos = _length(record, 1)
  features_end = pos + length
  while pos < features_end:
    tag = record[pos]
    length, pos = _length(record, pos + 1)
    entry_end = pos + length
    if tag != 0x0A or entry_end > features_end:
      raise ValueError(f"unexpected field tag {tag} in tf.Example features")
    name = value = None
    while pos < entry_end:
      tag = record[pos]
      length, pos = _length(record, pos + 1)
      if tag == 0x0A:
        name = record[pos:pos + length]
      elif tag == 0x12 and length:
        list_length, start = _length(record, pos + 1)
        value = (record[pos] >> 3, start, start + list_length)
      pos += length
    if pos != entry_end or name is None:
      raise ValueError("truncated tf.Example feature entry")
    if value is not None:
      features[name] = value
  if pos != features_end or features_end != len(record):
    raise ValueError("truncated tf.Example")
  return features


_LIST_KINDS = {"bytes_list": 1, "float_list": 2, "int64_list": 3}


class RecordDecoder:
  """Decodes a serialised example exactly as TFDS does, without TFDS's generic tf.Example parser.

  Each feature the builder writes is one value of the tf.Example (a tensor as raw bytes, a class label, a
  scalar or a text). The record's wire format is walked here rather than parsed by protobuf, because a
  parsed message copies every value out (0.5 MB per ben-ge example, more than the rest of decoding):
  tensors become read-only `np.frombuffer` views into the record itself, as read-only as TFDS's.
  """

  def __init__(self, plan: Sequence[tuple]):
    # plan: (name, tf.Example list field, value dtype, tensor shape or None) per feature. What each
    # record's decoding looks up is worked out once: the name as the record spells it, the Feature field
    # number of the list, and a tensor's element count.
    self._steps = tuple((name, name.encode(), _LIST_KINDS[field], field, dtype, shape,
                         None if shape is None else math.prod(shape)) for name, field, dtype, shape in plan)

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
    """The example of one record; ValueError naming the feature if the record does not hold it."""
    try:
      features = _example_features(record)
    except IndexError:
      raise ValueError("truncated tf.Example") from None
    example = {}
    for name, key, list_kind, field, dtype, shape, count in self._steps:
      kind, start, stop = features.get(key, (None, 0, 0))
      if kind != list_kind or start == stop:
        raise ValueError(f"feature '{name}' is not a non-empty {field} in the record")
      tag = record[start]
      if field == "bytes_list":  # one value: field 1, length-delimited
        length, pos = _length(record, start + 1)
        if tag != 0x0A or pos + length != stop:
          raise ValueError(f"feature '{name}' is not one bytes value")
        if shape is None:
          example[name] = record[pos:stop]
        elif length != count * dtype.itemsize:
          raise ValueError(f"feature '{name}' has {length} bytes, shape {shape} of {dtype} needs "
                           f"{count * dtype.itemsize}")
        else:
          example[name] = np.frombuffer(record, dtype, count, pos).reshape(shape)
        continue
      # A scalar: the first value of a packed (tag 0x0A) or unpacked (0x0D float, 0x08 varint) list.
      pos = _length(record, start + 1)[1] if tag == 0x0A else start + 1
      if field == "float_list" and tag in (0x0A, 0x0D):
        value = np.frombuffer(record, "<f4", 1, pos)[0]
      elif field == "int64_list" and tag in (0x0A, 0x08):
        value = _varint(record, pos)[0]
        value = value - (1 << 64) if value >= 1 << 63 else value  # int64 travels as two's complement
      else:
        raise ValueError(f"feature '{name}' has an unexpected {field} encoding")
      # As TFDS: np.array([value], dtype).item(), a Python int, float or bool.
      example[name] = dtype.type(value).item()
    return example


class DecodedSource:
  """A random-access source of decoded examples over a source of records (serialised, or decoded by
  TFDS when `decoder` is None); a record that cannot be read raises DamagedDatasetError naming the split,
  the example and the commands that rebuild the dataset."""

  def __init__(self, records, decoder: RecordDecoder | None, *, where: str = "", advice: str = ""):
    self._records = records
    self._decoder = decoder
    self._where, self._advice = where, advice

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int) -> dict:
    try:
      record = self._records[index]
      return record if self._decoder is None else self._decoder(record)
    except (OSError, ValueError, RuntimeError) as error:  # array_record: "Corrupted Riegeli/records file"
      raise DamagedDatasetError(
          f"cannot read example {index} of {self._where}: {error}\n{self._advice}") from error


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
