"""Per-example numpy transforms: normalisation, labels, joint geometric and spectral augmentation.

Everything here works on one raw ben-ge example (a dict with the features of the prepared TFDS dataset)
and stays in numpy float32, so the input pipeline can run it in worker processes without touching JAX.
Geometric operations act on the raw rasters (cheap views of uint16 / uint8 data) and the normalisation then
makes the one float32 copy each image needs. The config is checked before anything here runs
(config_checks.check_data), so these functions trust their options.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence

import numpy as np

from labeleff_jax.data import constants
from labeleff_jax.data import presets as input_presets

# Raw example features that are rasters [H, W, ...] and must move together under crops, flips and
# rotations. `lulc` is both an input modality (a class map, one-hot on the device) and the segmentation label.
RASTER_FEATURES = ("s2", "s1", "dem", "lulc")

# Image modalities that spectral augmentation may touch: land cover is categorical and stays exact.
SPECTRAL_MODALITIES = ("s2", "s1", "dem")

# Modalities that `compute_normalization_stats` standardises (one-hots and the season stay as they are).
STANDARDIZABLE_MODALITIES = ("s2", "s1", "dem", "era5")

# Map every stored byte to a class index or to the ignore value, so out-of-range codes never reach a loss
# (labels) or a one-hot (inputs: the model's one-hot of 255 is all zeros).
_LULC_LABEL = np.full(256, constants.LULC_IGNORE, np.int32)
_LULC_LABEL[: constants.NUM_LULC_CLASSES] = np.arange(constants.NUM_LULC_CLASSES)
_LULC_INPUT = _LULC_LABEL.astype(np.uint8)

_S1_LOW, _S1_HIGH = constants.S1_CLIP_DB
_S1_RANGE = _S1_HIGH - _S1_LOW


def _feature(example: Mapping, key: str):
  try:
    return example[key]
  except KeyError:
    raise KeyError(f"Example has no feature '{key}' (features present: {sorted(example)}).") from None


def _class_index(value, num_classes: int, key: str) -> int:
  index = int(np.asarray(value))
  if not 0 <= index < num_classes:
    raise ValueError(f"Feature '{key}' holds class {index}, outside 0..{num_classes - 1}.")
  return index


# ---------------------------------------------------------------------------------------------------------
# Normalisation.
# ---------------------------------------------------------------------------------------------------------
def prepare_stats(stats: Mapping | None) -> dict | None:
  """Turns JSON statistics ({modality: {'mean': [...], 'std': [...]}}) into float32 arrays, checked."""
  if stats is None:
    return None
  prepared = {}
  for name, entry in stats.items():
    if name not in STANDARDIZABLE_MODALITIES:
      raise ValueError(f"Normalisation stats for '{name}': only {STANDARDIZABLE_MODALITIES} are "
                       "standardised.")
    try:
      mean = np.asarray(entry["mean"], np.float32)
      std = np.asarray(entry["std"], np.float32)
    except (KeyError, TypeError):
      raise ValueError(f"Normalisation stats for '{name}' need 'mean' and 'std' lists.") from None
    channels = constants.MODALITIES[name]
    if mean.shape != (channels,) or std.shape != (channels,):
      raise ValueError(f"Normalisation stats for '{name}' must have {channels} values each, got mean "
                       f"{mean.shape} and std {std.shape}.")
    if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(std)) and np.all(std > 0)):
      raise ValueError(f"Normalisation stats for '{name}' must be finite with std > 0.")
    prepared[name] = {"mean": mean, "inv_std": (1.0 / std).astype(np.float32)}
  return prepared


def _destination(out: Mapping | None, name: str, shape: tuple, dtype=np.float32) -> np.ndarray:
  """Where modality `name` is written: a fresh array, or the caller's (e.g. a row of a batch buffer)."""
  if out is None:
    return np.empty(shape, dtype)
  target = out[name]
  if target.shape != tuple(shape):
    raise ValueError(f"Output buffer for '{name}' has shape {target.shape}, the example gives "
                     f"{tuple(shape)}.")
  return target


def _land_cover_classes(raw: np.ndarray, table: np.ndarray, out: Mapping | None, name: str) -> np.ndarray:
  """The class of every land-cover code of `raw` by `table` (_LULC_INPUT or _LULC_LABEL), looked up straight
  into the destination. mode='clip' skips the bounds check: uint8 codes always index the 256-entry table."""
  target = _destination(out, name, raw.shape, table.dtype)
  np.take(table, raw.astype(np.uint8, copy=False), out=target, mode="clip")
  return target


