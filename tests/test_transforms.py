"""Tests of the per-example transforms: normalisation values, labels, joint geometry, spectral jitter."""

import json

import numpy as np
import pytest

from labeleff_jax import config_checks
from labeleff_jax.data import constants, transforms


def make_example(size=8, seed=0):
  """A raw example whose pixels are all distinguishable: value = row * size + column (+ band offsets)."""
  rng = np.random.default_rng(seed)
  position = np.arange(size * size).reshape(size, size)
  s2 = (position[..., None] + 100 * np.arange(12)).astype(np.uint16)
  s1 = (-(position[..., None] % 25) - np.array([0.0, 0.5])).astype(np.float32)
  dem = position[..., None].astype(np.float32)
  lulc = (position % 11).astype(np.uint8)
  fractions = rng.random(11).astype(np.float32)
  fractions /= fractions.sum()
  return {
      "s2": s2, "s1": s1, "dem": dem, "lulc": lulc, "lulc_fractions": fractions,
      "lulc_top": int(fractions.argmax()), "climatezone": 5, "season_s2": np.float32(0.25),
      "season_s1": np.float32(0.3), "era5": rng.normal(size=9).astype(np.float32), "geocluster": 17,
      "lon": np.float32(8.0), "lat": np.float32(47.0), "patch_id": b"S2A_test",
  }


def dihedral_images(image):
  """The eight symmetries of the square applied to `image`, computed with np.flip / np.rot90."""
  out = []
  for mirrored in (image, np.flip(image, axis=1)):
    for k in range(4):
      out.append(np.rot90(mirrored, k, axes=(0, 1)))
  return out


def test_reference_normalisation_matches_hand_computed_values():
  example = make_example(size=2)
  example["s2"] = np.array([0, 2500, 10000, 20000], np.uint16).reshape(2, 2, 1).repeat(12, axis=2)
  example["s1"] = np.array([[[-30.0, 3.0], [-25.0, 0.0]], [[-12.5, -5.0], [-20.0, -1.0]]], np.float32)
  example["dem"] = np.array([0.0, 250.0, 1500.0, -20.0], np.float32).reshape(2, 2, 1)
  example["lulc"] = np.array([[0, 10], [255, 3]], np.uint8)
  era5 = constants.ERA5_OFFSET + 2.0 * constants.ERA5_SCALE
  example["era5"] = era5.astype(np.float32)
  inputs = transforms.normalize(example, list(constants.MODALITIES))

  np.testing.assert_allclose(inputs["s2"][..., 0], [[0.0, 0.25], [1.0, 1.0]], rtol=1e-6)
  # (clip(x, -25, 0) + 25) / 25
  np.testing.assert_allclose(inputs["s1"], [[[0.0, 1.0], [0.0, 1.0]], [[0.5, 0.8], [0.2, 0.96]]], rtol=1e-6)
  np.testing.assert_allclose(inputs["dem"][..., 0], [[0.0, 0.25], [1.5, -0.02]], rtol=1e-6)
  np.testing.assert_allclose(inputs["era5"], np.full(9, 2.0), rtol=1e-6)
  # The land-cover input is the class map (255 where there is no class); the models one-hot it.
  assert inputs["lulc"].dtype == np.uint8
  np.testing.assert_array_equal(inputs["lulc"], [[0, 10], [255, 3]])
  np.testing.assert_array_equal(inputs["climatezone"], np.eye(12)[5])
  np.testing.assert_array_equal(inputs["season"], [0.25])
  for name, value in inputs.items():
    assert value.dtype == (np.uint8 if name == "lulc" else np.float32), name


def test_only_requested_modalities_are_returned():
  inputs = transforms.normalize(make_example(), ["s1", "season"])
  assert sorted(inputs) == ["s1", "season"]


