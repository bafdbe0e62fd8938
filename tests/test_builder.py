"""Tests of the TFDS builder `ben_ge`: features against independent rasterio/CSV reads, splits, bad input, CLI.

One synthetic ben-ge-800-style folder (written by data_builders.ben_ge.synthetic) is prepared once per module
and reused; bad-input cases corrupt copies of a second, smaller folder.
"""

import csv
import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import rasterio
from rasterio.enums import Resampling
import tensorflow_datasets as tfds
from tensorflow_datasets.core import dataset_info

from data_builders.ben_ge import archive
from data_builders.ben_ge import ben_ge
from data_builders.ben_ge import build
from data_builders.ben_ge import reading
from data_builders.ben_ge import synthetic
from labeleff_jax.data import constants

NAME = "ben-ge-800"
NUM_PATCHES = 48  # 36 / 6 / 6 under the 75 / 12.5 / 12.5 rule
REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

# The feature table of API.md, written out independently of the builder.
EXPECTED_TENSORS = {
    "s2": (np.uint16, (120, 120, 12)),
    "s1": (np.float32, (120, 120, 2)),
    "dem": (np.float32, (120, 120, 1)),
    "lulc": (np.uint8, (120, 120)),
    "lulc_fractions": (np.float32, (11,)),
    "era5": (np.float32, (9,)),
}
EXPECTED_CLASS_LABELS = {"lulc_top": 11, "climatezone": 12, "geocluster": 20}
EXPECTED_SCALARS = ("season_s2", "season_s1", "lon", "lat")
EXPECTED_TEXT = ("patch_id", "patch_id_s1")


# ---------------------------------------------------------------------------------------------------------
# Fixtures: one good dataset per module.
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def raw_dir(tmp_path_factory):
  manual_dir = tmp_path_factory.mktemp("manual")
  synthetic.write_dataset(manual_dir, NAME, NUM_PATCHES, seed=5, nodata_fraction=0.3)
  return manual_dir


