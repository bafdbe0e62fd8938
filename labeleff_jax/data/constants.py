"""The one table of facts: ben-ge's bands, codes and files, the modalities and labels a batch can hold, the
task kinds and compute dtypes. The builder, the synthetic writer, the pipeline, the models and the config
checks all read them from here, so they cannot disagree.

The dataset facts come from the reference (docs/reference.md); nothing here is tuned.
"""

import dataclasses

import numpy as np

# ---------------------------------------------------------------------------------------------------------
# Rasters.
# ---------------------------------------------------------------------------------------------------------
PATCH_SIZE = 120  # pixels at 10 m: every stored raster is 120 x 120

# Sentinel-2 L2A bands in the reference order (no B10), with their native pixel size in metres.
S2_BANDS = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12")
S2_BAND_RESOLUTION_M = {
    "B01": 60, "B02": 10, "B03": 10, "B04": 10, "B05": 20, "B06": 20,
    "B07": 20, "B08": 10, "B8A": 20, "B09": 60, "B11": 20, "B12": 20,
}
# Native raster side in pixels for a 1.2 km patch: 120 (10 m), 60 (20 m), 20 (60 m).
S2_BAND_SIZE = {band: 1200 // res for band, res in S2_BAND_RESOLUTION_M.items()}
S2_RGB_INDICES = (3, 2, 1)  # B04, B03, B02

S1_BANDS = ("VH", "VV")  # reference order

# ---------------------------------------------------------------------------------------------------------
# ESA WorldCover land cover.
# ---------------------------------------------------------------------------------------------------------
LULC_CLASSES = (
    "tree_cover", "shrubland", "grassland", "cropland", "built-up", "bare/sparse_vegetation",
    "snow_and_ice", "permanent_water_bodies", "herbaceous_wetland", "mangroves", "moss_and_lichen",
)
NUM_LULC_CLASSES = len(LULC_CLASSES)
# Raw WorldCover codes in class order: the reference maps 100 -> 110, 95 -> 100, then v / 10 - 1.
WORLDCOVER_CODES = (10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 100)
LULC_IGNORE = 255  # stored for "no data" (code 0 or anything unknown where the builder is told to mask)
# Official WorldCover colours (RGB 0..255), in class order, for plots.
WORLDCOVER_COLORS = (
    (0, 100, 0), (255, 187, 34), (255, 255, 76), (240, 150, 255), (250, 0, 0), (180, 180, 180),
    (240, 240, 240), (0, 100, 200), (0, 150, 160), (0, 207, 117), (250, 230, 160),
)

# Column names of the fraction CSV, in class order (the CSV itself is read by name).
LULC_FRACTION_COLUMNS = LULC_CLASSES


def worldcover_code_to_class(codes: np.ndarray) -> np.ndarray:
  """Maps raw WorldCover codes to class indices 0..10 and every other code to LULC_IGNORE (uint8)."""
  lookup = np.full(256, LULC_IGNORE, dtype=np.uint8)
  for index, code in enumerate(WORLDCOVER_CODES):
    lookup[code] = index
  codes = np.asarray(codes)
  if codes.dtype != np.uint8:
    out_of_range = (codes < 0) | (codes > 255)
    codes = np.where(out_of_range, 0, codes).astype(np.uint8)
    result = lookup[codes]
    result[out_of_range] = LULC_IGNORE
    return result
  return lookup[codes]


# ---------------------------------------------------------------------------------------------------------
# Koeppen-Geiger climate zones: raw codes in class order (0 = water patch, no zone).
# ---------------------------------------------------------------------------------------------------------
CLIMATE_ZONE_CODES = (0, 7, 8, 9, 14, 15, 16, 18, 25, 26, 27, 29)
NUM_CLIMATE_ZONES = len(CLIMATE_ZONE_CODES)
CLIMATE_ZONE_CODE_TO_CLASS = {code: index for index, code in enumerate(CLIMATE_ZONE_CODES)}

# ---------------------------------------------------------------------------------------------------------
# ERA-5 weather, in the order of the `era5` feature (the CSV is read by these names).
# ---------------------------------------------------------------------------------------------------------
ERA5_COLUMNS = (
    "atmpressure_level", "temperature_s2", "temperature_s1", "wind-u_s2", "wind-u_s1",
    "wind-v_s2", "wind-v_s1", "relhumidity_s2", "relhumidity_s1",
)

NUM_GEOCLUSTERS = 20

# ---------------------------------------------------------------------------------------------------------
# CSV schemas: the columns each file must have (more may appear; order never matters).
# ---------------------------------------------------------------------------------------------------------
META_COLUMNS = ("patch_id", "patch_id_s1", "timestamp_s2", "timestamp_s1", "season_s2", "season_s1",
                "lon", "lat")  # plus `climatezone` here or in NAME_climatezones.csv
CLIMATEZONE_COLUMNS = ("patch_id", "climatezone")
WORLDCOVER_CSV_COLUMNS = ("patch_id",) + LULC_FRACTION_COLUMNS
ERA5_CSV_COLUMNS = ("patch_id",) + ERA5_COLUMNS
GEOCLUSTER_COLUMNS = ("patch_id", "cluster_idx")


def csv_names(name: str) -> dict:
  """File names of the CSVs of dataset folder `name` (e.g. 'ben-ge-800')."""
  return {
      "meta": f"{name}_meta.csv",
      "climatezones": f"{name}_climatezones.csv",  # full ben-ge only; else the column lives in meta
      "worldcover": f"{name}_esaworldcover.csv",
      "era5": f"{name}_era-5.csv",
      "geoclusters": f"{name}_geoclusters_k20.csv",
  }


def raster_paths(patch_id: str, patch_id_s1: str) -> dict:
  """Relative paths of every raster of one patch, keyed by what they hold."""
  paths = {f"s2_{band}": f"sentinel-2/{patch_id}/{patch_id}_{band}.tif" for band in S2_BANDS}
  paths.update({f"s1_{band}": f"sentinel-1/{patch_id_s1}/{patch_id_s1}_{band}.tif" for band in S1_BANDS})
  paths["lulc"] = f"esaworldcover/{patch_id}_esaworldcover.tif"
  paths["dem"] = f"dem/{patch_id}_dem.tif"
  return paths


# ---------------------------------------------------------------------------------------------------------
# Normalisation (the reference's constants; the pipeline can instead standardise with train-split stats).
# ---------------------------------------------------------------------------------------------------------
S2_SCALE = 10000.0  # reflectance x 1e4 -> clip(x / 1e4, 0, 1)
S1_CLIP_DB = (-25.0, 0.0)  # (clip(x, -25, 0) + 25) / 25
# The reference does not normalise the DEM; European elevations span roughly 0..3000 m, so the project
# divides by this to keep inputs O(1) (documented in the README).
DEM_SCALE_M = 1000.0
# ERA-5 scaling: (x - offset) / scale per column, physically motivated ranges (documented in the README).
ERA5_OFFSET = np.array([1000.0, 283.0, 283.0, 0.0, 0.0, 0.0, 0.0, 70.0, 70.0], np.float32)
ERA5_SCALE = np.array([50.0, 15.0, 15.0, 10.0, 10.0, 10.0, 10.0, 30.0, 30.0], np.float32)

# ---------------------------------------------------------------------------------------------------------
# What a batch holds (docs/architecture.md, "Batches").
# ---------------------------------------------------------------------------------------------------------
# Modality names accepted in `config.data.modalities`, with their channels in a batch.
IMAGE_MODALITIES = {"s2": len(S2_BANDS), "s1": len(S1_BANDS), "dem": 1, "lulc": NUM_LULC_CLASSES}
VECTOR_MODALITIES = {"season": 1, "climatezone": NUM_CLIMATE_ZONES, "era5": len(ERA5_COLUMNS)}
MODALITIES = {**IMAGE_MODALITIES, **VECTOR_MODALITIES}

TASK_KINDS = ("classification", "multilabel", "segmentation", "regression")


@dataclasses.dataclass(frozen=True)
class Label:
  """A label the pipeline can produce: the task kind it feeds, its classes, and what it is in a batch."""
  kind: str
  num_classes: int  # 1 for regression
  leaks_from: str | None  # the input modality that already holds the answer (None: none does)
  description: str


LABELS = {
    "climatezone": Label("classification", NUM_CLIMATE_ZONES, "climatezone",
                         "int32 [] climate-zone class 0..11"),
    "lulc_top": Label("classification", NUM_LULC_CLASSES, "lulc", "int32 [] dominant land-cover class 0..10"),
    "geocluster": Label("classification", NUM_GEOCLUSTERS, None, "int32 [] geographic cluster 0..19"),
    "lulc_multihot": Label("multilabel", NUM_LULC_CLASSES, "lulc",
                           "float32 [11] land-cover classes whose fraction exceeds the threshold"),
    "lulc": Label("segmentation", NUM_LULC_CLASSES, "lulc",
                  "int32 [H, W] land-cover class per pixel, 255 = ignore"),
    "season": Label("regression", 1, "season", "float32 [] season_s2"),
}

# `config.train.compute_dtype`: parameters, optimizer state and losses stay float32 either way.
COMPUTE_DTYPES = ("float32", "bfloat16")

DATASET_CONFIGS = ("ben-ge-800", "ben-ge-8k", "ben-ge-0.2", "ben-ge-0.4", "ben-ge-0.6", "ben-ge-0.8",
                   "ben-ge")