def test_standardisation_uses_given_statistics():
  example = make_example(size=4)
  mean = np.arange(12, dtype=np.float32) * 10
  std = np.arange(1, 13, dtype=np.float32)
  stats = {"s2": {"mean": mean.tolist(), "std": std.tolist()}}
  inputs = transforms.normalize(example, ["s2", "s1"], stats)
  expected = (example["s2"].astype(np.float64) - mean) / std
  np.testing.assert_allclose(inputs["s2"], expected, rtol=1e-5)
  # s1 is missing from the stats, so it keeps the reference scaling.
  np.testing.assert_allclose(inputs["s1"], (np.clip(example["s1"], -25, 0) + 25) / 25, rtol=1e-6)


def test_bad_statistics_are_rejected_with_the_modality_named():
  with pytest.raises(ValueError, match="'s1'"):
    transforms.prepare_stats({"s1": {"mean": [0.0], "std": [1.0, 1.0]}})
  with pytest.raises(ValueError, match="'dem'"):
    transforms.prepare_stats({"dem": {"mean": [0.0], "std": [0.0]}})


class ListSource(list):
  pass


def test_normalisation_statistics_match_numpy_over_the_split():
  examples = ListSource(make_example(size=6, seed=seed) for seed in range(5))
  rng = np.random.default_rng(3)
  for example in examples:  # uint16 values near 10^4, where a naive float32 sum of squares goes wrong
    example["s2"] = rng.integers(9000, 11000, example["s2"].shape).astype(np.uint16)
  stats = transforms.compute_normalization_stats(examples, ["s2", "dem", "era5", "lulc", "season"])
  assert sorted(stats) == ["dem", "era5", "s2"]
  json.dumps(stats)  # stored in the workdir as JSON
  for name in stats:
    stacked = np.stack([np.asarray(e[name], np.float64) for e in examples])
    values = stacked.reshape(-1, constants.MODALITIES[name])
    np.testing.assert_allclose(stats[name]["mean"], values.mean(axis=0), rtol=1e-9)
    np.testing.assert_allclose(stats[name]["std"], values.std(axis=0), rtol=1e-7)
  subset = transforms.compute_normalization_stats(examples, ["dem"], max_examples=2)
  picked = np.stack([examples[0]["dem"], examples[4]["dem"]]).astype(np.float64)  # evenly spaced: 0, 4
  np.testing.assert_allclose(subset["dem"]["mean"], [picked.mean()], rtol=1e-9)
  assert subset["dem"]["num_examples"] == 2


def test_labels_have_the_documented_dtypes_and_values():
  example = make_example(size=4)
  example["lulc"][0, 0] = 255
  example["lulc"][0, 1] = 42  # not a class: must become the ignore value, never a class index
  example["lulc_fractions"] = np.array([0.5, 0.05, 0.06, 0.0, 0.39] + [0.0] * 6, np.float32)
  labels = transforms.make_labels(example, list(constants.LABELS), threshold=0.05)
  assert labels["climatezone"].dtype == np.int32 and labels["climatezone"] == 5
  assert labels["lulc_top"].dtype == np.int32
  assert labels["geocluster"] == 17
  np.testing.assert_array_equal(labels["lulc_multihot"], [1, 0, 1, 0, 1, 0, 0, 0, 0, 0, 0])
  assert labels["lulc_multihot"].dtype == np.float32
  assert labels["lulc"].dtype == np.int32 and labels["lulc"].shape == (4, 4)
  assert labels["lulc"][0, 0] == 255 and labels["lulc"][0, 1] == 255
  np.testing.assert_array_equal(labels["lulc"][1:], example["lulc"][1:])
  assert labels["season"].dtype == np.float32 and labels["season"] == np.float32(0.25)
  # Written into a batch row's buffers instead (the pipeline's path): the same values, in those buffers.
  out = {name: np.full(np.shape(value), 7, np.asarray(value).dtype) for name, value in labels.items()}
  written = transforms.make_labels(example, list(constants.LABELS), threshold=0.05, out=out)
  for name, value in labels.items():
    assert written[name] is out[name]
    np.testing.assert_array_equal(out[name], value)


