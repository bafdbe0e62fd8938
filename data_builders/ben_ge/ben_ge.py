"""TFDS builder `ben_ge`: a raw ben-ge folder (or its .tar.gz) -> array_record, written without TensorFlow.

One builder config per dataset: `ben-ge-800`, `ben-ge-8k`, the full-dataset subsets `ben-ge-0.2`,
`ben-ge-0.4`, `ben-ge-0.6`, `ben-ge-0.8` (each defined by its split index files) and the full `ben-ge`.
The features are the table "The prepared TFDS dataset" of API.md; reading, validation and the split rule
are in `reading.py` (its docstring documents the rule used when a dataset ships no split files).

Two deliberate departures from a stock GeneratorBasedBuilder:
- Everything about the input is validated (CSVs, split files, the header of every raster) inside
  `_split_generators`, before the first example is written; TFDS writes into an `incomplete.*` folder
  that is only renamed to `VERSION/` on success, so a failed build never leaves a dataset that looks
  complete.
- `_generate_splits` streams examples straight into array_record shards. TFDS's own writer buffers a
  whole split in memory (up to 1 GB, then spills to disk through `tf.io.gfile`, i.e. TensorFlow), which
  is neither flat in memory nor TF-free. Examples are stored in generator order (sorted patch_id), so
  `disable_shuffling=True`; the input pipeline shuffles.

Library entry point: `prepare(manual_dir, data_dir, name) -> Path`.
"""

import dataclasses
import itertools
import logging
import os
import pathlib
from typing import Iterator

import numpy as np
import tensorflow_datasets as tfds
from array_record.python import array_record_module
from tensorflow_datasets.core import example_serializer
from tensorflow_datasets.core import file_adapters
from tensorflow_datasets.core import utils as tfds_utils

from data_builders.ben_ge import archive
from data_builders.ben_ge import reading
from labeleff_jax.data import constants

VERSION = "1.0.0"
# Shards of at most this many examples (~0.53 MB each, so ~140 MB per shard): large enough to keep the
# file count low, small enough that a partial read of a split touches little data.
EXAMPLES_PER_SHARD = 256
# array_record writer options. With TFDS's default (zstd) decompressing a record was the largest single cost
# of the training input pipeline, paid again every epoch; uncompressed shards are about a third larger.
# benchmarks/input_pipeline.py measures the options (benchmarks/README.md). Readers detect the compression.
ARRAY_RECORD_OPTIONS = "group_size:1,uncompressed"
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")

# Koeppen-Geiger abbreviations of the climate codes present in ben-ge (legend of Beck et al. 2018).
_CLIMATE_ABBREVIATIONS = {0: "water", 7: "BSk", 8: "Csa", 9: "Csb", 14: "Cfa", 15: "Cfb", 16: "Cfc",
                          18: "Dsb", 25: "Dfa", 26: "Dfb", 27: "Dfc", 29: "ET"}
CLIMATE_ZONE_NAMES = tuple(f"{code}_{_CLIMATE_ABBREVIATIONS[code]}" for code in constants.CLIMATE_ZONE_CODES)

_CITATIONS_PATH = pathlib.Path(__file__).with_name("CITATIONS.bib")


@dataclasses.dataclass(eq=False)
class BenGeConfig(tfds.core.BuilderConfig):
  """A ben-ge dataset: which folder it is read from and which split files define it."""
  folder: str = ""  # dataset folder (and CSV prefix) inside manual_dir, e.g. "ben-ge-8k" or "ben-ge"
  split_prefix: str = ""  # split files are FOLDER/splits/SPLIT_PREFIX_{train,val,test}.csv
  requires_split_files: bool = False  # a subset of the full dataset is nothing without its index files


def _config(name: str, folder: str, requires_split_files: bool, description: str) -> BenGeConfig:
  return BenGeConfig(name=name, folder=folder, split_prefix=name, requires_split_files=requires_split_files,
                     description=description)


BUILDER_CONFIGS = [
    _config("ben-ge-800", "ben-ge-800", False,
            "800 patches (lecture subset); split 600/100/100 by the documented rule unless splits/ exist."),
    _config("ben-ge-8k", "ben-ge-8k", False, "8,000 patches; splits/ben-ge-8k_{train,val,test}.csv."),
    *[_config(f"ben-ge-{fraction}", "ben-ge", True,
              f"{int(float(fraction) * 100)}% subset of the full ben-ge, defined by "
              f"splits/ben-ge-{fraction}_{{train,val,test}}.csv in the ben-ge folder.")
      for fraction in ("0.2", "0.4", "0.6", "0.8")],
    _config("ben-ge", "ben-ge", False, "Full ben-ge (590,326 patches)."),
]
assert tuple(config.name for config in BUILDER_CONFIGS) == constants.DATASET_CONFIGS


