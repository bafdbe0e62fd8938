"""Label-fraction sweep: training from scratch against pretrained encoders + fine-tuning or linear probing.

For every seed S the sweep pretrains one S2/S1 dual encoder on all training images without labels
(`pretrain/seedS`), then trains the same S2 classifier at every label fraction F with each method
(`METHOD/fracF/seedS`):
- `scratch`: random initialisation, every parameter trains;
- `finetune`: the pretrained S2 encoder as initialisation, every parameter trains;
- `linear_probe`: the pretrained S2 encoder frozen (BatchNorm statistics included), only the head trains;
- `published_finetune`, `published_linear_probe`: the same two from published weights (`config.published`:
  a .pth file or catalog:NAME, its architecture and width, and the input scaling it was trained with).
At one fraction all methods see the same labelled subset (nested and class-stratified, with the
fixed `data.label_fraction_seed`), the same batch size and the same number of optimizer steps, so the
comparison isolates the initialisation. Training length is a fixed number of optimizer steps
(`config.steps`) rather than epochs: at 1 % of the labels an epoch is a single batch, and a fixed epoch
budget would starve exactly the runs the sweep is about. The batch size is `config.batch_size`, lowered at
small fractions to the largest multiple of the device count that the labelled subset fills.
"""

import json
import pathlib

import jax
import ml_collections

from labeleff_jax import writers
from labeleff_jax.experiments import runner
from labeleff_jax.experiments import tables

METHODS = ("scratch", "finetune", "linear_probe", "published_finetune", "published_linear_probe")
METHOD_LABELS = {"scratch": "supervised from scratch", "finetune": "contrastive + fine-tune",
                 "linear_probe": "contrastive + linear probe",
                 "published_finetune": "published weights + fine-tune",
                 "published_linear_probe": "published weights + linear probe"}
# The methods that start from this sweep's own contrastive pretraining.
PRETRAINED_METHODS = ("finetune", "linear_probe")
METRIC_LABELS = {"accuracy": "accuracy", "macro_f1": "macro F1", "miou": "mIoU", "micro_f1": "micro F1"}


def fraction_dir(fraction: float) -> str:
  return f"frac{float(fraction):g}"


def _check(config: ml_collections.ConfigDict) -> None:
  unknown = [method for method in config.methods if method not in METHODS]
  if unknown:
    raise ValueError(f"methods: {unknown} unknown; choose from {list(METHODS)}")
  missing = [method for method in config.methods if method not in config.learning_rates]
  if missing:
    raise KeyError(f"learning_rates has no rate for method(s) {missing}")
  for fraction in config.fractions:
    if not 0.0 < float(fraction) <= 1.0:
      raise ValueError(f"fractions: {fraction} is not in (0, 1]")
  if not config.seeds:
    raise ValueError("seeds is empty: the sweep needs at least one seed")
  published = [method for method in config.methods if method.startswith("published_")]
  if published and not config.get("published", {}).get("init_from", ""):
    raise ValueError(f"methods {published} need published weights: give published=catalog:NAME or FILE.pth")
  if config.steps <= 0 or config.pretrain_steps <= 0:
    raise ValueError(f"steps={config.steps} and pretrain_steps={config.pretrain_steps} must be positive")


def _shared(run_config: ml_collections.ConfigDict, config: ml_collections.ConfigDict) -> None:
  """The experiment's data and model keys override every run's (one dataset, one encoder width)."""
  runner.override(run_config, "data", config.data)
  runner.override(run_config, "model", config.model)


def plan(config: ml_collections.ConfigDict, root: str | pathlib.Path) -> list[runner.Run]:
  """Every run of the sweep in execution order: per seed, the pretraining first, then its downstream runs."""
  _check(config)
  root = pathlib.Path(root).resolve()
  runs = []
  for seed in config.seeds:
    pretrain_dir = f"pretrain/seed{seed}"
    if any(method in PRETRAINED_METHODS for method in config.methods):
      pretrain = runner.clone(config.pretrain)
      _shared(pretrain, config)
      pretrain.seed = int(seed)
      pretrain.train.max_steps = config.pretrain_steps
      runs.append(runner.Run(pretrain_dir, pretrain, {"method": "pretrain", "seed": int(seed)}))
    for fraction in config.fractions:
      for method in config.methods:
        run = runner.clone(config.downstream)
        _shared(run, config)
        run.seed = int(seed)
        run.data.label_fraction = float(fraction)
        run.transfer.mode = "linear_probe" if method.endswith("linear_probe") else "finetune"
        if method.startswith("published_"):
          # The published encoder's architecture and width; only the input scaling differs in the data.
          run.init_from = config.published.init_from
          run.model.update(name=config.published.model, width=int(config.published.width))
          for modality, preset in config.published.presets.items():
            run.data.presets[modality] = preset
        else:
          run.init_from = "" if method == "scratch" else str(root / pretrain_dir)
        run.optimizer.learning_rate = float(config.learning_rates[method])
        run.train.max_steps = config.steps
        # Only the final checkpoint: these runs take a minute or two, and tiny labelled sets make an
        # epoch one step long (the engine's default, a checkpoint per epoch, would save every step).
        run.train.checkpoint_every_steps = config.steps
        runs.append(runner.Run(f"{method}/{fraction_dir(fraction)}/seed{seed}", run,
                               {"method": method, "fraction": float(fraction), "seed": int(seed)}))
  return runs


