"""Flax NNX models of labeleff_jax: create_model(config, rngs=...) builds any experiment's model by name."""

import math
from typing import Any

import jax
from flax import nnx

from labeleff_jax import config_checks
# Importing the modules registers their components in the registries.
from labeleff_jax.models import contrastive, resnet, supervised, torch_style, unet  # noqa: F401
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
    "resnet18", "resnet50", "resolve_conv_impl",
]


def resolve_conv_impl(conv_impl: str, backend: str | None = None) -> str:
  """'xla' or 'cpu_fast' for config.model.conv_impl; 'auto' is 'cpu_fast' only on a CPU backend.

  `backend` defaults to jax.default_backend(), the platform the model will run on.
  """
  config_checks.check_choice(conv_impl, config_checks.CONV_IMPLS, "config.model.conv_impl")
  if conv_impl != "auto":
    return conv_impl
  return "cpu_fast" if (backend or jax.default_backend()) == "cpu" else "xla"


def create_model(config: Any, *, rngs: nnx.Rngs) -> nnx.Module:
  """Builds the model named by config.model.name ('unet' | 'resnet18' | 'resnet50' | 'dual_encoder' |
  'simclr'), reading config.model, config.data, config.tasks and config.train.compute_dtype.

  Convolutions are XLA's own unless config.model.conv_impl resolves to 'cpu_fast' (see
  `resolve_conv_impl`): then labeleff_jax.cpu draws the initial weights and runs every convolution. The model
  starts in training mode (dropout on, BatchNorm on batch statistics), like a torch module. Wrap in
  nnx.eval_shape to get shapes without allocating.
  """
  config_checks.check_model(config)
  build = MODELS.get(config.model.name)
  if resolve_conv_impl(config_checks.get(config.model, "conv_impl", "auto")) == "xla":
    return build(config, rngs=rngs)
  from labeleff_jax import cpu  # pylint: disable=g-import-not-at-top  (GPU and TPU users never load it)
  with torch_style.drawing_with(cpu.block_draw):
    model = build(config, rngs=rngs)
  cpu.use_fast_convolutions(model)
  return model


def count_params(model: nnx.Module) -> int:
  """Number of trainable parameters (nnx.Param leaves; BatchNorm statistics and RNG state excluded).

  Shared modules are counted once, like torch's parameters(). Works on abstract models from nnx.eval_shape.
  """
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)))
