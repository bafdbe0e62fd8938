"""A small world model of Europe that the synthetic ben-ge writer samples patches from.

The synthetic dataset must look like ben-ge on disk and carry learnable, partly complementary structure in
its content. Everything here is numpy and does no I/O; `synthetic.py` turns its output into GeoTIFFs/CSVs.

The model, from the top:
- Location: each patch falls into one of a dozen regions modelled on the countries of BigEarthNet
  (Portugal, Ireland, Benelux, Switzerland, Austria, Serbia/Kosovo, Lithuania, Finland) plus a few more
  (interior Iberia, western Norway, the Po valley, Greece) so that every climate zone of the code set occurs.
- Elevation: a fixed trend of Gaussian mountain ranges (Alps, Pyrenees, Scandes, ...), times a smooth random
  relief that depends on the seed, plus per-patch hills. Inside a patch, relief is a smooth random field whose
  amplitude grows with the mean elevation.
- Climate: coldest- and warmest-month temperatures from latitude, continentality (longitude) and a 6.5 K/km
  lapse rate, with a little local noise; a Mediterranean summer-dry band and an arid interior-Iberia bump.
  Simplified Koeppen rules then give one of the codes of `constants.CLIMATE_ZONE_CODES`; about 2 % of the
  patches are open water and get code 0.
- Acquisition: an S2 date over 2017-2018, an S1 date a few days away; season follows the ben-ge formula.
- Land cover: a class mix drawn from a Dirichlet whose weights depend on the climate zone and elevation
  (snow high up and in tundra, mangroves rare and only at the coast, wetland in boreal/oceanic zones); the
  map is the argmax of smoothed random class fields plus a terrain term (wetland in hollows, snow and bare
  rock on highs), so it has realistic blobs. Water fills the lowest ground up to one level (flat lakes).
  Cropland is cut into rectangular parcels, each at its own crop stage.
- Weather (ERA-5 at the S2 and S1 times): pressure falls with elevation; temperature follows the climate,
  the (lagged) season, the lapse rate and the time of day; westerly wind, stronger in winter; humidity higher
  in winter, lower in Mediterranean summers.
- Sentinel-2: per-class reflectance spectra (water dark in the NIR, vegetation with a red edge, snow bright
  in the visible and dark in the SWIR, ...); vegetation mixes a green and a senescent spectrum by a vigour
  that depends on the climate zone and the season; forests are more coniferous (darker in the NIR) in cold
  climates; soils are brighter in dry climates; cold scenes get seasonal snow on open land; hill shading
  from the DEM; per-pixel noise. 20 m and 60 m bands are block averages of the 10 m rendering, so the bands
  agree the way real ones do.
- Sentinel-1: per-class VH/VV backscatter in dB with multiplicative gamma speckle (4.4 looks), wind
  roughening on water, crop growth raising VV, terrain slope brightening, a per-patch incidence offset.

Complementarity is designed in: tree cover and mangroves, grassland and herbaceous wetland, built-up and
bare ground have similar spectra but different backscatter; grassland, cropland, bare ground and moss look
alike to the radar, as do water and snow, while their spectra differ. Seasonal snow hides land cover from
S2 but not from S1. Climate zone reaches S2 only indirectly (vegetation vigour and colour, land-cover mix,
snow, soil brightness), so learning it takes more than reading one band.
"""

import dataclasses
import datetime
import functools

import numpy as np

from labeleff_jax.data import constants

PATCH = constants.PATCH_SIZE
TREE, SHRUB, GRASS, CROP, BUILT, BARE, SNOW, WATER, WETLAND, MANGROVE, MOSS = range(11)
VEGETATION_CLASSES = (TREE, SHRUB, GRASS, CROP, WETLAND, MANGROVE, MOSS)

FIRST_DAY = datetime.date(2017, 1, 1)
NUM_DAYS = (datetime.date(2018, 12, 31) - FIRST_DAY).days + 1

# RNG streams, each seeded by a fixed-length key (numpy's SeedSequence ignores trailing zeros, so keys of
# different lengths could collide).
WORLD_STREAM, META_STREAM, RASTER_STREAM = 0, 1, 2
WATER_PATCH_PROBABILITY = 0.02


def season_from_day_of_year(day_of_year):
  """ben-ge season encoding: 1 on 21 June, 0 on 22 December (day_of_year counts 1 January as 1)."""
  return (1.0 - np.cos(2.0 * np.pi * (np.asarray(day_of_year, np.float64) + 9.0) / 365.25)) / 2.0


def season_from_date(date: datetime.date) -> float:
  return float(season_from_day_of_year(date.timetuple().tm_yday))


def rng_for(seed: int, stream: int, index: int = 0) -> np.random.Generator:
  if seed < 0 or index < 0:
    raise ValueError(f"seed and patch index must be non-negative, got seed={seed}, index={index}")
  return np.random.default_rng([seed, stream, index, 0x5EED])


