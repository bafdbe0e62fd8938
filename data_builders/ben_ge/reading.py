"""Reading and validating one ben-ge dataset folder: CSVs by column name, rasters with rasterio, splits.

Three stages, each raising `BenGeDataError` (a ValueError) that names the patch and the file at fault:

1. `scan_folder` reads every CSV (by column name, never by position), checks that each needed column is
   there, that every patch of the dataset appears in every CSV with finite numbers and known codes, and
   decides the splits. Only the tabular metadata is held in memory (a few hundred bytes per patch).
2. `check_raster_headers` opens the header of every raster of every patch (no pixel data) and checks that
   it exists, is readable, and has the expected size, band count and dtype family. Stages 1 and 2 run
   before anything is written, so a broken dataset fails in seconds instead of after an hour of writing.
3. `read_patch` reads one patch's pixels exactly as the reference does and checks their content (NaN or
   inf, unknown WorldCover codes). The builder calls it patch by patch, so memory does not grow with the
   dataset.

Splits: where `FOLDER/splits/PREFIX_{train,val,test}.csv` exist (one patch_id per line, no header), they
are used (`_val` feeds `validation`). Otherwise every patch goes to exactly one split by this rule, which
depends only on the set of patch ids (not on file system order, not on any RNG implementation): sort the
patches by the SHA-256 hex digest of `SPLIT_SALT + patch_id`; the first round(0.75 n) are `train`, the
next round(0.125 n) `validation`, the rest `test` (ben-ge-800: 600 / 100 / 100). Within each split the
examples are stored in sorted patch_id order.
"""

import csv
import dataclasses
import hashlib
import math
import pathlib
from typing import Iterable, Mapping, Sequence

import numpy as np
import rasterio
from rasterio.enums import Resampling

from labeleff_jax.data import constants

SPLITS = ("train", "validation", "test")
# Split file suffix for each split name (the ben-ge index files call validation `val`).
SPLIT_FILE_SUFFIX = {"train": "train", "validation": "val", "test": "test"}
# The fixed, documented seed of the split rule used when a dataset ships no split files.
SPLIT_SALT = "ben-ge-split-seed-42:"
SPLIT_FRACTIONS = {"train": 0.75, "validation": 0.125}  # test gets the rest

# Tolerance on the WorldCover fractions: they are rounded aggregates and may overshoot 1 a little.
FRACTION_TOLERANCE = 1e-3


class BenGeDataError(ValueError):
  """The ben-ge input is missing, unreadable or inconsistent; the message names the patch and file."""


# ---------------------------------------------------------------------------------------------------------
# CSVs.
# ---------------------------------------------------------------------------------------------------------
def _read_csv_columns(path: pathlib.Path, columns: Sequence[str],
                      wanted_ids: Iterable[str] | None = None) -> dict[str, tuple[str, ...]]:
  """Maps patch_id -> the raw strings of `columns`, read by header name.

  Only rows whose patch_id is in `wanted_ids` are kept (all rows if None), so a full-dataset CSV does not
  cost memory for patches outside the subset being built.
  """
  if not path.is_file():
    raise BenGeDataError(f"{path}: CSV file is missing")
  wanted = None if wanted_ids is None else set(wanted_ids)
  rows: dict[str, tuple[str, ...]] = {}
  try:
    with open(path, newline="", encoding="utf-8-sig") as handle:
      reader = csv.reader(handle)
      header = next(reader, None)
      if header is None:
        raise BenGeDataError(f"{path}: CSV file is empty (no header row)")
      header = [name.strip() for name in header]
      missing = [name for name in ("patch_id", *columns) if name not in header]
      if missing:
        raise BenGeDataError(f"{path}: missing column(s) {missing}; the header has {header}")
      id_index = header.index("patch_id")
      indices = [header.index(name) for name in columns]
      needed_width = max([id_index, *indices]) + 1
      for line_number, row in enumerate(reader, start=2):
        if not row:
          continue
        if len(row) < needed_width:
          raise BenGeDataError(f"{path}, line {line_number}: {len(row)} fields, expected at least "
                               f"{needed_width} (row: {row})")
        patch_id = row[id_index].strip()
        if not patch_id:
          raise BenGeDataError(f"{path}, line {line_number}: empty patch_id")
        if wanted is not None and patch_id not in wanted:
          continue
        if patch_id in rows:
          raise BenGeDataError(f"{path}, line {line_number}: patch {patch_id} appears more than once")
        rows[patch_id] = tuple(row[i].strip() for i in indices)
  except (OSError, UnicodeDecodeError, csv.Error) as error:
    raise BenGeDataError(f"{path}: cannot read CSV ({error})") from error
  return rows


