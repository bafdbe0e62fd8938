"""Writes a SYNTHETIC ben-ge dataset folder (GeoTIFFs + CSVs in the exact on-disk layout of the real one).

    python -m data_builders.ben_ge.synthetic --out PATH [--name NAME] [--num_patches N] [--seed S]
        [--workers W] [--write_splits | --no-write_splits] [--nodata_fraction F]

The content comes from the small world model in `synthetic_world.py` (see its docstring), so models trained on it learn
something: climate zone from S2, land cover from S2 and from S1, with partly complementary modalities. The
folder carries a `SYNTHETIC_README.txt` (see `is_synthetic_folder`) so that nobody mistakes it, or results
on it, for real ben-ge.

Layout (docs/reference.md; file names from `labeleff_jax.data.constants`):
    NAME/NAME_meta.csv, NAME_esaworldcover.csv, NAME_era-5.csv, NAME_geoclusters_k20.csv
    NAME/NAME_climatezones.csv            full-dataset names only (ben-ge, ben-ge-0.x); else a meta column
    NAME/splits/NAME_{train,val,test}.csv one patch_id per line, no header (80/10/10), when splits are written
    NAME/sentinel-2/PID/PID_B01.tif ...   uint16 reflectance x 1e4 at native 10/20/60 m sizes
    NAME/sentinel-1/S1ID/S1ID_VH.tif ...  float32 dB, 120 x 120
    NAME/esaworldcover/PID_esaworldcover.tif  uint8 WorldCover codes (0 = no data)
    NAME/dem/PID_dem.tif                  int16 metres
Every GeoTIFF has the UTM CRS of its longitude and a north-up transform with the band's real pixel size.

Each patch draws from its own RNG keyed by (seed, patch index), so the output is byte-identical for a seed
whatever the number of workers. The folder is written as `NAME.partial` and renamed at the end.
"""

import argparse
import csv
import datetime
import multiprocessing
import pathlib
import re
import shutil
import struct
import sys
import time

import numpy as np
import rasterio
import rasterio.warp
from rasterio.crs import CRS
from rasterio.transform import Affine

from data_builders.ben_ge import synthetic_world as world_model
from labeleff_jax.data import constants

GENERATOR_VERSION = "1"
MARKER_FILE = "SYNTHETIC_README.txt"  # present in every folder this module writes, never in real ben-ge
SPLIT_FRACTIONS = (("train", 0.8), ("val", 0.1), ("test", 0.1))
# Deliberately not constants.ERA5_COLUMNS' order: readers must go by column name.
ERA5_WRITE_ORDER = ("patch_id", "patch_id_s1", "temperature_s2", "wind-u_s2", "wind-v_s2", "relhumidity_s2",
                    "temperature_s1", "wind-u_s1", "wind-v_s1", "relhumidity_s1", "atmpressure_level")
assert sorted(ERA5_WRITE_ORDER) == sorted(constants.ERA5_CSV_COLUMNS + ("patch_id_s1",))
assert ERA5_WRITE_ORDER[2:] != constants.ERA5_COLUMNS


def is_full_dataset_name(name: str) -> bool:
  """The full ben-ge and its fractional subsets keep climate zones in a separate CSV and ship splits."""
  return name == "ben-ge" or re.fullmatch(r"ben-ge-0\.\d+", name) is not None


def default_write_splits(name: str) -> bool:
  return is_full_dataset_name(name) or name == "ben-ge-8k"


def utm_epsg(lon: float) -> int:
  """EPSG code of the northern-hemisphere WGS 84 / UTM zone containing `lon`."""
  zone = int(np.floor((lon + 180.0) / 6.0)) % 60 + 1
  return 32600 + zone


