"""torchvision-named ResNet weights onto our models: keys and layouts, input bands by name, transfer's source.

`build_source` gives the source dict that `labeleff_jax.transfer.apply_mapping` loads with the identity
mapping.

Our ResNets (labeleff_jax/models/resnet.py) have torchvision's structure in NHWC; an encoder's flat paths are
'conv1/kernel' (HWIO), 'bn1/{scale,bias,mean,var}', 'blocks/{i}/conv1/kernel', 'blocks/{i}/bn1/...',
'blocks/{i}/downsample/conv/kernel', 'blocks/{i}/downsample/bn/...', with i running over the blocks of all
stages in order. torchvision's 'layer{s}.{j}.*' therefore becomes 'blocks/{offset(s) + j}/*'.
"""

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from labeleff_jax.data import constants
from labeleff_jax.weights import catalog
from labeleff_jax.weights import layouts

# The published weights' band orders (catalog.py): 13 S2 L1C bands; S1 as VV, VH (torchgeo's S1 means,
# -12.59 and -20.26 dB, are VV's and VH's), the order of SSL4EO-S12 and SEN12MS; RGB as B04, B03, B02.
S2_13_BANDS = catalog.S2_BAND_NAMES
S1_WEIGHT_BANDS = catalog.S1_BAND_NAMES
RGB_BANDS = catalog.S2_RGB_BAND_NAMES
_DEFAULT_WEIGHT_BANDS = {13: S2_13_BANDS, 12: constants.S2_BANDS, 2: S1_WEIGHT_BANDS, 3: RGB_BANDS}
_KNOWN_BANDS = frozenset(S2_13_BANDS) | {"VV", "VH", "HH", "HV"}
# Band names of ben-ge's image modalities, in the order a batch holds them.
_DATA_BANDS = {"s2": constants.S2_BANDS, "s1": constants.S1_BANDS}
_DEFAULT_MODALITY = {13: "s2", 12: "s2", 3: "s2", 2: "s1"}

_BN_NAMES = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}
_BLOCK_KEY = re.compile(r"^layer(\d+)\.(\d+)\.(.+)$")
_ARCHITECTURES = {
    ("basic", (2, 2, 2, 2)): "resnet18", ("basic", (3, 4, 6, 3)): "resnet34",
    ("bottleneck", (3, 4, 6, 3)): "resnet50", ("bottleneck", (3, 4, 23, 3)): "resnet101",
    ("bottleneck", (3, 8, 36, 3)): "resnet152",
}


class ConversionError(ValueError):
  """Weights that cannot be put onto the model as asked: other architecture, shapes or bands."""


# ---------------------------------------------------------------------------------------------------------
# torchvision names -> our paths.
# ---------------------------------------------------------------------------------------------------------
def _module_param(name: str, key: str, value) -> tuple[str, np.ndarray] | None:
  """'conv1' / 'bn1' + torch parameter name -> (our relative path, array); None for num_batches_tracked."""
  module, _, param = name.rpartition(".")
  array = np.asarray(value)
  if module.startswith("conv") or module == "downsample.0":
    if param != "weight":
      raise ConversionError(f"{key}: our ResNet convs have only a weight, no {param!r} (as torchvision's)")
    if array.ndim != 4:
      raise ConversionError(f"{key}: a conv weight must be 4-D (OIHW), got shape {array.shape}")
    ours = "downsample/conv" if module == "downsample.0" else module
    return f"{ours}/kernel", np.ascontiguousarray(array.transpose(2, 3, 1, 0))  # OIHW -> HWIO
  if module.startswith("bn") or module == "downsample.1":
    ours = "downsample/bn" if module == "downsample.1" else module
    if param == "num_batches_tracked":  # a counter for momentum=None; BatchNorm here has a fixed momentum
      return None
    if param not in _BN_NAMES or array.ndim != 1:
      raise ConversionError(f"{key}: not a BatchNorm parameter of the expected form (shape {array.shape})")
    return f"{ours}/{_BN_NAMES[param]}", array
  raise ConversionError(f"{key}: not a conv or BatchNorm parameter")  # callers filter these out first


