"""Contrastive encoders: the multimodal dual encoder (Scheibenreif et al. 2022) and a one-modality SimCLR encoder.

The reference dual encoder is two torchvision ResNet-18 (12-channel S2, 2-channel S1) whose fc layers are
one shared projector Linear(512, 512) -> ReLU -> Linear(512, 256): 22,772,096 parameters.
"""

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from labeleff_jax.data import constants
from labeleff_jax.models import layers
from labeleff_jax.models.encoders import MLPEncoder
from labeleff_jax.models.fusion import FusionTrunk, check_modalities, get_input
from labeleff_jax.models.registry import BACKBONES, MODELS
from labeleff_jax.models.supervised import _get, model_dtype

DEFAULT_PROJECTOR = (512, 256)


class Projector(nnx.Module):
  """MLP projection head: Linear -> ReLU between layers, none after the last (SimCLR's g(.))."""

  def __init__(self, in_features: int, features: Sequence[int] = DEFAULT_PROJECTOR, *, dtype=jnp.float32,
               rngs: nnx.Rngs):
    features = tuple(int(f) for f in features)
    if not features or min(features) < 1:
      raise ValueError(f"config.model.projector must be a non-empty list of positive sizes, got {features}")
    sizes = (in_features,) + features
    self.layers = nnx.List([layers.linear(a, b, dtype=dtype, rngs=rngs) for a, b in zip(sizes, sizes[1:])])

  def __call__(self, x: jax.Array) -> jax.Array:
    for index, layer in enumerate(self.layers):
      x = layer(x)
      if index < len(self.layers) - 1:
        x = nnx.relu(x)
    return x


class PooledEncoder(nnx.Module):
  """One modality -> [B, out_features]: an image backbone + global average pool, or an MLP for a vector."""

  def __init__(self, modality: str, *, backbone: str, width: int, mlp_features: Sequence[int], dtype,
               rngs: nnx.Rngs):
    self.modality = modality
    self.dtype = dtype
    channels = constants.MODALITIES[modality]
    if modality in constants.IMAGE_MODALITIES:
      self.net = BACKBONES.get(backbone)(channels, width=width, dtype=dtype, rngs=rngs)
      self.out_features = self.net.out_channels
      self.is_image = True
    else:
      self.net = MLPEncoder(channels, mlp_features, dtype=dtype, rngs=rngs)
      self.out_features = self.net.out_features
      self.is_image = False

  def __call__(self, inputs: dict) -> jax.Array:
    x = self.net(get_input(inputs, self.modality, self.dtype))
    return x.mean(axis=(1, 2)) if self.is_image else x


class DualEncoder(nnx.Module):
  """inputs -> {'z_a': [B, D], 'z_b': [B, D]}: projections (not normalised) of modality_a and modality_b.

  `encoders` and `projectors` are keyed by modality; with a shared projector both keys hold the same module,
  which NNX stores (and counts) once.
  """

  def __init__(self, modality_a: str = "s2", modality_b: str = "s1", *, backbone: str = "resnet18",
               width: int = 64, projector: Sequence[int] = DEFAULT_PROJECTOR, shared_projector: bool = True,
               mlp_features: Sequence[int] = (64, 64), dtype=jnp.float32, rngs: nnx.Rngs):
    check_modalities((modality_a,), "config.model.modality_a")
    check_modalities((modality_b,), "config.model.modality_b")
    if modality_a == modality_b:
      raise ValueError(f"config.model.modality_a and modality_b must differ, both are {modality_a!r} "
                       "(for two views of one modality use config.model.name='simclr')")
    self.modality_a, self.modality_b = modality_a, modality_b
    encoder_a, encoder_b = (PooledEncoder(m, backbone=backbone, width=width, mlp_features=mlp_features,
                                          dtype=dtype, rngs=rngs) for m in (modality_a, modality_b))
    self.encoders = nnx.Dict({modality_a: encoder_a, modality_b: encoder_b})
    if shared_projector:
      if encoder_a.out_features != encoder_b.out_features:
        raise ValueError(
            f"config.model.shared_projector needs equal feature sizes, got {modality_a}: "
            f"{encoder_a.out_features}, {modality_b}: {encoder_b.out_features}; set shared_projector=False")
      shared = Projector(encoder_a.out_features, projector, dtype=dtype, rngs=rngs)
      self.projectors = nnx.Dict({modality_a: shared, modality_b: shared})
    else:
      self.projectors = nnx.Dict({
          m: Projector(e.out_features, projector, dtype=dtype, rngs=rngs)
          for m, e in ((modality_a, encoder_a), (modality_b, encoder_b))})

  def __call__(self, inputs: dict) -> dict:
    out = {}
    for key, modality in (("z_a", self.modality_a), ("z_b", self.modality_b)):
      features = self.encoders[modality](inputs)
      out[key] = self.projectors[modality](features).astype(jnp.float32)
    return out

  def features(self, inputs: dict) -> jax.Array:
    """Pooled backbone features of both modalities, concatenated [a, b]: [B, F_a + F_b], float32."""
    return jnp.concatenate(
        [self.encoders[m](inputs).astype(jnp.float32) for m in (self.modality_a, self.modality_b)], axis=-1)