def normalize(example: Mapping, modalities: Sequence[str], stats: Mapping | None = None,
              out: Mapping | None = None, presets: Mapping[str, str] | None = None) -> dict:
  """Returns the input arrays of `modalities` for one raw example (float32; lulc uint8).

  Without `stats` (or for a modality missing from it) the reference's fixed scaling applies: s2
  clip(x / 1e4, 0, 1), s1 (clip(x, -25, 0) + 25) / 25, dem x / 1000, era5 (x - offset) / scale. A modality
  in `stats` (see `compute_normalization_stats`) is standardised per band instead. lulc becomes a uint8
  class map [H, W] (255 where no data; the models one-hot it), climatezone a one-hot [12], season a [1]
  vector of season_s2.

  A modality in `presets` ({modality: preset name}, data.presets) is scaled the way published weights expect
  instead (labeleff_jax/data/presets.py), whatever `stats` holds.

  With `out` (a dict of arrays of the right shapes and dtypes), results are written there and `out` returned:
  the pipeline passes rows of its batch buffers, so each image is converted once, straight into the batch.
  """
  if stats is not None and not all("inv_std" in entry for entry in stats.values()):
    stats = prepare_stats(stats)
  stats = stats or {}
  inputs = {}
  for name in modalities:
    if name in ("season", "climatezone"):
      raw = None
    else:
      raw = np.asarray(_feature(example, name))
    if presets and name in presets:
      target = _destination(out, name, raw.shape)
      input_presets.apply(presets[name], raw, name, target)
    elif name in stats:
      target = _destination(out, name, raw.shape)
      np.subtract(raw, stats[name]["mean"], out=target, dtype=np.float32)
      target *= stats[name]["inv_std"]
    elif name == "s2":
      # Convert, scale and clip in place: no temporaries, and each pass is a plain float32 loop (a
      # multiply that also casts from uint16 runs numpy's slower buffered loop).
      target = _destination(out, name, raw.shape)
      np.copyto(target, raw)
      np.multiply(target, np.float32(1.0 / constants.S2_SCALE), out=target)
      np.clip(target, 0.0, 1.0, out=target)
    elif name == "s1":
      target = _destination(out, name, raw.shape)
      np.clip(raw, _S1_LOW, _S1_HIGH, out=target, dtype=np.float32)
      target -= np.float32(_S1_LOW)
      target *= np.float32(1.0 / _S1_RANGE)
    elif name == "dem":
      target = _destination(out, name, raw.shape)
      np.multiply(raw, np.float32(1.0 / constants.DEM_SCALE_M), out=target, dtype=np.float32)
    elif name == "era5":
      target = _destination(out, name, raw.shape)
      np.subtract(raw, constants.ERA5_OFFSET, out=target, dtype=np.float32)
      target /= constants.ERA5_SCALE
    elif name == "lulc":
      # The class map travels (1 byte a pixel); models expand it to a one-hot on the device, which would
      # be 44 bytes a pixel here.
      target = _land_cover_classes(raw, _LULC_INPUT, out, name)
    elif name == "season":
      target = _destination(out, name, (1,))
      target[0] = np.float32(_feature(example, "season_s2"))
    elif name == "climatezone":
      zone = _class_index(_feature(example, "climatezone"), constants.NUM_CLIMATE_ZONES, "climatezone")
      target = _destination(out, name, (constants.NUM_CLIMATE_ZONES,))
      target[...] = 0.0
      target[zone] = 1.0
    else:
      raise ValueError(f"Unknown modality '{name}'; known: {sorted(constants.MODALITIES)}.")
    inputs[name] = target
  return inputs


