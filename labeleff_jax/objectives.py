"""Training objectives: what a batch's loss is and which whole-split metrics an evaluation accumulates.

An objective owns the loss of every head of a model and the sufficient statistics (confusion matrices,
sums) from which metrics are computed over a whole split, so the engine never averages per-batch metrics.
`SupervisedObjective` covers every task kind of `config.tasks`; `ContrastiveObjective` the NT-Xent
pretraining of the dual encoder and of SimCLR. Both are picked by `config.objective` (default: supervised).
"""

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from labeleff_jax import losses
from labeleff_jax import metrics
from labeleff_jax.data import constants

TASK_KINDS = ("classification", "multilabel", "segmentation", "regression")


def _valid_mask(batch, target):
  """Broadcasts the per-example `valid` flag to the shape of `target` (pixels for segmentation)."""
  valid = batch["valid"]
  return valid.reshape(valid.shape + (1,) * (target.ndim - valid.ndim))


class SupervisedObjective:
  """Weighted sum of per-task losses; whole-split metrics per task."""

  def __init__(self, config: ml_collections.ConfigDict):
    self.tasks = list(config.tasks)
    if not self.tasks:
      raise ValueError("config.tasks is empty: a supervised run needs at least one task")
    for task in self.tasks:
      if task.kind not in TASK_KINDS:
        raise ValueError(f"tasks[{task.name}].kind={task.kind!r} is unknown; choose one of {TASK_KINDS}")

  # -- training -------------------------------------------------------------------------------------------
  def task_loss(self, task, output, batch):
    """Mean loss of one task over the valid elements of the global batch, in float32."""
    target = batch["labels"][task.label]
    if task.kind == "classification":
      return losses.softmax_cross_entropy(output, target, mask=batch["valid"])
    if task.kind == "segmentation":
      mask = _valid_mask(batch, target) & (target != constants.LULC_IGNORE)
      return losses.softmax_cross_entropy(output, target, mask=mask)
    if task.kind == "multilabel":
      return losses.sigmoid_binary_cross_entropy(output, target, mask=_valid_mask(batch, target))
    prediction = output.reshape(target.shape)
    return losses.mse(prediction, target, mask=batch["valid"])

  def loss(self, model, outputs, batch):
    """Returns (total loss, {task name: loss}) for a training or evaluation batch."""
    task_losses = {task.name: self.task_loss(task, outputs[task.name], batch) for task in self.tasks}
    if hasattr(model, "combine_losses"):
      total = model.combine_losses(task_losses)
    else:
      total = sum(task.get("weight", 1.0) * task_losses[task.name] for task in self.tasks)
    return total, {f"loss_{name}": value for name, value in task_losses.items()}

  # -- evaluation -----------------------------------------------------------------------------------------
  def eval_stats(self, outputs, batch) -> dict:
    """Per-batch sufficient statistics (jit-able) for whole-split metrics of every task."""
    stats = {}
    for task in self.tasks:
      output, target = outputs[task.name], batch["labels"][task.label]
      if task.kind in ("classification", "segmentation"):
        mask = _valid_mask(batch, target)
        stats[task.name] = metrics.confusion_matrix(
            target, jnp.argmax(output, axis=-1), task.num_classes, mask=mask)
      elif task.kind == "multilabel":
        stats[task.name] = metrics.multilabel_counts(target > 0.5, output > 0, mask=batch["valid"])
      else:
        stats[task.name] = metrics.regression_sums(output.reshape(target.shape), target, mask=batch["valid"])
    return stats

  def new_accumulators(self) -> dict:
    accumulators = {}
    for task in self.tasks:
      if task.kind in ("classification", "segmentation"):
        accumulators[task.name] = metrics.ClassificationAccumulator(task.num_classes)
      elif task.kind == "multilabel":
        accumulators[task.name] = metrics.MultilabelAccumulator(task.num_classes)
      else:
        accumulators[task.name] = metrics.RegressionAccumulator()
    return accumulators

  def summarize(self, accumulators: dict) -> dict:
    """Flat metric dict `{task}/{metric}` from the accumulated statistics (scalars only)."""
    result = {}
    for name, accumulator in accumulators.items():
      for key, value in accumulator.result().items():
        if np.ndim(value) == 0:
          result[f"{name}/{key}"] = float(value)
    return result

  def predictions(self, outputs) -> dict:
    """Hard predictions per task, for plots."""
    result = {}
    for task in self.tasks:
      output = outputs[task.name]
      if task.kind in ("classification", "segmentation"):
        result[task.name] = jnp.argmax(output, axis=-1)
      elif task.kind == "multilabel":
        result[task.name] = output > 0
      else:
        result[task.name] = output.reshape(output.shape[0])
    return result

  @property
  def main_metric(self) -> str:
    """The metric that summarises a run (first task): accuracy, mIoU, micro F1 or MAE."""
    task = self.tasks[0]
    key = {"classification": "accuracy", "segmentation": "miou", "multilabel": "micro_f1",
           "regression": "mae"}[task.kind]
    return f"{task.name}/{key}"


class ContrastiveObjective:
  """NT-Xent between two embeddings of the same patches (S2/S1 pairs, or two augmented views)."""

  def __init__(self, config: ml_collections.ConfigDict):
    self.temperature = config.get("contrastive", {}).get("temperature", 0.1)
    self.tasks = []

  def loss(self, model, outputs, batch):
    del model, batch
    z_a, z_b = outputs["z_a"], outputs["z_b"]
    loss = losses.nt_xent(z_a, z_b, self.temperature)
    aux = {
        "matching_accuracy": losses.matching_accuracy(z_a, z_b),
        "embedding_std": embedding_std(z_a),
    }
    return loss, aux

  def eval_stats(self, outputs, batch) -> dict:
    # Padding rows would add fake negatives, so evaluation batches are scored on valid rows only by
    # giving them zero weight: the loss is approximated batch-wise and averaged with counts.
    loss, aux = self.loss(None, outputs, batch)
    count = jnp.sum(batch["valid"]).astype(jnp.float32)
    return {"contrastive": {"loss_sum": loss * count, "matching_sum": aux["matching_accuracy"] * count,
                            "count": count}}

  def new_accumulators(self) -> dict:
    return {"contrastive": metrics.MeanAccumulator()}

  def summarize(self, accumulators: dict) -> dict:
    return {f"contrastive/{k}": float(v) for k, v in accumulators["contrastive"].result().items()}

  def predictions(self, outputs) -> dict:
    return {}

  @property
  def main_metric(self) -> str:
    return "contrastive/matching"


def embedding_std(z: jax.Array) -> jax.Array:
  """Mean per-dimension std of L2-normalised embeddings: ~1/sqrt(D) when healthy, ~0 when collapsed."""
  z = z.astype(jnp.float32)
  z = z / (jnp.linalg.norm(z, axis=-1, keepdims=True) + 1e-12)
  return jnp.mean(jnp.std(z, axis=0))


OBJECTIVES = {"supervised": SupervisedObjective, "contrastive": ContrastiveObjective}


def make_objective(config: ml_collections.ConfigDict) -> Any:
  name = config.get("objective", "supervised")
  if name not in OBJECTIVES:
    raise ValueError(f"config.objective={name!r} is unknown; choose one of {tuple(OBJECTIVES)}")
  return OBJECTIVES[name](config)