@pytest.fixture(scope="module")
def prepared(raw_dir, tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("data")
  path = ben_ge.prepare(raw_dir, data_dir, NAME)
  return data_dir, path


@pytest.fixture(scope="module")
def sources(prepared):
  data_dir, path = prepared
  builder = tfds.builder_from_directory(os.fspath(path))
  return {split: builder.as_data_source(split) for split in reading.SPLITS}


def _all_examples(source) -> list[dict]:
  return [source[i] for i in range(len(source))]


def _text(value) -> str:
  return value.decode() if isinstance(value, bytes) else str(value)


def _csv_rows(path: pathlib.Path) -> dict[str, dict[str, str]]:
  with open(path, newline="") as handle:
    return {row["patch_id"]: row for row in csv.DictReader(handle)}


# ---------------------------------------------------------------------------------------------------------
# The prepared dataset.
# ---------------------------------------------------------------------------------------------------------
def test_layout_and_split_sizes(prepared, sources):
  data_dir, path = prepared
  assert path == pathlib.Path(data_dir) / "ben_ge" / NAME / ben_ge.VERSION
  assert (path / "dataset_info.json").is_file()
  assert sorted(p.name for p in path.glob("*.array_record-*")) == [
      f"ben_ge-{split}.array_record-00000-of-00001" for split in ("test", "train", "validation")]
  assert {split: len(source) for split, source in sources.items()} == {"train": 36, "validation": 6, "test": 6}
  info = json.loads((path / "dataset_info.json").read_text())
  assert info["fileFormat"] == "array_record" and info["configName"] == NAME
  assert "Mommert" in info["citation"]


def test_readable_through_tfds_data_source_by_name(prepared, sources):
  data_dir, _ = prepared
  by_name = tfds.data_source(f"ben_ge/{NAME}", data_dir=os.fspath(data_dir))
  assert {split: len(by_name[split]) for split in reading.SPLITS} == {s: len(v) for s, v in sources.items()}
  assert _text(by_name["test"][2]["patch_id"]) == _text(sources["test"][2]["patch_id"])


def test_every_feature_has_the_api_dtype_and_shape(sources):
  example = sources["validation"][0]
  expected_keys = set(EXPECTED_TENSORS) | set(EXPECTED_CLASS_LABELS) | set(EXPECTED_SCALARS) | set(EXPECTED_TEXT)
  assert set(example) == expected_keys
  for key, (dtype, shape) in EXPECTED_TENSORS.items():
    assert example[key].dtype == dtype and example[key].shape == shape, key
  for key, num_classes in EXPECTED_CLASS_LABELS.items():
    assert 0 <= int(example[key]) < num_classes, key
  for key in EXPECTED_SCALARS:
    assert np.isfinite(float(example[key])), key
  for key in EXPECTED_TEXT:
    assert isinstance(example[key], (bytes, str)) and _text(example[key]), key
  builder_features = ben_ge.features()
  for key, num_classes in EXPECTED_CLASS_LABELS.items():
    assert builder_features[key].num_classes == num_classes


def _reference_patch(folder: pathlib.Path, patch_id: str, patch_id_s1: str) -> dict:
  """Reads one patch the way the lecture's reference does, straight from the files."""
  s2 = []
  for band in constants.S2_BANDS:
    with rasterio.open(folder / "sentinel-2" / patch_id / f"{patch_id}_{band}.tif") as src:
      s2.append(src.read(out_shape=(1, 120, 120), resampling=Resampling.bilinear)[0])
  s1 = []
  for band in ("VH", "VV"):
    with rasterio.open(folder / "sentinel-1" / patch_id_s1 / f"{patch_id_s1}_{band}.tif") as src:
      s1.append(src.read(1))
  with rasterio.open(folder / "dem" / f"{patch_id}_dem.tif") as src:
    dem = src.read(1)
  with rasterio.open(folder / "esaworldcover" / f"{patch_id}_esaworldcover.tif") as src:
    codes = src.read(1)
  # WorldCover: the reference's 100 -> 110, 95 -> 100, v / 10 - 1; code 0 is "no data" -> 255.
  code_to_class = {10: 0, 20: 1, 30: 2, 40: 3, 50: 4, 60: 5, 70: 6, 80: 7, 90: 8, 95: 9, 100: 10, 0: 255}
  lulc = np.vectorize(code_to_class.__getitem__)(codes)
  return {"s2": np.stack(s2, -1), "s1": np.stack(s1, -1), "dem": dem[..., None], "lulc": lulc, "codes": codes}


def test_one_patch_matches_an_independent_read(raw_dir, sources):
  folder = raw_dir / NAME
  meta = _csv_rows(folder / f"{NAME}_meta.csv")
  fractions_csv = _csv_rows(folder / f"{NAME}_esaworldcover.csv")
  era5_csv = _csv_rows(folder / f"{NAME}_era-5.csv")
  clusters = _csv_rows(folder / f"{NAME}_geoclusters_k20.csv")
  # Prefer a patch with a no-data strip so that the 255 mapping is exercised too.
  examples = _all_examples(sources["train"])
  chosen = next((e for e in examples if (e["lulc"] == 255).any()), examples[0])
  assert (chosen["lulc"] == 255).any(), "the fixture should contain a patch with WorldCover no-data"
  patch_id = _text(chosen["patch_id"])
  row = meta[patch_id]
  assert _text(chosen["patch_id_s1"]) == row["patch_id_s1"]
  expected = _reference_patch(folder, patch_id, row["patch_id_s1"])

  np.testing.assert_array_equal(chosen["s2"], expected["s2"])
  assert expected["s2"].dtype == np.uint16
  # The 20 m band B05 really was upsampled bilinearly (not repeated pixel by pixel).
  with rasterio.open(folder / "sentinel-2" / patch_id / f"{patch_id}_B05.tif") as src:
    native = src.read(1)
  assert native.shape == (60, 60)
  assert not np.array_equal(chosen["s2"][..., 4], np.repeat(np.repeat(native, 2, 0), 2, 1))
  np.testing.assert_array_equal(chosen["s1"], expected["s1"])
  np.testing.assert_array_equal(chosen["dem"], expected["dem"].astype(np.float32))
  np.testing.assert_array_equal(chosen["lulc"], expected["lulc"])

  fractions = np.array([float(fractions_csv[patch_id][c]) for c in constants.LULC_CLASSES], np.float32)
  np.testing.assert_array_equal(chosen["lulc_fractions"], fractions)
  assert int(chosen["lulc_top"]) == int(np.argmax(fractions))
  era5_names = ["atmpressure_level", "temperature_s2", "temperature_s1", "wind-u_s2", "wind-u_s1",
                "wind-v_s2", "wind-v_s1", "relhumidity_s2", "relhumidity_s1"]
  np.testing.assert_array_equal(chosen["era5"], np.array([float(era5_csv[patch_id][c]) for c in era5_names],
                                                         np.float32))
  climate_codes = [0, 7, 8, 9, 14, 15, 16, 18, 25, 26, 27, 29]
  assert int(chosen["climatezone"]) == climate_codes.index(int(row["climatezone"]))
  assert float(chosen["season_s2"]) == np.float32(row["season_s2"])
  assert float(chosen["season_s1"]) == np.float32(row["season_s1"])
  assert float(chosen["lon"]) == np.float32(row["lon"]) and float(chosen["lat"]) == np.float32(row["lat"])
  assert int(chosen["geocluster"]) == int(clusters[patch_id]["cluster_idx"])


def test_splits_follow_the_documented_rule_and_sorted_order(raw_dir, sources):
  patch_ids = sorted(_csv_rows(raw_dir / NAME / f"{NAME}_meta.csv"))
  ranked = sorted(patch_ids, key=lambda p: hashlib.sha256(("ben-ge-split-seed-42:" + p).encode()).hexdigest())
  expected = {"train": sorted(ranked[:36]), "validation": sorted(ranked[36:42]), "test": sorted(ranked[42:])}
  stored = {split: [_text(e["patch_id"]) for e in _all_examples(source)] for split, source in sources.items()}
  assert stored == expected


def test_split_rule_ignores_csv_row_order(raw_dir, tmp_path):
  shuffled = tmp_path / NAME
  shutil.copytree(raw_dir / NAME, shuffled, ignore=shutil.ignore_patterns("sentinel-*", "dem", "esaworldcover"))
  rng = np.random.default_rng(0)
  for csv_path in shuffled.glob("*.csv"):
    header, *rows = csv_path.read_text().splitlines()
    order = rng.permutation(len(rows))
    csv_path.write_text("\n".join([header] + [rows[i] for i in order]) + "\n")
  original = reading.scan_folder(raw_dir / NAME, NAME)
  reordered = reading.scan_folder(shuffled, NAME)
  assert reordered.splits == original.splits
  np.testing.assert_array_equal(reordered.era5, original.era5)


def test_rebuild_from_tar_gz_is_identical(raw_dir, prepared, tmp_path):
  manual_dir = tmp_path / "manual"
  manual_dir.mkdir()
  with tarfile.open(manual_dir / f"{NAME}.tar.gz", "w:gz", compresslevel=1) as tar:
    tar.add(raw_dir / NAME, arcname=NAME)
  rebuilt = ben_ge.prepare(manual_dir, tmp_path / "data", NAME)
  _, original = prepared
  for split in reading.SPLITS:
    files = [f"ben_ge-{split}.array_record-00000-of-00001"]
    for name in files:
      assert (rebuilt / name).read_bytes() == (original / name).read_bytes(), name
  extracted = tmp_path / "data" / "downloads" / "ben_ge_extracted" / f"{NAME}.tar.gz"
  assert archive.is_extracted(manual_dir / f"{NAME}.tar.gz", extracted)


def test_prepared_dataset_is_a_cheap_no_op(prepared, tmp_path, monkeypatch):
  data_dir, path = prepared
  before = {p: p.stat().st_mtime_ns for p in path.iterdir()}

  def no_preparation(*args, **kwargs):
    raise AssertionError("an already prepared dataset was prepared again")

  monkeypatch.setattr(ben_ge.BenGe, "download_and_prepare", no_preparation)
  monkeypatch.setattr(ben_ge.BenGe, "_generate_examples", no_preparation)
  # The manual dir does not even exist: a prepared dataset must not look at it.
  assert ben_ge.prepare(tmp_path / "nowhere", data_dir, NAME) == path
  assert {p: p.stat().st_mtime_ns for p in path.iterdir()} == before


def test_unknown_config_name_is_rejected(tmp_path):
  with pytest.raises(ValueError, match="ben-ge-8k"):
    ben_ge.prepare(tmp_path, tmp_path, "ben-ge-9000")


# ---------------------------------------------------------------------------------------------------------
# Split files and the full-dataset subsets.
# ---------------------------------------------------------------------------------------------------------
def test_subset_of_the_full_dataset_uses_its_split_files(tmp_path, monkeypatch):
  monkeypatch.setattr(ben_ge, "EXAMPLES_PER_SHARD", 3)  # so that a split spans several shards
  manual_dir = tmp_path / "manual"
  folder = synthetic.write_dataset(manual_dir, "ben-ge", 16, seed=2, write_splits=False)
  assert (folder / "ben-ge_climatezones.csv").is_file()  # climate zones from their own file
  ids = sorted(_csv_rows(folder / "ben-ge_meta.csv"))
  with pytest.raises(reading.BenGeDataError, match=r"ben-ge-0\.2_\{train,val,test\}\.csv"):
    ben_ge.prepare(manual_dir, tmp_path / "data", "ben-ge-0.2")
  # Listed in a shuffled order and with one id of the full dataset left out of the subset entirely.
  membership = {"train": ids[9:1:-1], "val": [ids[12], ids[10]], "test": [ids[15], ids[13], ids[11]]}
  (folder / "splits").mkdir()
  for split, members in membership.items():
    (folder / "splits" / f"ben-ge-0.2_{split}.csv").write_text("\n".join(members) + "\n")
  path = ben_ge.prepare(manual_dir, tmp_path / "data", "ben-ge-0.2")
  assert sorted(p.name for p in path.glob("ben_ge-train.*")) == [
      f"ben_ge-train.array_record-0000{i}-of-00003" for i in range(3)]
  assert not list(path.glob("*.writing-*"))
  builder = tfds.builder_from_directory(os.fspath(path))
  stored = {split: [_text(builder.as_data_source(split)[i]["patch_id"])
                    for i in range(len(builder.as_data_source(split)))] for split in reading.SPLITS}
  assert stored == {"train": sorted(membership["train"]), "validation": sorted(membership["val"]),
                    "test": sorted(membership["test"])}
  # A config name with both '-' and '.' resolves through TFDS's name parser too.
  by_name = tfds.data_source("ben_ge/ben-ge-0.2", data_dir=os.fspath(tmp_path / "data"))
  assert {split: len(by_name[split]) for split in reading.SPLITS} == {"train": 8, "validation": 2, "test": 3}
  climate = _csv_rows(folder / "ben-ge_climatezones.csv")
  example = builder.as_data_source("test")[0]
  codes = list(constants.CLIMATE_ZONE_CODES)
  assert int(example["climatezone"]) == codes.index(int(climate[_text(example["patch_id"])]["climatezone"]))


def test_split_files_must_be_complete_and_disjoint(tmp_path):
  folder = tmp_path / "f"
  (folder / "splits").mkdir(parents=True)
  (folder / "splits" / "x_train.csv").write_text("a\nb\n")
  with pytest.raises(reading.BenGeDataError, match="x_val.csv"):
    reading.split_files(folder, "x")
  (folder / "splits" / "x_val.csv").write_text("c\n")
  (folder / "splits" / "x_test.csv").write_text("b\n")
  (folder / "x_meta.csv").write_text("patch_id\n")
  with pytest.raises(reading.BenGeDataError, match=r"patch b is in both .*x_train.csv and .*x_test.csv"):
    reading.scan_folder(folder, "x")


# ---------------------------------------------------------------------------------------------------------
# Bad input: a clear error naming the patch and the file, and nothing that looks like a dataset.
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_raw(tmp_path_factory):
  root = tmp_path_factory.mktemp("small")
  folder = synthetic.write_dataset(root, NAME, 12, seed=9)
  meta = _csv_rows(folder / f"{NAME}_meta.csv")
  victim = sorted(meta)[5]
  return folder, victim, meta[victim]["patch_id_s1"]


def _rewrite_raster(path: pathlib.Path, data: np.ndarray) -> None:
  """Overwrites a GeoTIFF with `data` ([bands, H, W]), keeping its georeference."""
  with rasterio.open(path) as src:
    profile = src.profile
  profile.update(count=data.shape[0], height=data.shape[1], width=data.shape[2], dtype=data.dtype.name)
  profile.pop("nodata", None)
  profile.pop("blockxsize", None), profile.pop("blockysize", None), profile.pop("tiled", None)
  with rasterio.open(path, "w", **profile) as dst:
    dst.write(data)


def _read_raster(path: pathlib.Path) -> np.ndarray:
  with rasterio.open(path) as src:
    return src.read()


def _edit_csv(path: pathlib.Path, edit) -> None:
  with open(path, newline="") as handle:
    rows = list(csv.DictReader(handle))
  fieldnames, rows = edit(list(rows[0].keys()), rows)
  with open(path, "w", newline="") as handle:
    writer = csv.DictWriter(handle, fieldnames=fieldnames, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)


def _corrupt_missing_file(folder, pid, sid):
  path = folder / "dem" / f"{pid}_dem.tif"
  path.unlink()
  return path.name, "missing"


def _corrupt_tif(folder, pid, sid):
  path = folder / "sentinel-2" / pid / f"{pid}_B03.tif"
  path.write_bytes(b"II*\x00" + bytes(range(256)) * 4)
  return path.name, "cannot read"


def _corrupt_size(folder, pid, sid):
  path = folder / "sentinel-1" / sid / f"{sid}_VH.tif"
  _rewrite_raster(path, np.zeros((1, 60, 60), np.float32))
  return path.name, "60x60 px, expected 120x120"


def _corrupt_s2_size(folder, pid, sid):
  path = folder / "sentinel-2" / pid / f"{pid}_B05.tif"  # a 20 m band stored at 10 m size
  _rewrite_raster(path, np.zeros((1, 120, 120), np.uint16))
  return path.name, "120x120 px, expected 60x60"


def _corrupt_band_count(folder, pid, sid):
  path = folder / "esaworldcover" / f"{pid}_esaworldcover.tif"
  codes = _read_raster(path)
  _rewrite_raster(path, np.concatenate([codes, codes]))
  return path.name, "2 band"


def _corrupt_worldcover_code(folder, pid, sid):
  path = folder / "esaworldcover" / f"{pid}_esaworldcover.tif"
  codes = _read_raster(path)
  codes[0, 7, 11] = 37
  _rewrite_raster(path, codes)
  return path.name, r"unknown WorldCover code\(s\) \[37\]"


def _corrupt_climate_code(folder, pid, sid):
  def edit(fields, rows):
    for row in rows:
      if row["patch_id"] == pid:
        row["climatezone"] = "3"
    return fields, rows
  _edit_csv(folder / f"{NAME}_meta.csv", edit)
  return f"{NAME}_meta.csv", "unknown climate zone code 3"


def _corrupt_missing_row(folder, pid, sid):
  _edit_csv(folder / f"{NAME}_era-5.csv", lambda fields, rows: (fields, [r for r in rows if r["patch_id"] != pid]))
  return f"{NAME}_era-5.csv", "is missing"


def _corrupt_missing_column(folder, pid, sid):
  _edit_csv(folder / f"{NAME}_era-5.csv", lambda fields, rows: ([f for f in fields if f != "wind-u_s1"], rows))
  return f"{NAME}_era-5.csv", "wind-u_s1"


def _corrupt_nan(folder, pid, sid):
  path = folder / "sentinel-1" / sid / f"{sid}_VV.tif"
  data = _read_raster(path)
  data[0, 100, 3] = np.nan
  _rewrite_raster(path, data)
  return path.name, "NaN/inf"


def _corrupt_inf_dem(folder, pid, sid):
  path = folder / "dem" / f"{pid}_dem.tif"
  data = _read_raster(path).astype(np.float32)
  data[0, 1, 2] = np.inf
  _rewrite_raster(path, data)
  return path.name, "NaN/inf"


def _corrupt_nan_in_csv(folder, pid, sid):
  def edit(fields, rows):
    for row in rows:
      if row["patch_id"] == pid:
        row["temperature_s2"] = "nan"
    return fields, rows
  _edit_csv(folder / f"{NAME}_era-5.csv", edit)
  return f"{NAME}_era-5.csv", "not finite"


CORRUPTIONS = {
    "missing file": _corrupt_missing_file,
    "corrupt tif": _corrupt_tif,
    "wrong size": _corrupt_size,
    "wrong S2 band size": _corrupt_s2_size,
    "wrong band count": _corrupt_band_count,
    "unknown WorldCover code": _corrupt_worldcover_code,
    "unknown climate code": _corrupt_climate_code,
    "patch missing from a CSV": _corrupt_missing_row,
    "missing column": _corrupt_missing_column,
    "NaN in a raster": _corrupt_nan,
    "inf in the DEM": _corrupt_inf_dem,
    "NaN in a CSV": _corrupt_nan_in_csv,
}


# A column missing from a CSV is a fault of the file, not of any one patch.
FILE_LEVEL_CASES = {"missing column"}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_bad_input_names_patch_and_file_and_leaves_no_dataset(small_raw, tmp_path, case):
  source, victim, victim_s1 = small_raw
  manual_dir = tmp_path / "manual"
  shutil.copytree(source, manual_dir / NAME)
  file_name, pattern = CORRUPTIONS[case](manual_dir / NAME, victim, victim_s1)
  data_dir = tmp_path / "data"
  with pytest.raises(reading.BenGeDataError, match=pattern) as raised:
    ben_ge.prepare(manual_dir, data_dir, NAME)
  message = str(raised.value)
  if case not in FILE_LEVEL_CASES:
    assert victim in message, message
  assert file_name in message, message
  # Nothing that looks complete: no version folder, no dataset_info.json anywhere, not loadable.
  dataset_root = data_dir / "ben_ge" / NAME
  assert not (dataset_root / ben_ge.VERSION).exists()
  assert not list(data_dir.rglob("dataset_info.json"))
  assert not list(data_dir.rglob("*.array_record-*"))
  with pytest.raises(dataset_info.DatasetInfoFileError, match="dataset_info.json"):
    tfds.builder_from_directory(os.fspath(dataset_root / ben_ge.VERSION))
  # TFDS lists no split of a variant folder without dataset_info.json.
  by_name = tfds.data_source(f"ben_ge/{NAME}", data_dir=os.fspath(data_dir), download=False)
  assert not set(reading.SPLITS) & set(by_name)


def test_unsafe_archive_is_refused_by_the_builder(tmp_path):
  manual_dir = tmp_path / "manual"
  manual_dir.mkdir()
  info = tarfile.TarInfo(f"{NAME}/../../escaped.csv")
  with tarfile.open(manual_dir / f"{NAME}.tar.gz", "w:gz") as tar:
    info.size = 0
    tar.addfile(info)
  with pytest.raises(archive.UnsafeArchiveError, match="escaped.csv"):
    ben_ge.prepare(manual_dir, tmp_path / "data", NAME)
  assert not (tmp_path / "escaped.csv").exists()
  assert not list((tmp_path / "data").rglob("dataset_info.json"))


def test_missing_input_explains_where_to_put_it(tmp_path):
  (tmp_path / "manual").mkdir()
  (tmp_path / "manual" / "unrelated.txt").write_text("x")
  with pytest.raises(reading.BenGeDataError, match=r"ben-ge-800\.tar\.gz[\s\S]*zenodo"):
    ben_ge.prepare(tmp_path / "manual", tmp_path / "data", NAME)


# ---------------------------------------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------------------------------------
def test_cli_reports_path_and_split_sizes(raw_dir, prepared, capsys):
  data_dir, path = prepared
  assert build.main(["--manual_dir", os.fspath(raw_dir), "--data_dir", os.fspath(data_dir), "--config", NAME]) == 0
  out = capsys.readouterr().out
  assert os.fspath(path) in out
  for split, count in (("train", 36), ("validation", 6), ("test", 6)):
    assert f"{split}: {count} examples" in out


def test_cli_builds_in_a_fresh_process_without_tensorflow(small_raw, tmp_path):
  source, _, _ = small_raw
  script = (
      "import runpy, sys\n"
      f"sys.argv = ['build', '--manual_dir', {os.fspath(source.parent)!r}, '--data_dir', "
      f"{os.fspath(tmp_path / 'data')!r}]\n"
      "try:\n"
      "  runpy.run_module('data_builders.ben_ge.build', run_name='__main__')\n"
      "except SystemExit as exit:\n"
      "  assert exit.code == 0, exit.code\n"
      "assert 'tensorflow' not in sys.modules, 'TensorFlow was imported'\n"
      "print('NO_TENSORFLOW')\n")
  result = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "NO_TENSORFLOW" in result.stdout
  assert "train: 9 examples" in result.stdout and "test: 1 examples" in result.stdout
  assert os.fspath(tmp_path / "data" / "ben_ge" / NAME / ben_ge.VERSION) in result.stdout