# ---------------------------------------------------------------------------------------------------------
# Ids.
# ---------------------------------------------------------------------------------------------------------
def _patch_ids(meta: world_model.PatchMeta, column: int, row: int):
  """Realistic S2 and S1 ids: S2A_MSIL2A_20170701T093031_78_25, S1A_IW_GRDH_1SDV_..._029341_034EA5_78_25."""
  s2_id = f"{meta.s2_satellite}_MSIL2A_{meta.s2_time:%Y%m%dT%H%M%S}_{column}_{row}"
  # Absolute orbits advance by 175 per 12-day cycle; datatake ids are hex and also grow with time.
  days = (meta.s1_time - datetime.datetime(2017, 1, 1)).total_seconds() / 86400.0
  orbit = (14800 if meta.s1_satellite == "S1A" else 3600) + int(days * 175 / 12)
  datatake = (0x0283A0 if meta.s1_satellite == "S1A" else 0x00F000) + int(days * 60)
  s1_id = (f"{meta.s1_satellite}_IW_GRDH_1SDV_{meta.s1_time:%Y%m%dT%H%M%S}_{orbit:06d}_{datatake:06X}"
           f"_{column}_{row}")
  return s2_id, s1_id


def assign_ids(metas, seed: int):
  """Unique (S2, S1) ids for all patches; the grid position is random, bumped on the rare collision."""
  seen_s2, seen_s1, ids = set(), set(), []
  for meta in metas:
    rng = world_model.rng_for(seed, world_model.META_STREAM + 100, meta.index)
    column, row = (int(v) for v in rng.integers(0, 100, 2))
    s2_id, s1_id = _patch_ids(meta, column, row)
    while s2_id in seen_s2 or s1_id in seen_s1:
      row = (row + 1) % 100
      column += row == 0
      s2_id, s1_id = _patch_ids(meta, column, row)
    seen_s2.add(s2_id)
    seen_s1.add(s1_id)
    ids.append((s2_id, s1_id))
  return ids


# ---------------------------------------------------------------------------------------------------------
# Georeferencing.
# ---------------------------------------------------------------------------------------------------------
def patch_origins(metas):
  """(epsg, west, north) per patch: the upper-left corner, snapped to the 60 m grid of the coarsest band."""
  epsgs = [utm_epsg(m.lon) for m in metas]
  origins = [None] * len(metas)
  for epsg in sorted(set(epsgs)):
    members = [i for i, e in enumerate(epsgs) if e == epsg]
    xs, ys = rasterio.warp.transform("EPSG:4326", f"EPSG:{epsg}", [metas[i].lon for i in members],
                                     [metas[i].lat for i in members])
    for i, x, y in zip(members, xs, ys):
      origins[i] = (epsg, float(np.round(x / 60.0) * 60.0 - 600.0), float(np.round(y / 60.0) * 60.0 + 600.0))
  return origins


# ---------------------------------------------------------------------------------------------------------
# Writing one patch (runs in the workers).
# ---------------------------------------------------------------------------------------------------------
_TEMPLATE_WEST, _TEMPLATE_NORTH = -1234567.25, 9876543.125  # values that occur nowhere else in a header