class SimCLREncoder(nnx.Module):
  """inputs -> {'z': [B, D]}: backbone on the (early-fused) modalities, global pool, projector.

  The engine calls it once on `inputs` and once on `inputs2` (the two augmented views).
  """

  def __init__(self, modalities: Sequence[str], *, backbone: str = "resnet18", width: int = 64,
               image_size: int = constants.PATCH_SIZE, projector: Sequence[int] = DEFAULT_PROJECTOR,
               dtype=jnp.float32, rngs: nnx.Rngs):
    self.trunk = FusionTrunk(modalities, fusion="early", backbone=backbone, width=width, image_size=image_size,
                             dtype=dtype, rngs=rngs)
    self.projector = Projector(self.trunk.out_channels, projector, dtype=dtype, rngs=rngs)

  def features(self, inputs: dict) -> jax.Array:
    """Pooled backbone features [B, F], float32."""
    return self.trunk(inputs).astype(jnp.float32).mean(axis=(1, 2))

  def __call__(self, inputs: dict) -> dict:
    pooled = self.trunk(inputs).mean(axis=(1, 2))
    return {"z": self.projector(pooled).astype(jnp.float32)}


@MODELS.register("dual_encoder")
def _build_dual_encoder(config: Any, *, rngs: nnx.Rngs) -> DualEncoder:
  model_cfg = config["model"]
  return DualEncoder(
      _get(model_cfg, "modality_a", "s2"), _get(model_cfg, "modality_b", "s1"),
      backbone=_get(model_cfg, "backbone", "resnet18"), width=int(_get(model_cfg, "width", 64)),
      projector=tuple(_get(model_cfg, "projector", DEFAULT_PROJECTOR)),
      shared_projector=bool(_get(model_cfg, "shared_projector", True)),
      mlp_features=tuple(_get(model_cfg, "mlp_features", (64, 64))), dtype=model_dtype(config), rngs=rngs)


@MODELS.register("simclr")
def _build_simclr(config: Any, *, rngs: nnx.Rngs) -> SimCLREncoder:
  model_cfg, data_cfg = config["model"], config.get("data", None)
  modalities = _get(model_cfg, "modalities", None) or _get(data_cfg, "modalities", None)
  if not modalities:
    raise ValueError("config.data.modalities is missing (the modality SimCLR encodes, e.g. ['s2'])")
  image_modalities = [m for m in check_modalities(modalities) if m in constants.IMAGE_MODALITIES]
  if not image_modalities:
    raise ValueError(f"SimCLR needs an image modality in config.data.modalities, got {list(modalities)}")
  return SimCLREncoder(
      modalities, backbone=_get(model_cfg, "backbone", "resnet18"), width=int(_get(model_cfg, "width", 64)),
      image_size=int(_get(data_cfg, "image_size", constants.PATCH_SIZE)),
      projector=tuple(_get(model_cfg, "projector", DEFAULT_PROJECTOR)), dtype=model_dtype(config), rngs=rngs)