def _is_module_key(rest: str, modules: tuple[str, ...]) -> bool:
  return rest.rpartition(".")[0] in modules


@dataclasses.dataclass(frozen=True)
class ConvertedResNet:
  """A torchvision-named ResNet state dict in our encoder-relative paths, with what was learnt on the way."""
  flat: dict[str, np.ndarray]  # 'conv1/kernel' (HWIO), 'blocks/3/bn2/mean', ...
  architecture: str  # 'resnet18', 'resnet50', ... (or a description of an unnamed one)
  block: str  # 'basic' or 'bottleneck'
  blocks_per_stage: tuple[int, ...]
  width: int  # conv1's output channels (64 for the published models)
  in_channels: int
  skipped: list[str]  # torchvision keys not converted: fc.* and anything unknown
  dropped: list[str]  # num_batches_tracked counters, which our BatchNorm has no use for

  def __repr__(self):
    return (f"ConvertedResNet({self.architecture}, width={self.width}, in_channels={self.in_channels}, "
            f"{len(self.flat)} arrays, skipped={self.skipped})")


def convert_resnet(state: Mapping[str, Any]) -> ConvertedResNet:
  """Converts a torchvision/timm ResNet state dict (keys like 'layer1.0.conv1.weight') to our paths.

  Conv kernels OIHW -> HWIO; BatchNorm weight/bias/running_mean/running_var -> scale/bias/mean/var;
  num_batches_tracked dropped; 'fc.*' and every key that is not part of a torchvision ResNet are returned
  in `skipped`. The architecture (basic blocks or bottlenecks, blocks per stage) and the width (conv1's
  output channels) are read off the keys and shapes.
  """
  if "conv1.weight" not in state:
    raise ConversionError(f"not a torchvision ResNet state dict: no 'conv1.weight' among {list(state)[:5]}")
  stages: dict[int, set[int]] = {}
  for key in state:
    match = _BLOCK_KEY.match(key)
    if match:
      stages.setdefault(int(match[1]), set()).add(int(match[2]))
  if sorted(stages) != list(range(1, len(stages) + 1)) or not stages:
    raise ConversionError(f"ResNet stages must be layer1..layerN, found layer{sorted(stages)}")
  for stage, indices in stages.items():
    if sorted(indices) != list(range(len(indices))):
      raise ConversionError(f"layer{stage} has blocks {sorted(indices)}, expected 0..{len(indices) - 1}")
  blocks_per_stage = tuple(len(stages[s]) for s in sorted(stages))
  bottleneck = any(_BLOCK_KEY.match(key) and key.endswith(".conv3.weight") for key in state)
  block = "bottleneck" if bottleneck else "basic"
  block_modules = ("conv1", "bn1", "conv2", "bn2", "downsample.0", "downsample.1") + (
      ("conv3", "bn3") if bottleneck else ())
  offsets = np.cumsum((0,) + blocks_per_stage)

  flat, skipped, dropped = {}, [], []
  for key, value in state.items():
    match = _BLOCK_KEY.match(key)
    if match and _is_module_key(match[3], block_modules):
      index = offsets[int(match[1]) - 1] + int(match[2])
      converted = _module_param(match[3], key, value)
      prefix = f"blocks/{index}/"
    elif _is_module_key(key, ("conv1", "bn1")):
      converted = _module_param(key, key, value)
      prefix = ""
    else:  # fc.* (a classifier or a projection head) and anything this converter does not know
      skipped.append(key)
      continue
    if converted is None:
      dropped.append(key)
    else:
      flat[prefix + converted[0]] = converted[1]

  kernel = flat["conv1/kernel"]
  architecture = _ARCHITECTURES.get((block, blocks_per_stage), f"resnet({block} blocks {blocks_per_stage})")
  return ConvertedResNet(flat, architecture=architecture, block=block, blocks_per_stage=blocks_per_stage,
                         width=int(kernel.shape[3]), in_channels=int(kernel.shape[2]), skipped=skipped,
                         dropped=dropped)