class GeoTiffWriter:
  """Writes single-band GeoTIFFs byte-identical to rasterio/GDAL's, but without GDAL's per-file overhead.

  GDAL writes an uncompressed single-band GTiff as a fixed header followed by the raw pixels, and for rasters
  of one shape, dtype, CRS and pixel size the header differs only in the tie point (the upper-left corner).
  So GDAL writes one template per kind (into memory), and each file is the template with its tie point and
  pixels replaced. Opening a GDAL dataset per file costs ~1.4 ms, 16 files per patch; this costs ~0.2 ms.
  Where the template does not have that layout (another GDAL version may differ), it falls back to rasterio.
  """

  def __init__(self):
    self._templates = {}

  def _template(self, shape, dtype, epsg, pixel_size, nodata):
    key = (shape, np.dtype(dtype).str, epsg, pixel_size, nodata)
    if key not in self._templates:
      self._templates[key] = self._make_template(shape, np.dtype(dtype), epsg, pixel_size, nodata)
    return self._templates[key]

  @staticmethod
  def _make_template(shape, dtype, epsg, pixel_size, nodata):
    """(header, tie point offset), or None where GDAL's output is not header + raw pixels."""
    # A pattern, not zeros: GDAL may treat all-zero strips specially, and the pattern must be findable.
    pattern = (np.arange(np.prod(shape)) % 251 + 1).astype(dtype).reshape(shape)
    content = _gdal_bytes(pattern, epsg, _TEMPLATE_WEST, _TEMPLATE_NORTH, pixel_size, nodata)
    header_size = len(content) - pattern.nbytes
    tie_point = struct.pack("<dd", _TEMPLATE_WEST, _TEMPLATE_NORTH)
    offset = content.find(tie_point)
    if not (content[:2] == b"II" and content.count(tie_point) == 1 and 0 <= offset < header_size
            and content[header_size:] == pattern.astype(dtype.newbyteorder("<")).tobytes()):
      return None
    template = (bytes(content[:header_size]), offset)
    # Check once against GDAL itself with other pixels and another corner.
    probe = pattern[::-1].copy()
    if _fill_template(template, probe, 300000.0, 5000040.0) != _gdal_bytes(
        probe, epsg, 300000.0, 5000040.0, pixel_size, nodata):
      return None
    return template

  def write(self, path, image: np.ndarray, epsg: int, west: float, north: float, pixel_size: float,
            nodata=None):
    template = self._template(image.shape, image.dtype, epsg, pixel_size, nodata)
    if template is None:
      with rasterio.open(path, "w", **_profile(image, epsg, west, north, pixel_size, nodata)) as dst:
        dst.write(image, 1)
      return
    with open(path, "wb") as f:
      f.write(_fill_template(template, image, west, north))


def _fill_template(template, image, west, north) -> bytes:
  header, tie_point_offset = template
  corner = struct.pack("<dd", west, north)
  pixels = np.ascontiguousarray(image, image.dtype.newbyteorder("<")).tobytes()
  return b"".join((header[:tie_point_offset], corner, header[tie_point_offset + 16:], pixels))


def _gdal_bytes(image, epsg, west, north, pixel_size, nodata) -> bytes:
  with rasterio.MemoryFile() as memory:
    with memory.open(**_profile(image, epsg, west, north, pixel_size, nodata)) as dst:
      dst.write(image, 1)
    return memory.read()


def _profile(image, epsg, west, north, pixel_size, nodata):
  profile = dict(driver="GTiff", height=image.shape[0], width=image.shape[1], count=1, dtype=image.dtype,
                 crs=CRS.from_epsg(epsg), transform=Affine(pixel_size, 0.0, west, 0.0, -pixel_size, north))
  if nodata is not None:
    profile["nodata"] = nodata
  return profile


_WRITER = GeoTiffWriter()  # one per process: the templates are cached in it


def _write_patch(job):
  """Generates and writes every raster of one patch; returns (index, land-cover fractions)."""
  meta, seed, root, patch_id, patch_id_s1, (epsg, west, north) = job
  rasters = world_model.generate_rasters(meta, seed)
  root = pathlib.Path(root)
  paths = constants.raster_paths(patch_id, patch_id_s1)
  (root / paths["s2_B01"]).parent.mkdir(parents=True, exist_ok=True)
  (root / paths["s1_VH"]).parent.mkdir(parents=True, exist_ok=True)
  for band in constants.S2_BANDS:
    _WRITER.write(root / paths[f"s2_{band}"], rasters["s2"][band], epsg, west, north,
                  constants.S2_BAND_RESOLUTION_M[band])
  for band in constants.S1_BANDS:
    _WRITER.write(root / paths[f"s1_{band}"], rasters["s1"][band], epsg, west, north, 10)
  _WRITER.write(root / paths["lulc"], rasters["lulc"], epsg, west, north, 10, nodata=0)
  _WRITER.write(root / paths["dem"], rasters["dem"], epsg, west, north, 10)
  return meta.index, rasters["fractions"]


# ---------------------------------------------------------------------------------------------------------
# CSVs.
# ---------------------------------------------------------------------------------------------------------
def _write_csv(path: pathlib.Path, header, rows):
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    if header is not None:
      writer.writerow(header)
    writer.writerows(rows)


def _fmt(value: float, digits: int = 6) -> str:
  return f"{value:.{digits}f}"


