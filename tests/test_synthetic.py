"""Tests of the synthetic ben-ge writer: on-disk layout, determinism, and that its content is learnable."""

import csv
import datetime
import fcntl
import math
import pathlib
import re

import numpy as np
import pytest
import rasterio
import rasterio.warp
import threadpoolctl
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import KFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from data_builders.ben_ge import synthetic
from data_builders.ben_ge import synthetic_world as world
from labeleff_jax.data import constants

NUM_PATCHES = 150  # enough for the learnability checks to have clear margins, small enough to be fast
S2_ID = re.compile(r"S2[AB]_MSIL2A_(\d{8}T\d{6})_\d{1,3}_\d{1,3}")
S1_ID = re.compile(r"S1[AB]_IW_GRDH_1SDV_(\d{8}T\d{6})_\d{6}_[0-9A-F]{6}_\d{1,3}_\d{1,3}")


def read_csv(path):
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def header_of(path):
  with open(path, newline="") as f:
    return next(csv.reader(f))


def all_files(root: pathlib.Path) -> dict:
  return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  """A 150-patch ben-ge-800-style folder, every raster read back once with rasterio."""
  # Written once per pytest run: the parent of the per-worker base temp is shared by all xdist workers.
  shared = pathlib.Path(tmp_path_factory.getbasetemp()).parent / "synthetic-150"
  shared.mkdir(parents=True, exist_ok=True)
  with open(shared / ".lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    root = shared / "ben-ge-800"
    if not root.exists():
      synthetic.write_dataset(shared, "ben-ge-800", NUM_PATCHES, seed=0, nodata_fraction=0.1)
  meta = read_csv(root / "ben-ge-800_meta.csv")
  rasters, profiles = [], []
  for row in meta:
    arrays, info = {}, {}
    for key, relative in constants.raster_paths(row["patch_id"], row["patch_id_s1"]).items():
      with rasterio.open(root / relative) as src:
        arrays[key] = src.read()
        info[key] = (src.count, src.crs.to_epsg(), src.transform, src.bounds)
    rasters.append(arrays)
    profiles.append(info)
  return {"root": root, "meta": meta, "rasters": rasters, "profiles": profiles}


# ---------------------------------------------------------------------------------------------------------
# Layout.
# ---------------------------------------------------------------------------------------------------------
def test_folder_holds_exactly_the_ben_ge_files(dataset):
  root = dataset["root"]
  assert root.name == "ben-ge-800" and not (root.parent / "ben-ge-800.partial").exists()
  names = constants.csv_names("ben-ge-800")
  for key in ("meta", "worldcover", "era5", "geoclusters"):
    assert (root / names[key]).is_file(), key
  assert not (root / names["climatezones"]).exists()  # ben-ge-800 keeps climate zones in the meta CSV
  assert not (root / "splits").exists()
  assert "SYNTHETIC" in (root / "SYNTHETIC_README.txt").read_text()
  assert synthetic.is_synthetic_folder(root) and not synthetic.is_synthetic_folder(root / "dem")
  expected = {"SYNTHETIC_README.txt"} | {names[k] for k in ("meta", "worldcover", "era5", "geoclusters")}
  for row in dataset["meta"]:
    expected |= set(constants.raster_paths(row["patch_id"], row["patch_id_s1"]).values())
  written = {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}
  assert written == expected


def test_csv_columns(dataset):
  root = dataset["root"]
  names = constants.csv_names("ben-ge-800")
  assert header_of(root / names["meta"]) == list(constants.META_COLUMNS) + ["climatezone"]
  assert header_of(root / names["worldcover"]) == list(constants.WORLDCOVER_CSV_COLUMNS) + ["filename"]
  era5_header = header_of(root / names["era5"])
  assert sorted(era5_header) == sorted(("patch_id", "patch_id_s1") + constants.ERA5_COLUMNS)
  # The order must differ from the feature order, so that a reader going by position would fail.
  assert [c for c in era5_header if c in constants.ERA5_COLUMNS] != list(constants.ERA5_COLUMNS)
  assert header_of(root / names["geoclusters"]) == list(constants.GEOCLUSTER_COLUMNS)
  ids = [row["patch_id"] for row in dataset["meta"]]
  assert len(set(ids)) == len(ids) == NUM_PATCHES
  for key in ("worldcover", "era5", "geoclusters"):
    assert [row["patch_id"] for row in read_csv(root / names[key])] == ids, key


def test_ids_and_timestamps(dataset):
  for row in dataset["meta"]:
    s2_match, s1_match = S2_ID.fullmatch(row["patch_id"]), S1_ID.fullmatch(row["patch_id_s1"])
    assert s2_match and s1_match, (row["patch_id"], row["patch_id_s1"])
    # The two ids of a patch end with the same grid position, as in ben-ge.
    assert row["patch_id"].split("_")[-2:] == row["patch_id_s1"].split("_")[-2:]
    s2_time = datetime.datetime.strptime(row["timestamp_s2"], "%Y-%m-%d %H:%M:%S")
    s1_time = datetime.datetime.strptime(row["timestamp_s1"], "%Y-%m-%d %H:%M:%S")
    assert s2_time == datetime.datetime.strptime(s2_match.group(1), "%Y%m%dT%H%M%S")
    assert s1_time == datetime.datetime.strptime(s1_match.group(1), "%Y%m%dT%H%M%S")
    assert datetime.datetime(2017, 1, 1) <= s2_time < datetime.datetime(2019, 1, 1)
    assert abs((s1_time.date() - s2_time.date()).days) <= 3


def test_rasters_have_native_sizes_dtypes_and_georeferencing(dataset):
  for row, arrays, info in zip(dataset["meta"], dataset["rasters"], dataset["profiles"]):
    lon, lat = float(row["lon"]), float(row["lat"])
    epsg = 32600 + math.floor((lon + 180.0) / 6.0) + 1  # northern UTM zone of the longitude
    for band in constants.S2_BANDS:
      resolution = constants.S2_BAND_RESOLUTION_M[band]
      assert arrays[f"s2_{band}"].shape == (1, 1200 // resolution, 1200 // resolution), band
      assert arrays[f"s2_{band}"].dtype == np.uint16
    for band in constants.S1_BANDS:
      assert arrays[f"s1_{band}"].shape == (1, 120, 120) and arrays[f"s1_{band}"].dtype == np.float32
    assert arrays["lulc"].shape == (1, 120, 120) and arrays["lulc"].dtype == np.uint8
    assert arrays["dem"].shape == (1, 120, 120) and arrays["dem"].dtype == np.int16
    for key, (count, crs_epsg, transform, bounds) in info.items():
      pixel = constants.S2_BAND_RESOLUTION_M[key[3:]] if key.startswith("s2_") else 10
      assert count == 1 and crs_epsg == epsg, key
      assert (transform.a, transform.b, transform.d, transform.e) == (pixel, 0.0, 0.0, -pixel), key
      assert bounds == info["lulc"][3], key  # all rasters of a patch cover the same 1.2 km square
      assert bounds.right - bounds.left == pytest.approx(1200.0)
    # The patch centre, projected back, lands on the CSV's lon/lat.
    bounds = info["lulc"][3]
    centre_lon, centre_lat = rasterio.warp.transform(
        f"EPSG:{epsg}", "EPSG:4326", [(bounds.left + bounds.right) / 2], [(bounds.bottom + bounds.top) / 2])
    assert abs(centre_lon[0] - lon) < 0.01 and abs(centre_lat[0] - lat) < 0.01


def test_values_are_plausible(dataset):
  valid_codes = set(constants.WORLDCOVER_CODES)
  for arrays in dataset["rasters"]:
    assert set(np.unique(arrays["lulc"])) <= valid_codes | {0}
    s2 = np.concatenate([arrays[f"s2_{b}"].ravel() for b in constants.S2_BANDS])
    assert 0 < s2.min() and s2.max() < 20000  # reflectance x 1e4 (sunlit snow slopes exceed 1)
    s1 = np.stack([arrays[f"s1_{b}"] for b in constants.S1_BANDS])
    assert np.isfinite(s1).all() and -50 < s1.min() and s1.max() < 25  # dB
    assert arrays["s1_VH"].mean() < arrays["s1_VV"].mean()  # cross-pol is weaker
    assert -20 <= arrays["dem"].min() and arrays["dem"].max() < 5000
  for row in dataset["meta"]:
    assert int(row["climatezone"]) in constants.CLIMATE_ZONE_CODES
    assert 36 <= float(row["lat"]) <= 71 and -11 <= float(row["lon"]) <= 33  # Europe
  clusters = [int(r["cluster_idx"]) for r in read_csv(dataset["root"] / "ben-ge-800_geoclusters_k20.csv")]
  assert set(clusters) <= set(range(constants.NUM_GEOCLUSTERS)) and len(set(clusters)) >= 10


def test_fractions_match_the_land_cover_maps(dataset):
  rows = read_csv(dataset["root"] / "ben-ge-800_esaworldcover.csv")
  nodata_patches = 0
  for row, arrays in zip(rows, dataset["rasters"]):
    codes = arrays["lulc"][0]
    expected = [np.mean(codes == code) for code in constants.WORLDCOVER_CODES]
    written = [float(row[column]) for column in constants.LULC_FRACTION_COLUMNS]
    np.testing.assert_allclose(written, expected, atol=1e-7, err_msg=row["patch_id"])
    assert row["filename"] == f"{row['patch_id']}_esaworldcover.tif"
    if (codes == 0).any():
      nodata_patches += 1
      assert sum(written) < 1.0
    else:
      assert sum(written) == pytest.approx(1.0, abs=1e-6)
  assert 3 <= nodata_patches <= 35  # nodata_fraction=0.1 of 150 patches


def test_land_cover_maps_have_spatial_structure(dataset):
  # Neighbouring pixels agree far more often than they would for a shuffled map of the same classes.
  same, shuffled_same = [], []
  rng = np.random.default_rng(0)
  for arrays in dataset["rasters"][:40]:
    codes = arrays["lulc"][0]
    same.append(np.mean(codes[:, 1:] == codes[:, :-1]))
    flat = rng.permutation(codes.ravel()).reshape(codes.shape)
    shuffled_same.append(np.mean(flat[:, 1:] == flat[:, :-1]))
  assert np.mean(same) > 0.9 and np.mean(same) > np.mean(shuffled_same) + 0.3


def test_weather_follows_elevation_and_season(dataset):
  era5 = read_csv(dataset["root"] / "ben-ge-800_era-5.csv")
  pressure = np.array([float(r["atmpressure_level"]) for r in era5])
  elevation = np.array([arrays["dem"].mean() for arrays in dataset["rasters"]])
  assert np.corrcoef(pressure, elevation)[0, 1] < -0.9
  season = np.array([float(r["season_s2"]) for r in dataset["meta"]])
  temperature = np.array([float(r["temperature_s2"]) for r in era5])
  latitude = np.array([float(r["lat"]) for r in dataset["meta"]])
  assert 240 < temperature.min() and temperature.max() < 320  # kelvin
  # Warmer in summer, colder up north and up high.
  design = np.stack([np.ones_like(season), season, latitude, elevation / 1000.0], axis=1)
  coefficients = np.linalg.lstsq(design, temperature, rcond=None)[0]
  assert coefficients[1] > 5.0 and coefficients[2] < -0.2 and coefficients[3] < -3.0
  for row in era5:
    assert 0 <= float(row["relhumidity_s2"]) <= 100 and 0 <= float(row["relhumidity_s1"]) <= 100


def test_water_patches_get_climate_code_zero(dataset):
  fractions = read_csv(dataset["root"] / "ben-ge-800_esaworldcover.csv")
  for row, cover in zip(dataset["meta"], fractions):
    if int(row["climatezone"]) == 0:
      assert float(cover["permanent_water_bodies"]) > 0.5, row["patch_id"]


# ---------------------------------------------------------------------------------------------------------
# Season and the world model.
# ---------------------------------------------------------------------------------------------------------
def test_season_formula():
  def reference(date):  # written out independently of synthetic_world.py
    day = date.timetuple().tm_yday
    return (1 - math.cos(2 * math.pi * (day + 9) / 365.25)) / 2
  assert world.season_from_date(datetime.date(2017, 6, 21)) > 0.9998
  assert world.season_from_date(datetime.date(2018, 12, 22)) < 1e-4
  assert world.season_from_date(datetime.date(2018, 3, 21)) == pytest.approx(0.5, abs=0.03)
  for date in (datetime.date(2017, 1, 1), datetime.date(2018, 9, 30), datetime.date(2018, 12, 31)):
    assert world.season_from_date(date) == pytest.approx(reference(date), abs=1e-12)


def test_meta_seasons_follow_the_timestamps(dataset):
  for row in dataset["meta"]:
    for sensor in ("s2", "s1"):
      date = datetime.datetime.strptime(row[f"timestamp_{sensor}"], "%Y-%m-%d %H:%M:%S").date()
      expected = (1 - math.cos(2 * math.pi * (date.timetuple().tm_yday + 9) / 365.25)) / 2
      assert float(row[f"season_{sensor}"]) == pytest.approx(expected, abs=1e-6)


def test_every_climate_zone_occurs_at_800_patches():
  model = world.World.from_seed(0)
  codes = [world.sample_patch_meta(model, 0, index).climate_code for index in range(800)]
  counts = {code: codes.count(code) for code in constants.CLIMATE_ZONE_CODES}
  assert min(counts.values()) >= 3, counts
  assert max(counts.values()) < 0.3 * 800, counts


# ---------------------------------------------------------------------------------------------------------
# Determinism, naming variants, atomic writing, CLI.
# ---------------------------------------------------------------------------------------------------------
def test_same_seed_same_bytes_whatever_the_workers(tmp_path, dataset):
  one = synthetic.write_dataset(tmp_path / "one", "ben-ge-800", 8, seed=0)
  two = synthetic.write_dataset(tmp_path / "two", "ben-ge-800", 8, seed=0, workers=2)
  assert all_files(one) == all_files(two)
  # A patch depends only on (seed, index): the first rows of the 150-patch dataset are the same patches.
  assert read_csv(one / "ben-ge-800_meta.csv") == dataset["meta"][:8]
  other = synthetic.write_dataset(tmp_path / "other", "ben-ge-800", 8, seed=1)
  one_files, other_files = all_files(one), all_files(other)
  assert one_files["ben-ge-800_meta.csv"] != other_files["ben-ge-800_meta.csv"]
  assert set(one_files) != set(other_files)  # different ids, so different raster paths


def test_geotiffs_are_byte_identical_to_rasterio_output(tmp_path):
  writer = synthetic.GeoTiffWriter()
  rng = np.random.default_rng(0)
  kinds = [((120, 120), np.uint16, 10, None), ((60, 60), np.uint16, 20, None),
           ((20, 20), np.uint16, 60, None), ((120, 120), np.float32, 10, None),
           ((120, 120), np.uint8, 10, 0), ((120, 120), np.int16, 10, None)]
  for shape, dtype, pixel, nodata in kinds:
    for epsg, west, north in ((32629, 520020.0, 4420980.0), (32635, 401160.0, 7045200.0)):
      image = (rng.random(shape) * 250).astype(dtype)
      writer.write(tmp_path / "fast.tif", image, epsg, west, north, pixel, nodata)
      profile = dict(driver="GTiff", height=shape[0], width=shape[1], count=1, dtype=dtype,
                     crs=rasterio.crs.CRS.from_epsg(epsg),
                     transform=rasterio.transform.Affine(pixel, 0.0, west, 0.0, -pixel, north))
      if nodata is not None:
        profile["nodata"] = nodata
      with rasterio.open(tmp_path / "gdal.tif", "w", **profile) as dst:
        dst.write(image, 1)
      assert (tmp_path / "fast.tif").read_bytes() == (tmp_path / "gdal.tif").read_bytes(), (shape, dtype)


def test_full_dataset_names_use_a_climatezone_csv_and_splits(tmp_path):
  root = synthetic.write_dataset(tmp_path, "ben-ge-0.2", 20, seed=3)
  names = constants.csv_names("ben-ge-0.2")
  assert "climatezone" not in header_of(root / names["meta"])
  zones = read_csv(root / names["climatezones"])
  assert header_of(root / names["climatezones"]) == list(constants.CLIMATEZONE_COLUMNS)
  ids = [row["patch_id"] for row in read_csv(root / names["meta"])]
  assert [row["patch_id"] for row in zones] == ids
  assert {int(row["climatezone"]) for row in zones} <= set(constants.CLIMATE_ZONE_CODES)
  splits = {}
  for split in ("train", "val", "test"):
    lines = (root / "splits" / f"ben-ge-0.2_{split}.csv").read_text().split()
    assert all(S2_ID.fullmatch(line) for line in lines), split  # no header, one id per line
    splits[split] = lines
  assert [len(splits[s]) for s in ("train", "val", "test")] == [16, 2, 2]
  assert sorted(splits["train"] + splits["val"] + splits["test"]) == sorted(ids)


def test_split_files_on_request(tmp_path):
  without = synthetic.write_dataset(tmp_path / "a", "ben-ge-0.4", 5, write_splits=False)
  assert not (without / "splits").exists()
  root = synthetic.write_dataset(tmp_path / "b", "ben-ge-800", 10, write_splits=True)
  assert sorted(p.name for p in (root / "splits").iterdir()) == [
      "ben-ge-800_test.csv", "ben-ge-800_train.csv", "ben-ge-800_val.csv"]


def test_interrupted_run_leaves_only_a_partial_folder(tmp_path, monkeypatch):
  real_generate = world.generate_rasters

  def failing(meta, seed):
    if meta.index == 3:
      raise RuntimeError("simulated crash")
    return real_generate(meta, seed)

  monkeypatch.setattr(world, "generate_rasters", failing)
  with pytest.raises(RuntimeError, match="simulated crash"):
    synthetic.write_dataset(tmp_path, "ben-ge-800", 6)
  assert not (tmp_path / "ben-ge-800").exists() and (tmp_path / "ben-ge-800.partial").is_dir()
  monkeypatch.setattr(world, "generate_rasters", real_generate)
  root = synthetic.write_dataset(tmp_path, "ben-ge-800", 6)  # a stale .partial is replaced
  assert root.is_dir() and not (tmp_path / "ben-ge-800.partial").exists()
  with pytest.raises(FileExistsError, match="ben-ge-800"):
    synthetic.write_dataset(tmp_path, "ben-ge-800", 6)
  synthetic.write_dataset(tmp_path, "ben-ge-800", 4, overwrite=True)
  assert len(read_csv(root / "ben-ge-800_meta.csv")) == 4


@pytest.mark.parametrize("kwargs, message", [
    ({"num_patches": 0}, "num_patches"), ({"nodata_fraction": 1.5}, "nodata_fraction"),
    ({"name": "a/b"}, "name"), ({"seed": -1}, "seed")])
def test_bad_arguments_are_rejected(tmp_path, kwargs, message):
  arguments = {"name": "ben-ge-800", "num_patches": 2, "seed": 0, **kwargs}
  with pytest.raises(ValueError, match=message):
    synthetic.write_dataset(tmp_path, **arguments)


def test_command_line(tmp_path, capsys):
  synthetic.main(["--out", str(tmp_path), "--name", "ben-ge-8k", "--num_patches", "10", "--seed", "2"])
  assert "SYNTHETIC" in capsys.readouterr().out
  root = tmp_path / "ben-ge-8k"
  assert len(read_csv(root / "ben-ge-8k_meta.csv")) == 10
  assert (root / "splits" / "ben-ge-8k_train.csv").read_text().count("\n") == 8  # ben-ge-8k ships splits


# ---------------------------------------------------------------------------------------------------------
# Learnability, with independent simple models (scikit-learn).
# ---------------------------------------------------------------------------------------------------------
def _logistic_regression():
  return make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000))