# ---------------------------------------------------------------------------------------------------------
# Geography.
# ---------------------------------------------------------------------------------------------------------
# (name, lon, lat, sd_lon, sd_lat, weight): where patches are drawn from.
REGIONS = (
    ("portugal", -8.2, 39.8, 0.6, 1.2, 0.13),
    ("iberia_interior", -3.5, 40.5, 1.8, 1.2, 0.06),
    ("ireland", -8.0, 53.2, 1.0, 0.9, 0.08),
    ("benelux", 4.8, 50.4, 1.3, 0.8, 0.07),
    ("switzerland", 8.2, 46.7, 1.0, 0.4, 0.09),
    ("austria", 13.5, 47.4, 1.8, 0.5, 0.10),
    ("serbia_kosovo", 20.8, 44.0, 0.9, 1.3, 0.10),
    ("po_valley", 11.0, 44.7, 1.4, 0.4, 0.05),
    ("greece", 22.0, 38.8, 1.2, 0.8, 0.03),
    ("lithuania", 23.8, 55.3, 1.4, 0.7, 0.08),
    ("finland", 26.0, 63.5, 2.2, 3.0, 0.16),
    ("western_norway", 7.0, 61.5, 1.2, 1.8, 0.06),
)
# Fixed geocluster centres (lon, lat): a stand-in for ben-ge's k-means (k=20) over patch locations.
GEOCLUSTER_CENTRES = np.array([
    (-8.5, 41.2), (-8.0, 38.5), (-4.5, 41.2), (-2.5, 39.3), (-8.6, 53.9), (-7.2, 52.5), (4.8, 50.5),
    (7.4, 46.8), (9.2, 46.5), (12.0, 47.3), (15.2, 47.5), (20.6, 45.0), (21.0, 42.9), (11.0, 44.9),
    (22.0, 38.8), (23.8, 55.3), (25.0, 61.0), (27.0, 64.5), (26.0, 67.8), (7.0, 61.5),
], np.float64)
assert len(GEOCLUSTER_CENTRES) == constants.NUM_GEOCLUSTERS

# (lon, lat, sd_lon, sd_lat, height_m): the large-scale relief.
MOUNTAIN_RANGES = (
    (10.0, 46.5, 3.2, 0.6, 1500.0),   # Alps
    (0.5, 42.7, 2.0, 0.4, 1600.0),    # Pyrenees
    (-3.5, 40.2, 3.0, 2.0, 650.0),    # Iberian plateau
    (-7.6, 40.3, 0.6, 0.4, 800.0),    # Serra da Estrela
    (3.0, 45.3, 1.0, 0.8, 800.0),     # Massif Central
    (19.8, 42.8, 1.5, 1.0, 1300.0),   # Dinaric Alps / Kosovo
    (24.0, 46.5, 2.5, 1.2, 1000.0),   # Carpathians
    (7.5, 61.5, 1.2, 1.8, 800.0),     # Scandes (south)
    (17.0, 67.5, 2.0, 2.0, 900.0),    # Scandes (north)
    (-7.5, 52.5, 1.5, 1.0, 250.0),    # Irish uplands
    (22.0, 39.5, 1.5, 1.0, 900.0),    # Pindus
)


@dataclasses.dataclass(frozen=True)
class World:
  """Seed-dependent large-scale random relief (a few random bumps and dents)."""
  bump_lon: np.ndarray
  bump_lat: np.ndarray
  bump_sd: np.ndarray
  bump_height: np.ndarray

  @classmethod
  def from_seed(cls, seed: int) -> "World":
    rng = rng_for(seed, WORLD_STREAM)
    n = 40
    return cls(bump_lon=rng.uniform(-10.0, 30.0, n), bump_lat=rng.uniform(36.0, 70.0, n),
               bump_sd=rng.uniform(0.4, 1.5, n), bump_height=rng.normal(0.0, 250.0, n))

  def trend_elevation(self, lon: float, lat: float) -> float:
    height = 60.0
    for m_lon, m_lat, sd_lon, sd_lat, peak in MOUNTAIN_RANGES:
      height += peak * np.exp(-0.5 * (((lon - m_lon) / sd_lon) ** 2 + ((lat - m_lat) / sd_lat) ** 2))
    bumps = self.bump_height * np.exp(
        -0.5 * ((lon - self.bump_lon) ** 2 + (lat - self.bump_lat) ** 2) / self.bump_sd ** 2)
    return float(max(height + bumps.sum(), 5.0))


def geocluster(lon: float, lat: float) -> int:
  """Index of the nearest fixed cluster centre (longitude shrunk by cos(lat) to approximate distance)."""
  dlon = (GEOCLUSTER_CENTRES[:, 0] - lon) * np.cos(np.radians(lat))
  dlat = GEOCLUSTER_CENTRES[:, 1] - lat
  return int(np.argmin(dlon ** 2 + dlat ** 2))