# ---------------------------------------------------------------------------------------------------------
# Input bands.
# ---------------------------------------------------------------------------------------------------------
def canonical_band(name: str) -> str:
  """'B1', 'b01' -> 'B01'; 'b8a', 'B08A' -> 'B8A'; 'vv' -> 'VV'. Unknown names are a ConversionError."""
  band = str(name).strip().upper()
  match = re.fullmatch(r"B0*(\d{1,2})(A?)", band)
  if match:  # Sentinel-2 writes B8A without the zero that pads B01..B09
    band = f"B{int(match[1])}A" if match[2] else f"B{int(match[1]):02d}"
  if band not in _KNOWN_BANDS:
    raise ConversionError(f"unknown band name {name!r}; known: {', '.join(sorted(_KNOWN_BANDS))} "
                          "('B1' and 'B01' spellings alike)")
  return band


def _canonical_bands(names: Sequence[str], what: str) -> tuple[str, ...]:
  if isinstance(names, str):
    raise ConversionError(f"{what} must be a sequence of band names, got the string {names!r}")
  bands = tuple(canonical_band(name) for name in names)
  if len(set(bands)) != len(bands):
    raise ConversionError(f"{what} name a band twice: {list(names)}")
  return bands


def default_weight_bands(in_channels: int) -> tuple[str, ...]:
  """The bands of a stem with `in_channels` inputs when the weights do not say: 13 -> Sentinel-2 L1C
  (B01..B12 with B10), 12 -> ben-ge's S2 order, 2 -> VV, VH (SSL4EO-S12, SEN12MS), 3 -> RGB (B04, B03,
  B02)."""
  if in_channels not in _DEFAULT_WEIGHT_BANDS:
    raise ConversionError(f"weights with {in_channels} input channels have no default band names; give "
                          f"them (weight_bands), one per input channel")
  return _DEFAULT_WEIGHT_BANDS[in_channels]


def _band_indices(weight_bands, data_bands, in_channels: int) -> tuple[list[int], tuple, tuple]:
  weights = (_canonical_bands(weight_bands, "weight bands") if weight_bands is not None
             else default_weight_bands(in_channels))
  if len(weights) != in_channels:
    raise ConversionError(f"the weights' stem has {in_channels} input channels but {len(weights)} weight "
                          f"bands were named: {list(weights)}")
  data = _canonical_bands(data_bands, "data bands")
  missing = [band for band in data if band not in weights]
  if missing:
    raise ConversionError(f"the weights have no input channel for data band(s) {', '.join(missing)}; their "
                          f"bands are {', '.join(weights)}")
  return [weights.index(band) for band in data], weights, data


def select_input_bands(kernel_hwio: np.ndarray, weight_bands: Sequence[str] | None,
                       data_bands: Sequence[str]) -> np.ndarray:
  """The stem kernel's input channels picked and ordered by band name: [H, W, len(data_bands), O].

  Dropping a weight band is exactly feeding it zeros, as long as the data normalisation maps a missing
  band's 0 to 0 (x / 10000 does; a mean subtraction would not). `weight_bands` None: the default for the
  kernel's input channels (`default_weight_bands`).
  """
  kernel = np.asarray(kernel_hwio)
  if kernel.ndim != 4:
    raise ConversionError(f"select_input_bands needs an HWIO kernel, got shape {kernel.shape}")
  indices, _, _ = _band_indices(weight_bands, data_bands, kernel.shape[2])
  return np.ascontiguousarray(kernel[:, :, indices, :])


def band_changes(weight_bands: Sequence[str] | None, data_bands: Sequence[str],
                 in_channels: int) -> list[str]:
  """What `select_input_bands` does, in words: e.g. ['dropped B10 from 13-band weights'] or
  ['reordered VV,VH -> VH,VV']; [] when the bands are the same in the same order."""
  _, weights, data = _band_indices(weight_bands, data_bands, in_channels)
  changes = []
  dropped = [band for band in weights if band not in data]
  if dropped:
    changes.append(f"dropped {','.join(dropped)} from {len(weights)}-band weights")
  kept = [band for band in weights if band in data]
  if kept != list(data):
    changes.append(f"reordered {','.join(kept)} -> {','.join(data)}")
  return changes


