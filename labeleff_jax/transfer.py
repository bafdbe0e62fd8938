"""Transfer learning: load an earlier run's checkpoint, or published PyTorch weights, into a new model.

`config.init_from` names one of:
- a run workdir (or its checkpoints/ folder, or one step folder): our own orbax checkpoint;
- a PyTorch `.pth` file (torchvision/timm ResNet state dicts, SSL4EO-S12 MoCo or DINO checkpoints, the
  dual S1/S2 ResNet of Scheibenreif et al.), read without torch (labeleff_jax/weights/pth.py), its layout
  detected or forced with `config.transfer.source`, its ResNets renamed onto ours
  (labeleff_jax/weights/convert.py) and its input bands matched to ben-ge's by name (13-band Sentinel-2
  weights lose B10's input kernel, Sentinel-1 weights in VV, VH order are reordered to VH, VV);
- `catalog:NAME`, a published file of labeleff_jax/weights/catalog.py, looked up in
  `config.transfer.weights_dir` (default $LABELEFF_WEIGHTS_DIR or ~/.cache/labeleff_jax/weights) after
  `python -m labeleff_jax.weights.fetch NAME`; the catalogue also says the file's bands and the input
  scaling it was trained with, which is compared with `config.data.presets` (a warning if they differ).
`config.transfer.load` is a list of "SOURCE=TARGET" path prefixes (slash-separated paths in the model's
state); an empty list means "same paths". Every model keeps its trunk at `backbone` and each encoder at
`backbone/encoders/<modality>`, so "backbone=backbone" moves the dual encoder's S2 ResNet-18
(`backbone/encoders/s2`) into an S2 classifier, and "backbone/encoders/s1=backbone/encoders/s1" would
move only the S1 one. Every source array under SOURCE is copied to the same relative path under
TARGET. The restore reports what it loaded, which checkpoint arrays it skipped and which model arrays
stay freshly initialised, and it fails on any shape mismatch or on a mapping that matches nothing.

`config.transfer.mode` picks what trains afterwards:
- `finetune`: everything, optionally the backbone with a lower learning rate (`backbone_lr_scale`).
- `linear_probe`: only the parameters outside `transfer.backbone`; the backbone's BatchNorm layers keep
  their running statistics (they run in inference mode during training too).
The optimizer is always built on the model that was loaded (the reference's defect, an optimizer bound
to another model, cannot happen: `train.py` builds the optimizer after loading, from the same object).
"""

import pathlib
import re
from typing import Any

from absl import logging
import flax.nnx as nnx
from flax import traverse_util
import jax
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from labeleff_jax import checkpoint as checkpoint_lib
from labeleff_jax import config_checks
from labeleff_jax.data import presets as input_presets
from labeleff_jax.weights import catalog
from labeleff_jax.weights import convert
from labeleff_jax.weights import layouts
from labeleff_jax.weights import pth



class TransferError(ValueError):
  """A transfer mapping that cannot be applied as written."""


def _flatten(tree: Any) -> dict[str, Any]:
  """Slash-joined paths of a nested dict of arrays (nnx pure dicts key list entries by int)."""
  return traverse_util.flatten_dict(_str_keys(tree), sep="/")


def _str_keys(tree):
  if not isinstance(tree, dict):
    return tree
  return {str(k): _str_keys(v) for k, v in tree.items()}


def _under(path: str, prefix: str) -> bool:
  return not prefix or path == prefix or path.startswith(prefix + "/")


def _parse_mapping(entries) -> list[tuple[str, str]]:
  mapping = []
  for entry in entries or ["="]:
    if "=" not in entry:
      raise TransferError(f"transfer.load entry {entry!r} must read 'SOURCE=TARGET' (path prefixes)")
    source, target = (part.strip().strip("/") for part in entry.split("=", 1))
    mapping.append((source, target))
  return mapping