def _box_mean(image, size=5):
  """Mean over a size x size window (edges padded by reflection), like a simple speckle filter."""
  pad = size // 2
  padded = np.pad(image, pad, mode="reflect")
  summed = np.cumsum(np.cumsum(np.pad(padded, ((1, 0), (1, 0))), axis=0), axis=1)
  h, w = image.shape
  return (summed[size:size + h, size:size + w] - summed[:h, size:size + w] - summed[size:size + h, :w]
          + summed[:h, :w]) / size ** 2


def test_climate_zone_is_learnable_from_s2_statistics(dataset):
  features = []
  for arrays in dataset["rasters"]:
    logs = [np.log(arrays[f"s2_{b}"].astype(np.float64) / 1e4 + 1e-3) for b in constants.S2_BANDS]
    features.append([x.mean() for x in logs] + [x.std() for x in logs])
  features = np.array(features)
  labels = np.array([constants.CLIMATE_ZONE_CODE_TO_CLASS[int(r["climatezone"])] for r in dataset["meta"]])
  correct = majority_correct = 0
  with threadpoolctl.threadpool_limits(1):
    for train, test in KFold(5, shuffle=True, random_state=0).split(features):
      model = _logistic_regression().fit(features[train], labels[train])
      correct += np.sum(model.predict(features[test]) == labels[test])
      majority_correct += np.sum(labels[test] == np.bincount(labels[train]).argmax())
  accuracy, majority = correct / len(labels), majority_correct / len(labels)
  assert accuracy > majority + 0.08, (accuracy, majority)