# ---------------------------------------------------------------------------------------------------------
# The source dict for transfer.apply_mapping.
# ---------------------------------------------------------------------------------------------------------
def _flat_paths(tree: Mapping, prefix: str = "") -> dict[str, Any]:
  """Slash-joined paths of a nested dict (nnx pure dicts key list entries by int); flat dicts pass."""
  flat = {}
  for key, value in tree.items():
    path = f"{prefix}/{key}" if prefix else str(key)
    if isinstance(value, Mapping):
      flat.update(_flat_paths(value, path))
    else:
      flat[path] = value
  return flat


def _join(prefix: str, path: str) -> str:
  return f"{prefix}/{path}" if prefix else path


def _under(flat: Mapping[str, Any], prefix: str) -> dict[str, Any]:
  """The arrays of `flat` under `prefix`, keyed by their path relative to it."""
  if not prefix:
    return dict(flat)
  return {path[len(prefix) + 1:]: value for path, value in flat.items() if path.startswith(prefix + "/")}


_MODEL_KINDS = {(False, 8): "resnet18", (False, 16): "resnet34", (True, 16): "resnet50",
                (True, 33): "resnet101", (True, 50): "resnet152"}


def _model_resnet(model: Mapping[str, Any]) -> str:
  """'resnet18 (8 basic blocks, width 8)'-style description of the ResNet with relative paths `model`."""
  blocks = {int(path.split("/")[1]) for path in model if path.startswith("blocks/")}
  bottleneck = any(path.endswith("conv3/kernel") for path in model)
  width = np.shape(model["conv1/kernel"])[-1] if "conv1/kernel" in model else "?"
  kind = _MODEL_KINDS.get((bottleneck, len(blocks)), "network")
  return f"{kind} ({len(blocks)} {'bottleneck' if bottleneck else 'basic'} blocks, width {width})"


def _per_role(value, role: str, modality: str | None, single: bool):
  """A weight_bands / data_bands argument for one role: a plain sequence (single encoder only) or a dict
  keyed by role or modality."""
  if value is None:
    return None
  if isinstance(value, Mapping):
    if role in value:
      return value[role]
    return value.get(modality) if modality else None
  if not single:
    raise ConversionError("a dual checkpoint needs band names per encoder: a dict keyed by 's1' / 's2'")
  return value


def _default_data_bands(modality: str) -> tuple[str, ...] | None:
  """ben-ge's band order for an image modality, or for an early-fusion encoder named like 's2_s1'."""
  parts = modality.split("_")
  if all(part in _DATA_BANDS for part in parts):
    return tuple(band for part in parts for band in _DATA_BANDS[part])
  return None


def _natural(path: str) -> tuple:
  """Sort key: the stem before the blocks, blocks by number ('blocks/2' before 'blocks/10')."""
  parts = path.split("/")
  return (1, int(parts[1]), path) if parts[0] == "blocks" else (0, 0, path)