def load_checkpoint_model_state(path) -> dict:
  """The model part (pure dict of numpy arrays) of the latest checkpoint under `path`."""
  directory, step = checkpoint_lib.find_checkpoint(path)
  # A fresh manager: the run's own manager must not see (or clean up) a foreign directory.
  manager = ocp.CheckpointManager(directory, item_names=("state",),
                                  item_handlers={"state": ocp.StandardCheckpointHandler()},
                                  options=ocp.CheckpointManagerOptions(read_only=True))
  # Every array whole on this process's first device: the saving run's devices (their number, their
  # processes) need not exist here, and every process of a multi-process run reads its own copy.
  local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=local),
                          manager.item_metadata(step)["state"])
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
  manager.close()
  state = jax.tree.map(np.asarray, restored["state"])
  if "model" not in state:
    raise TransferError(f"init_from: checkpoint {directory}/{step} holds no 'model' state")
  return state["model"]


def apply_mapping(target: dict, source: dict, mapping, dont_load=()) -> tuple[dict, dict]:
  """Copies source arrays into a flat copy of `target` by prefix mapping; returns (new flat, report)."""
  flat_target, flat_source = _flatten(target), _flatten(source)
  skip = [re.compile(pattern) for pattern in dont_load]
  new, loaded, mismatched = dict(flat_target), {}, []
  for source_prefix, target_prefix in mapping:
    matched = 0
    for source_path, value in flat_source.items():
      if not _under(source_path, source_prefix) or any(p.search(source_path) for p in skip):
        continue
      relative = source_path[len(source_prefix):].lstrip("/")
      target_path = "/".join(part for part in (target_prefix, relative) if part)
      if target_path not in flat_target:
        continue
      if np.shape(flat_target[target_path]) != np.shape(value):
        mismatched.append(f"{source_path} {np.shape(value)} -> {target_path} "
                          f"{np.shape(flat_target[target_path])}")
        continue
      new[target_path] = np.asarray(value, dtype=np.asarray(flat_target[target_path]).dtype)
      loaded[target_path] = source_path
      matched += 1
    if matched == 0 and not mismatched:
      sources = [path for path in flat_source if _under(path, source_prefix)]
      targets = [path for path in flat_target if _under(path, target_prefix)]
      if sources and targets:  # both sides have arrays there, with other names: other architectures
        raise TransferError(
            f"transfer.load '{source_prefix}={target_prefix}' matched no array: the checkpoint and the model "
            f"are different architectures under these prefixes (e.g. a U-Net checkpoint and a ResNet "
            f"model). Checkpoint arrays: {sources[:3]} ...; model arrays: {targets[:3]} ... Use a checkpoint "
            "of the same model.name, or map sub-trees that exist in both.")
      raise TransferError(f"transfer.load '{source_prefix}={target_prefix}' matched no array; "
                          f"{'no checkpoint' if not sources else 'no model'} array lies under that prefix "
                          f"(checkpoint top-level keys: {sorted(source)}, model top-level keys: "
                          f"{sorted(target)})")
  if mismatched:
    raise TransferError("transfer: shape mismatch for\n  " + "\n  ".join(mismatched))
  used_sources = set(loaded.values())
  report = {
      "loaded": sorted(loaded),
      "skipped": sorted(path for path in flat_source if path not in used_sources),
      "fresh": sorted(path for path in flat_target if path not in loaded),
  }
  return new, report


def _int_keys(tree):
  """nnx pure dicts key list entries by int; flattened paths turned them into strings."""
  if not isinstance(tree, dict):
    return tree
  return {(int(k) if isinstance(k, str) and k.isdigit() else k): _int_keys(v) for k, v in tree.items()}


PTH_SUFFIXES = (".pth", ".pt", ".pth.tar", ".ckpt")


def _is_pth(init_from: str) -> bool:
  return str(init_from).endswith(PTH_SUFFIXES) or pathlib.Path(init_from).is_file()