# ---------------------------------------------------------------------------------------------------------
# Climate.
# ---------------------------------------------------------------------------------------------------------
LAPSE_RATE_K_PER_M = 0.0065


def month_temperatures(lon: float, lat: float, elevation: float):
  """Mean temperatures (deg C) of the coldest and the warmest month, a rough fit to European stations."""
  lapse = LAPSE_RATE_K_PER_M * elevation
  coldest = 21.0 - 0.32 * lat - 0.3 * lon - lapse
  warmest = 45.0 - 0.53 * lat + 0.2 * min(max(lon, 0.0), 25.0) - lapse
  return coldest, warmest


def koeppen_code(coldest: float, warmest: float, summer_dry: bool, arid: bool) -> int:
  """Simplified Koeppen-Geiger rules (Peel et al. 2007 thresholds), restricted to the ben-ge code set."""
  if warmest < 10.0:
    return 29  # ET tundra
  if arid:
    return 7  # BSk
  if coldest > 0.0:
    if summer_dry:
      return 8 if warmest >= 22.0 else 9  # Csa / Csb
    if warmest >= 22.0:
      return 14  # Cfa
    return 15 if warmest >= 15.5 else 16  # Cfb / Cfc
  if summer_dry:
    return 18  # Dsb
  if warmest >= 22.0:
    return 25  # Dfa
  return 26 if warmest >= 15.5 else 27  # Dfb / Dfc


# Land-cover propensities per climate code, in constants.LULC_CLASSES order:
# tree shrub grass crop built bare snow water wetland mangrove moss
LULC_PROPENSITY = {
    0: (0.05, 0.01, 0.03, 0.03, 0.02, 0.02, 0.0, 3.0, 0.06, 0.01, 0.0),
    7: (0.05, 0.35, 0.20, 0.35, 0.03, 0.25, 0.0, 0.01, 0.005, 0.0, 0.0),
    8: (0.25, 0.35, 0.12, 0.30, 0.05, 0.08, 0.0, 0.02, 0.01, 0.02, 0.0),
    9: (0.45, 0.25, 0.15, 0.20, 0.04, 0.04, 0.0, 0.02, 0.01, 0.005, 0.0),
    14: (0.20, 0.05, 0.10, 0.60, 0.08, 0.01, 0.0, 0.03, 0.02, 0.01, 0.0),
    15: (0.30, 0.03, 0.40, 0.35, 0.07, 0.01, 0.0, 0.02, 0.02, 0.0, 0.0),
    16: (0.20, 0.10, 0.50, 0.05, 0.02, 0.08, 0.0, 0.05, 0.12, 0.0, 0.05),
    18: (0.40, 0.30, 0.20, 0.10, 0.02, 0.15, 0.01, 0.01, 0.01, 0.0, 0.01),
    25: (0.15, 0.03, 0.12, 0.70, 0.06, 0.01, 0.0, 0.03, 0.03, 0.0, 0.0),
    26: (0.50, 0.03, 0.20, 0.30, 0.04, 0.01, 0.0, 0.05, 0.05, 0.0, 0.0),
    27: (0.65, 0.05, 0.05, 0.04, 0.01, 0.02, 0.0, 0.08, 0.15, 0.0, 0.04),
    29: (0.03, 0.10, 0.30, 0.0, 0.0, 0.35, 0.15, 0.04, 0.02, 0.0, 0.20),
}
assert set(LULC_PROPENSITY) == set(constants.CLIMATE_ZONE_CODES)


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


# How strongly each class seeks high (+) or low (-) ground inside a patch, in constants.LULC_CLASSES order.
TERRAIN_PREFERENCE = np.array([0.0, 0.0, 0.0, -0.3, -0.3, 0.7, 1.5, -1.6, -1.0, 0.0, 0.4])


def lulc_propensity(climate_code: int, elevation: float) -> np.ndarray:
  weights = np.array(LULC_PROPENSITY[climate_code], np.float64)
  high = _sigmoid((elevation - 2300.0) / 200.0)
  weights[SNOW] += 0.6 * high
  weights[BARE] *= 1.0 + 3.0 * _sigmoid((elevation - 1800.0) / 250.0)
  weights[TREE] *= 1.0 - 0.9 * _sigmoid((elevation - 2000.0) / 150.0)
  weights[CROP] *= 1.0 - _sigmoid((elevation - 900.0) / 200.0)
  weights[BUILT] *= 1.0 - 0.8 * _sigmoid((elevation - 1200.0) / 200.0)
  weights[MANGROVE] *= 1.0 - _sigmoid((elevation - 50.0) / 20.0)  # only at the coast
  return weights