def test_unknown_names_and_out_of_range_classes_raise_clearly():
  with pytest.raises(ValueError, match="'colour'"):
    transforms.make_labels(make_example(), ["colour"])
  with pytest.raises(ValueError, match="'sentinel3'"):
    config_checks.check_modalities(["s2", "sentinel3"])
  example = make_example()
  example["climatezone"] = 12
  with pytest.raises(ValueError, match="'climatezone'"):
    transforms.normalize(example, ["climatezone"])
  del example["era5"]
  with pytest.raises(KeyError, match="'era5'"):
    transforms.normalize(example, ["era5"])


def test_dihedral_moves_images_and_mask_together():
  example = make_example(size=6)
  rasters = transforms.rasters_of(example)
  seen = set()
  for seed in range(40):
    out = transforms.random_dihedral(rasters, np.random.default_rng(seed))
    position = out["dem"][..., 0].astype(np.int64)  # dem holds each pixel's original position
    np.testing.assert_array_equal(out["lulc"], position % 11)
    np.testing.assert_array_equal(out["s2"].astype(np.int64), position[..., None] + 100 * np.arange(12))
    np.testing.assert_array_equal(out["s1"][..., 0], -(position % 25))
    candidates = dihedral_images(example["dem"])
    matches = [i for i, c in enumerate(candidates) if np.array_equal(c, out["dem"])]
    assert len(matches) == 1
    seen.add(matches[0])
  assert seen == set(range(8))  # every symmetry of the square occurs


def test_dihedral_options_switch_flip_and_rotation_off():
  rasters = transforms.rasters_of(make_example(size=5))
  original = rasters["dem"]
  for seed in range(20):
    rng = np.random.default_rng(seed)
    only_rotations = transforms.random_dihedral(rasters, rng, flip=False)["dem"]
    assert any(np.array_equal(only_rotations, np.rot90(original, k)) for k in range(4))
    only_flip = transforms.random_dihedral(rasters, rng, rot90=False)["dem"]
    assert np.array_equal(only_flip, original) or np.array_equal(only_flip, original[:, ::-1])
    untouched = transforms.random_dihedral(rasters, rng, flip=False, rot90=False)["dem"]
    np.testing.assert_array_equal(untouched, original)


def test_random_crop_takes_the_same_window_from_every_raster():
  example = make_example(size=10)
  rasters = transforms.rasters_of(example)
  corners = set()
  for seed in range(30):
    top, left = transforms.random_crop_offsets(np.random.default_rng(seed), 10, 10, 4)
    assert 0 <= top <= 6 and 0 <= left <= 6
    corners.add((top, left))
    out = transforms.crop(rasters, top, left, 4)
    expected_position = (np.arange(top, top + 4)[:, None] * 10 + np.arange(left, left + 4)[None, :])
    np.testing.assert_array_equal(out["dem"][..., 0], expected_position)
    np.testing.assert_array_equal(out["lulc"], expected_position % 11)
    np.testing.assert_array_equal(out["s2"][..., 3], expected_position + 300)
  assert len(corners) > 5
  assert transforms.center_crop_offsets(10, 10, 4) == (3, 3)
  assert transforms.center_crop_offsets(120, 120, 32) == (44, 44)
  with pytest.raises(ValueError, match="image_size"):
    transforms.center_crop_offsets(10, 10, 12)


