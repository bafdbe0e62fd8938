"""Supervised models: a fused backbone with any set of task heads, and fixed or learned (Kendall) loss weights."""

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from labeleff_jax.config_checks import get as _get
from labeleff_jax.data import constants
from labeleff_jax.models.fusion import FusionTrunk
from labeleff_jax.models.heads import build_task_head
from labeleff_jax.models.registry import MODELS

# Kendall et al. 2018 derive 1/(2 sigma^2) for a Gaussian (regression) likelihood and 1/sigma^2 for a
# softmax/Bernoulli one; with s = log sigma^2 both get the regulariser log sigma = s / 2.
KENDALL_LOSS_SCALE = {"classification": 1.0, "multilabel": 1.0, "segmentation": 1.0, "regression": 0.5}


class SupervisedModel(nnx.Module):
  """inputs dict -> {task name: output}, all heads on one fused feature map.

  Outputs (float32): classification and multilabel logits [B, n]; segmentation logits [B, H, W, n];
  regression [B] (one output) or [B, n].
  """

  def __init__(self, trunk: FusionTrunk, tasks: Sequence[Any], *, task_weighting: str = "fixed",
               default_dropout: float | None = None, dtype=jnp.float32, rngs: nnx.Rngs):
    names = [task["name"] for task in tasks]
    self.backbone = trunk
    self.heads = nnx.Dict({
        task["name"]: build_task_head(
            task, index, in_channels=trunk.out_channels, feature_size=trunk.feature_size,
            image_size=trunk.image_size, default_dropout=default_dropout, dtype=dtype, rngs=rngs)
        for index, task in enumerate(tasks)})
    self.task_names = tuple(names)
    self.task_kinds = tuple(task["kind"] for task in tasks)
    self.task_weights = tuple(float(_get(task, "weight", 1.0)) for task in tasks)
    self.task_weighting = task_weighting
    if task_weighting == "uncertainty":
      # s_i = log sigma_i^2, starting at sigma = 1 (every task weighted 1, like the fixed default).
      self.task_log_vars = nnx.Param(jnp.zeros((len(tasks),), jnp.float32))

  def __call__(self, inputs: dict) -> dict:
    features = self.backbone(inputs)
    return {name: self.heads[name](features) for name in self.task_names}

  def features(self, inputs: dict) -> jax.Array:
    """Globally averaged backbone feature map [B, out_channels], float32 (for k-NN and linear probes)."""
    return self.backbone(inputs).astype(jnp.float32).mean(axis=(1, 2))

  def combine_losses(self, losses: dict) -> jax.Array:
    """Total loss from per-task losses {task name: scalar}.

    fixed: sum_i weight_i * L_i. uncertainty (Kendall et al. 2018): sum_i c_i * exp(-s_i) * L_i + s_i / 2,
    with c_i = 1/2 for regression and 1 otherwise, s_i = task_log_vars[i] learned (task.weight unused).
    """
    missing = [name for name in self.task_names if name not in losses]
    if missing:
      raise KeyError(f"combine_losses: no loss for task(s) {missing}; got {sorted(losses)}")
    ordered = jnp.stack([jnp.asarray(losses[name], jnp.float32) for name in self.task_names])
    if self.task_weighting == "uncertainty":
      return uncertainty_weighted_sum(ordered, self.task_log_vars[...], self.task_kinds)
    return jnp.sum(jnp.asarray(self.task_weights, jnp.float32) * ordered)


def uncertainty_weighted_sum(losses: jax.Array, log_vars: jax.Array, kinds: Sequence[str]) -> jax.Array:
  """Kendall et al. 2018: sum_i c_i exp(-s_i) L_i + s_i / 2 over task losses [T] and log-variances s [T]."""
  scale = jnp.asarray([KENDALL_LOSS_SCALE[kind] for kind in kinds], jnp.float32)
  log_vars = log_vars.astype(jnp.float32)
  return jnp.sum(scale * jnp.exp(-log_vars) * losses + 0.5 * log_vars)


def model_dtype(config: Any):
  """The compute dtype of config.train.compute_dtype (parameters stay float32)."""
  return jnp.dtype(_get(config.get("train", None), "compute_dtype", "float32"))


def _build_supervised(config: Any, *, rngs: nnx.Rngs) -> SupervisedModel:
  model_cfg, data_cfg = config.get("model", None), config.get("data", None)
  dtype = model_dtype(config)
  trunk = FusionTrunk(
      data_cfg["modalities"], fusion=_get(model_cfg, "fusion", "early"), backbone=model_cfg["name"],
      width=int(_get(model_cfg, "width", 64)), image_size=int(_get(data_cfg, "image_size", constants.PATCH_SIZE)),
      shared_backbone=bool(_get(model_cfg, "shared_backbone", False)),
      mlp_features=tuple(_get(model_cfg, "mlp_features", (64, 64))), dtype=dtype, rngs=rngs)
  tasks = config.get("tasks", None)
  return SupervisedModel(trunk, list(tasks), task_weighting=_get(model_cfg, "task_weighting", "fixed"),
                         default_dropout=_get(model_cfg, "dropout", None), dtype=dtype, rngs=rngs)


for _name in ("unet", "resnet18", "resnet50"):
  MODELS.register(_name)(_build_supervised)
