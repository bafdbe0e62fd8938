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

from labeleff_jax import config_checks
from labeleff_jax import losses
from labeleff_jax import metrics
from labeleff_jax.data import constants


def _valid_mask(batch, target):
  """Broadcasts the per-example `valid` flag to the shape of `target` (pixels for segmentation)."""
  valid = batch["valid"]
  return valid.reshape(valid.shape + (1,) * (target.ndim - valid.ndim))


class SupervisedObjective:
  """Weighted sum of per-task losses; whole-split metrics per task."""

  def __init__(self, config: ml_collections.ConfigDict):
    config_checks.check_task_heads(list(config.tasks))
    self.tasks = list(config.tasks)

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
    if model is not None and hasattr(model, "combine_losses"):
      total = model.combine_losses(task_losses)
    else:
      total = sum(task.get("weight", 1.0) * task_losses[task.name] for task in self.tasks)
    return total, {f"loss_{name}": value for name, value in task_losses.items()}

  # -- evaluation -----------------------------------------------------------------------------------------
  def eval_stats(self, outputs, batch) -> dict:
    """Per-batch sufficient statistics (jit-able) for whole-split metrics of every task and the loss."""
    total, task_losses = self.loss(None, outputs, batch)
    count = jnp.sum(batch["valid"]).astype(jnp.float32)
    # Losses are means over the batch's valid examples: weighting them by the count gives the split mean.
    stats = {"loss": {"loss_sum": total * count, "count": count,
                      **{f"{k}_sum": v * count for k, v in task_losses.items()}}}
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
    accumulators = {"loss": metrics.MeanAccumulator()}
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
          result[key if name == "loss" else f"{name}/{key}"] = float(value)
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
  """NT-Xent between two embeddings of the same patches: S2/S1 pairs (dual encoder) or two augmented views.

  Logged with the loss: the reference's matching accuracy, and the spread of the normalised embeddings
  (`embedding_spread` = mean per-dimension std x sqrt(D): about 1 for well-spread embeddings, near 0 when
  they collapse to one point), which the engine watches.
  """

  def __init__(self, config: ml_collections.ConfigDict):
    self.temperature = config.contrastive.temperature
    self.two_views = config.model.name != "dual_encoder"
    self.tasks = []

  def forward(self, model, batch) -> dict:
    if not self.two_views:
      return model(batch["inputs"])
    if "inputs2" not in batch:  # evaluation batches carry one view: embed it, score no pairs
      z = model(batch["inputs"])["z"]
      return {"z_a": z, "z_b": z}
    # Both views in one pass, so BatchNorm normalises with the statistics of all 2B images (SimCLR).
    both = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), batch["inputs"], batch["inputs2"])
    z = model(both)["z"]
    half = z.shape[0] // 2
    return {"z_a": z[:half], "z_b": z[half:]}

  def loss(self, model, outputs, batch):
    del model
    z_a, z_b = outputs["z_a"], outputs["z_b"]
    loss, matching = losses.nt_xent_and_matching_accuracy(z_a, z_b, self.temperature, mask=batch["valid"])
    return loss, {"matching_accuracy": matching, "embedding_spread": embedding_spread(z_a)}

  def eval_stats(self, outputs, batch) -> dict:
    loss, matching = losses.nt_xent_and_matching_accuracy(
        outputs["z_a"], outputs["z_b"], self.temperature, mask=batch["valid"])
    count = jnp.sum(batch["valid"]).astype(jnp.float32)
    stats = {"embedding_spread_sum": embedding_spread(outputs["z_a"], batch["valid"]) * count,
             "count": count}
    if not self.two_views:  # one-view evaluation batches have no pairs to score
      stats.update(loss_sum=loss * count, matching_accuracy_sum=matching * count)
    return {"contrastive": stats}

  def new_accumulators(self) -> dict:
    return {"contrastive": metrics.MeanAccumulator()}

  def summarize(self, accumulators: dict) -> dict:
    return {f"contrastive/{k}": float(v) for k, v in accumulators["contrastive"].result().items()
            if np.ndim(v) == 0}

  def predictions(self, outputs) -> dict:
    return {}

  @property
  def main_metric(self) -> str:
    return "probe/knn_accuracy"


def embedding_spread(z: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """Mean per-dimension std of L2-normalised embeddings times sqrt(D): ~1 spread out, ~0 collapsed."""
  z = z.astype(jnp.float32)
  z = z / (jnp.linalg.norm(z, axis=-1, keepdims=True) + 1e-12)
  weights = jnp.ones(z.shape[:1], jnp.float32) if mask is None else mask.astype(jnp.float32)
  count = jnp.maximum(jnp.sum(weights), 1.0)
  mean = jnp.sum(z * weights[:, None], axis=0) / count
  variance = jnp.sum(jnp.square(z - mean) * weights[:, None], axis=0) / count
  return jnp.mean(jnp.sqrt(variance)) * jnp.sqrt(jnp.float32(z.shape[-1]))


OBJECTIVES = {"supervised": SupervisedObjective, "contrastive": ContrastiveObjective}


def make_objective(config: ml_collections.ConfigDict) -> Any:
  name = config_checks.check_choice(config.get("objective", "supervised"), config_checks.OBJECTIVES,
                                    "objective")
  return OBJECTIVES[name](config)