# Vegetation vigour (0 = senescent/dry, 1 = fully green) per climate code: (base, seasonal amplitude).
# A positive amplitude greens up in summer; Mediterranean and steppe climates are greenest in winter.
VIGOUR = {
    0: (0.6, 0.2), 7: (0.45, -0.3), 8: (0.7, -0.45), 9: (0.65, -0.3), 14: (0.3, 0.6), 15: (0.65, 0.3),
    16: (0.4, 0.45), 18: (0.35, 0.35), 25: (0.2, 0.75), 26: (0.2, 0.7), 27: (0.1, 0.65), 29: (0.05, 0.5),
}
# Soil brightness factor per climate code: dry climates expose brighter soil, boreal soils are dark.
SOIL_BRIGHTNESS = {
    0: 1.0, 7: 1.35, 8: 1.25, 9: 1.1, 14: 1.0, 15: 0.9, 16: 0.85, 18: 1.1, 25: 0.95, 26: 0.85, 27: 0.7,
    29: 0.9,
}


def vigour(climate_code: int, season: float) -> float:
  base, amplitude = VIGOUR[climate_code]
  return float(np.clip(base + amplitude * season, 0.0, 1.0))


# ---------------------------------------------------------------------------------------------------------
# One patch's metadata (cheap: computed for all patches in the main process).
# ---------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class PatchMeta:
  index: int
  lon: float
  lat: float
  elevation: float  # patch mean, m
  climate_code: int
  water_patch: bool
  s2_time: datetime.datetime
  s1_time: datetime.datetime
  s2_satellite: str  # "S2A" / "S2B"
  s1_satellite: str
  season_s2: float
  season_s1: float
  weather_s2: dict  # temperature [K], wind-u, wind-v [m/s], relhumidity [%]
  weather_s1: dict
  pressure: float  # mbar
  wind_speed_s1: float
  nodata: bool  # the land-cover map gets a no-data (code 0) region


def sample_patch_meta(world: World, seed: int, index: int, nodata_fraction: float = 0.0) -> PatchMeta:
  rng = rng_for(seed, META_STREAM, index)
  region_weights = np.array([r[5] for r in REGIONS])
  region = REGIONS[rng.choice(len(REGIONS), p=region_weights / region_weights.sum())]
  lon = float(np.clip(rng.normal(region[1], region[3]), -10.0, 32.0))
  lat = float(np.clip(rng.normal(region[2], region[4]), 36.0, 70.0))
  water_patch = bool(rng.random() < WATER_PATCH_PROBABILITY)

  hills = rng.exponential(120.0)
  elevation = world.trend_elevation(lon, lat) * float(np.exp(rng.normal(0.0, 0.35))) + hills
  if water_patch:
    elevation = float(rng.uniform(0.0, 30.0))
  elevation = float(min(elevation, 3600.0))

  coldest, warmest = month_temperatures(lon, lat, elevation)
  coldest += rng.normal(0.0, 1.0)
  warmest += rng.normal(0.0, 1.0)
  summer_dry = (lat + 0.08 * max(lon - 10.0, 0.0) + rng.normal(0.0, 0.5)) < 43.0
  aridity = np.exp(-0.5 * (((lon + 3.0) / 1.8) ** 2 + ((lat - 40.5) / 1.1) ** 2)) + rng.normal(0.0, 0.15)
  arid = aridity > 0.55 and elevation < 1100.0
  climate_code = 0 if water_patch else koeppen_code(coldest, warmest, summer_dry, arid)

  day = int(rng.integers(NUM_DAYS))
  s2_date = FIRST_DAY + datetime.timedelta(days=day)
  # Sentinel-2 passes at ~10:30 local solar time; Sentinel-1 at dawn (descending) or dusk (ascending).
  s2_hour = 10.5 - lon / 15.0 + rng.normal(0.0, 0.15)
  s2_time = datetime.datetime.combine(s2_date, datetime.time()) + datetime.timedelta(hours=s2_hour)
  s2_time = s2_time.replace(microsecond=0)
  ascending = bool(rng.random() < 0.5)
  s1_hour = (18.0 if ascending else 6.0) - lon / 15.0 + rng.normal(0.0, 0.1)
  s1_date = s2_date + datetime.timedelta(days=int(rng.integers(-3, 4)))
  s1_time = datetime.datetime.combine(s1_date, datetime.time()) + datetime.timedelta(hours=s1_hour)
  s1_time = s1_time.replace(microsecond=0)
  s2_satellite = "S2B" if (s2_date >= datetime.date(2017, 7, 6) and rng.random() < 0.5) else "S2A"
  s1_satellite = "S1B" if rng.random() < 0.5 else "S1A"
  season_s2 = season_from_date(s2_date)
  season_s1 = season_from_date(s1_date)

  # Weather: temperature lags insolation by about four weeks.
  def temperature(date, diurnal, anomaly):
    lagged_season = float(season_from_day_of_year(date.timetuple().tm_yday - 28))
    return 273.15 + coldest + (warmest - coldest) * lagged_season + diurnal + anomaly

  anomaly = rng.normal(0.0, 2.5)
  mediterranean = 1.0 if climate_code in (7, 8, 9, 18) else 0.0
  wind_u_mean = 2.0 + 2.5 * (1.0 - season_s2) + elevation / 1000.0 + (1.5 if water_patch else 0.0)
  weather_s2 = {
      "temperature": temperature(s2_date, 1.0, anomaly),
      "wind-u": wind_u_mean + rng.normal(0.0, 2.5),
      "wind-v": rng.normal(0.3, 2.5),
      "relhumidity": float(np.clip(
          78.0 + 10.0 * (1.0 - season_s2) - 25.0 * mediterranean * season_s2 + rng.normal(0.0, 8.0),
          15.0, 100.0)),
  }
  weather_s1 = {
      "temperature": temperature(s1_date, 1.0 if ascending else -3.5, 0.6 * anomaly + rng.normal(0.0, 1.5)),
      "wind-u": 0.5 * weather_s2["wind-u"] + 0.5 * wind_u_mean + rng.normal(0.0, 1.8),
      "wind-v": 0.5 * weather_s2["wind-v"] + rng.normal(0.15, 1.8),
      "relhumidity": float(np.clip(weather_s2["relhumidity"] + (0.0 if ascending else 10.0)
                                   + rng.normal(0.0, 5.0), 15.0, 100.0)),
  }
  pressure = 1013.25 * np.exp(-elevation / 8434.0) + rng.normal(0.0, 8.0)
  nodata = bool(rng.random() < nodata_fraction)
  return PatchMeta(
      index=index, lon=lon, lat=lat, elevation=elevation, climate_code=climate_code,
      water_patch=water_patch, s2_time=s2_time, s1_time=s1_time, s2_satellite=s2_satellite,
      s1_satellite=s1_satellite, season_s2=season_s2, season_s1=season_s1, weather_s2=weather_s2,
      weather_s1=weather_s1, pressure=float(pressure),
      wind_speed_s1=float(np.hypot(weather_s1["wind-u"], weather_s1["wind-v"])), nodata=nodata)