def _csv_header(path: pathlib.Path) -> list[str]:
  try:
    with open(path, newline="", encoding="utf-8-sig") as handle:
      return [name.strip() for name in next(csv.reader(handle), [])]
  except (OSError, UnicodeDecodeError, csv.Error) as error:
    raise BenGeDataError(f"{path}: cannot read CSV ({error})") from error


def _finite_float(text: str, path: pathlib.Path, patch_id: str, column: str) -> float:
  try:
    value = float(text)
  except ValueError:
    raise BenGeDataError(f"{path}: patch {patch_id}, column {column!r}: {text!r} is not a number") from None
  if not math.isfinite(value):
    raise BenGeDataError(f"{path}: patch {patch_id}, column {column!r}: value {text!r} is not finite")
  return value


def _integer(text: str, path: pathlib.Path, patch_id: str, column: str) -> int:
  value = _finite_float(text, path, patch_id, column)  # accepts "7" and "7.0"
  if value != int(value):
    raise BenGeDataError(f"{path}: patch {patch_id}, column {column!r}: {text!r} is not an integer")
  return int(value)


# ---------------------------------------------------------------------------------------------------------
# Splits.
# ---------------------------------------------------------------------------------------------------------
def split_files(folder: pathlib.Path, prefix: str) -> dict[str, pathlib.Path]:
  """Split index files of `prefix` in `folder/splits/`: all three, or {} if there are none."""
  paths = {split: folder / "splits" / f"{prefix}_{suffix}.csv" for split, suffix in SPLIT_FILE_SUFFIX.items()}
  present = {split: path for split, path in paths.items() if path.is_file()}
  if present and len(present) != len(paths):
    missing = [str(path) for split, path in paths.items() if split not in present]
    raise BenGeDataError(f"incomplete split files for {prefix}: missing {missing}")
  return present


def read_split_file(path: pathlib.Path) -> list[str]:
  """Patch ids of one index file: one id per line, no header (a `patch_id` header line is tolerated)."""
  try:
    lines = path.read_text(encoding="utf-8-sig").splitlines()
  except (OSError, UnicodeDecodeError) as error:
    raise BenGeDataError(f"{path}: cannot read split file ({error})") from error
  ids = [line.split(",")[0].strip() for line in lines]
  ids = [patch_id for patch_id in ids if patch_id]
  if ids and ids[0] == "patch_id":
    ids = ids[1:]
  seen = set()
  for patch_id in ids:
    if patch_id in seen:
      raise BenGeDataError(f"{path}: patch {patch_id} is listed more than once")
    seen.add(patch_id)
  return ids


def _split_rank(patch_id: str) -> str:
  return hashlib.sha256((SPLIT_SALT + patch_id).encode("utf-8")).hexdigest()


def deterministic_splits(patch_ids: Iterable[str]) -> dict[str, list[str]]:
  """The documented 75 / 12.5 / 12.5 split of a dataset without split files (see the module docstring)."""
  ranked = sorted(set(patch_ids), key=lambda patch_id: (_split_rank(patch_id), patch_id))
  num_train = round(SPLIT_FRACTIONS["train"] * len(ranked))
  num_validation = round(SPLIT_FRACTIONS["validation"] * len(ranked))
  return {
      "train": sorted(ranked[:num_train]),
      "validation": sorted(ranked[num_train:num_train + num_validation]),
      "test": sorted(ranked[num_train + num_validation:]),
  }


