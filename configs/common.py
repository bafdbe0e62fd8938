"""Shared pieces of the experiment configs: defaults, big_vision-style arguments, the `tiny` variant.

A config file reads like an experiment description: it starts from `base()`, states what differs, and
ends with `finalize(config, arg)`, which applies `tiny` and `key=value` arguments and locks the config
so that a misspelt override (`--config.trian.batch_size=8`) is an error instead of a silent no-op.
"""

import ml_collections

ConfigDict = ml_collections.ConfigDict


def parse_arg(arg: str | None, **defaults) -> ConfigDict:
  """Parses big_vision's `key=value,flag` argument string; flags become True. Unknown keys fail."""
  parsed = ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    key = key.strip()
    if key not in parsed:
      raise KeyError(f"config argument {key!r} is unknown; this config accepts {sorted(parsed)}")
    if not _:
      parsed[key] = True
    elif isinstance(parsed[key], bool):
      parsed[key] = value.lower() in ("1", "true", "yes")
    elif isinstance(parsed[key], (int, float)) and not isinstance(parsed[key], bool):
      parsed[key] = type(parsed[key])(value)
    else:
      parsed[key] = value
  return parsed


def task(name: str, kind: str, num_classes: int, *, label: str | None = None, weight: float = 1.0,
         head: str = "reference", dropout: float | None = None) -> ConfigDict:
  """One head of a model. `dropout=None` keeps the head's reference default (0.5 classification, 0.1
  regression, none for pooled heads)."""
  return ConfigDict(dict(name=name, kind=kind, label=label or name, num_classes=num_classes,
                         weight=weight, head=head, dropout=dropout))


def base() -> ConfigDict:
  """Defaults shared by every experiment: the reference's supervised recipe on ben-ge-800."""
  config = ConfigDict()
  config.seed = 42
  config.objective = "supervised"
  config.init_from = ""

  config.data = ConfigDict(dict(
      name="ben-ge-800",
      data_dir="./data/tfds",  # prepared TFDS datasets
      manual_dir="./data/manual",  # the downloaded archive or extracted folder
      modalities=["s2"],
      label_fraction=1.0,
      label_fraction_seed=0,
      stratify_by="climatezone",
      normalization="reference",  # or 'standardize' (per-band train-split mean/std)
      image_size=120,
      multilabel_threshold=0.05,
      num_views=1,
      num_workers=0,  # grain workers making training batches (0: made when asked for, in the caller)
      worker_type="process",  # or 'thread': grain threads (one process; the GIL limits them)
      prefetch=2,  # batches read ahead
      augment=ConfigDict(dict(flip=True, rot90=True, brightness=0.0, contrast=0.0, noise_std=0.0,
                              blur_prob=0.0)),
  ))
  config.data.synthetic = ConfigDict(dict(num_patches=0, seed=0))
  # The input scaling published weights were trained with, per modality (labeleff_jax/data/presets.py),
  # e.g. s2='s2_div10000', s1='s1_db_zscore_ssl4eo'; '' keeps data.normalization for that modality.
  config.data.presets = ConfigDict(dict(s2="", s1=""))
  config.model = ConfigDict(dict(
      name="unet", fusion="early", width=64, dropout=0.5, shared_backbone=False,
      mlp_features=(64, 64), task_weighting="fixed", backbone="resnet18",
      projector=(512, 256), shared_projector=True, modality_a="s2", modality_b="s1",
      # 'xla': XLA's own convolutions; 'cpu_fast': labeleff_jax/cpu's; 'auto': cpu_fast on a CPU backend.
      conv_impl="auto",
  ))
  config.tasks = [task("climatezone", "classification", 12)]
  # Reference: SGD lr 1e-4 without momentum, cosine annealing with T_max=300 stepped once per epoch.
  config.optimizer = ConfigDict(dict(
      name="sgd", learning_rate=1e-4, momentum=0.0, weight_decay=0.0, schedule="cosine",
      schedule_unit="epoch", decay_steps=300, warmup_steps=0, alpha=0.0, grad_clip_norm=0.0,
  ))
  config.train = ConfigDict(dict(
      batch_size=32, num_epochs=5, max_steps=0, compute_dtype="float32", log_every_steps=10,
      eval_every_epochs=1, checkpoint_every_steps=0,
  ))
  config.eval = ConfigDict(dict(batch_size=32))
  config.mesh = ConfigDict(dict(data=-1))
  # source: the layout of a .pth init_from ('' detects: torchvision, moco, dino, dual_resnet); modality: the
  # encoder single-encoder weights go to ('' = the catalogue's, else s2 for 12/13/3 bands, s1 for 2);
  # weights_dir: where catalog:NAME files are ('' = $LABELEFF_WEIGHTS_DIR or ~/.cache/labeleff_jax/weights).
  config.transfer = ConfigDict(dict(mode="finetune", load=[], dont_load=[], backbone="backbone",
                                    backbone_lr_scale=1.0, source="", modality="", weights_dir=""))
  # collapse_threshold: an embedding_spread below it at a log step is reported as a collapse (warning, and
  # summary.json's collapsed_at_step); a spread of ~1 means spread out, ~0 all projections on one point.
  config.contrastive = ConfigDict(dict(temperature=0.1, collapse_threshold=0.05))
  config.probe = ConfigDict(dict(label="", k=20))
  return config


def use_synthetic(config: ConfigDict, num_patches: int, *, seed: int = 0) -> None:
  """Points the config at synthetic ben-ge data, kept apart from any real data on the machine."""
  config.data.synthetic.num_patches = num_patches
  config.data.synthetic.seed = seed
  # One prepared folder per synthetic build: the tiny 48-patch and the 800-patch datasets share data.name.
  config.data.data_dir = f"./data/synthetic/tfds-{num_patches}-seed{seed}"
  config.data.manual_dir = f"./data/synthetic/manual-{num_patches}-seed{seed}"


def make_tiny(config: ConfigDict) -> None:
  """Shrinks data, model and schedule so a CPU test runs the whole experiment in seconds."""
  use_synthetic(config, 48)
  config.data.image_size = 32
  config.model.width = 4
  config.model.mlp_features = (8,)
  config.model.projector = (32, 16)
  config.train.batch_size = 8
  config.eval.batch_size = 8
  config.train.num_epochs = 2
  config.train.log_every_steps = 2


def overridable_lists(config: ConfigDict) -> None:
  """Turns every list of plain values into a tuple, the sequence type ml_collections lets the command line
  override: `--config.data.modalities=s2 --config.data.modalities=s1` or `--config.data.modalities="('s2',
  's1')"`. Lists of ConfigDicts (`tasks`) stay lists. Code that assigns a list later gets a tuple back."""
  for key, value in config.items():
    if isinstance(value, ConfigDict):
      overridable_lists(value)
    elif isinstance(value, list) and not any(isinstance(item, (dict, ConfigDict)) for item in value):
      del config[key]  # an assignment would keep the list type
      config[key] = tuple(value)


def finalize(config: ConfigDict, arg: ConfigDict) -> ConfigDict:
  if arg.get("tiny", False):
    make_tiny(config)
  elif arg.get("synthetic", False):
    use_synthetic(config, 800)
  overridable_lists(config)
  config.lock()
  return config