# ---------------------------------------------------------------------------------------------------------
# Smooth random fields.
# ---------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _upsampling_matrix(cells: int, size: int = PATCH) -> np.ndarray:
  """[size, cells] weights that spread a coarse grid of cell centres smoothly over the pixel centres.

  Gaussian kernel weights (0.7 cells wide), normalised per pixel. Linear or smoothstep interpolation would
  leave kinks or flat spots at the coarse grid's knots, which hill shading turns into visible stripes.
  """
  positions = (np.arange(size) + 0.5) / size * cells - 0.5
  distance = positions[:, None] - np.arange(cells)[None, :]
  matrix = np.exp(-0.5 * (distance / 0.7) ** 2)
  return matrix / matrix.sum(axis=1, keepdims=True)


def smooth_fields(rng: np.random.Generator, count: int, scales=((4, 0.7), (10, 0.5), (24, 0.3))):
  """`count` smooth random fields [count, PATCH, PATCH] with roughly unit standard deviation.

  Each is a sum of smoothly upsampled white noise on coarse grids (cells, amplitude).
  """
  total = np.zeros((count, PATCH, PATCH))
  norm = 0.0
  for cells, amplitude in scales:
    up = _upsampling_matrix(cells)
    coarse = rng.standard_normal((count, cells, cells))
    total += amplitude * (up @ coarse @ up.T)
    norm += amplitude ** 2
  # The smoothing shrinks the standard deviation to 0.42-0.54 of the coarse noise's (finer grids more).
  return total / (np.sqrt(norm) * 0.46)