# ---------------------------------------------------------------------------------------------------------
# The catalog: everything tabular about the patches to build, plus their split.
# ---------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Catalog:
  """Validated tabular data of every patch to build, stored column-wise (arrays indexed like patch_ids)."""
  folder: pathlib.Path
  patch_ids: list[str]  # sorted
  patch_ids_s1: list[str]
  season_s2: np.ndarray  # float32 [N]
  season_s1: np.ndarray
  lon: np.ndarray
  lat: np.ndarray
  climatezone: np.ndarray  # int64 [N], class index 0..11
  lulc_fractions: np.ndarray  # float32 [N, 11]
  era5: np.ndarray  # float32 [N, 9], constants.ERA5_COLUMNS order
  geocluster: np.ndarray  # int64 [N], 0..19
  splits: dict[str, list[str]]  # split name -> sorted patch ids
  split_source: str  # "split files in ..." or "deterministic rule ..."
  index: dict[str, int] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    self.index = {patch_id: row for row, patch_id in enumerate(self.patch_ids)}

  def tabular_features(self, patch_id: str) -> dict:
    """The non-raster features of one patch, ready for the TFDS feature dict."""
    row = self.index[patch_id]
    fractions = self.lulc_fractions[row]
    return {
        "patch_id": patch_id,
        "patch_id_s1": self.patch_ids_s1[row],
        "lulc_fractions": fractions,
        "lulc_top": int(np.argmax(fractions)),  # ties go to the lower class index, like torch.argmax
        "climatezone": int(self.climatezone[row]),
        "season_s2": np.float32(self.season_s2[row]),
        "season_s1": np.float32(self.season_s1[row]),
        "era5": self.era5[row],
        "geocluster": int(self.geocluster[row]),
        "lon": np.float32(self.lon[row]),
        "lat": np.float32(self.lat[row]),
    }


