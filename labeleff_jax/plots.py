"""Figures of a run: metric curves from `metrics.jsonl`, and example predictions like the reference's.

Matplotlib runs with the Agg backend (no display). Every figure of synthetic data says so in its title.
"""

import collections
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.colors  # noqa: E402  pylint: disable=g-import-not-at-top
import matplotlib.pyplot as plt  # noqa: E402  pylint: disable=g-import-not-at-top
import numpy as np  # noqa: E402  pylint: disable=g-import-not-at-top

from labeleff_jax.data import constants  # noqa: E402  pylint: disable=g-import-not-at-top

WORLDCOVER_CMAP = matplotlib.colors.ListedColormap(np.array(constants.WORLDCOVER_COLORS) / 255.0)


def plot_curves(records: list[dict], out_dir: pathlib.Path, *, title_suffix: str = "") -> list[pathlib.Path]:
  """One PNG per metric: its value against the step, one line per split."""
  series = collections.defaultdict(lambda: collections.defaultdict(list))
  for record in records:
    for key, value in record.items():
      if key in ("step", "split", "epoch", "num_examples") or key.endswith("/count") \
          or not isinstance(value, (int, float)) or isinstance(value, bool):
        continue
      series[key][record["split"]].append((record["step"], value))
  out_dir.mkdir(parents=True, exist_ok=True)
  written = []
  for metric, by_split in sorted(series.items()):
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for split, points in sorted(by_split.items()):
      steps, values = zip(*points)
      ax.plot(steps, values, marker="o" if len(points) < 30 else None, label=split)
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.set_title(metric + title_suffix, fontsize=9)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out_dir / f"curve_{metric.replace('/', '_')}.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    written.append(path)
  return written


def s2_rgb(s2: np.ndarray) -> np.ndarray:
  """Displayable RGB (B04, B03, B02) of a normalised S2 image, with a 2-98 % percentile stretch."""
  rgb = np.asarray(s2, np.float32)[..., list(constants.S2_RGB_INDICES)]
  low, high = np.percentile(rgb, 2), np.percentile(rgb, 98)
  return np.clip((rgb - low) / max(high - low, 1e-6), 0, 1)


def plot_examples(examples: dict, predictions: dict, tasks, path: pathlib.Path, *, max_examples: int = 4,
                  title_suffix: str = "") -> pathlib.Path:
  """Reference-style grid: S2 RGB, then per segmentation task prediction and ground truth maps.

  `examples` holds numpy `inputs` and `labels` of a batch; `predictions` the objective's hard predictions.
  Classification tasks are written into the RGB panel's title (predicted / true class).
  """
  inputs, labels = examples["inputs"], examples["labels"]
  count = min(max_examples, next(iter(inputs.values())).shape[0])
  seg_tasks = [task for task in tasks if task.kind == "segmentation"]
  columns = 1 + 2 * len(seg_tasks)
  fig, axes = plt.subplots(count, columns, figsize=(2.6 * columns, 2.6 * count), squeeze=False)
  for row in range(count):
    ax = axes[row, 0]
    if "s2" in inputs:
      ax.imshow(s2_rgb(inputs["s2"][row]))
    else:
      # Vector-only inputs (season, climate zone, weather) leave this panel without an image.
      first = next((value for value in inputs.values() if value.ndim == 4), None)
      if first is not None:
        ax.imshow(first[row, ..., 0], cmap="gray")
    lines = []
    for task in tasks:
      if task.kind in ("classification", "regression") and task.name in predictions:
        predicted, true = predictions[task.name][row], labels[task.label][row]
        if task.kind == "classification":
          lines.append(f"{task.name}: pred {int(predicted)} / true {int(true)}")
        else:
          lines.append(f"{task.name}: pred {float(predicted):.2f} / true {float(true):.2f}")
    ax.set_title("\n".join(["S2 RGB"] + lines), fontsize=7)
    for index, task in enumerate(seg_tasks):
      truth = np.where(labels[task.label][row] == constants.LULC_IGNORE, np.nan, labels[task.label][row])
      for offset, (name, image) in enumerate((("prediction", predictions[task.name][row]),
                                               ("ground truth", truth))):
        ax = axes[row, 1 + 2 * index + offset]
        ax.imshow(image, cmap=WORLDCOVER_CMAP, vmin=-0.5, vmax=constants.NUM_LULC_CLASSES - 0.5,
                  interpolation="nearest")
        ax.set_title(f"{task.name} {name}", fontsize=8)
  for ax in axes.ravel():
    ax.set_xticks([])
    ax.set_yticks([])
  if seg_tasks:
    handles = [matplotlib.patches.Patch(color=np.array(color) / 255.0, label=name)
               for name, color in zip(constants.LULC_CLASSES, constants.WORLDCOVER_COLORS)]
    fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=7)
  fig.suptitle("Example predictions" + title_suffix, fontsize=9)
  fig.tight_layout(rect=(0, 0.08 if seg_tasks else 0, 1, 0.97))
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=90)
  plt.close(fig)
  return path