def _place_encoder(converted: ConvertedResNet, prefix: str, target: Mapping[str, Any], *, weight_bands,
                   data_bands, where: str) -> tuple[dict[str, np.ndarray], list[str]]:
  """Our paths under `prefix` -> arrays, after band selection, checked against the model's arrays there."""
  model = _under(target, prefix)
  flat = dict(converted.flat)
  changes = []
  if data_bands is not None:
    changes = band_changes(weight_bands, data_bands, converted.in_channels)
    flat["conv1/kernel"] = select_input_bands(flat["conv1/kernel"], weight_bands, data_bands)
  elif weight_bands is not None:
    raise ConversionError(f"{where}: weight band names given but no data band names for {prefix!r}")
  extra = sorted(set(flat) - set(model))
  missing = sorted(set(model) - set(flat))
  if extra or missing:
    raise ConversionError(
        f"{where}: the weights are a {converted.architecture} (width {converted.width}, "
        f"{sum(converted.blocks_per_stage)} {converted.block} blocks) but the model at {prefix!r} is a "
        f"{_model_resnet(model)}; weight arrays without a model array: {extra[:4]}, model arrays without "
        f"weights: {missing[:4]}")
  bad = [path for path in sorted(flat, key=_natural) if np.shape(flat[path]) != np.shape(model[path])]
  if bad:
    ours, theirs = np.shape(flat["conv1/kernel"]), np.shape(model["conv1/kernel"])
    hint = (" (conv1/kernel's third dimension is the input bands: see data_bands / weight_bands)"
            if ours[2] != theirs[2] else "")
    raise ConversionError(
        f"{where}: shape mismatch (weights of width {ours[3]}, model of width {theirs[3]}, after band "
        f"selection){hint}:\n  "
        + "\n  ".join(f"{_join(prefix, path)}: weights {np.shape(flat[path])}, model "
                       f"{np.shape(model[path])}" for path in bad[:8])
        + (f"\n  ... and {len(bad) - 8} more" if len(bad) > 8 else ""))
  return {_join(prefix, path): np.asarray(value, np.float32) for path, value in flat.items()}, changes


def _place_projector(projector: Mapping[str, Any], prefix: str, target: Mapping[str, Any]):
  """fc.0 / fc.2 (Linear, ReLU, Linear) -> `prefix`/layers/{0,1}/{kernel,bias}; (arrays, None) or
  ({}, reason it was skipped)."""
  model = _under(target, prefix)
  names = {"0.weight": "layers/0/kernel", "0.bias": "layers/0/bias", "2.weight": "layers/1/kernel",
           "2.bias": "layers/1/bias"}
  if set(projector) != set(names):
    return {}, f"the checkpoint's head has keys {sorted(projector)}, not Linear-ReLU-Linear fc.0 / fc.2"
  if set(model) != set(names.values()):
    return {}, (f"the model has no two-layer projector at {prefix!r}" if not model else
                f"the model's projector at {prefix!r} has arrays {sorted(model)}, not two layers")
  arrays = {}
  for key, path in names.items():
    value = np.asarray(projector[key], np.float32)
    value = value.T if value.ndim == 2 else value  # torch Linear [out, in] -> our Dense [in, out]
    if value.shape != np.shape(model[path]):
      return {}, (f"shape mismatch: fc.{key} {value.shape} vs {_join(prefix, path)} "
                  f"{np.shape(model[path])}")
    arrays[_join(prefix, path)] = value
  return arrays, None