def _tensor(shape, dtype) -> tfds.features.Tensor:
  # Raw bytes instead of TFDS's default of one protobuf number per element: serialising a patch drops
  # from ~40 ms to under 1 ms and decoding from ~1.3 ms to ~0.1 ms; the decoded arrays are identical.
  return tfds.features.Tensor(shape=shape, dtype=dtype, encoding=tfds.features.Encoding.BYTES)


def features() -> tfds.features.FeaturesDict:
  """The features of API.md; only Tensor / ClassLabel / Text / Scalar, so no TensorFlow is needed."""
  size = constants.PATCH_SIZE
  return tfds.features.FeaturesDict({
      "patch_id": tfds.features.Text(),
      "patch_id_s1": tfds.features.Text(),
      "s2": _tensor((size, size, len(constants.S2_BANDS)), np.uint16),
      "s1": _tensor((size, size, len(constants.S1_BANDS)), np.float32),
      "dem": _tensor((size, size, 1), np.float32),
      "lulc": _tensor((size, size), np.uint8),
      "lulc_fractions": _tensor((constants.NUM_LULC_CLASSES,), np.float32),
      "lulc_top": tfds.features.ClassLabel(names=constants.LULC_CLASSES),
      "climatezone": tfds.features.ClassLabel(names=CLIMATE_ZONE_NAMES),
      "season_s2": tfds.features.Scalar(dtype=np.float32),
      "season_s1": tfds.features.Scalar(dtype=np.float32),
      "era5": _tensor((len(constants.ERA5_COLUMNS),), np.float32),
      "geocluster": tfds.features.ClassLabel(num_classes=constants.NUM_GEOCLUSTERS),
      "lon": tfds.features.Scalar(dtype=np.float32),
      "lat": tfds.features.Scalar(dtype=np.float32),
  })


