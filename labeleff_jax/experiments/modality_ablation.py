"""Modality ablation: which ben-ge modalities predict land cover, in the rows of the ben-ge paper's table.

Each row is a set of input modalities (S2, S1, Climate, DEM, Weather, Season and combinations), fused
early or late (`config.fusion`). Every row is scored on three land-cover tasks of one patch:
- `lulc_top`: single-label classification of the dominant WorldCover class (accuracy, macro F1);
- `lulc_multihot`: multi-label classification of the classes covering more than
  `data.multilabel_threshold` of the patch (micro F1, and the per-label accuracy the paper reports);
- `lulc`: per-pixel segmentation of the WorldCover map (mIoU, pixel accuracy).
With `task_mode='multitask'` (the default) one U-Net per row carries all three heads, trained on the sum
of their losses: a third of the runs of `task_mode='separate'` (one run per task), at the price of tasks
sharing one representation, so rows compare fairly with each other but not exactly with single-task
numbers. Workdirs: `FUSION/ROW/seedS` (multitask) or `FUSION/ROW/TASK/seedS`.
"""

import pathlib

import ml_collections

from labeleff_jax import writers
from labeleff_jax.experiments import runner
from labeleff_jax.experiments import tables

# The paper's names of the modalities, and what they are in the pipeline.
MODALITY_NAMES = {"S2": "s2", "S1": "s1", "Climate": "climatezone", "DEM": "dem", "Weather": "era5",
                  "Season": "season"}
# Rows of the ben-ge paper's modality table (Mommert et al. 2023), in its order, plus S2+S1+Season.
PAPER_ROWS = ("S2", "S1", "Climate", "DEM", "Weather", "Season", "S2+S1", "S2+Season", "S2+S1+Climate",
              "S2+S1+DEM", "S2+S1+Season")
TASK_MODES = ("multitask", "separate")
METRIC_HEADERS = {
    "lulc_top/accuracy": "top class: accuracy",
    "lulc_top/macro_f1": "top class: macro F1",
    "lulc_multihot/micro_f1": "multi-label: F1",
    "lulc_multihot/hamming_accuracy": "multi-label: accuracy",
    "lulc/miou": "segmentation: mIoU",
    "lulc/pixel_accuracy": "segmentation: pixel acc.",
}


def row_modalities(row: str) -> list[str]:
  """'S2+S1+DEM' -> ['s2', 's1', 'dem'], naming the part that is not a modality."""
  modalities = []
  for part in row.split("+"):
    if part not in MODALITY_NAMES:
      raise ValueError(f"rows: {part!r} (in {row!r}) is not a modality; use {sorted(MODALITY_NAMES)} "
                       "joined by '+', e.g. 'S2+S1+DEM'")
    modalities.append(MODALITY_NAMES[part])
  if len(set(modalities)) != len(modalities):
    raise ValueError(f"rows: {row!r} names a modality twice")
  return modalities


def _check(config: ml_collections.ConfigDict) -> None:
  if config.task_mode not in TASK_MODES:
    raise ValueError(f"task_mode={config.task_mode!r} is unknown; choose one of {TASK_MODES}")
  if config.fusion not in ("early", "late"):
    raise ValueError(f"fusion={config.fusion!r} is unknown; choose 'early' or 'late'")
  if not config.rows:
    raise ValueError("rows is empty: name at least one modality set, e.g. rows=S2:S2+S1")
  if not config.seeds:
    raise ValueError("seeds is empty: the ablation needs at least one seed")
  if config.steps <= 0:
    raise ValueError(f"steps={config.steps} must be positive")


def plan(config: ml_collections.ConfigDict) -> list[runner.Run]:
  """Every run of the ablation, row by row (seeds inside), so finished rows come first."""
  _check(config)
  task_groups = [list(config.base.tasks)] if config.task_mode == "multitask" else [
      [task] for task in config.base.tasks]
  runs = []
  for row in config.rows:
    modalities = row_modalities(row)
    for seed in config.seeds:
      for tasks in task_groups:
        run = runner.clone(config.base)
        runner.override(run, "data", config.data)
        run.seed = int(seed)
        run.data.modalities = modalities
        run.model.fusion = config.fusion
        run.tasks = [runner.clone(task) for task in tasks]
        run.train.max_steps = config.steps
        run.train.checkpoint_every_steps = config.steps
        parts = [config.fusion, row] + ([tasks[0].name] if config.task_mode == "separate" else [])
        runs.append(runner.Run("/".join(parts + [f"seed{seed}"]), run, {"row": row, "seed": int(seed)}))
  return runs


def run(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *, train_fn=None) -> dict:
  """Runs (or reads) the whole ablation and writes results.csv, results.md and runs.jsonl."""
  root = runner.open_experiment(config, workdir)
  records = runner.execute(plan(config), root, desc=f"modality ablation ({config.fusion} fusion)",
                           train_fn=train_fn)
  runner.write_records(records, root / "runs.jsonl")
  return write_results(config, records, root)


def write_results(config: ml_collections.ConfigDict, records, root: pathlib.Path) -> dict:
  metrics = list(config.metrics)
  rows = tables.aggregate(records, ["row"], metrics)
  stem = "results"
  if writers.is_writer():  # with several processes, process 0 writes the tables
    tables.write_csv(rows, ["row"], metrics, root / f"{stem}.csv")
  synthetic = bool(config.data.synthetic.get("num_patches", 0))
  data_note = " (synthetic data)" if synthetic else ""
  headers = {"row": "modalities", **METRIC_HEADERS}
  table = tables.markdown_table(rows, ["row"], metrics, headers=headers)
  steps = f"{config.steps} optimizer steps per run, batch {config.base.train.batch_size}"
  model = (f"one {config.base.model.name} (width {config.base.model.width}) per row with all three heads"
           if config.task_mode == "multitask" else f"one {config.base.model.name} per row and task")
  sections = [f"# Modality ablation, {config.fusion} fusion{data_note}\n",
              f"Dataset `{config.data.name}`{data_note}; test split; mean ± std over seeds "
              f"{list(config.seeds)} (in %); {model}; {steps}; images cropped to "
              f"{config.data.image_size} px.\n",
              f"Command: `{config.get('command', '')}`\n" if config.get("command", "") else "",
              table]
  markdown = "\n".join(section for section in sections if section)
  writers.write_text(root / f"{stem}.md", markdown)
  return {"results_md": str(root / f"{stem}.md"), "results_csv": str(root / f"{stem}.csv"), "rows": rows,
          "records": records, "markdown": markdown}