def fitting_batch_size(labelled: int, limit: int, num_devices: int, *, fraction: float) -> int:
  """The largest multiple of `num_devices` that is at most `limit` and at most `labelled` examples."""
  batch_size = min(limit, labelled) // num_devices * num_devices
  if batch_size <= 0:
    raise ValueError(
        f"label fraction {fraction} leaves {labelled} labelled training examples, fewer than the "
        f"{num_devices} devices of the mesh: drop it from `fractions` or train on fewer devices "
        "(mesh.data)")
  return batch_size


class _BatchSizer:
  """Sets each downstream run's batch size from the size of its labelled subset (read once per fraction)."""

  def __init__(self, config: ml_collections.ConfigDict):
    self.limit = int(config.batch_size)
    self.counts: dict[float, int] = {}

  def labelled_count(self, run_config) -> int:
    fraction = float(run_config.data.label_fraction)
    if fraction not in self.counts:
      from labeleff_jax.data import pipeline, splits  # pylint: disable=g-import-not-at-top
      splits.ensure_prepared(run_config)
      train_split = splits.open_split(run_config, "train")
      spec = pipeline.DataSpec.from_config(run_config)
      self.counts[fraction] = len(pipeline.select_indices(spec, train_split, "labelled"))
    return self.counts[fraction]

  def __call__(self, run: runner.Run) -> None:
    if run.keys["method"] == "pretrain":
      return
    requested = run.config.mesh.get("data", -1)
    num_devices = jax.device_count() if requested in (-1, None) else int(requested)
    run.config.train.batch_size = fitting_batch_size(
        self.labelled_count(run.config), self.limit, num_devices, fraction=run.keys["fraction"])


def run(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *, train_fn=None) -> dict:
  """Runs (or reads) the whole sweep and writes results.csv, results.md, runs.jsonl and the plots."""
  root = runner.open_experiment(config, workdir)
  runs = plan(config, root)
  records = runner.execute(runs, root, desc="label-fraction sweep", train_fn=train_fn,
                           before_run=_BatchSizer(config))
  runner.write_records(records, root / "runs.jsonl")
  return write_results(config, records, root)


def write_results(config: ml_collections.ConfigDict, records, root: pathlib.Path) -> dict:
  """Tables (CSV + markdown) and plots of the downstream runs; pretraining k-NN accuracy alongside."""
  downstream = [record for record in records if record["method"] != "pretrain"]
  metrics = list(config.metrics)
  rows = tables.aggregate(downstream, ["fraction", "method"], metrics)
  if writers.is_writer():  # with several processes, process 0 writes the tables and plots
    tables.write_csv(rows, ["fraction", "method"], metrics, root / "results.csv")
  synthetic = bool(config.data.synthetic.get("num_patches", 0))
  data_note = " (synthetic data)" if synthetic else ""
  headers = {**METHOD_LABELS, "fraction": "label fraction"}
  for_display = [{**row, "fraction": f"{row['fraction'] * 100:g} %"} for row in rows]
  sections = [f"# Label-fraction sweep{data_note}\n",
              f"Dataset `{config.data.name}`{data_note}; test split; mean ± std over seeds "
              f"{list(config.seeds)} (in %); {config.steps} optimizer steps per run, batch size up to "
              f"{config.batch_size}; "
              f"{config.pretrain_steps} contrastive pretraining steps per seed"
              + (f"; published weights: `{config.published.init_from}`" if config.get("published", {}).get(
                  "init_from", "") else "") + ".\n",
              f"Command: `{config.get('command', '')}`\n" if config.get("command", "") else ""]
  plots = []
  for metric in metrics:
    task, _, name = metric.rpartition("/")
    title = f"test {task} {METRIC_LABELS.get(name, name)}"
    sections.append(f"## {title}\n\n" + tables.pivot_markdown(for_display, "fraction", "method", metric,
                                                              headers=headers))
    path = root / f"{metric.replace('/', '_')}_vs_fraction.png"
    if writers.is_writer():
      tables.plot_against_fraction(rows, metric, path, labels=METHOD_LABELS, ylabel=f"{title} (%)",
                                   title=f"{config.data.name}{data_note}: {title}, mean ± std over "
                                         f"{len(config.seeds)} seed(s)")
    plots.append(path)
  pretraining = [record for record in records if record["method"] == "pretrain"]
  if pretraining and "probe/knn_accuracy" in pretraining[0]:
    knn = tables.cell([record.get("probe/knn_accuracy") for record in pretraining])
    sections.append("## Pretraining\n\nk-NN accuracy (k=%d, all training labels) of the pretrained "
                    "embeddings on the test split: %s %%.\n" % (
                        config.pretrain.probe.get("k", 20), tables.format_cell(knn)))
  sections.append("## Every run\n\n" + tables.records_markdown(
      downstream, ["method", "fraction", "seed"], metrics, headers=headers))
  markdown = "\n".join(section for section in sections if section)
  writers.write_text(root / "results.md", markdown)
  return {"results_md": str(root / "results.md"), "results_csv": str(root / "results.csv"),
          "plots": [str(path) for path in plots], "rows": rows, "records": records, "markdown": markdown}


def load_records(root: str | pathlib.Path) -> list[dict]:
  """The per-run records a finished sweep wrote (runs.jsonl)."""
  return [json.loads(line) for line in (pathlib.Path(root) / "runs.jsonl").read_text().splitlines()]