class BenGe(tfds.core.GeneratorBasedBuilder):
  """ben-ge: BigEarthNet Sentinel-1/2 patches with DEM, WorldCover, ERA-5, climate zone and season."""

  VERSION = tfds.core.Version(VERSION)
  RELEASE_NOTES = {str(VERSION): "First release: features of API.md, array_record, TF-free build."}
  BUILDER_CONFIGS = BUILDER_CONFIGS
  DEFAULT_BUILDER_CONFIG_NAME = "ben-ge-800"
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Put the dataset folder, or its archive, into `manual_dir` (the folder name is the config's):
    manual_dir/ben-ge-800/  or  manual_dir/ben-ge-800.tar.gz   (config ben-ge-800, 183 MB)
    manual_dir/ben-ge-8k/   or  manual_dir/ben-ge-8k.tar.gz    (config ben-ge-8k, 4.2 GB unpacked)
    manual_dir/ben-ge/      or  manual_dir/ben-ge.tar.gz       (configs ben-ge-0.2 ... ben-ge)
  Where to get them:
  - ben-ge-800: the archive of the lecture "Label-efficient Deep Learning in Remote Sensing" / the
    IGARSS 2023 tutorial "Data-efficient Learning for Earth Observation" (HSG-AIML), on Zenodo
    (https://zenodo.org/records/12941231, ben-ge-800.tar.gz).
  - ben-ge-8k: https://zenodo.org/record/8121208 (one archive with every modality and splits/).
  - full ben-ge: assemble one folder `ben-ge/` in the same layout from Sentinel-1/2 of BigEarthNet
    (https://bigearth.net/#downloads), DEM (https://zenodo.org/record/8129350), WorldCover
    (https://zenodo.org/record/8129666), ERA-5 (https://zenodo.org/record/8129412) and ben-ge_meta.csv /
    the split index files (https://github.com/HSG-AIML/ben-ge). The subsets ben-ge-0.2 ... 0.8 need
    their index files in ben-ge/splits/ (ben-ge-0.2_train.csv, ben-ge-0.2_val.csv, ben-ge-0.2_test.csv).
  Without TensorFlow, prepare it with:
    python -m data_builders.ben_ge.build --manual_dir MANUAL_DIR --data_dir DATA_DIR --config NAME
  """

  def __init__(self, *, file_format=None, **kwargs):
    # array_record is the only format that is written and read without TensorFlow.
    super().__init__(file_format=file_format or file_adapters.FileFormat.ARRAY_RECORD, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=("ben-ge (Mommert et al., IGARSS 2023): Sentinel-2 (12 bands, upsampled to 120x120) and "
                     "Sentinel-1 (VH, VV) patches of BigEarthNet with Copernicus DEM, ESA WorldCover map and "
                     "fractions, ERA-5 weather, Koeppen-Geiger climate zone, season encoding and geographic "
                     "clusters. Raw values; normalisation belongs to the input pipeline."),
        features=features(),
        homepage="https://github.com/HSG-AIML/ben-ge",
        citation=_CITATIONS_PATH.read_text() if _CITATIONS_PATH.is_file() else "",
        disable_shuffling=True,
    )

  # ---------------------------------------------------------------------------------------------------
  # Finding the input.
  # ---------------------------------------------------------------------------------------------------
  def _source_folder(self, dl_manager) -> tuple[pathlib.Path, str]:
    """The extracted dataset folder and the prefix of its CSV names.

    Looks for manual_dir/FOLDER/ (FOLDER is `ben-ge` for the full-dataset subsets, whose CSVs are shared),
    then manual_dir/NAME/ (a folder written for one subset alone), then FOLDER.tar.gz or NAME.tar.gz,
    which is extracted safely under the download folder (and reused while the archive is unchanged).
    """
    config = self.builder_config
    manual_dir = pathlib.Path(os.fspath(dl_manager.manual_dir))
    prefixes = list(dict.fromkeys([config.folder, config.name]))

    def find(root: pathlib.Path):
      for prefix in prefixes:
        meta_name = constants.csv_names(prefix)["meta"]
        for candidate in (root / prefix, root):
          if (candidate / meta_name).is_file():
            return candidate, prefix
      return None

    found = find(manual_dir)
    if found:
      return found
    for prefix in prefixes:
      for suffix in ARCHIVE_SUFFIXES:
        tar_path = manual_dir / f"{prefix}{suffix}"
        if not tar_path.is_file():
          continue
        target = pathlib.Path(os.fspath(dl_manager.download_dir)) / "ben_ge_extracted" / tar_path.name
        logging.info("Extracting %s to %s", tar_path, target)
        archive.safe_extract(tar_path, target)
        found = find(target)
        if found:
          return found
        raise reading.BenGeDataError(f"{tar_path}: the archive holds no {constants.csv_names(prefix)['meta']}")
    raise reading.BenGeDataError(
        f"{manual_dir}: found no dataset folder ({' or '.join(p + '/' for p in prefixes)}) and no archive "
        f"({' or '.join(p + '.tar.gz' for p in prefixes)}).\n{self.MANUAL_DOWNLOAD_INSTRUCTIONS}")

  # ---------------------------------------------------------------------------------------------------
  # TFDS hooks.
  # ---------------------------------------------------------------------------------------------------
  def _split_generators(self, dl_manager):
    config = self.builder_config
    folder, csv_prefix = self._source_folder(dl_manager)
    if config.requires_split_files and not reading.split_files(folder, config.split_prefix):
      raise reading.BenGeDataError(
          f"{folder / 'splits'}: {config.name} is defined by its index files "
          f"{config.split_prefix}_{{train,val,test}}.csv, which are missing")
    catalog = reading.scan_folder(folder, csv_prefix, config.split_prefix)
    for split, ids in catalog.splits.items():
      if not ids:
        raise reading.BenGeDataError(f"{folder}: split {split!r} would be empty ({len(catalog.patch_ids)} "
                                     "patches are too few)")
    progress = tfds_utils.tqdm(total=len(catalog.patch_ids), desc="Checking raster headers", unit=" patches",
                               leave=False, mininterval=1.0)
    try:
      reading.check_raster_headers(catalog, progress=lambda: progress.update(1))
    finally:
      progress.close()
    logging.info("ben_ge/%s: %d patches from %s; splits %s from %s", config.name, len(catalog.patch_ids),
                 folder, {split: len(ids) for split, ids in catalog.splits.items()}, catalog.split_source)
    return {split: self._generate_examples(catalog, ids) for split, ids in catalog.splits.items()}

  def _generate_examples(self, catalog: reading.Catalog, patch_ids: list[str]) -> Iterator[tuple[str, dict]]:
    """Yields (patch_id, features) one patch at a time, in the given (sorted) order."""
    with reading.gdal_env():
      for patch_id in patch_ids:
        yield patch_id, {**catalog.tabular_features(patch_id), **reading.read_patch(catalog, patch_id)}

  def _generate_splits(self, dl_manager, download_config):
    """Streams every split into array_record shards (see the module docstring for why)."""
    split_generators = self._split_generators(dl_manager)
    serializer = example_serializer.ExampleSerializer(self.info.features.get_serialized_info())
    adapter = file_adapters.ADAPTER_FOR_FORMAT[self.info.file_format]

    def serialize(example: dict) -> bytes:
      return serializer.serialize_example(self.info.features.encode_example(example))

    split_infos = []
    for split_name, generator in split_generators.items():
      if download_config.max_examples_per_split is not None:
        generator = itertools.islice(generator, download_config.max_examples_per_split)
      examples = iter(tfds_utils.tqdm(generator, desc=f"Writing {split_name}", unit=" examples", leave=False,
                                      mininterval=1.0))
      template = self._get_filename_template(split_name=split_name)
      # The shard count is part of every file name but known only at the end: write under temporary names.
      temporary_paths, shard_lengths, num_bytes = [], [], 0
      while (first := next(examples, None)) is not None:
        path = pathlib.Path(f"{template.filepath_prefix()}.writing-{len(temporary_paths):05d}")
        shard = itertools.chain([first], itertools.islice(examples, EXAMPLES_PER_SHARD - 1))
        count, size = _write_shard(adapter, path, shard, serialize)
        temporary_paths.append(path)
        shard_lengths.append(count)
        num_bytes += size
      if not shard_lengths:
        raise reading.BenGeDataError(f"split {split_name!r} has no examples")
      for index, path in enumerate(temporary_paths):
        os.replace(path, template.sharded_filepath(shard_index=index, num_shards=len(temporary_paths)))
      split_infos.append(tfds.core.SplitInfo(name=split_name, shard_lengths=shard_lengths,
                                             num_bytes=num_bytes, filename_template=template))
    return split_infos


def _write_shard(adapter, path: pathlib.Path, examples, serialize) -> tuple[int, int]:
  """Writes (key, example) pairs to one shard as they arrive; returns (examples, serialised bytes)."""
  count = num_bytes = 0

  def records():
    nonlocal count, num_bytes
    for key, example in examples:
      record = serialize(example)
      count += 1
      num_bytes += len(record)
      yield key, record

  if adapter is file_adapters.ArrayRecordFileAdapter:
    # TFDS's adapter always writes with its default options; write with ours (ARRAY_RECORD_OPTIONS).
    writer = array_record_module.ArrayRecordWriter(os.fspath(path), ARRAY_RECORD_OPTIONS)
    try:
      for _, record in records():
        writer.write(record)
    finally:
      writer.close()
  else:
    adapter.write_examples(path, records())
  return count, num_bytes


def config_names() -> tuple[str, ...]:
  return tuple(config.name for config in BUILDER_CONFIGS)


def dataset_dir(data_dir, name: str) -> pathlib.Path:
  """Where `prepare` puts the dataset `name`: DATA_DIR/ben_ge/NAME/VERSION."""
  return pathlib.Path(data_dir) / "ben_ge" / name / VERSION


def prepare(manual_dir, data_dir, name: str = "ben-ge-800") -> pathlib.Path:
  """Builds the TFDS dataset `ben_ge/NAME` from `manual_dir` into `data_dir`; returns its folder.

  `manual_dir` holds the folder NAME/ or its archive NAME.tar.gz (the full-dataset subsets read the folder
  `ben-ge/`). If the dataset is already prepared this returns at once without touching `manual_dir`.
  Raises reading.BenGeDataError (a ValueError) naming the patch and file when the input is bad; nothing
  that looks like a finished dataset is left behind then.
  """
  if name not in config_names():
    raise ValueError(f"unknown ben_ge config {name!r}; choose one of {list(config_names())}")
  builder = BenGe(config=name, data_dir=os.fspath(data_dir))
  if not builder.is_prepared():
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir)))
  return pathlib.Path(os.fspath(builder.data_path))
