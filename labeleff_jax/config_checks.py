"""Every check of an experiment config, run before any data is read or anything is compiled.

The one place that validates: `check(config)` runs all of it for a training run, and the library's entry
points run the part they read (`check_data` for the input pipeline, `check_model` for `create_model`,
`check_optimizer` for the optimizer). Every error names the config key at fault and says what to change.
Unknown keys are caught earlier: configs are locked ConfigDicts, so `--config.foo.bar=...` with a misspelt
key fails in the flag parser.
"""

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from labeleff_jax.data import constants


class ConfigError(ValueError):
  """An experiment config that cannot run as written."""


def get(section: Any, key: str, default: Any = None) -> Any:
  """section.get(key) with `default` for a missing section, a missing key or None."""
  if section is None:
    return default
  value = section.get(key, default)
  return default if value is None else value


# ---------------------------------------------------------------------------------------------------------
# Single values.
# ---------------------------------------------------------------------------------------------------------
def check_choice(value: Any, allowed: Sequence, key: str) -> Any:
  """Returns `value` if it is one of `allowed`, else raises naming the key."""
  if value not in allowed:
    raise ConfigError(f"{key}={value!r} is unknown; allowed values: {sorted(allowed)}")
  return value


def check_int(value: Any, key: str, *, minimum: int | None = None) -> int:
  """Returns `value` as an int (bools refused), at least `minimum` when given."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise ConfigError(f"{key} must be an integer, got {value!r}")
  if minimum is not None and value < minimum:
    raise ConfigError(f"{key}={value} must be >= {minimum}")
  return int(value)


def check_modalities(names: Any, key: str = "data.modalities") -> tuple[str, ...]:
  """The modality names as a tuple, checked against constants.MODALITIES."""
  if isinstance(names, str):
    raise ConfigError(f"{key} must be a list of modality names, got the string {names!r}")
  names = tuple(names)
  if not names:
    raise ConfigError(f"{key} is empty: name at least one of {sorted(constants.MODALITIES)}")
  for name in names:
    if name not in constants.MODALITIES:
      raise ConfigError(f"{key}: {name!r} is not a ben-ge modality; choose from "
                        f"{sorted(constants.MODALITIES)}")
  if len(set(names)) != len(names):
    raise ConfigError(f"{key} lists a modality twice: {list(names)}")
  return names


def check_labels(names: Any, key: str = "labels") -> tuple[str, ...]:
  """The label names as a tuple, checked against constants.LABELS."""
  if isinstance(names, str):
    raise ConfigError(f"{key} must be a list of label names, got the string {names!r}")
  names = tuple(names)
  for name in names:
    if name not in constants.LABELS:
      raise ConfigError(f"{key}: {name!r} is not a label of the dataset; choose from "
                        f"{sorted(constants.LABELS)}")
  return names


# ---------------------------------------------------------------------------------------------------------
# Sections.
# ---------------------------------------------------------------------------------------------------------
NORMALIZATIONS = ("reference", "standardize")
WORKER_TYPES = ("process", "thread")
AUGMENT_KEYS = ("flip", "rot90", "brightness", "contrast", "noise_std", "blur_prob")
CONV_IMPLS = ("auto", "xla", "cpu_fast")
FUSIONS = ("early", "late")
TASK_WEIGHTINGS = ("fixed", "uncertainty")
OBJECTIVES = ("supervised", "contrastive")
TRANSFER_MODES = ("finetune", "linear_probe")
OPTIMIZERS = ("sgd", "adam", "adamw", "lars")
SCHEDULES = ("constant", "cosine", "warmup_cosine")


def check_data(config) -> None:
  """`config.data`, the seed and the batch sizes: everything the input pipeline reads (pipeline.DataSpec)."""
  data = config.data
  check_modalities(data.get("modalities", ()))
  name = data.get("name", None)
  if name is not None:
    check_choice(name, constants.DATASET_CONFIGS, "data.name")
  fraction = get(data, "label_fraction", 1.0)
  if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction <= 1.0:
    raise ConfigError(f"data.label_fraction={fraction!r} must be a number in (0, 1]")
  check_int(get(data, "label_fraction_seed", 0), "data.label_fraction_seed")
  # Stratification reads one integer class per example, so only the classification labels qualify.
  check_choice(get(data, "stratify_by", "climatezone"),
               [key for key, label in constants.LABELS.items() if label.kind == "classification"],
               "data.stratify_by")
  check_int(config.get("seed", 0), "seed")
  image_size = get(data, "image_size", None)
  if image_size is not None:
    check_int(image_size, "data.image_size", minimum=1)
    if image_size > constants.PATCH_SIZE:
      raise ConfigError(f"data.image_size={image_size} is larger than the stored {constants.PATCH_SIZE} px")
  check_choice(get(data, "normalization", "reference"), NORMALIZATIONS, "data.normalization")
  check_int(get(data, "normalization_max_examples", 1000), "data.normalization_max_examples", minimum=1)
  from labeleff_jax.data import presets  # pylint: disable=g-import-not-at-top
  try:
    presets.check(dict(get(data, "presets", {})))
  except ValueError as error:
    raise ConfigError(str(error)) from None
  check_choice(get(data, "num_views", 1), (1, 2), "data.num_views")
  threshold = get(data, "multilabel_threshold", 0.05)
  if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= threshold < 1.0:
    raise ConfigError(f"data.multilabel_threshold={threshold!r} must be a number in [0, 1)")
  augment = dict(get(data, "augment", {}))
  unknown = sorted(set(augment) - set(AUGMENT_KEYS))
  if unknown:
    raise ConfigError(f"data.augment: unknown option(s) {unknown}; known: {list(AUGMENT_KEYS)}")
  for key in ("flip", "rot90"):
    if not isinstance(augment.get(key, True), bool):
      raise ConfigError(f"data.augment.{key} must be True or False, got {augment[key]!r}")
  for key in ("brightness", "contrast", "noise_std", "blur_prob"):
    value = augment.get(key, 0.0)
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
        or value < 0):
      raise ConfigError(f"data.augment.{key} must be a finite number >= 0, got {value!r}")
  for key in ("contrast", "blur_prob"):  # contrast factors stay positive; a probability
    if augment.get(key, 0.0) > 1:
      raise ConfigError(f"data.augment.{key}={augment[key]} must be <= 1")
  check_int(get(data, "num_workers", 0), "data.num_workers", minimum=0)
  check_choice(get(data, "worker_type", "process"), WORKER_TYPES, "data.worker_type")
  check_int(get(data, "prefetch", 2), "data.prefetch", minimum=0)
  check_int(config.train.batch_size, "train.batch_size", minimum=1)
  eval_batch = get(config.get("eval", None), "batch_size", None)
  if eval_batch is not None:
    check_int(eval_batch, "eval.batch_size", minimum=1)


def check_task_heads(tasks: Sequence) -> None:
  """What a model needs of `config.tasks`: unique names, known kinds, class counts."""
  if not tasks:
    raise ConfigError("config.tasks is empty: a supervised run needs at least one task")
  names = [task.get("name", None) for task in tasks]
  if len(set(names)) != len(names):
    raise ConfigError(f"config.tasks: task names must be unique, got {names}")
  for index, task in enumerate(tasks):
    where = f"config.tasks[{index}]"
    for key in ("name", "kind"):
      if task.get(key, None) is None:
        raise ConfigError(f"{where}.{key} is missing")
    check_choice(task["kind"], constants.TASK_KINDS, f"{where}.kind")
    num_classes = task.get("num_classes", None)
    if task["kind"] != "regression" and (num_classes is None or num_classes < 1):
      raise ConfigError(f"{where}.num_classes must be a positive int for a {task['kind']} task "
                        f"(task {task['name']!r}), got {num_classes!r}")


def check_task_labels(tasks: Sequence, *, modalities: Sequence[str], model_name: str) -> None:
  """What training needs of `config.tasks`: labels the dataset has, of the task's kind and class count,
  not also fed as an input, and a dense backbone for segmentation."""
  for index, task in enumerate(tasks):
    where = f"config.tasks[{index}]"
    label = constants.LABELS.get(task.label)
    if label is None:
      raise ConfigError(f"{where}.label={task.label!r} is not a label of the dataset; choose from "
                        f"{sorted(constants.LABELS)}")
    if task.kind != label.kind:
      raise ConfigError(f"{where}: label {task.label!r} needs kind={label.kind!r}, not {task.kind!r}")
    if get(task, "num_classes", label.num_classes) != label.num_classes:
      raise ConfigError(f"{where}.num_classes={task.num_classes} but label {task.label!r} has "
                        f"{label.num_classes}")
    if label.leaks_from in modalities:
      raise ConfigError(f"{where}: label {task.label!r} is also the input modality {label.leaks_from!r} "
                        "(data.modalities), which leaks the answer; remove one of them")
    if task.kind == "segmentation" and model_name != "unet":
      raise ConfigError(f"{where}: segmentation needs a dense backbone; set model.name='unet' "
                        f"(got {model_name!r})")


def check_model(config) -> None:
  """What `models.create_model` reads: config.model, the modalities, the tasks and the compute dtype."""
  model = config.get("model", None)
  name = get(model, "name", None)
  if name is None:
    raise ConfigError("config.model.name is missing")
  check_choice(get(config.get("train", None), "compute_dtype", "float32"), constants.COMPUTE_DTYPES,
               "config.train.compute_dtype")
  check_choice(get(model, "conv_impl", "auto"), CONV_IMPLS, "config.model.conv_impl")
  check_int(get(model, "width", 64), "config.model.width", minimum=1)
  for key in ("mlp_features", "projector"):
    sizes = tuple(get(model, key, (1,)))
    if not sizes or min(sizes) < 1:
      raise ConfigError(f"config.model.{key} must be a non-empty list of positive sizes, got {sizes}")
  data = config.get("data", None)
  if name == "dual_encoder":
    pair = (get(model, "modality_a", "s2"), get(model, "modality_b", "s1"))
    check_modalities(pair[:1], "config.model.modality_a")
    check_modalities(pair[1:], "config.model.modality_b")
    if pair[0] == pair[1]:
      raise ConfigError(f"config.model.modality_a and modality_b must differ, both are {pair[0]!r} (for two "
                        "views of one modality use config.model.name='simclr')")
    return
  modalities = check_modalities(get(model, "modalities", None) or get(data, "modalities", ()),
                                "config.data.modalities")
  if name == "simclr":
    if not any(m in constants.IMAGE_MODALITIES for m in modalities):
      raise ConfigError(f"SimCLR needs an image modality in config.data.modalities, got {list(modalities)}")
    return
  fusion = check_choice(get(model, "fusion", "early"), FUSIONS, "config.model.fusion")
  check_choice(get(model, "task_weighting", "fixed"), TASK_WEIGHTINGS, "config.model.task_weighting")
  if get(model, "shared_backbone", False):
    images = {m: constants.MODALITIES[m] for m in modalities if m in constants.IMAGE_MODALITIES}
    if fusion != "late":
      raise ConfigError("config.model.shared_backbone applies to late fusion only "
                        "(config.model.fusion='late')")
    if len(images) < 2 or len(set(images.values())) != 1:
      raise ConfigError("config.model.shared_backbone needs at least two image modalities with equal channel "
                        f"counts, got {images}; set shared_backbone=False to give each its own backbone")
  check_task_heads(list(config.get("tasks", [])))


def check_optimizer(config) -> None:
  """`config.optimizer`, as optim.make_optimizer reads it."""
  opt = config.optimizer
  check_choice(opt.name, OPTIMIZERS, "optimizer.name")
  check_choice(get(opt, "schedule", "constant"), SCHEDULES, "optimizer.schedule")
  check_choice(get(opt, "schedule_unit", "step"), ("step", "epoch"), "optimizer.schedule_unit")


def probe_label(config) -> str | None:
  """The label of the k-NN representation probe (pretraining runs), or None."""
  return get(config.get("probe", None), "label", None) or None


def required_labels(config) -> list[str]:
  """Label names the input pipeline must produce for this config."""
  supervised = get(config, "objective", "supervised") == "supervised"
  labels = [task.label for task in config.get("tasks", [])] if supervised else []
  if probe_label(config):
    labels.append(probe_label(config))
  return sorted(set(labels))


def check_transfer(config) -> None:
  """transfer.* and a catalog:NAME init_from (the weights files themselves are checked when read)."""
  from labeleff_jax.weights import catalog, layouts  # pylint: disable=g-import-not-at-top
  transfer = config.get("transfer", None)
  check_choice(get(transfer, "mode", "finetune"), TRANSFER_MODES, "transfer.mode")
  check_choice(get(transfer, "source", ""), layouts.AUTO + layouts.LAYOUTS, "transfer.source")
  check_choice(get(transfer, "modality", ""), ("", *catalog.MODALITIES), "transfer.modality")
  init_from = str(config.get("init_from", "") or "")
  if init_from.startswith(catalog.CATALOG_PREFIX):
    try:
      catalog.get(init_from)
    except KeyError as error:
      raise ConfigError(f"init_from: {error.args[0]}") from None


def check(config, *, num_data_devices: int) -> None:
  """The whole config of a training run; raises ConfigError on the first inconsistency found."""
  check_data(config)
  check_choice(config.data.get("name", None), constants.DATASET_CONFIGS, "data.name")
  for key in ("train", "eval"):
    batch_size = get(config.get(key, None), "batch_size", None)
    if batch_size is not None and batch_size % num_data_devices:
      suggestion = max(1, batch_size // num_data_devices) * num_data_devices
      raise ConfigError(f"{key}.batch_size={batch_size} is not a positive multiple of the {num_data_devices} "
                        f"devices on the mesh's data axis; use e.g. {key}.batch_size={suggestion}")
  if config.train.num_epochs <= 0 and not config.train.get("max_steps", None):
    raise ConfigError("train.num_epochs must be positive (or set train.max_steps)")
  check_model(config)
  check_optimizer(config)
  check_transfer(config)
  label = probe_label(config)
  if label is not None and getattr(constants.LABELS.get(label), "kind", None) != "classification":
    raise ConfigError(f"probe.label={label!r} must be a classification label: "
                      f"{sorted(k for k, v in constants.LABELS.items() if v.kind == 'classification')}")
  objective = check_choice(get(config, "objective", "supervised"), OBJECTIVES, "objective")
  modalities = list(config.data.modalities)
  if objective == "supervised":
    check_task_labels(list(config.tasks), modalities=modalities, model_name=config.model.name)
  elif config.model.name == "dual_encoder":
    for key in ("modality_a", "modality_b"):
      if config.model.get(key, None) not in modalities:
        raise ConfigError(f"model.{key}={config.model.get(key, None)!r} must be one of "
                          f"data.modalities={modalities}")
  elif get(config.data, "num_views", 1) != 2:
    raise ConfigError(f"model.name={config.model.name!r} learns from two augmented views: set "
                      "data.num_views=2")