def _write_tables(root: pathlib.Path, name: str, metas, ids, fractions, climatezones_separate: bool):
  files = constants.csv_names(name)
  meta_header = list(constants.META_COLUMNS) + ([] if climatezones_separate else ["climatezone"])
  meta_rows = []
  for meta, (s2_id, s1_id) in zip(metas, ids):
    row = [s2_id, s1_id, f"{meta.s2_time:%Y-%m-%d %H:%M:%S}", f"{meta.s1_time:%Y-%m-%d %H:%M:%S}",
           _fmt(meta.season_s2), _fmt(meta.season_s1), _fmt(meta.lon), _fmt(meta.lat)]
    meta_rows.append(row + ([] if climatezones_separate else [meta.climate_code]))
  _write_csv(root / files["meta"], meta_header, meta_rows)
  if climatezones_separate:
    _write_csv(root / files["climatezones"], constants.CLIMATEZONE_COLUMNS,
               [(s2_id, meta.climate_code) for meta, (s2_id, _) in zip(metas, ids)])

  _write_csv(root / files["worldcover"], list(constants.WORLDCOVER_CSV_COLUMNS) + ["filename"],
             [[s2_id] + [_fmt(f, 8) for f in frac] + [f"{s2_id}_esaworldcover.tif"]
              for (s2_id, _), frac in zip(ids, fractions)])

  era5_rows = []
  for meta, (s2_id, s1_id) in zip(metas, ids):
    values = {"patch_id": s2_id, "patch_id_s1": s1_id, "atmpressure_level": _fmt(meta.pressure, 3)}
    for suffix, weather in (("s2", meta.weather_s2), ("s1", meta.weather_s1)):
      for key, value in weather.items():
        values[f"{key}_{suffix}"] = _fmt(value, 3)
    era5_rows.append([values[column] for column in ERA5_WRITE_ORDER])
  _write_csv(root / files["era5"], ERA5_WRITE_ORDER, era5_rows)

  _write_csv(root / files["geoclusters"], constants.GEOCLUSTER_COLUMNS,
             [(s2_id, world_model.geocluster(meta.lon, meta.lat)) for meta, (s2_id, _) in zip(metas, ids)])


def _write_splits(root: pathlib.Path, name: str, ids, seed: int):
  order = world_model.rng_for(seed, world_model.META_STREAM + 200).permutation(len(ids))
  num_train = int(round(SPLIT_FRACTIONS[0][1] * len(ids)))
  num_val = int(round(SPLIT_FRACTIONS[1][1] * len(ids)))
  parts = {"train": order[:num_train], "val": order[num_train:num_train + num_val],
           "test": order[num_train + num_val:]}
  (root / "splits").mkdir(exist_ok=True)
  for split, members in parts.items():
    _write_csv(root / "splits" / f"{name}_{split}.csv", None, [[ids[i][0]] for i in sorted(members)])


def is_synthetic_folder(folder) -> bool:
  """Whether a ben-ge folder was written by this module (so results on it must be labelled synthetic)."""
  return (pathlib.Path(folder) / MARKER_FILE).is_file()


def _write_readme(root: pathlib.Path, name: str, num_patches: int, seed: int):
  (root / MARKER_FILE).write_text(
      f"SYNTHETIC DATA - not ben-ge.\n\n"
      f"This folder imitates the on-disk layout of ben-ge ({name}) but every value was generated by\n"
      f"labeleff_jax's world model (data_builders/ben_ge/synthetic_world.py, generator version {GENERATOR_VERSION})\n"
      f"with seed {seed} and {num_patches} patches. Results obtained on it say nothing about real\n"
      f"Earth-observation data; label them as synthetic wherever they are shown.\n")


