"""Whole-split metrics: jit-able per-batch sufficient statistics and host-side accumulators over them.

The device computes small statistics per batch (a confusion matrix, per-label counts, error sums); the
host adds them up in int64/float64 over the whole split and derives the metrics once at the end. Metrics
are therefore never averages of per-batch metrics, and uneven or padded final batches count exactly.

Convention for classes that never occur: a class absent from both the labels and the predictions of the
whole split has no defined precision, recall, F1 or IoU. Its per-class entries are NaN and the macro
averages (macro F1, mIoU) skip it, i.e. they average over classes present in the labels or predictions,
like scikit-learn's default `labels=None` and torchmetrics' macro Jaccard index. Mean class accuracy
averages recall over classes present in the labels, like `sklearn.metrics.balanced_accuracy_score`.
Multi-label macro F1 follows the same rule per label. A split with nothing counted gives NaN metrics.
"""

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from labeleff_jax import losses
from labeleff_jax import sharding

# ---------------------------------------------------------------------------------------------------------
# Per-batch statistics (jit-able; sharding-safe).
# ---------------------------------------------------------------------------------------------------------


def _is_checkable(x: jax.Array) -> bool:
  """True for a concrete array whose values this process can read (not a tracer, not multi-host)."""
  return not isinstance(x, jax.core.Tracer) and getattr(x, "is_fully_addressable", True)


def _histogram_shard(flat_index, weight, length, axis_name):
  counts = jnp.zeros((length,), jnp.int32).at[flat_index.reshape(-1)].add(weight.reshape(-1))
  if axis_name is not None:
    counts = jax.lax.psum(counts, axis_name)
  return counts


def confusion_matrix(labels: jax.Array, preds: jax.Array, num_classes: int, mask: Any = None, *,
                     mesh: Any = None, axis_name: str = sharding.DATA_AXIS) -> jax.Array:
  """int32 [C, C] counts of (true class, predicted class) pairs: rows are true classes.

  labels, preds: integer arrays of the same shape, [B] (classification) or [B, H, W] (segmentation).
  Excluded: elements where `mask` (shape a prefix of labels.shape, e.g. the batch's `valid` [B]) is
  False, and labels outside 0..C-1 (constants.LULC_IGNORE = 255 marks no-data pixels). Predictions must
  lie in 0..C-1: outside jit an out-of-range prediction is an error; under jit it cannot be checked and
  is not counted. Works under jit with the batch sharded over a mesh (see sharding.batch_mesh): each device
  counts its shard and the counts are summed over the mesh axis.
  """
  if not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
    raise ValueError(f"num_classes must be a positive int, got {num_classes!r}.")
  labels = jnp.asarray(labels)
  preds = jnp.asarray(preds)
  if labels.shape != preds.shape:
    raise ValueError(f"labels and preds must have the same shape, got {labels.shape} and {preds.shape}.")
  for name, array in (("labels", labels), ("preds", preds)):
    if not jnp.issubdtype(array.dtype, jnp.integer):
      raise TypeError(f"{name} must be integer class indices, got dtype {array.dtype}.")
  if _is_checkable(preds) and preds.size and (int(jnp.min(preds)) < 0 or int(jnp.max(preds)) >= num_classes):
    raise ValueError(f"preds must lie in 0..{num_classes - 1}, got values in "
                     f"{int(jnp.min(preds))}..{int(jnp.max(preds))}.")
  labels = labels.astype(jnp.int32)
  preds = preds.astype(jnp.int32)
  valid = losses.valid_mask(mask, labels.shape)
  valid &= (labels >= 0) & (labels < num_classes) & (preds >= 0) & (preds < num_classes)
  # Invalid elements get cell 0 with weight 0, so the scatter never sees an out-of-range index.
  flat_index = jnp.where(valid, labels * num_classes + preds, 0)
  weight = valid.astype(jnp.int32)
  if labels.ndim == 0:
    flat_index, weight = flat_index[None], weight[None]
  shard_mesh = sharding.batch_mesh(flat_index, mesh, axis_name)
  counts = sharding.map_over_batch_shards(
      lambda index, w, name: _histogram_shard(index, w, num_classes * num_classes, name),
      shard_mesh, axis_name, (flat_index, weight))
  return counts.reshape(num_classes, num_classes)


def _binary(x: jax.Array) -> jax.Array:
  x = jnp.asarray(x)
  return x if x.dtype == jnp.bool_ else x >= 0.5