def test_training_transform_crops_and_augments_jointly_and_eval_is_centred():
  example = make_example(size=12)
  train = transforms.ExampleTransform(modalities=("s2", "dem", "lulc"), labels=("lulc",), image_size=6,
                                      train=True, flip=True, rot90=True)
  for seed in range(10):
    row = train.view(example, np.random.default_rng(seed))
    position = np.rint(row["inputs"]["dem"][..., 0] * constants.DEM_SCALE_M).astype(np.int64)
    assert row["inputs"]["s2"].shape == (6, 6, 12)
    np.testing.assert_array_equal(row["labels"]["lulc"], position % 11)
    np.testing.assert_array_equal(row["inputs"]["lulc"], position % 11)
    np.testing.assert_allclose(row["inputs"]["s2"][..., 0], position / 1e4, rtol=1e-6)
    # A window of 6x6 contiguous pixels: the spread of positions is that of a 6x6 block.
    assert position.max() - position.min() == 5 * 12 + 5
  evaluation = transforms.ExampleTransform(modalities=("dem",), labels=("lulc",), image_size=6)
  row = evaluation.view(example, None)
  expected = np.arange(3, 9)[:, None] * 12 + np.arange(3, 9)[None, :]
  np.testing.assert_allclose(row["inputs"]["dem"][..., 0] * constants.DEM_SCALE_M, expected, rtol=1e-6)
  np.testing.assert_array_equal(row["labels"]["lulc"], expected % 11)


def test_spectral_augmentation_keeps_shapes_and_finiteness_and_spares_categorical_inputs():
  example = make_example(size=16)
  inputs = transforms.normalize(example, ["s2", "s1", "lulc", "era5"])
  options = transforms.SpectralAugment(brightness=0.2, contrast=0.3, noise_std=0.05, blur_prob=1.0)
  out = transforms.spectral_augment(inputs, np.random.default_rng(0), options)
  for name in inputs:
    assert out[name].shape == inputs[name].shape and out[name].dtype == inputs[name].dtype
    assert np.all(np.isfinite(out[name]))
  assert not np.allclose(out["s2"], inputs["s2"])
  assert not np.allclose(out["s1"], inputs["s1"])
  np.testing.assert_array_equal(out["lulc"], inputs["lulc"])
  np.testing.assert_array_equal(out["era5"], inputs["era5"])
  again = transforms.spectral_augment(inputs, np.random.default_rng(0), options)
  np.testing.assert_array_equal(again["s2"], out["s2"])  # pure function of the generator
  untouched = transforms.spectral_augment(inputs, np.random.default_rng(0), transforms.SpectralAugment())
  np.testing.assert_array_equal(untouched["s2"], inputs["s2"])


def test_brightness_and_contrast_act_per_band():
  image = np.random.default_rng(1).random((8, 8, 3)).astype(np.float32)
  shifted = transforms.spectral_augment({"s1": image}, np.random.default_rng(2),
                                        transforms.SpectralAugment(brightness=0.5))["s1"]
  shift = (shifted - image).reshape(-1, 3)
  np.testing.assert_allclose(shift, np.broadcast_to(shift[0], shift.shape), atol=1e-6)  # one shift per band
  assert np.all(np.abs(shift[0]) <= 0.5) and len(set(np.round(shift[0], 6))) == 3
  scaled = transforms.spectral_augment({"s1": image}, np.random.default_rng(2),
                                       transforms.SpectralAugment(contrast=0.5))["s1"]
  np.testing.assert_allclose(scaled.mean(axis=(0, 1)), image.mean(axis=(0, 1)), atol=1e-5)  # mean kept
  ratio = scaled.std(axis=(0, 1)) / image.std(axis=(0, 1))
  assert np.all((ratio >= 0.5 - 1e-4) & (ratio <= 1.5 + 1e-4))