# ---------------------------------------------------------------------------------------------------------
# Spectra (reflectance 0..1, bands B01 B02 B03 B04 B05 B06 B07 B08 B8A B09 B11 B12).
# ---------------------------------------------------------------------------------------------------------
_GREEN = {
    TREE: (0.020, 0.025, 0.045, 0.024, 0.070, 0.220, 0.280, 0.300, 0.310, 0.280, 0.150, 0.070),
    SHRUB: (0.035, 0.045, 0.070, 0.060, 0.105, 0.190, 0.225, 0.240, 0.250, 0.230, 0.230, 0.150),
    GRASS: (0.030, 0.040, 0.085, 0.045, 0.115, 0.290, 0.350, 0.370, 0.380, 0.350, 0.230, 0.120),
    CROP: (0.030, 0.040, 0.080, 0.040, 0.110, 0.300, 0.380, 0.400, 0.410, 0.380, 0.240, 0.120),
    WETLAND: (0.030, 0.038, 0.080, 0.046, 0.110, 0.270, 0.330, 0.350, 0.360, 0.330, 0.210, 0.110),
    MANGROVE: (0.021, 0.026, 0.046, 0.025, 0.071, 0.220, 0.278, 0.298, 0.308, 0.278, 0.145, 0.068),
    MOSS: (0.040, 0.050, 0.075, 0.065, 0.110, 0.185, 0.215, 0.230, 0.240, 0.220, 0.225, 0.150),
}
_SENESCENT = {
    TREE: (0.030, 0.035, 0.050, 0.050, 0.080, 0.150, 0.180, 0.200, 0.210, 0.190, 0.180, 0.100),
    SHRUB: (0.060, 0.070, 0.095, 0.115, 0.145, 0.180, 0.200, 0.215, 0.225, 0.205, 0.290, 0.220),
    GRASS: (0.060, 0.070, 0.100, 0.120, 0.150, 0.200, 0.230, 0.250, 0.260, 0.240, 0.330, 0.240),
    CROP: (0.070, 0.085, 0.115, 0.140, 0.165, 0.195, 0.215, 0.230, 0.240, 0.220, 0.330, 0.260),
    WETLAND: (0.050, 0.060, 0.085, 0.095, 0.120, 0.160, 0.185, 0.200, 0.210, 0.190, 0.230, 0.160),
    MANGROVE: (0.031, 0.036, 0.051, 0.051, 0.081, 0.150, 0.180, 0.200, 0.210, 0.190, 0.178, 0.098),
    MOSS: (0.055, 0.065, 0.090, 0.105, 0.135, 0.175, 0.195, 0.210, 0.220, 0.200, 0.260, 0.200),
}
# Needle-leaf forest: darker, with a weaker NIR plateau than broadleaf, and evergreen.
_CONIFER = (0.018, 0.021, 0.036, 0.020, 0.052, 0.140, 0.180, 0.195, 0.205, 0.185, 0.100, 0.045)
# Share of conifers in tree cover per climate code: boreal and mountain forests are mostly needle-leaf.
CONIFER_SHARE = {
    0: 0.3, 7: 0.5, 8: 0.25, 9: 0.4, 14: 0.15, 15: 0.3, 16: 0.5, 18: 0.6, 25: 0.25, 26: 0.6, 27: 0.9,
    29: 0.8,
}
# How much each vegetation class follows the climate's vigour cycle (evergreen forests barely do).
_PHENOLOGY_WEIGHT = {TREE: 0.5, SHRUB: 0.8, GRASS: 1.0, CROP: 1.0, WETLAND: 0.8, MANGROVE: 0.3, MOSS: 0.6}
_FIXED = {
    # Built-up and bare ground are both flat and bright; bare soil rises a little more into the SWIR.
    BUILT: (0.100, 0.110, 0.130, 0.150, 0.170, 0.190, 0.200, 0.215, 0.220, 0.205, 0.270, 0.230),
    BARE: (0.105, 0.115, 0.140, 0.170, 0.190, 0.210, 0.220, 0.235, 0.240, 0.225, 0.320, 0.280),
    SNOW: (0.850, 0.860, 0.840, 0.810, 0.790, 0.770, 0.750, 0.720, 0.700, 0.600, 0.080, 0.060),
    WATER: (0.060, 0.055, 0.045, 0.030, 0.022, 0.015, 0.012, 0.010, 0.009, 0.007, 0.004, 0.003),
}
BARE_SOIL = np.array(_SENESCENT[CROP]) * np.array([1, 1, 1, 1.1, 1.1, 1, 0.95, 0.9, 0.9, 0.9, 1.05, 1.1])


def class_spectra(climate_code: int, season: float, rng: np.random.Generator) -> np.ndarray:
  """[11, 12] reflectance per class for one patch: climate/season vigour plus a small per-patch jitter."""
  v = vigour(climate_code, season)
  spectra = np.zeros((constants.NUM_LULC_CLASSES, len(constants.S2_BANDS)))
  for cls in VEGETATION_CLASSES:
    w = 0.5 + _PHENOLOGY_WEIGHT[cls] * (v - 0.5)
    spectra[cls] = w * np.array(_GREEN[cls]) + (1.0 - w) * np.array(_SENESCENT[cls])
  conifer = float(np.clip(CONIFER_SHARE[climate_code] + rng.normal(0.0, 0.1), 0.0, 1.0))
  spectra[TREE] = conifer * np.array(_CONIFER) + (1.0 - conifer) * spectra[TREE]
  for cls, spectrum in _FIXED.items():
    spectra[cls] = spectrum
  spectra[BARE] *= SOIL_BRIGHTNESS[climate_code]
  # Per-patch jitter: overall brightness per class and a small per-band wobble.
  spectra *= np.exp(rng.normal(0.0, 0.06, (spectra.shape[0], 1)))
  spectra *= np.exp(rng.normal(0.0, 0.025, spectra.shape))
  return spectra


