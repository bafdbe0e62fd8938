"""Input scalings of published weights (data.presets), applied to ben-ge's raw Sentinel-1/2 values.

Published encoders were trained on inputs scaled their own way (reflectance /10000, dB z-scores with the
pretraining set's statistics, per-sample maxima, ...), and they only give their features on inputs scaled
the same way. `data.presets.s2` / `data.presets.s1` name one of labeleff_jax.weights.catalog.NORMALIZATIONS
for that modality; it replaces data.normalization for that modality. The numbers (means, standard
deviations) are read from the catalogue, per band name, so ben-ge's band order (S2 without B10, S1 as
VH, VV) picks the right ones whatever order the weights use.
"""

from collections.abc import Mapping

import numpy as np

from labeleff_jax.data import constants
from labeleff_jax.weights import catalog

BANDS = {"s2": constants.S2_BANDS, "s1": constants.S1_BANDS}
# The presets that can be computed from ben-ge's stored values, and the modality each one is for.
PRESET_MODALITIES = {
    "s2_div10000": "s2", "s2_l1c_zscore_ssl4eo": "s2", "sen12ms_s2_clip_permax": "s2",
    "s1_db_zscore_ssl4eo": "s1", "s1_db_2sigma_ssl4eo": "s1", "sen12ms_s1_clip_permax": "s1",
    "s1_raw_closp": "s1",
}
_PER_SAMPLE_EPSILON = 1e-5  # SSLTransformerRS adds it to each band's maximum before dividing


def check(presets: Mapping[str, str]) -> dict[str, str]:
  """The non-empty presets of `presets` ({modality: name}), checked; errors name the config key."""
  chosen = {}
  for modality, name in presets.items():
    if not name:
      continue
    if modality not in BANDS:
      raise ValueError(f"data.presets.{modality}: presets exist for {sorted(BANDS)} only")
    if name not in PRESET_MODALITIES:
      known = sorted(PRESET_MODALITIES)
      extra = (" (it is in the catalogue, but ben-ge has no input it applies to)"
               if name in catalog.NORMALIZATIONS else "")
      raise ValueError(f"data.presets.{modality}={name!r} is not a preset{extra}; choose one of {known}")
    if PRESET_MODALITIES[name] != modality:
      raise ValueError(f"data.presets.{modality}={name!r} scales {PRESET_MODALITIES[name]}, not {modality}")
    chosen[modality] = name
  return chosen


def for_weights(entry: catalog.WeightsEntry) -> dict[str, str]:
  """The data.presets that scale ben-ge as `entry`'s weights were trained ({} if ben-ge cannot be)."""
  return {entry.modality: entry.normalization} if entry.normalization in PRESET_MODALITIES else {}


def _per_band(values, modality: str, name: str) -> np.ndarray:
  """A catalogue preset's per-band numbers in ben-ge's band order (picked by band name)."""
  normalization = catalog.NORMALIZATIONS[name]
  by_band = dict(zip(normalization.bands, values, strict=True))
  return np.asarray([by_band[band] for band in BANDS[modality]], np.float32)


def apply(name: str, raw: np.ndarray, modality: str, out: np.ndarray) -> np.ndarray:
  """Writes preset `name` of the raw [H, W, bands] `modality` image into the float32 array `out`."""
  if name == "s2_div10000" or name == "s1_raw_closp":
    scale = 1.0 / 10000.0 if name == "s2_div10000" else 1.0
    np.multiply(raw, np.float32(scale), out=out, dtype=np.float32)
  elif name in ("s2_l1c_zscore_ssl4eo", "s1_db_zscore_ssl4eo"):
    normalization = catalog.NORMALIZATIONS[name]
    mean = _per_band(normalization.mean, modality, name)
    np.subtract(raw, mean, out=out, dtype=np.float32)
    out *= 1.0 / _per_band(normalization.std, modality, name)
  elif name == "s1_db_2sigma_ssl4eo":
    normalization = catalog.NORMALIZATIONS[name]
    mean, std = (_per_band(v, modality, name) for v in (normalization.mean, normalization.std))
    np.subtract(raw, mean - 2.0 * std, out=out, dtype=np.float32)
    out *= 1.0 / (4.0 * std)
    np.clip(out, 0.0, 1.0, out=out)
  elif name in ("sen12ms_s2_clip_permax", "sen12ms_s1_clip_permax"):
    low, high, shift = (0.0, 10000.0, 0.0) if modality == "s2" else (-25.0, 0.0, 25.0)
    np.clip(raw, low, high, out=out, dtype=np.float32)
    out += np.float32(shift)
    out /= out.max(axis=(0, 1)) + np.float32(_PER_SAMPLE_EPSILON)
  else:
    raise ValueError(f"unknown preset {name!r}")
  return out


def maps_zero_to_zero(name: str) -> bool:
  """Whether a raw 0 becomes an input of 0 (then a dropped input band equals a band of raw zeros)."""
  return name in ("s2_div10000", "sen12ms_s2_clip_permax", "s1_raw_closp")