def scan_folder(folder, name: str, split_prefix: str | None = None) -> Catalog:
  """Reads and validates the CSVs and split files of the dataset folder `folder` (files named `name_*`).

  `split_prefix` names the split files to use (default `name`); the full ben-ge folder serves several
  subsets (`ben-ge-0.2`, ...), each defined by its own split files. Raises BenGeDataError on any problem.
  """
  folder = pathlib.Path(folder)
  split_prefix = split_prefix or name
  if not folder.is_dir():
    raise BenGeDataError(f"dataset folder {folder} does not exist")
  names = constants.csv_names(name)
  meta_path = folder / names["meta"]

  # Which patches: the union of the split files, or every patch of the meta CSV.
  files = split_files(folder, split_prefix)
  if files:
    splits = {split: read_split_file(path) for split, path in files.items()}
    owner: dict[str, str] = {}
    for split, ids in splits.items():
      for patch_id in ids:
        if patch_id in owner:
          raise BenGeDataError(f"patch {patch_id} is in both {files[owner[patch_id]]} and {files[split]}")
        owner[patch_id] = split
    wanted = set(owner)
    for split in SPLITS:
      if not splits[split]:
        raise BenGeDataError(f"{files[split]}: split file lists no patches")
  else:
    owner, wanted = {}, None

  meta_columns = [column for column in constants.META_COLUMNS if column != "patch_id"]
  climate_path = folder / names["climatezones"]
  climate_in_meta = not climate_path.is_file()
  if climate_in_meta:
    if meta_path.is_file() and "climatezone" not in _csv_header(meta_path):
      raise BenGeDataError(f"{meta_path}: missing column 'climatezone' (and there is no {climate_path.name} "
                           "to take it from)")
    meta_columns.append("climatezone")
  meta = _read_csv_columns(meta_path, meta_columns, wanted)

  if wanted is None:
    patch_ids = sorted(meta)
    if not patch_ids:
      raise BenGeDataError(f"{meta_path}: no patches")
    splits = deterministic_splits(patch_ids)
    split_source = (f"deterministic rule (SHA-256 of {SPLIT_SALT!r} + patch_id, 75/12.5/12.5), "
                    f"no split files for {split_prefix}")
  else:
    patch_ids = sorted(wanted)
    for patch_id in patch_ids:
      if patch_id not in meta:
        raise BenGeDataError(f"{meta_path}: patch {patch_id} (listed in {files[owner[patch_id]]}) is missing")
    splits = {split: sorted(ids) for split, ids in splits.items()}
    split_source = f"split files {', '.join(str(path) for path in files.values())}"

  def require_all(rows: Mapping[str, tuple], path: pathlib.Path) -> None:
    for patch_id in patch_ids:
      if patch_id not in rows:
        raise BenGeDataError(f"{path}: patch {patch_id} is missing")

  # Meta: ids, season, position, and the climate zone unless it has its own file.
  num = len(patch_ids)
  season_s2, season_s1 = np.empty(num, np.float32), np.empty(num, np.float32)
  lon, lat = np.empty(num, np.float32), np.empty(num, np.float32)
  climate_codes = np.empty(num, np.int64)
  patch_ids_s1 = []
  column = {name: meta_columns.index(name) for name in meta_columns}
  for row, patch_id in enumerate(patch_ids):
    values = meta[patch_id]
    patch_id_s1 = values[column["patch_id_s1"]]
    if not patch_id_s1:
      raise BenGeDataError(f"{meta_path}: patch {patch_id}, column 'patch_id_s1' is empty")
    patch_ids_s1.append(patch_id_s1)
    for array, key in ((season_s2, "season_s2"), (season_s1, "season_s1"), (lon, "lon"), (lat, "lat")):
      array[row] = _finite_float(values[column[key]], meta_path, patch_id, key)
    if climate_in_meta:
      climate_codes[row] = _integer(values[column["climatezone"]], meta_path, patch_id, "climatezone")
  del meta

  if not climate_in_meta:
    climate = _read_csv_columns(climate_path, ["climatezone"], patch_ids)
    require_all(climate, climate_path)
    for row, patch_id in enumerate(patch_ids):
      climate_codes[row] = _integer(climate[patch_id][0], climate_path, patch_id, "climatezone")
    del climate
  climate_source = meta_path if climate_in_meta else climate_path
  climatezone = np.empty(num, np.int64)
  for row, code in enumerate(climate_codes):
    if int(code) not in constants.CLIMATE_ZONE_CODE_TO_CLASS:
      raise BenGeDataError(f"{climate_source}: patch {patch_ids[row]} has unknown climate zone code {code} "
                           f"(known: {list(constants.CLIMATE_ZONE_CODES)})")
    climatezone[row] = constants.CLIMATE_ZONE_CODE_TO_CLASS[int(code)]

  # WorldCover fractions, by class name.
  worldcover_path = folder / names["worldcover"]
  worldcover = _read_csv_columns(worldcover_path, constants.LULC_FRACTION_COLUMNS, patch_ids)
  require_all(worldcover, worldcover_path)
  fractions = np.empty((num, constants.NUM_LULC_CLASSES), np.float32)
  for row, patch_id in enumerate(patch_ids):
    for k, (text, key) in enumerate(zip(worldcover[patch_id], constants.LULC_FRACTION_COLUMNS)):
      value = _finite_float(text, worldcover_path, patch_id, key)
      if not -FRACTION_TOLERANCE <= value <= 1 + FRACTION_TOLERANCE:
        raise BenGeDataError(f"{worldcover_path}: patch {patch_id}, column {key!r}: fraction {value} is "
                             "outside [0, 1]")
      fractions[row, k] = value
  del worldcover

  # ERA-5 weather, in the feature's column order.
  era5_path = folder / names["era5"]
  era5_rows = _read_csv_columns(era5_path, constants.ERA5_COLUMNS, patch_ids)
  require_all(era5_rows, era5_path)
  era5 = np.empty((num, len(constants.ERA5_COLUMNS)), np.float32)
  for row, patch_id in enumerate(patch_ids):
    for k, (text, key) in enumerate(zip(era5_rows[patch_id], constants.ERA5_COLUMNS)):
      era5[row, k] = _finite_float(text, era5_path, patch_id, key)
  del era5_rows

  # Geographic clusters (a pretext-task label).
  cluster_path = folder / names["geoclusters"]
  clusters = _read_csv_columns(cluster_path, ["cluster_idx"], patch_ids)
  require_all(clusters, cluster_path)
  geocluster = np.empty(num, np.int64)
  for row, patch_id in enumerate(patch_ids):
    value = _integer(clusters[patch_id][0], cluster_path, patch_id, "cluster_idx")
    if not 0 <= value < constants.NUM_GEOCLUSTERS:
      raise BenGeDataError(f"{cluster_path}: patch {patch_id}, column 'cluster_idx': {value} is outside "
                           f"0..{constants.NUM_GEOCLUSTERS - 1}")
    geocluster[row] = value
  del clusters

  return Catalog(folder=folder, patch_ids=patch_ids, patch_ids_s1=patch_ids_s1, season_s2=season_s2,
                 season_s1=season_s1, lon=lon, lat=lat, climatezone=climatezone, lulc_fractions=fractions,
                 era5=era5, geocluster=geocluster, splits=splits, split_source=split_source)


