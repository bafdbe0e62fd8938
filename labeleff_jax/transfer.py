"""Transfer learning: load named sub-trees of an earlier run's checkpoint into a new model.

`config.init_from` names a run workdir (or its checkpoints/ folder, or one step folder).
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


def maybe_initialize(model: nnx.Module, config: ml_collections.ConfigDict) -> dict | None:
  """Loads `config.init_from` into `model` in place; returns the report (None without init_from)."""
  init_from = config.get("init_from", None)
  transfer = config.get("transfer", ml_collections.ConfigDict())
  mode = transfer.get("mode", "finetune")
  config_checks.check_choice(mode, config_checks.TRANSFER_MODES, "transfer.mode")
  if not init_from:
    if mode == "linear_probe":
      raise TransferError("transfer.mode='linear_probe' needs config.init_from (a pretrained run)")
    return None
  state = nnx.state(model, nnx.Not(nnx.RngState))
  target = nnx.to_pure_dict(state)
  source = load_checkpoint_model_state(init_from)
  new_flat, report = apply_mapping(target, source, _parse_mapping(transfer.get("load", [])),
                                   transfer.get("dont_load", []))
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