def make_labels(example: Mapping, labels: Sequence[str], threshold: float = 0.05,
                out: Mapping | None = None) -> dict:
  """Returns the training targets named in `labels` (constants.LABELS has their dtypes and shapes).

  With `out` (a dict of arrays of the right shapes and dtypes, e.g. a row of a batch), the targets are
  written there and `out`'s arrays returned.
  """
  targets = {}
  for name in labels:
    if name == "lulc":  # written straight into `out`: no temporary int32 map to copy
      targets[name] = _land_cover_classes(np.asarray(_feature(example, "lulc")), _LULC_LABEL, out, name)
      continue
    if name == "climatezone":
      value = np.int32(_class_index(_feature(example, name), constants.NUM_CLIMATE_ZONES, name))
    elif name == "lulc_top":
      value = np.int32(_class_index(_feature(example, name), constants.NUM_LULC_CLASSES, name))
    elif name == "geocluster":
      value = np.int32(_class_index(_feature(example, name), constants.NUM_GEOCLUSTERS, name))
    elif name == "lulc_multihot":
      fractions = np.asarray(_feature(example, "lulc_fractions"), np.float32)
      value = (fractions > threshold).astype(np.float32)
    elif name == "season":
      value = np.float32(_feature(example, "season_s2"))
    else:
      raise ValueError(f"Unknown label '{name}'; known labels: {sorted(constants.LABELS)}.")
    if out is not None:
      out[name][...] = value
      value = out[name]
    targets[name] = value
  return targets


def compute_normalization_stats(source, modalities: Sequence[str], max_examples: int | None = None,
                                indices: Sequence[int] | None = None) -> dict:
  """Per-band mean and std of the raw values of `source` (the training split), JSON-serialisable.

  Only the modalities that are standardised (s2, s1, dem, era5) get an entry; the others keep their fixed
  encodings. With `max_examples`, an evenly spaced, deterministic subset of the examples is read. Means and
  variances are accumulated in float64 and merged example by example (Chan et al.), which stays accurate
  for uint16 reflectances where a naive sum of squares would lose digits.
  """
  modalities = [name for name in modalities if name in STANDARDIZABLE_MODALITIES]
  indices = np.arange(len(source)) if indices is None else np.asarray(indices)
  if len(indices) == 0:
    raise ValueError("compute_normalization_stats: the source has no examples.")
  if max_examples is not None and max_examples < len(indices):
    if max_examples < 1:
      raise ValueError(f"max_examples must be >= 1, got {max_examples}.")
    picks = np.unique(np.linspace(0, len(indices) - 1, max_examples).round().astype(np.int64))
    indices = indices[picks]
  count = {name: 0 for name in modalities}
  mean = {name: np.zeros(constants.MODALITIES[name]) for name in modalities}
  m2 = {name: np.zeros(constants.MODALITIES[name]) for name in modalities}
  for index in indices:
    example = source[int(index)]
    for name in modalities:
      values = np.asarray(_feature(example, name))
      values = values.reshape(-1, constants.MODALITIES[name]).astype(np.float64)
      n_new = values.shape[0]
      mean_new = values.mean(axis=0)
      m2_new = ((values - mean_new) ** 2).sum(axis=0)
      n_old = count[name]
      total = n_old + n_new
      delta = mean_new - mean[name]
      mean[name] = mean[name] + delta * (n_new / total)
      m2[name] = m2[name] + m2_new + delta**2 * (n_old * n_new / total)
      count[name] = total
  stats = {}
  for name in modalities:
    std = np.sqrt(m2[name] / count[name])
    # A constant band (e.g. a flat DEM in a tiny split) would divide by zero; unit std leaves it centred.
    std = np.where(std > 1e-6, std, 1.0)
    stats[name] = {"mean": [float(v) for v in mean[name]], "std": [float(v) for v in std],
                   "num_examples": int(len(indices))}
  return stats


# ---------------------------------------------------------------------------------------------------------
# Geometry: one transform, applied identically to every raster (inputs and the label mask alike).
# ---------------------------------------------------------------------------------------------------------
def rasters_of(example: Mapping) -> dict:
  """The raster features present in `example` (the arrays that must be transformed together)."""
  return {name: example[name] for name in RASTER_FEATURES if name in example}


def spatial_size(rasters: Mapping) -> tuple[int, int]:
  """(height, width) shared by all rasters; raises when they disagree."""
  sizes = {name: tuple(np.shape(array)[:2]) for name, array in rasters.items()}
  if len(set(sizes.values())) != 1:
    raise ValueError(f"Rasters of one example differ in size: {sizes}.")
  return next(iter(sizes.values()))


def center_crop_offsets(height: int, width: int, size: int) -> tuple[int, int]:
  """Top-left corner of the centred size x size window."""
  _check_crop(height, width, size)
  return (height - size) // 2, (width - size) // 2