# ---------------------------------------------------------------------------------------------------------
# Rasters.
# ---------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RasterSpec:
  """What one raster file must look like."""
  size: int  # width and height in pixels
  min_bands: int
  max_bands: int
  dtype_kinds: str  # numpy dtype kinds accepted: 'u' unsigned, 'i' signed, 'f' float
  kind_description: str


_S1_SPEC = RasterSpec(constants.PATCH_SIZE, 1, 1, "f", "floating point (backscatter in dB)")
_LULC_SPEC = RasterSpec(constants.PATCH_SIZE, 1, 1, "ui", "integer (WorldCover codes)")
# ben-ge's README says one int16 band; one source stores three bands, of which the builder takes the first.
_DEM_SPEC = RasterSpec(constants.PATCH_SIZE, 1, 3, "uif", "integer or floating point (elevation in m)")


def raster_specs() -> dict[str, RasterSpec]:
  """Expected layout of every raster of a patch, keyed like constants.raster_paths."""
  specs = {f"s2_{band}": RasterSpec(constants.S2_BAND_SIZE[band], 1, 1, "u", "unsigned integer (L2A x 1e4)")
           for band in constants.S2_BANDS}
  specs.update({f"s1_{band}": _S1_SPEC for band in constants.S1_BANDS})
  specs["lulc"] = _LULC_SPEC
  specs["dem"] = _DEM_SPEC
  return specs


_SPECS = raster_specs()


def _check_header(dataset, spec: RasterSpec, path: pathlib.Path, patch_id: str) -> None:
  if dataset.width != spec.size or dataset.height != spec.size:
    raise BenGeDataError(f"{path}: patch {patch_id}: raster is {dataset.width}x{dataset.height} px, "
                         f"expected {spec.size}x{spec.size}")
  if not spec.min_bands <= dataset.count <= spec.max_bands:
    expected = (str(spec.min_bands) if spec.min_bands == spec.max_bands
                else f"{spec.min_bands}..{spec.max_bands}")
    raise BenGeDataError(f"{path}: patch {patch_id}: raster has {dataset.count} band(s), expected {expected}")
  dtype = np.dtype(dataset.dtypes[0])
  if dtype.kind not in spec.dtype_kinds:
    raise BenGeDataError(f"{path}: patch {patch_id}: raster dtype is {dtype}, expected {spec.kind_description}")


def _open(path: pathlib.Path, patch_id: str):
  if not path.is_file():
    raise BenGeDataError(f"{path}: patch {patch_id}: raster file is missing")
  try:
    return rasterio.open(path)
  except Exception as error:  # GDAL reports corrupt files through several unrelated exception types
    raise BenGeDataError(f"{path}: patch {patch_id}: cannot read raster ({error})") from error


def patch_raster_paths(catalog: Catalog, patch_id: str) -> dict[str, pathlib.Path]:
  row = catalog.index[patch_id]
  relative = constants.raster_paths(patch_id, catalog.patch_ids_s1[row])
  return {key: catalog.folder / path for key, path in relative.items()}


def gdal_env() -> rasterio.Env:
  """One GDAL environment for many opens (entering one per file costs ~0.5 ms); GDAL is told not to list
  a raster's folder on open, which for the flat dem/ and esaworldcover/ folders means thousands of files."""
  return rasterio.Env(GDAL_DISABLE_READDIR_ON_OPEN="EMPTY_DIR")