# ---------------------------------------------------------------------------------------------------------
# Entry points.
# ---------------------------------------------------------------------------------------------------------
def write_dataset(out_dir, name: str = "ben-ge-800", num_patches: int = 800, seed: int = 0, *,
                  write_splits=None, nodata_fraction: float = 0.0, workers: int = 1,
                  overwrite: bool = False, progress: bool = False) -> pathlib.Path:
  """Writes the synthetic dataset folder `out_dir/name` and returns its path.

  write_splits: None writes `splits/` for the names whose real counterparts have them (ben-ge-8k, ben-ge,
    ben-ge-0.x); True/False forces it. nodata_fraction: share of patches whose WorldCover map gets a no-data
    (code 0) strip. workers: processes generating patches (the output does not depend on it).
  """
  if not name or "/" in name or name.endswith(".partial"):
    raise ValueError(f"invalid dataset name {name!r}")
  if num_patches < 1:
    raise ValueError(f"num_patches must be positive, got {num_patches}")
  if seed < 0:
    raise ValueError(f"seed must be non-negative, got {seed}")
  if not 0.0 <= nodata_fraction <= 1.0:
    raise ValueError(f"nodata_fraction must be in [0, 1], got {nodata_fraction}")
  out_dir = pathlib.Path(out_dir)
  final = out_dir / name
  if final.exists():
    if not overwrite:
      raise FileExistsError(f"{final} already exists; remove it or pass overwrite=True")
    shutil.rmtree(final)
  partial = out_dir / f"{name}.partial"
  if partial.exists():
    shutil.rmtree(partial)  # left over from an interrupted run
  partial.mkdir(parents=True)
  for folder in ("sentinel-2", "sentinel-1", "esaworldcover", "dem"):
    (partial / folder).mkdir()

  world = world_model.World.from_seed(seed)
  metas = [world_model.sample_patch_meta(world, seed, i, nodata_fraction) for i in range(num_patches)]
  ids = assign_ids(metas, seed)
  origins = patch_origins(metas)
  jobs = [(meta, seed, str(partial), s2_id, s1_id, origin)
          for meta, (s2_id, s1_id), origin in zip(metas, ids, origins)]

  fractions = [None] * num_patches
  iterator = None
  pool = None
  try:
    if workers > 1:
      # spawn, not fork: the parent may be multithreaded (JAX in tests, notebooks); forking it can deadlock.
      pool = multiprocessing.get_context("spawn").Pool(workers)
      iterator = pool.imap_unordered(_write_patch, jobs, chunksize=8)
    else:
      iterator = map(_write_patch, jobs)
    start, done = time.time(), 0
    for index, patch_fractions in iterator:
      fractions[index] = patch_fractions
      done += 1
      if progress and (done % 200 == 0 or done == num_patches):
        rate = done / max(time.time() - start, 1e-9)
        print(f"\r{done}/{num_patches} patches ({rate:.1f}/s)", end="", file=sys.stderr, flush=True)
    if progress:
      print(file=sys.stderr)
  finally:
    if pool is not None:
      pool.terminate()
      pool.join()

  _write_tables(partial, name, metas, ids, fractions, climatezones_separate=is_full_dataset_name(name))
  if default_write_splits(name) if write_splits is None else write_splits:
    _write_splits(partial, name, ids, seed)
  _write_readme(partial, name, num_patches, seed)
  partial.rename(final)
  return final


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", required=True, help="folder to write NAME/ into")
  parser.add_argument("--name", default="ben-ge-800", help="dataset folder name (default ben-ge-800)")
  parser.add_argument("--num_patches", type=int, default=800)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--workers", type=int, default=1, help="processes (output does not depend on it)")
  parser.add_argument("--write_splits", action=argparse.BooleanOptionalAction, default=None,
                      help="write splits/ (default: only for ben-ge-8k and the full-dataset names)")
  parser.add_argument("--nodata_fraction", type=float, default=0.0,
                      help="share of patches with a no-data strip in the land-cover map")
  parser.add_argument("--overwrite", action="store_true", help="replace an existing NAME/ folder")
  args = parser.parse_args(argv)
  start = time.time()
  path = write_dataset(args.out, args.name, args.num_patches, args.seed, write_splits=args.write_splits,
                       nodata_fraction=args.nodata_fraction, workers=args.workers,
                       overwrite=args.overwrite, progress=True)
  seconds = time.time() - start
  print(f"wrote SYNTHETIC dataset {path} ({args.num_patches} patches in {seconds:.1f} s, "
        f"{args.num_patches / seconds:.1f} patches/s)")


if __name__ == "__main__":
  main()