def random_crop_offsets(rng: np.random.Generator, height: int, width: int, size: int) -> tuple[int, int]:
  """Top-left corner of a uniformly drawn size x size window."""
  _check_crop(height, width, size)
  return int(rng.integers(0, height - size + 1)), int(rng.integers(0, width - size + 1))


def _check_crop(height: int, width: int, size: int):
  if not 0 < size <= min(height, width):
    raise ValueError(f"data.image_size={size} does not fit the stored {height}x{width} rasters.")


def crop(rasters: Mapping, top: int, left: int, size: int) -> dict:
  """The same size x size window of every raster (views, no copy)."""
  return {name: array[top:top + size, left:left + size] for name, array in rasters.items()}


def apply_dihedral(rasters: Mapping, flip: bool, rotations: int) -> dict:
  """Mirrors left-right (if `flip`), then rotates by `rotations` x 90 degrees, every raster alike.

  Together the two cover the eight symmetries of the square, all physically valid for nadir imagery.
  """
  rotations %= 4
  out = {}
  for name, array in rasters.items():
    if flip:
      array = array[:, ::-1]
    # Counter-clockwise quarter turns as strided views, as np.rot90 does, minus its per-call overhead.
    if rotations == 1:
      array = array.swapaxes(0, 1)[::-1]
    elif rotations == 2:
      array = array[::-1, ::-1]
    elif rotations == 3:
      array = array[::-1].swapaxes(0, 1)
    out[name] = array
  return out


def random_dihedral(rasters: Mapping, rng: np.random.Generator, *, flip: bool = True,
                    rot90: bool = True) -> dict:
  """Draws one flip/rotation from `rng` and applies it jointly to every raster."""
  # Both draws happen even when disabled, so toggling one option never shifts the other's randomness.
  do_flip = bool(rng.integers(0, 2))
  rotations = int(rng.integers(0, 4))
  return apply_dihedral(rasters, do_flip and flip, rotations if rot90 else 0)


# ---------------------------------------------------------------------------------------------------------
# Spectral augmentation (for SimCLR-style views), on normalised float32 images.
# ---------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SpectralAugment:
  """Strengths of the spectral augmentations; all zero means none.

  brightness: per-band additive shift drawn from U(-brightness, brightness) (in normalised units).
  contrast: per-band factor from U(1 - contrast, 1 + contrast), applied around the band's mean.
  noise_std: standard deviation of additive per-pixel Gaussian noise.
  blur_prob: probability of a Gaussian blur with sigma from U(0.1, 2.0) pixels (SimCLR's range).
  """
  brightness: float = 0.0
  contrast: float = 0.0
  noise_std: float = 0.0
  blur_prob: float = 0.0

  @property
  def active(self) -> bool:
    return self.brightness > 0 or self.contrast > 0 or self.noise_std > 0 or self.blur_prob > 0


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
  """Separable Gaussian blur of an [H, W, C] float32 image over H and W (reflecting borders)."""
  radius = max(1, int(math.ceil(2.0 * sigma)))
  radius = min(radius, image.shape[0] - 1, image.shape[1] - 1)
  if radius < 1:
    return image
  offsets = np.arange(-radius, radius + 1, dtype=np.float32)
  weights = np.exp(-0.5 * (offsets / np.float32(sigma)) ** 2)
  weights /= weights.sum()
  out = image
  for axis in (0, 1):
    length = out.shape[axis]
    pad = [(0, 0)] * out.ndim
    pad[axis] = (radius, radius)
    padded = np.pad(out, pad, mode="reflect")
    blurred = np.zeros_like(out)
    for tap, weight in enumerate(weights):
      window = [slice(None)] * out.ndim
      window[axis] = slice(tap, tap + length)
      blurred += weight * padded[tuple(window)]
    out = blurred
  return out