def test_gaussian_blur_keeps_constants_and_mass_and_spreads_a_point():
  constant = np.full((9, 9, 2), 3.0, np.float32)
  np.testing.assert_allclose(transforms.gaussian_blur(constant, 1.5), constant, rtol=1e-6)
  point = np.zeros((15, 15, 1), np.float32)
  point[7, 7] = 1.0
  sigma = 1.3
  blurred = transforms.gaussian_blur(point, sigma)[..., 0]
  np.testing.assert_allclose(blurred.sum(), 1.0, rtol=1e-5)  # no mass reaches the border
  # A point spreads into a sampled 2-D Gaussian: relative to the centre, exp(-(i^2 + j^2) / (2 sigma^2))
  # wherever the kernel reaches (the normalisation cancels), and the documented 2-sigma cut-off beyond.
  reach = int(np.ceil(2 * sigma))
  offsets = np.arange(-7, 8)
  i, j = np.meshgrid(offsets, offsets, indexing="ij")
  inside = (np.abs(i) <= reach) & (np.abs(j) <= reach)
  np.testing.assert_allclose(blurred[inside] / blurred[7, 7],
                             np.exp(-(i[inside] ** 2 + j[inside] ** 2) / (2 * sigma ** 2)), rtol=1e-5)
  np.testing.assert_array_equal(blurred[~inside], 0.0)


def test_gaussian_blur_of_an_image_matches_scipy_with_mirrored_borders():
  from scipy import ndimage  # pylint: disable=g-import-not-at-top
  image = np.random.default_rng(3).random((11, 9, 2)).astype(np.float32)
  for sigma in (0.4, 1.3, 2.0):
    reach = int(np.ceil(2 * sigma))
    # numpy's 'reflect' padding (d c b | a b c d) is scipy's 'mirror' mode.
    expected = ndimage.gaussian_filter(image.astype(np.float64), sigma=(sigma, sigma, 0), mode="mirror",
                                       radius=(reach, reach, 0))
    np.testing.assert_allclose(transforms.gaussian_blur(image, sigma), expected, rtol=1e-5, atol=1e-6)


def test_noise_is_zero_mean_gaussian_of_the_given_std_independent_per_pixel_and_band():
  image = np.random.default_rng(4).random((64, 64, 12)).astype(np.float32)
  noisy = transforms.spectral_augment({"s2": image}, np.random.default_rng(5),
                                      transforms.SpectralAugment(noise_std=0.05))["s2"]
  noise = (noisy - image).astype(np.float64)
  # 49152 draws: the sample mean's standard error is 2.3e-4, the std's 1.6e-4.
  assert abs(noise.mean()) < 1e-3
  assert noise.std() == pytest.approx(0.05, abs=1e-3)
  standardized = noise.ravel() / noise.std()
  assert abs(np.mean(standardized ** 4) - 3.0) < 0.1  # a Gaussian's kurtosis, not a uniform's 1.8
  for axis in (0, 1, 2):  # neighbours along rows, columns and bands are uncorrelated
    a, b = np.swapaxes(noise, 0, axis)[:-1].ravel(), np.swapaxes(noise, 0, axis)[1:].ravel()
    assert abs(np.corrcoef(a, b)[0, 1]) < 0.03
  again = transforms.spectral_augment({"s2": image}, np.random.default_rng(6),
                                      transforms.SpectralAugment(noise_std=0.05))["s2"]
  assert not np.allclose(again, noisy)  # another generator state, other noise


def test_only_transforms_that_draw_random_numbers_need_a_generator():
  example = make_example(size=6)
  plain = transforms.ExampleTransform(modalities=("s2",), labels=(), train=True)
  assert not plain.uses_rng  # no crop, no augmentation: the pipeline skips making a generator
  np.testing.assert_array_equal(plain.view(example, None)["inputs"]["s2"],
                                transforms.normalize(example, ["s2"])["s2"])
  spectral = transforms.SpectralAugment(noise_std=0.1)
  for options in (dict(flip=True), dict(image_size=4), dict(spectral=spectral)):
    augmenting = transforms.ExampleTransform(modalities=("s2",), labels=(), train=True, **options)
    assert augmenting.uses_rng
    with pytest.raises(ValueError, match="generator"):
      augmenting.view(example, None)


