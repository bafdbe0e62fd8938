"""Checks of an experiment config that run before any data is read or anything is compiled.

Every error names the config key at fault and says what to change. Unknown keys are caught earlier:
configs are locked ConfigDicts, so `--config.foo.bar=...` with a misspelt key fails in the flag parser.
"""

import ml_collections

from labeleff_jax import scratch_prefault
from labeleff_jax.data import constants

# Labels the pipeline can produce: kind of task each supports and its number of classes.
LABELS = {
    "climatezone": ("classification", constants.NUM_CLIMATE_ZONES),
    "lulc_top": ("classification", constants.NUM_LULC_CLASSES),
    "geocluster": ("classification", constants.NUM_GEOCLUSTERS),
    "lulc_multihot": ("multilabel", constants.NUM_LULC_CLASSES),
    "lulc": ("segmentation", constants.NUM_LULC_CLASSES),
    "season": ("regression", 1),
}
# A label that is also an input modality leaks the answer into the model.
LEAKS = {"climatezone": "climatezone", "lulc_top": "lulc", "lulc_multihot": "lulc", "lulc": "lulc",
         "season": "season"}


class ConfigError(ValueError):
  """An experiment config that cannot run as written."""


def probe_label(config: ml_collections.ConfigDict) -> str | None:
  """The label of the k-NN representation probe (pretraining runs), or None."""
  probe = config.get("probe", None)
  return (probe.get("label", None) or None) if probe is not None else None


def required_labels(config: ml_collections.ConfigDict) -> list[str]:
  """Label names the input pipeline must produce for this config."""
  labels = [task.label for task in config.get("tasks", [])] if config.get("objective") != "contrastive" \
      else []
  if probe_label(config):
    labels.append(probe_label(config))
  return sorted(set(labels))


def check(config: ml_collections.ConfigDict, *, num_data_devices: int) -> None:
  """Raises ConfigError on the first inconsistency found."""
  modalities = list(config.data.modalities)
  if not modalities:
    raise ConfigError("data.modalities is empty: name at least one of " + ", ".join(constants.MODALITIES))
  for modality in modalities:
    if modality not in constants.MODALITIES:
      raise ConfigError(f"data.modalities: {modality!r} is not a ben-ge modality; choose from "
                        f"{sorted(constants.MODALITIES)}")
  if len(set(modalities)) != len(modalities):
    raise ConfigError(f"data.modalities lists a modality twice: {modalities}")
  if config.data.name not in constants.DATASET_CONFIGS:
    raise ConfigError(f"data.name={config.data.name!r} is unknown; choose one of {constants.DATASET_CONFIGS}")
  fraction = config.data.get("label_fraction", 1.0)
  if not 0.0 < fraction <= 1.0:
    raise ConfigError(f"data.label_fraction={fraction} must be in (0, 1]")
  image_size = config.data.get("image_size", constants.PATCH_SIZE)
  if not 8 <= image_size <= constants.PATCH_SIZE:
    raise ConfigError(f"data.image_size={image_size} must be between 8 and {constants.PATCH_SIZE}")

  for key in ("train", "eval"):
    section = config.get(key, None)
    if section is None or "batch_size" not in section:
      continue
    batch_size = section.batch_size
    if batch_size <= 0 or batch_size % num_data_devices:
      raise ConfigError(
          f"{key}.batch_size={batch_size} is not a positive multiple of the {num_data_devices} devices on "
          f"the mesh's data axis; use e.g. {key}.batch_size={max(1, batch_size // num_data_devices or 1) * num_data_devices}")
  if config.train.num_epochs <= 0 and not config.train.get("max_steps", None):
    raise ConfigError("train.num_epochs must be positive (or set train.max_steps)")
  dtype = config.train.get("compute_dtype", "float32")
  if dtype not in ("float32", "bfloat16"):
    raise ConfigError(f"train.compute_dtype={dtype!r}; choose 'float32' or 'bfloat16'")
  prefault = config.train.get("prefault_scratch", "off")
  if prefault not in scratch_prefault.MODES:
    raise ConfigError(f"train.prefault_scratch={prefault!r}; choose one of {scratch_prefault.MODES}")

  label = probe_label(config)
  if label is not None and (label not in LABELS or LABELS[label][0] != "classification"):
    raise ConfigError(f"probe.label={label!r} must be a classification label: "
                      f"{sorted(k for k, v in LABELS.items() if v[0] == 'classification')}")
  objective = config.get("objective", "supervised")
  if objective == "supervised":
    _check_tasks(config, modalities)
  elif objective == "contrastive":
    views = config.data.get("num_views", 1)
    if config.model.name == "dual_encoder":
      for key in ("modality_a", "modality_b"):
        modality = config.model.get(key, None)
        if modality not in modalities:
          raise ConfigError(f"model.{key}={modality!r} must be one of data.modalities={modalities}")
    elif views != 2:
      raise ConfigError(f"model.name={config.model.name!r} learns from two augmented views: set "
                        "data.num_views=2")
  else:
    raise ConfigError(f"objective={objective!r} is unknown; choose 'supervised' or 'contrastive'")


def _check_tasks(config, modalities):
  tasks = list(config.get("tasks", []))
  if not tasks:
    raise ConfigError("config.tasks is empty: a supervised run needs at least one task")
  names = [task.name for task in tasks]
  if len(set(names)) != len(names):
    raise ConfigError(f"config.tasks: task names must be unique, got {names}")
  for task in tasks:
    where = f"tasks[{task.name}]"
    if task.label not in LABELS:
      raise ConfigError(f"{where}.label={task.label!r} is not a label of the dataset; choose from "
                        f"{sorted(LABELS)}")
    kind, num_classes = LABELS[task.label]
    if task.kind != kind:
      raise ConfigError(f"{where}: label {task.label!r} needs kind={kind!r}, not {task.kind!r}")
    if task.get("num_classes", num_classes) != num_classes:
      raise ConfigError(f"{where}.num_classes={task.num_classes} but label {task.label!r} has "
                        f"{num_classes}")
    leak = LEAKS.get(task.label)
    if leak in modalities:
      raise ConfigError(f"{where}: label {task.label!r} is also the input modality {leak!r} "
                        "(data.modalities), which leaks the answer; remove one of them")
    if task.kind == "segmentation" and config.model.name != "unet":
      raise ConfigError(f"{where}: segmentation needs a dense backbone; set model.name='unet' "
                        f"(got {config.model.name!r})")