def spectral_augment(inputs: Mapping, rng: np.random.Generator, options: SpectralAugment, *,
                     in_place: bool = False) -> dict:
  """Applies brightness, contrast, noise and blur to the image modalities in `inputs` (s2, s1, dem).

  Other entries (one-hot land cover, vectors) pass through unchanged. Each modality and band draws its own
  strengths; the draw order is fixed, so the result is a pure function of the generator's state. With
  `in_place` the float32 arrays of `inputs` are modified (the pipeline does this on its own batch rows).
  """
  out = dict(inputs)
  if not options.active:
    return out
  for name in SPECTRAL_MODALITIES:
    if name not in inputs:
      continue
    if in_place:
      image = inputs[name]
      if image.dtype != np.float32:
        raise ValueError(f"In-place spectral augmentation needs float32 '{name}', got {image.dtype}.")
    else:
      image = np.array(inputs[name], np.float32)  # own copy: never write into a caller's array
    bands = image.shape[-1]
    shift = rng.uniform(-options.brightness, options.brightness, bands).astype(np.float32)
    factor = rng.uniform(1.0 - options.contrast, 1.0 + options.contrast, bands).astype(np.float32)
    blur = rng.random() < options.blur_prob
    sigma = rng.uniform(0.1, 2.0)
    if options.contrast > 0:
      band_mean = image.mean(axis=(0, 1), dtype=np.float32)
      image -= band_mean
      image *= factor
      image += band_mean
    if options.brightness > 0:
      image += shift
    if blur:
      image[...] = gaussian_blur(image, sigma)
    if options.noise_std > 0:
      noise = rng.standard_normal(image.shape, dtype=np.float32)
      noise *= np.float32(options.noise_std)
      image += noise
    out[name] = image
  return out


# ---------------------------------------------------------------------------------------------------------
# One example end to end.
# ---------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ExampleTransform:
  """Everything that turns one raw example into the inputs and labels of a batch row.

  `image_size`: None keeps the stored size; smaller values crop (random when training, centred otherwise).
  `flip`, `rot90` and `spectral` only act when `train` is true.
  """
  modalities: tuple[str, ...]
  labels: tuple[str, ...]
  stats: dict | None = None
  image_size: int | None = None
  train: bool = False
  flip: bool = False
  rot90: bool = False
  spectral: SpectralAugment = SpectralAugment()
  multilabel_threshold: float = 0.05
  presets: tuple[tuple[str, str], ...] = ()  # (modality, preset) pairs: data.presets

  @functools.cached_property
  def raster_features(self) -> tuple[str, ...]:
    """The rasters this transform reads: only these are cropped and turned."""
    used = set(self.modalities) | ({"lulc"} if "lulc" in self.labels else set())
    return tuple(name for name in RASTER_FEATURES if name in used)

  @functools.cached_property
  def preset_of(self) -> dict[str, str]:
    """`presets` as a mapping, built once rather than for every example."""
    return dict(self.presets)

  @property
  def uses_rng(self) -> bool:
    """Whether `view` draws random numbers (a random crop, a flip or turn, spectral jitter)."""
    return self.train and (self.image_size is not None or self.flip or self.rot90 or self.spectral.active)

  def view(self, example: Mapping, rng: np.random.Generator | None, with_labels: bool = True,
           out: Mapping | None = None) -> dict:
    """Returns {'inputs': ..., 'labels': ...} for one augmented view of `example`.

    With `out` (same structure, arrays of the right shapes: a row of a batch) the view is written there
    instead of into fresh arrays, so that each image is copied once on its way into the batch.
    """
    if self.uses_rng and rng is None:
      raise ValueError("This training transform draws random numbers: it needs a generator.")
    rasters = {name: _feature(example, name) for name in self.raster_features}
    if rasters and self.image_size is not None:
      height, width = spatial_size(rasters)
      if self.image_size != height or self.image_size != width:
        if self.train:
          top, left = random_crop_offsets(rng, height, width, self.image_size)
        else:
          top, left = center_crop_offsets(height, width, self.image_size)
        rasters = crop(rasters, top, left, self.image_size)
    if self.train and (self.flip or self.rot90):
      rasters = random_dihedral(rasters, rng, flip=self.flip, rot90=self.rot90)
    transformed = {**example, **rasters}
    inputs = normalize(transformed, self.modalities, self.stats, out=None if out is None else out["inputs"],
                       presets=self.preset_of)
    if self.train and self.spectral.active:
      inputs = spectral_augment(inputs, rng, self.spectral, in_place=True)
    result = {"inputs": inputs}
    if with_labels:
      result["labels"] = make_labels(transformed, self.labels, self.multilabel_threshold,
                                     out=None if out is None else out["labels"])
    return result