# S1 backscatter means in dB: (VH, VV). Volume scatterers (forest, shrubs) have a high cross-pol ratio,
# smooth surfaces (bare soil) a low one, flooded vegetation a very bright VV from double bounce.
S1_MEAN_DB = np.array([
    (-13.5, -7.5),    # tree cover
    (-16.0, -9.5),    # shrubland
    (-19.0, -11.0),   # grassland
    (-19.5, -11.5),   # cropland (VV rises with crop growth, below)
    (-11.0, -3.5),    # built-up
    (-22.5, -12.0),   # bare / sparse vegetation
    (-24.0, -17.5),   # snow and ice
    (-26.0, -19.5),   # water (wind roughening, below)
    (-17.5, -6.0),    # herbaceous wetland
    (-11.0, -6.0),    # mangroves
    (-20.0, -12.0),   # moss and lichen
], np.float32)
S1_LOOKS = 4.4


# ---------------------------------------------------------------------------------------------------------
# One patch's rasters.
# ---------------------------------------------------------------------------------------------------------
def _block_mean(image: np.ndarray, factor: int) -> np.ndarray:
  h, w = image.shape
  return image.reshape(h // factor, factor, w // factor, factor).mean(axis=(1, 3))


def _crop_parcels(rng: np.random.Generator) -> np.ndarray:
  """[PATCH, PATCH] parcel ids of a random rectangular field layout."""
  def cuts():
    edges = np.cumsum(rng.integers(12, 45, 12))
    return edges[edges < PATCH]
  rows = np.searchsorted(cuts(), np.arange(PATCH), side="right")
  cols = np.searchsorted(cuts(), np.arange(PATCH), side="right")
  return rows[:, None] * 16 + cols[None, :]


def generate_rasters(meta: PatchMeta, seed: int) -> dict:
  """All rasters of one patch at native resolution, plus the land-cover fractions.

  Returns a dict with `s2` {band: uint16 array}, `s1` {band: float32 dB}, `lulc` uint8 codes, `dem` int16,
  and `fractions` float64 [11] (share of the patch's pixels in each class; a no-data region counts for none).
  """
  rng = rng_for(seed, RASTER_STREAM, meta.index)
  code = meta.climate_code

  # Elevation: relief grows with altitude; a tilted plane adds a regional slope.
  relief = 6.0 + 0.08 * min(meta.elevation, 2000.0)
  terrain = smooth_fields(rng, 1, scales=((3, 0.8), (7, 0.5), (16, 0.2)))[0]
  yy, xx = np.mgrid[0:PATCH, 0:PATCH] / PATCH - 0.5
  tilt = rng.normal(0.0, 0.3, 2)
  terrain = terrain + tilt[0] * xx * 3 + tilt[1] * yy * 3
  dem = meta.elevation + relief * terrain
  terrain_z = (terrain - terrain.mean()) / (terrain.std() + 1e-6)

  # Land cover: Dirichlet class mix, then argmax of smoothed class fields with a terrain preference.
  propensity = lulc_propensity(code, meta.elevation)
  present = np.flatnonzero(propensity > 0)
  alpha = 4.0 * propensity[present] / propensity[present].sum()
  mix = np.full(constants.NUM_LULC_CLASSES, 1e-9)
  mix[present] = rng.dirichlet(np.maximum(alpha, 1e-3)) + 1e-9
  if meta.water_patch:
    mix[WATER] = max(mix[WATER], 0.85)
  noise = smooth_fields(rng, len(present))
  fields = (np.log(mix[present])[:, None, None] + 1.2 * noise
            + TERRAIN_PREFERENCE[present][:, None, None] * terrain_z[None])
  lulc = present[np.argmax(fields, axis=0)]

  # Water fills the lowest ground up to one level, so lakes are flat and their shores have no cliffs; the
  # fields only decide how much water there is. Elsewhere the best land class wins.
  water_share = np.mean(lulc == WATER)
  water = np.zeros_like(lulc, dtype=bool)
  if water_share > 0:
    level = np.quantile(terrain, water_share)
    water = terrain <= level
    land = present != WATER
    lulc = np.where(water, WATER, present[land][np.argmax(fields[land], axis=0)])
    dem[water] = meta.elevation + relief * level

  # Sentinel-2: a clean rendering at 10 m, averaged to each band's native pixel size, then sensor noise.
  spectra = class_spectra(code, meta.season_s2, rng).astype(np.float32)
  reflectance = np.take(spectra.T, lulc, axis=1)  # [12, H, W]: band-first keeps each band contiguous
  crop = lulc == CROP
  if crop.any():
    parcels = _crop_parcels(rng)
    v = vigour(code, meta.season_s2)
    stage = np.clip(rng.beta(2.0, 2.0, 16 * 16) * 0.6 + v - 0.3, 0.0, 1.0)[parcels[crop]]
    green, soil = np.array(_GREEN[CROP]), BARE_SOIL * SOIL_BRIGHTNESS[code]
    reflectance[:, crop] = green[:, None] * stage + soil[:, None] * (1.0 - stage)
  # Seasonal snow on open land when the scene is below freezing (forests keep only a little of it).
  snow_probability = np.clip((272.5 - meta.weather_s2["temperature"]) / 6.0, 0.0, 0.9)
  if snow_probability > 0 and not meta.water_patch:
    snow_field = smooth_fields(rng, 1, scales=((5, 1.0), (15, 0.4)))[0]
    covered = (snow_field < np.quantile(snow_field, snow_probability)) & ~water
    covered &= (lulc != TREE) | (snow_field < np.quantile(snow_field, 0.3 * snow_probability))
    reflectance[:, covered] = 0.85 * np.array(_FIXED[SNOW], np.float32)[:, None]
  texture = smooth_fields(rng, 1, scales=((30, 1.0),))[0]
  dzdx = np.gradient(dem, 10.0, axis=1)
  dzdy = np.gradient(dem, 10.0, axis=0)
  # Lambertian hill shading with the sun in the south, 35 degrees up.
  sun = np.radians(35.0)
  shade = (np.sin(sun) - np.cos(sun) * dzdy) / np.sqrt(1.0 + dzdx ** 2 + dzdy ** 2)
  shade = np.clip(shade / np.sin(sun), 0.3, 1.5) * (1.0 + 0.05 * texture)
  reflectance *= shade.astype(np.float32)
  s2 = {}
  for band_index, band in enumerate(constants.S2_BANDS):
    factor = constants.S2_BAND_RESOLUTION_M[band] // 10
    image = reflectance[band_index]
    if factor > 1:
      image = _block_mean(image, factor)
    # 3 % multiplicative and 0.002 additive noise, drawn together.
    sigma = np.sqrt((0.03 * image) ** 2 + 0.002 ** 2)
    image = image + sigma * rng.standard_normal(image.shape, dtype=np.float32)
    s2[band] = np.round(np.clip(image * constants.S2_SCALE, 1.0, 65535.0)).astype(np.uint16)

  # Sentinel-1 in dB, with speckle drawn in linear power.
  mean_db = np.take(S1_MEAN_DB, lulc, axis=0)  # [H, W, 2]
  if crop.any():
    mean_db[crop] += (stage[:, None] - 0.5) * np.array([3.0, 2.0], np.float32)
  if water.any():
    mean_db[water] += min(meta.wind_speed_s1, 12.0) * np.array([0.45, 0.8], np.float32)
  scene_offset = rng.normal(0.0, 0.7)  # incidence angle / calibration of the scene
  slope_brightening = np.clip(10.0 * dzdx, -3.0, 3.0) + scene_offset  # slopes facing the sensor
  mean_db += slope_brightening.astype(np.float32)[..., None]
  mean_db += 0.8 * smooth_fields(rng, 2, scales=((20, 1.0),)).transpose(1, 2, 0).astype(np.float32)
  built = lulc == BUILT
  if built.any():
    mean_db[built] += rng.exponential(1.0, (built.sum(), 2)).astype(np.float32)  # bright corner reflectors
  speckle = rng.standard_gamma(S1_LOOKS, mean_db.shape, dtype=np.float32) / S1_LOOKS
  s1_db = mean_db + 10.0 * np.log10(speckle)
  s1 = {band: np.ascontiguousarray(s1_db[..., i], np.float32) for i, band in enumerate(constants.S1_BANDS)}

  codes = np.asarray(constants.WORLDCOVER_CODES, np.uint8)[lulc]
  counts = np.bincount(lulc.ravel(), minlength=constants.NUM_LULC_CLASSES).astype(np.float64)
  if meta.nodata:
    # A strip along one edge without data, as at the edge of a WorldCover tile.
    width = int(rng.integers(10, 40))
    side = int(rng.integers(4))
    mask = np.zeros((PATCH, PATCH), bool)
    if side == 0:
      mask[:width] = True
    elif side == 1:
      mask[-width:] = True
    elif side == 2:
      mask[:, :width] = True
    else:
      mask[:, -width:] = True
    codes[mask] = 0
    counts = np.bincount(lulc[~mask].ravel(), minlength=constants.NUM_LULC_CLASSES).astype(np.float64)
  fractions = counts / float(PATCH * PATCH)

  dem_int = np.clip(np.round(dem), -500, 9000).astype(np.int16)
  return {"s2": s2, "s1": s1, "lulc": codes, "dem": dem_int, "fractions": fractions}