# ---------------------------------------------------------------------------------------------------------
# Published weights' input scalings (data.presets).
# ---------------------------------------------------------------------------------------------------------
def _raw_example():
  rng = np.random.default_rng(12)
  s2 = rng.integers(0, 12000, (5, 4, 12)).astype(np.uint16)
  s1 = rng.uniform(-35, 3, (5, 4, 2)).astype(np.float32)  # ben-ge order: VH, VV (dB)
  return {"s2": s2, "s1": s1}


def test_presets_scale_each_band_with_the_published_numbers_of_its_name():
  example = _raw_example()
  s2, s1 = example["s2"].astype(np.float64), example["s1"].astype(np.float64)
  vh, vv = s1[..., 0], s1[..., 1]
  # The numbers as published (torchgeo / SSL4EO-S12), written out here in the publishers' band order.
  l1c_mean = dict(zip(["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11",
                       "B12"], [1612.9, 1397.6, 1322.3, 1373.1, 1561.0, 2108.4, 2390.7, 2318.7, 2581.0, 837.7,
                                22.0, 2195.2, 1537.4]))
  l1c_std = dict(zip(l1c_mean, [791.0, 854.3, 878.7, 1144.9, 1127.5, 1164.2, 1276.0, 1249.5, 1345.9, 577.5,
                                47.5, 1340.0, 1142.9]))
  bens_bands = constants.S2_BANDS
  expected = {
      ("s2", "s2_div10000"): s2 / 10000,
      ("s2", "s2_l1c_zscore_ssl4eo"): (s2 - np.array([l1c_mean[b] for b in bens_bands]))
                                      / np.array([l1c_std[b] for b in bens_bands]),
      ("s2", "sen12ms_s2_clip_permax"): np.clip(s2, 0, 10000) / (np.clip(s2, 0, 10000).max(axis=(0, 1)) + 1e-5),
      ("s1", "s1_db_zscore_ssl4eo"): np.stack([(vh + 20.26) / 5.91, (vv + 12.59) / 5.26], -1),
      ("s1", "s1_db_2sigma_ssl4eo"): np.stack(
          [np.clip((vh - (-20.19237134 - 2 * 5.91150917)) / (4 * 5.91150917), 0, 1),
           np.clip((vv - (-12.54847273 - 2 * 5.25697717)) / (4 * 5.25697717), 0, 1)], -1),
      ("s1", "sen12ms_s1_clip_permax"): (np.clip(s1, -25, 0) + 25) / ((np.clip(s1, -25, 0) + 25).max(axis=(0, 1))
                                                                      + 1e-5),
      ("s1", "s1_raw_closp"): s1,
  }
  for (modality, preset), value in expected.items():
    out = transforms.normalize(example, [modality], presets={modality: preset})[modality]
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, value, rtol=2e-6, atol=2e-6, err_msg=preset)
  # Other modalities keep the reference scaling.
  both = transforms.normalize(example, ["s2", "s1"], presets={"s1": "s1_raw_closp"})
  np.testing.assert_allclose(both["s2"], np.clip(s2 / 10000, 0, 1), rtol=1e-6)


def test_presets_are_checked_by_name_and_modality():
  from labeleff_jax.data import presets  # pylint: disable=g-import-not-at-top
  assert presets.check({"s2": "s2_div10000", "s1": ""}) == {"s2": "s2_div10000"}
  with pytest.raises(ValueError, match=r"data.presets.s1='s2_div10000' scales s2"):
    presets.check({"s1": "s2_div10000"})
  with pytest.raises(ValueError, match="data.presets.s2='nope' is not a preset; choose one of"):
    presets.check({"s2": "nope"})
  with pytest.raises(ValueError, match="in the catalogue, but ben-ge has no input"):
    presets.check({"s2": "seco_rgb_quantiles_imagenet"})
  with pytest.raises(ValueError, match="data.presets.dem"):
    presets.check({"dem": "s2_div10000"})