def test_land_cover_is_learnable_from_s2_and_from_s1_and_best_from_both(dataset):
  rng = np.random.default_rng(0)
  s2_pixels, s1_pixels, labels, is_train = [], [], [], []
  num_train = int(0.7 * NUM_PATCHES)
  for index, arrays in enumerate(dataset["rasters"]):
    classes = constants.worldcover_code_to_class(arrays["lulc"][0]).ravel()
    chosen = rng.choice(np.flatnonzero(classes != constants.LULC_IGNORE), 150)
    bands = []
    for band in constants.S2_BANDS:
      image = arrays[f"s2_{band}"][0].astype(np.float64)
      factor = 120 // image.shape[0]
      bands.append(np.kron(image, np.ones((factor, factor))).ravel()[chosen])  # nearest upsampling
    s2_pixels.append(np.log(np.stack(bands, 1) / 1e4 + 1e-3))
    s1 = [arrays[f"s1_{band}"][0].astype(np.float64) for band in constants.S1_BANDS]
    filtered = [_box_mean(x) for x in s1]
    s1_pixels.append(np.stack([x.ravel()[chosen] for x in s1 + filtered], axis=1))
    labels.append(classes[chosen])
    is_train.append(np.full(len(chosen), index < num_train))
  s2, s1 = np.concatenate(s2_pixels), np.concatenate(s1_pixels)
  labels, is_train = np.concatenate(labels), np.concatenate(is_train)
  majority = np.mean(labels[~is_train] == np.bincount(labels[is_train]).argmax())

  def accuracy(features):
    with threadpoolctl.threadpool_limits(1):
      model = _logistic_regression().fit(features[is_train], labels[is_train])
      return model.score(features[~is_train], labels[~is_train])

  s2_accuracy, s1_accuracy = accuracy(s2), accuracy(s1)
  both_accuracy = accuracy(np.concatenate([s2, s1], axis=1))
  scores = dict(majority=majority, s2=s2_accuracy, s1=s1_accuracy, both=both_accuracy)
  assert s2_accuracy > majority + 0.2, scores
  assert s1_accuracy > majority + 0.08, scores
  assert both_accuracy > max(s2_accuracy, s1_accuracy) + 0.03, scores
