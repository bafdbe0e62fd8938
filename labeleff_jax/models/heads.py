"""Task heads on a backbone feature map: the reference head, a global-pool head, segmentation and regression."""

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from labeleff_jax.config_checks import check_choice
from labeleff_jax.models import torch_style
from labeleff_jax.models.registry import HEADS

# Dropout of the reference head when neither the task nor config.model.dropout sets one: the reference uses
# 0.5 for classification and 0.1 for its regression head.
REFERENCE_REGRESSION_DROPOUT = 0.1
DEFAULT_HEAD = {"classification": "reference", "multilabel": "reference", "segmentation": "conv1x1",
                "regression": "reference"}
HEADS_FOR_KIND = {"classification": ("reference", "pool"), "multilabel": ("reference", "pool"),
                  "segmentation": ("conv1x1",), "regression": ("reference", "pool")}


class ReferenceHead(nnx.Module):
  """The lecture's head: Conv1x1(C -> 1) -> flatten (h*w) -> Dropout -> Linear(h*w, n).

  The flatten order of an NHWC [B,h,w,1] map is row-major over (h, w), the same as torch's view of an
  NCHW [B,1,h,w] map, so weights can be moved between the two one-to-one.
  """

  def __init__(self, in_channels: int, feature_size: int, num_outputs: int, dropout: float, *,
               dtype=jnp.float32, rngs: nnx.Rngs):
    self.reduce = torch_style.conv(in_channels, 1, 1, dtype=dtype, rngs=rngs)
    self.dropout = nnx.Dropout(dropout, rngs=rngs)
    self.dense = torch_style.linear(feature_size * feature_size, num_outputs, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.reduce(x)
    x = x.reshape(x.shape[0], -1)
    return self.dense(self.dropout(x))


class PoolHead(nnx.Module):
  """Global average pool -> Dropout -> Linear(C, n): works for any input size (torchvision's fc)."""

  def __init__(self, in_channels: int, num_outputs: int, dropout: float, *, dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.dropout = nnx.Dropout(dropout, rngs=rngs)
    self.dense = torch_style.linear(in_channels, num_outputs, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.dense(self.dropout(x.mean(axis=(1, 2))))


class SegmentationHead(nnx.Module):
  """Conv1x1(C -> n) per pixel; a feature map smaller than the image is resized (bilinear) to the image."""

  def __init__(self, in_channels: int, num_classes: int, image_size: int, *, dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.classify = torch_style.conv(in_channels, num_classes, 1, dtype=dtype, rngs=rngs)
    self.image_size = image_size

  def __call__(self, x: jax.Array) -> jax.Array:
    logits = self.classify(x)
    if logits.shape[1] != self.image_size or logits.shape[2] != self.image_size:
      logits = jax.image.resize(
          logits, (logits.shape[0], self.image_size, self.image_size, logits.shape[3]), "bilinear")
    return logits


class TaskHead(nnx.Module):
  """Wraps a head: returns float32 outputs; single-output regression gives [B] (the label's shape)."""

  def __init__(self, head: nnx.Module, squeeze: bool):
    self.head = head
    self.squeeze = squeeze

  def __call__(self, x: jax.Array) -> jax.Array:
    out = self.head(x).astype(jnp.float32)
    return out[..., 0] if self.squeeze else out


def _num_outputs(task: Any) -> int:
  """Outputs of a task's head (config_checks.check_tasks made sure classes are given where needed)."""
  num = task.get("num_classes", None)
  return 1 if num is None else int(num)


def _dropout(task: Any, kind: str, head: str, default_dropout: float | None) -> float:
  if task.get("dropout", None) is not None:
    return float(task["dropout"])
  if head == "pool":
    return 0.0  # torchvision's fc has none; set task.dropout to add one
  if kind == "regression":
    return REFERENCE_REGRESSION_DROPOUT
  return 0.5 if default_dropout is None else float(default_dropout)


@HEADS.register("reference")
def _reference_head(task, *, in_channels, feature_size, image_size, default_dropout, dtype, rngs):
  del image_size
  return ReferenceHead(in_channels, feature_size, _num_outputs(task),
                       _dropout(task, task["kind"], "reference", default_dropout), dtype=dtype, rngs=rngs)


@HEADS.register("pool")
def _pool_head(task, *, in_channels, feature_size, image_size, default_dropout, dtype, rngs):
  del feature_size, image_size
  return PoolHead(in_channels, _num_outputs(task),
                  _dropout(task, task["kind"], "pool", default_dropout), dtype=dtype, rngs=rngs)


@HEADS.register("conv1x1")
def _segmentation_head(task, *, in_channels, feature_size, image_size, default_dropout, dtype, rngs):
  del feature_size, default_dropout
  return SegmentationHead(in_channels, _num_outputs(task), image_size, dtype=dtype, rngs=rngs)


def build_task_head(task: Any, index: int, *, in_channels: int, feature_size: int, image_size: int,
                    default_dropout: float | None, dtype, rngs: nnx.Rngs) -> TaskHead:
  """Builds the head of config.tasks[index] for a backbone feature map of [B, feature_size^2, in_channels]."""
  kind = task["kind"]
  head_name = task.get("head", None) or DEFAULT_HEAD[kind]
  HEADS.get(head_name)  # unknown names fail here with the list of all heads
  check_choice(head_name, HEADS_FOR_KIND[kind], f"config.tasks[{index}].head for a {kind} task")
  head = HEADS.get(head_name)(task, in_channels=in_channels, feature_size=feature_size,
                              image_size=image_size, default_dropout=default_dropout, dtype=dtype, rngs=rngs)
  squeeze = kind == "regression" and _num_outputs(task) == 1
  return TaskHead(head, squeeze)


def multilabel_predictions(logits: jax.Array, threshold: float = 0.5) -> jax.Array:
  """Multi-hot predictions of a multilabel head: sigmoid(logit) > threshold, as float32."""
  return (jax.nn.sigmoid(logits.astype(jnp.float32)) > threshold).astype(jnp.float32)