def multilabel_counts(targets: jax.Array, preds: jax.Array, mask: Any = None) -> dict:
  """Per-label TP/FP/FN/TN [L] and exact-match and example counts of one batch (int32).

  targets, preds: [B, L], boolean or numeric (numeric values count as positive when >= 0.5; pass
  `logits > 0` for predictions from logits). `mask` [B] drops padding rows.
  """
  targets = _binary(targets)
  preds = _binary(preds)
  if targets.ndim != 2 or targets.shape != preds.shape:
    raise ValueError(f"targets and preds must both have shape [B, L], got {targets.shape} and {preds.shape}.")
  valid = losses.valid_mask(mask, targets.shape[:1])
  valid_2d = valid[:, None]

  def count(condition):
    return jnp.sum(condition & valid_2d, axis=0, dtype=jnp.int32)

  return {
      "true_positives": count(targets & preds),
      "false_positives": count(~targets & preds),
      "false_negatives": count(targets & ~preds),
      "true_negatives": count(~targets & ~preds),
      "exact_matches": jnp.sum(jnp.all(targets == preds, axis=1) & valid, dtype=jnp.int32),
      "count": jnp.sum(valid, dtype=jnp.int32),
  }


def regression_sums(preds: jax.Array, targets: jax.Array, mask: Any = None) -> dict:
  """Sums of absolute and squared errors over valid elements, and their number (float32, int32)."""
  abs_error_sum, count = losses.mae_sum_and_count(preds, targets, mask)
  squared_error_sum, _ = losses.mse_sum_and_count(preds, targets, mask)
  return {"abs_error_sum": abs_error_sum, "squared_error_sum": squared_error_sum, "count": count}


# ---------------------------------------------------------------------------------------------------------
# Metrics from accumulated statistics (host, numpy).
# ---------------------------------------------------------------------------------------------------------


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
  """Elementwise numerator / denominator as float64, NaN where the denominator is 0 (undefined)."""
  numerator = np.asarray(numerator, np.float64)
  denominator = np.asarray(denominator, np.float64)
  with np.errstate(divide="ignore", invalid="ignore"):
    return np.where(denominator > 0, numerator / np.where(denominator > 0, denominator, 1.0), np.nan)


def _mean_where(values: np.ndarray, include: np.ndarray) -> float:
  return float(np.mean(values[include])) if np.any(include) else float("nan")


def scores_from_confusion(confusion: Any) -> dict:
  """Classification / segmentation metrics of a [C, C] confusion matrix (rows = true class).

  Returns floats `accuracy` (= `pixel_accuracy` = `micro_f1` for single-label predictions),
  `macro_f1`, `miou`, `mean_class_accuracy`, the lists `iou_per_class`, `f1_per_class`,
  `recall_per_class` (NaN for undefined classes), and `count` (elements counted). See the module
  docstring for how absent classes are treated.
  """
  confusion = np.asarray(confusion)
  if confusion.ndim != 2 or confusion.shape[0] != confusion.shape[1]:
    raise ValueError(f"confusion must be a square [C, C] matrix, got shape {confusion.shape}.")
  if np.any(confusion < 0):
    raise ValueError("confusion matrix has negative counts.")
  confusion = confusion.astype(np.int64)
  true_positives = np.diag(confusion)
  support = confusion.sum(axis=1)  # how often each class is the label
  predicted = confusion.sum(axis=0)  # how often each class is predicted
  total = int(confusion.sum())
  present = (support + predicted) > 0

  accuracy = float(_ratio(true_positives.sum(), total))
  f1_per_class = _ratio(2 * true_positives, support + predicted)
  iou_per_class = _ratio(true_positives, support + predicted - true_positives)
  recall_per_class = _ratio(true_positives, support)
  return {
      "accuracy": accuracy,
      "pixel_accuracy": accuracy,
      # Every counted element has exactly one label and one prediction, so micro-averaged precision,
      # recall and F1 all equal the accuracy.
      "micro_f1": accuracy,
      "macro_f1": _mean_where(f1_per_class, present),
      "miou": _mean_where(iou_per_class, present),
      "mean_class_accuracy": _mean_where(recall_per_class, support > 0),
      "iou_per_class": iou_per_class.tolist(),
      "f1_per_class": f1_per_class.tolist(),
      "recall_per_class": recall_per_class.tolist(),
      "count": total,
  }


def scores_from_multilabel_counts(counts: Mapping[str, Any]) -> dict:
  """Multi-label metrics of accumulated multilabel_counts.

  `micro_f1` pools TP/FP/FN over all labels; `macro_f1` averages per-label F1 over labels that occur in
  the targets or predictions; `exact_match_accuracy` is the fraction of examples with every label right
  (scikit-learn's accuracy_score on multi-label data); `hamming_accuracy` the fraction of right
  (example, label) decisions (1 - hamming loss).
  """
  tp, fp, fn, tn = (np.asarray(counts[key], np.int64) for key in
                    ("true_positives", "false_positives", "false_negatives", "true_negatives"))
  f1_per_label = _ratio(2 * tp, 2 * tp + fp + fn)
  present = (tp + fp + fn) > 0
  return {
      "micro_f1": float(_ratio(2 * tp.sum(), 2 * tp.sum() + fp.sum() + fn.sum())),
      "macro_f1": _mean_where(f1_per_label, present),
      "exact_match_accuracy": float(_ratio(counts["exact_matches"], counts["count"])),
      "hamming_accuracy": float(_ratio(tp.sum() + tn.sum(), tp.sum() + fp.sum() + fn.sum() + tn.sum())),
      "f1_per_label": f1_per_label.tolist(),
      "count": int(counts["count"]),
  }