def check_raster_headers(catalog: Catalog, progress=None) -> None:
  """Opens the header of every raster of every patch and checks it against `raster_specs()`.

  No pixel data is read. `progress`, if given, is called once per patch (e.g. a tqdm update).
  """
  with gdal_env():
    for patch_id in catalog.patch_ids:
      for key, path in patch_raster_paths(catalog, patch_id).items():
        with _open(path, patch_id) as dataset:
          _check_header(dataset, _SPECS[key], path, patch_id)
      if progress is not None:
        progress()


def _read(path: pathlib.Path, patch_id: str, spec: RasterSpec, **read_kwargs) -> np.ndarray:
  """Reads band 1 of a raster (resampled if out_shape is given), turning any failure into BenGeDataError."""
  with _open(path, patch_id) as dataset:
    _check_header(dataset, spec, path, patch_id)
    try:
      return dataset.read(1, **read_kwargs)
    except Exception as error:  # corrupt pixel blocks surface only here, past a readable header
      raise BenGeDataError(f"{path}: patch {patch_id}: cannot read pixels ({error})") from error


def _require_finite(array: np.ndarray, path: pathlib.Path, patch_id: str) -> None:
  finite = np.isfinite(array)
  if not finite.all():
    bad = np.argwhere(~finite)[0]
    raise BenGeDataError(f"{path}: patch {patch_id}: {int((~finite).sum())} NaN/inf pixel(s), first at "
                         f"row {bad[0]}, column {bad[1]} (value {array[tuple(bad)]})")


def read_patch(catalog: Catalog, patch_id: str) -> dict:
  """Reads and checks the rasters of one patch; returns s2, s1, dem and lulc as stored in the dataset.

  - s2: each band read like the reference, `read(out_shape=(1, 120, 120), resampling=bilinear)`, so the
    20 m and 60 m bands are upsampled bilinearly (10 m bands are read unchanged); uint16, channels last in
    constants.S2_BANDS order.
  - s1: VH then VV, float32 dB; dem: the first band, float32 [120, 120, 1]. Both must be finite.
  - lulc: WorldCover codes mapped to classes 0..10; code 0 (no data) becomes 255; any other code is an
    error (the reference would silently turn it into -1).
  """
  size = constants.PATCH_SIZE
  paths = patch_raster_paths(catalog, patch_id)
  s2 = np.empty((size, size, len(constants.S2_BANDS)), np.uint16)
  for channel, band in enumerate(constants.S2_BANDS):
    key = f"s2_{band}"
    pixels = _read(paths[key], patch_id, _SPECS[key], out_shape=(size, size), resampling=Resampling.bilinear)
    if pixels.max(initial=0) > np.iinfo(np.uint16).max:
      raise BenGeDataError(f"{paths[key]}: patch {patch_id}: values above the uint16 range")
    s2[..., channel] = pixels
  s1 = np.empty((size, size, len(constants.S1_BANDS)), np.float32)
  for channel, band in enumerate(constants.S1_BANDS):
    key = f"s1_{band}"
    pixels = _read(paths[key], patch_id, _SPECS[key]).astype(np.float32)
    _require_finite(pixels, paths[key], patch_id)
    s1[..., channel] = pixels
  dem = _read(paths["dem"], patch_id, _SPECS["dem"]).astype(np.float32)
  _require_finite(dem, paths["dem"], patch_id)

  codes = _read(paths["lulc"], patch_id, _SPECS["lulc"])
  lulc = constants.worldcover_code_to_class(codes)
  unknown = (lulc == constants.LULC_IGNORE) & (codes != 0)
  if unknown.any():
    values = sorted(int(v) for v in np.unique(codes[unknown]))
    raise BenGeDataError(f"{paths['lulc']}: patch {patch_id}: unknown WorldCover code(s) {values} in "
                         f"{int(unknown.sum())} pixel(s) (known: 0 = no data, {list(constants.WORLDCOVER_CODES)})")
  return {"s2": s2, "s1": s1, "dem": dem[..., None], "lulc": lulc}