def build_source(state: Mapping[str, Any], target: Mapping[str, Any], *, source: str | None = None,
                 modality: str | None = None, encoder_prefixes: Mapping[str, str] | None = None,
                 weight_bands=None, data_bands=None) -> tuple[dict[str, np.ndarray], dict]:
  """A flat source dict in our naming, for `transfer.apply_mapping(target, source, [("", "")])`.

  `state`: a flat .pth state dict (`read_pth`); `target`: the model's state (nnx pure dict, nested or
  flat with '/'). `source`: the layout (config.transfer.source; None / 'auto' detects). Single-encoder
  weights go onto `encoder_prefixes['encoder']`, else `backbone/encoders/<modality>`, where `modality`
  defaults to 's2' for 13, 12 or 3 input channels and 's1' for 2. Dual weights go onto
  `encoder_prefixes['s1']` / `['s2']` (default `backbone/encoders/s1` / `s2`; an encoder the model lacks is
  skipped), a shared head onto `encoder_prefixes['projector']` (default `projector`) and per-encoder heads
  onto `['projector_s1']` / `['projector_s2']` (default `projectors/s1` / `s2`, the DualEncoder's separate
  projectors), each if the model has a two-layer projector of the same shapes there (else skipped, with
  the reason).

  Bands: `data_bands` (a sequence, or a dict keyed by role or modality) names the model's input channels;
  it defaults to ben-ge's order for 's2' and 's1' (and early-fusion names like 's2_s1'), else the stem is
  taken as it is. `weight_bands` likewise names the checkpoint's input channels (default by channel count,
  see `default_weight_bands`).

  Every array placed is checked against the model (architecture, then shapes, naming the path); a
  mismatch is a ConversionError. Returns (source, info): info holds 'layout', 'architecture', 'width',
  'bands' (e.g. 'dropped B10 from 13-band weights'), 'loaded' (role -> model prefix), 'skipped' (roles or
  checkpoint keys not placed, with reasons), 'dropped' (num_batches_tracked counts), 'ignored' (checkpoint
  keys outside every role) and 'ignored_summary' (the same, grouped). 'architecture' and 'width' are plain
  values for single-encoder layouts and dicts by role for the dual one.
  """
  extracted = layouts.extract(state, source)
  flat_target = _flat_paths(target)
  prefixes = dict(encoder_prefixes or {})
  single = "encoder" in extracted.roles
  result: dict[str, np.ndarray] = {}
  info: dict[str, Any] = {"layout": extracted.layout, "architecture": {}, "width": {}, "bands": [],
                          "loaded": {}, "skipped": [], "dropped": [], "ignored": list(extracted.ignored),
                          "ignored_summary": layouts.summarize_keys(extracted.ignored)}

  encoders = {role: convert_resnet(tv_state) for role, tv_state in extracted.roles.items()
              if not role.startswith("projector")}
  for role, converted in encoders.items():
    if single:
      role_modality = modality or _DEFAULT_MODALITY.get(converted.in_channels)
      if role_modality is None and "encoder" not in prefixes:
        raise ConversionError(f"weights with {converted.in_channels} input channels: say which modality's "
                              "encoder they are for (modality=) or where they go (encoder_prefixes)")
      prefix = prefixes.get("encoder", prefixes.get(role_modality, f"backbone/encoders/{role_modality}"))
    else:
      role_modality = role
      prefix = prefixes.get(role, f"backbone/encoders/{role}")
    keys = f"keys {extracted.prefixes[role]}*" if extracted.prefixes[role] else "top-level keys"
    where = f"{extracted.layout} checkpoint, {role} ({keys})"
    if not _under(flat_target, prefix):
      if single:
        raise ConversionError(f"{where}: the model has no arrays under {prefix!r}; set modality= or "
                              f"encoder_prefixes (model top-level keys: {sorted(target)})")
      info["skipped"].append(f"{role}: the model has no encoder at {prefix!r} "
                             f"({len(extracted.roles[role])} checkpoint keys under "
                             f"{extracted.prefixes[role]})")
      continue
    bands = _per_role(data_bands, role, role_modality, single)
    if bands is None and role_modality:
      bands = _default_data_bands(role_modality)
    arrays, changes = _place_encoder(
        converted, prefix, flat_target, weight_bands=_per_role(weight_bands, role, role_modality, single),
        data_bands=bands, where=where)
    result.update(arrays)
    info["loaded"][role] = prefix
    info["architecture"][role] = converted.architecture
    info["width"][role] = converted.width
    info["bands"].extend(f"{role}: {change}" if not single else change for change in changes)
    info["skipped"].extend(f"{extracted.prefixes[role]}{key}" for key in converted.skipped)
    if converted.dropped:
      info["dropped"].append(f"{role}: {len(converted.dropped)} num_batches_tracked counters")

  for role in extracted.roles:
    if role.startswith("projector"):
      # 'projector' (one shared head) -> our shared `projector`; 'projector_s1' -> `projectors/s1`.
      default = "projector" if role == "projector" else f"projectors/{role.removeprefix('projector_')}"
      prefix = prefixes.get(role, default)
      arrays, reason = _place_projector(extracted.roles[role], prefix, flat_target)
      if reason is None:
        result.update(arrays)
        info["loaded"][role] = prefix
      else:
        info["skipped"].append(f"{role} ({extracted.prefixes[role]}*): {reason}")
  if not result:
    raise ConversionError(f"{extracted.layout} checkpoint: nothing could be placed on the model "
                          f"({'; '.join(info['skipped'])})")
  if single:  # one encoder: plain values rather than one-entry dicts
    info["architecture"] = info["architecture"].get("encoder")
    info["width"] = info["width"].get("encoder")
  return result, info