# ---------------------------------------------------------------------------------------------------------
# Host-side accumulators: update(stats) once per batch, result() once per split.
# ---------------------------------------------------------------------------------------------------------


class ClassificationAccumulator:
  """Sums confusion matrices (from confusion_matrix) in int64; result() = scores_from_confusion."""

  def __init__(self, num_classes: int):
    self.num_classes = num_classes
    self.reset()

  def reset(self) -> None:
    self.confusion = np.zeros((self.num_classes, self.num_classes), np.int64)

  def update(self, confusion: Any) -> None:
    confusion = np.asarray(confusion)
    if confusion.shape != self.confusion.shape:
      raise ValueError(f"expected a {self.confusion.shape} confusion matrix, got shape {confusion.shape}.")
    self.confusion += confusion.astype(np.int64)

  def result(self) -> dict:
    return scores_from_confusion(self.confusion)


class MultilabelAccumulator:
  """Sums multilabel_counts in int64; result() = scores_from_multilabel_counts."""

  _PER_LABEL = ("true_positives", "false_positives", "false_negatives", "true_negatives")

  def __init__(self, num_labels: int):
    self.num_labels = num_labels
    self.reset()

  def reset(self) -> None:
    self.counts = {key: np.zeros(self.num_labels, np.int64) for key in self._PER_LABEL}
    self.counts["exact_matches"] = np.int64(0)
    self.counts["count"] = np.int64(0)

  def update(self, counts: Mapping[str, Any]) -> None:
    for key in self.counts:
      value = np.asarray(counts[key]).astype(np.int64)
      if value.shape != np.shape(self.counts[key]):
        raise ValueError(f"{key}: expected shape {np.shape(self.counts[key])}, got {value.shape}.")
      self.counts[key] = self.counts[key] + value

  def result(self) -> dict:
    return scores_from_multilabel_counts(self.counts)


class RegressionAccumulator:
  """Sums regression_sums in float64; result() gives `mae`, `mse`, `rmse` and `count`."""

  def __init__(self):
    self.reset()

  def reset(self) -> None:
    self.abs_error_sum = 0.0
    self.squared_error_sum = 0.0
    self.count = 0

  def update(self, sums: Mapping[str, Any]) -> None:
    self.abs_error_sum += float(np.asarray(sums["abs_error_sum"], np.float64))
    self.squared_error_sum += float(np.asarray(sums["squared_error_sum"], np.float64))
    self.count += int(sums["count"])

  def result(self) -> dict:
    mse_value = float(_ratio(self.squared_error_sum, self.count))
    return {"mae": float(_ratio(self.abs_error_sum, self.count)), "mse": mse_value,
            "rmse": float(np.sqrt(mse_value)), "count": self.count}


class MeanAccumulator:
  """Count-weighted means of per-batch sums: update({"NAME_sum": s, ..., "count": n}) -> {"NAME": mean}.

  Each batch contributes its sums and one shared count (e.g. valid examples), so the result is the mean
  over the whole split, however uneven the batches.
  """

  def __init__(self):
    self.reset()

  def reset(self) -> None:
    self.sums: dict[str, float] = {}
    self.count = 0.0

  def update(self, stats: Mapping[str, Any]) -> None:
    if "count" not in stats:
      raise KeyError(f"stats need a 'count' entry, got keys {sorted(stats)}.")
    names = [key for key in stats if key != "count"]
    if not names or any(not key.endswith("_sum") for key in names):
      raise ValueError(f"every entry besides 'count' must be a NAME_sum, got keys {sorted(stats)}.")
    if self.sums and set(names) != set(self.sums):
      raise ValueError(f"keys changed between batches: {sorted(self.sums)} then {sorted(names)}.")
    for key in names:
      self.sums[key] = self.sums.get(key, 0.0) + float(np.asarray(stats[key], np.float64))
    self.count += float(np.asarray(stats["count"], np.float64))

  def result(self) -> dict:
    return {key[:-len("_sum")]: float(_ratio(total, self.count)) for key, total in self.sums.items()}


__all__ = [
    "ClassificationAccumulator", "MeanAccumulator", "MultilabelAccumulator", "RegressionAccumulator",
    "confusion_matrix", "multilabel_counts", "regression_sums", "scores_from_confusion",
    "scores_from_multilabel_counts",
]
