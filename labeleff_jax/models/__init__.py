"""Flax NNX models of labeleff_jax: create_model(config, rngs=...) builds any experiment's model by name."""

import math
from typing import Any

import jax
from flax import nnx

# Importing the modules registers their components in the registries.
from labeleff_jax.models import contrastive, resnet, supervised, unet  # noqa: F401
from labeleff_jax.models.contrastive import DualEncoder, Projector, SimCLREncoder
from labeleff_jax.models.fusion import FusionTrunk, blow_up
from labeleff_jax.models.heads import multilabel_predictions
from labeleff_jax.models.registry import BACKBONES, HEADS, MODELS
from labeleff_jax.models.resnet import ResNet, resnet18, resnet50
from labeleff_jax.models.supervised import SupervisedModel
from labeleff_jax.models.unet import UNet

__all__ = [
    "BACKBONES", "HEADS", "MODELS", "DualEncoder", "FusionTrunk", "Projector", "ResNet", "SimCLREncoder",
    "SupervisedModel", "UNet", "blow_up", "count_params", "create_model", "multilabel_predictions",
    "resnet18", "resnet50",
]


def create_model(config: Any, *, rngs: nnx.Rngs) -> nnx.Module:
  """Builds the model named by config.model.name ('unet' | 'resnet18' | 'resnet50' | 'dual_encoder' |
  'simclr'), reading config.model, config.data, config.tasks and config.train.compute_dtype.

  The model starts in training mode (dropout on, BatchNorm on batch statistics), like a torch module.
  Wrap in nnx.eval_shape to get shapes without allocating.
  """
  model_cfg = config.get("model", None)
  if model_cfg is None or model_cfg.get("name", None) is None:
    raise ValueError(f"config.model.name is missing; allowed values: {MODELS.names()}")
  return MODELS.get(model_cfg["name"])(config, rngs=rngs)


def count_params(model: nnx.Module) -> int:
  """Number of trainable parameters (nnx.Param leaves; BatchNorm statistics and RNG state excluded).

  Shared modules are counted once, like torch's parameters(). Works on abstract models from nnx.eval_shape.
  """
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)))