def _data_preset(config, modality: str) -> str:
  """config.data.presets' scaling of `modality` ('' when the modality keeps data.normalization)."""
  return dict(config.data.get("presets", {})).get(modality, "") if "data" in config else ""


def _normalization_note(entry, config) -> str:
  """How the data's scaling of the weights' modality compares with the one the weights were trained with."""
  used = _data_preset(config, entry.modality)
  if used == entry.normalization:
    return f"data.presets.{entry.modality}={used!r}: the scaling the weights were trained with"
  wanted = catalog.NORMALIZATIONS[entry.normalization]
  usable = bool(input_presets.for_weights(entry))
  now = (f"data.presets.{entry.modality}={used!r}" if used else
         f"data.normalization={config.data.get('normalization', 'reference')!r}")
  return (f"{entry.name} was trained on inputs scaled as {entry.normalization!r} ({wanted.description}) "
          f"but this run scales {entry.modality} by {now}"
          + (f": set --config.data.presets.{entry.modality}={entry.normalization}" if usable else
             ": ben-ge cannot be scaled that way, so expect the features to shift"))


def _pth_source(init_from: str, config, target: dict) -> tuple[dict, dict]:
  """The flat source dict (our paths) of a .pth file or catalogue entry, and what was done to make it."""
  transfer = config.get("transfer", ml_collections.ConfigDict())
  entry = None
  path = init_from
  if init_from.startswith(catalog.CATALOG_PREFIX):
    entry = catalog.get(init_from)
    path = catalog.resolve(init_from, transfer.get("weights_dir", "") or None)
  state = pth.read_pth(path)
  modality = transfer.get("modality", "") or (entry.modality if entry else None)
  source_layout = transfer.get("source", "") or (entry.layout if entry else None)
  weight_bands = entry.bands if entry else None
  if entry is not None and entry.layout == "dual_resnet":
    weight_bands = {entry.modality: entry.bands}
  try:
    source, info = convert.build_source(state, target, source=source_layout, modality=modality,
                                        weight_bands=weight_bands)
  except (convert.ConversionError, layouts.LayoutError) as error:
    raise TransferError(
        f"init_from {init_from}: {error}\nThe model is config.model.name={config.model.get('name')!r} at "
        f"config.model.width={config.model.get('width')}: published ResNets have width 64; set "
        "--config.model.name=resnet50 for ResNet-50 weights (resnet18 for ResNet-18), and "
        "--config.transfer.source to force a layout.") from error
  if entry is not None and entry.subtree:
    # A catalogue entry names one encoder of a two-encoder file: only that one is loaded.
    keep = info["loaded"].get(entry.modality)
    source = {key: value for key, value in source.items() if keep and key.startswith(keep + "/")}
    info["loaded"] = {entry.modality: keep} if keep else {}
  # The ignored keys can be thousands (a MoCo momentum encoder): the report keeps their grouped summary.
  info.pop("ignored", None)
  info = {"file": str(path), **info}
  s2_preset = _data_preset(config, "s2")
  if any("dropped B10" in line for line in info["bands"]) and s2_preset and not (
      input_presets.maps_zero_to_zero(s2_preset)):
    info["bands"].append(f"B10's input kernel dropped: under data.presets.s2={s2_preset!r} this equals a B10 "
                         "at the preset's mean, not a zero B10")
  if entry is not None:
    info["catalog"] = entry.name
    info["normalization"] = _normalization_note(entry, config)
    if _data_preset(config, entry.modality) != entry.normalization:
      logging.warning("transfer: %s", info["normalization"])
  else:
    info["normalization"] = ("unknown for a file outside the catalogue: scale the inputs the way the "
                             "weights were trained (data.presets)")
  return source, info


def load_pretrained(model: nnx.Module, config: ml_collections.ConfigDict) -> dict | None:
  """Loads `config.init_from` (a run, a .pth file or catalog:NAME) into `model` in place.

  Returns the report: 'loaded' (model paths filled), 'skipped' (checkpoint arrays not used), 'fresh'
  (model paths left as initialised) and, for published weights, 'source' (file, layout, architecture,
  band handling, normalisation); None without init_from. A shape mismatch, or a checkpoint that fills
  nothing, is a TransferError.
  """
  init_from = config.get("init_from", None)
  transfer = config.get("transfer", ml_collections.ConfigDict())
  mode = transfer.get("mode", "finetune")
  config_checks.check_choice(mode, config_checks.TRANSFER_MODES, "transfer.mode")
  if not init_from:
    if mode == "linear_probe":
      raise TransferError("transfer.mode='linear_probe' needs config.init_from (a pretrained run)")
    return None
  init_from = str(init_from)
  state = nnx.state(model, nnx.Not(nnx.RngState))
  target = nnx.to_pure_dict(state)
  origin = None
  if init_from.startswith(catalog.CATALOG_PREFIX) or _is_pth(init_from):
    source, origin = _pth_source(init_from, config, target)
    source = traverse_util.unflatten_dict(source, sep="/")
  else:
    source = load_checkpoint_model_state(init_from)
  new_flat, report = apply_mapping(target, source, _parse_mapping(transfer.get("load", [])),
                                   transfer.get("dont_load", []))
  if origin is not None:
    report["source"] = origin
    report["skipped"] = sorted(set(report["skipped"]) | set(origin.get("skipped", [])))
  nnx.replace_by_pure_dict(state, _int_keys(traverse_util.unflatten_dict(new_flat, sep="/")))
  nnx.update(model, state)
  logging.info("transfer from %s: loaded %d arrays, skipped %d, fresh %d", init_from,
               len(report["loaded"]), len(report["skipped"]), len(report["fresh"]))
  for path in report["fresh"]:
    logging.info("  fresh: %s", path)
  return report


def _backbone_path(config) -> str:
  return config.get("transfer", ml_collections.ConfigDict()).get("backbone", "backbone")


def _path_of(key_path) -> str:
  parts = []
  for entry in key_path:
    part = getattr(entry, "key", getattr(entry, "name", getattr(entry, "idx", entry)))
    parts.append(str(part))
  return "/".join(parts)


def trainable_filter(config: ml_collections.ConfigDict):
  """The nnx filter of parameters the optimizer updates (all, or all but the frozen backbone)."""
  mode = config.get("transfer", ml_collections.ConfigDict()).get("mode", "finetune")
  if mode != "linear_probe":
    return nnx.Param
  backbone = _backbone_path(config)
  return nnx.All(nnx.Param, lambda path, _: not _under("/".join(map(str, path)), backbone))


def freeze_for_probe(model: nnx.Module, config: ml_collections.ConfigDict) -> None:
  """Linear probing: the backbone runs in inference mode (running BatchNorm statistics) in training too."""
  mode = config.get("transfer", ml_collections.ConfigDict()).get("mode", "finetune")
  if mode != "linear_probe":
    return
  node = model
  for part in _backbone_path(config).split("/"):
    if not hasattr(node, part):
      raise TransferError(f"transfer.backbone={_backbone_path(config)!r}: model has no attribute {part!r}")
    node = getattr(node, part)
  node.eval()


def scale_backbone_updates(tx: optax.GradientTransformation, config) -> optax.GradientTransformation:
  """Fine-tuning with a lower learning rate for the backbone: its updates scaled by backbone_lr_scale."""
  scale = config.get("transfer", ml_collections.ConfigDict()).get("backbone_lr_scale", 1.0)
  if scale == 1.0:
    return tx
  backbone = _backbone_path(config)

  def labels(params):
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "backbone" if _under(_path_of(path), backbone) else "rest", params)

  return optax.chain(tx, optax.multi_transform(
      {"backbone": optax.scale(scale), "rest": optax.identity()}, labels))
