"""Contrastive encoders: the multimodal dual encoder (Scheibenreif et al. 2022) and a one-modality SimCLR encoder.

The reference dual encoder is two torchvision ResNet-18 (12-channel S2, 2-channel S1) whose fc layers are
one shared projector Linear(512, 512) -> ReLU -> Linear(512, 256): 22,772,096 parameters.
"""

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from labeleff_jax.config_checks import get as _get
from labeleff_jax.data import constants
from labeleff_jax.models import torch_style
from labeleff_jax.models.fusion import FusionTrunk
from labeleff_jax.models.registry import MODELS
from labeleff_jax.models.supervised import model_dtype

DEFAULT_PROJECTOR = (512, 256)


class Projector(nnx.Module):
  """MLP projection head: Linear -> ReLU between layers, none after the last (SimCLR's g(.))."""

  def __init__(self, in_features: int, features: Sequence[int] = DEFAULT_PROJECTOR, *, dtype=jnp.float32,
               rngs: nnx.Rngs):
    features = tuple(int(f) for f in features)
    sizes = (in_features,) + features
    self.layers = nnx.List([torch_style.linear(a, b, dtype=dtype, rngs=rngs)
                            for a, b in zip(sizes, sizes[1:])])

  def __call__(self, x: jax.Array) -> jax.Array:
    for index, layer in enumerate(self.layers):
      x = layer(x)
      if index < len(self.layers) - 1:
        x = nnx.relu(x)
    return x


class DualEncoder(nnx.Module):
  """inputs -> {'z_a': [B, D], 'z_b': [B, D]}: projections (not normalised) of modality_a and modality_b.

  `backbone` is a late-fusion trunk over the two modalities (paths `backbone/encoders/<modality>`, the same as
  in supervised models, so a pretrained encoder transfers by path); image feature maps are averaged over
  space, vector modalities use their MLP encoding. The projector is `projector` when shared (the reference:
  one module, counted once) and `projectors[modality]` when each modality has its own.
  """

  def __init__(self, modality_a: str = "s2", modality_b: str = "s1", *, backbone: str = "resnet18",
               width: int = 64, image_size: int = constants.PATCH_SIZE,
               projector: Sequence[int] = DEFAULT_PROJECTOR, shared_projector: bool = True,
               mlp_features: Sequence[int] = (64, 64), dtype=jnp.float32, rngs: nnx.Rngs):
    self.modality_a, self.modality_b = modality_a, modality_b
    self.backbone = FusionTrunk((modality_a, modality_b), fusion="late", backbone=backbone, width=width,
                                image_size=image_size, mlp_features=mlp_features, dtype=dtype, rngs=rngs)
    dim_a, dim_b = self.backbone.feature_dims
    if shared_projector:
      if dim_a != dim_b:
        raise ValueError(
            f"config.model.shared_projector needs equal feature sizes, got {modality_a}: {dim_a}, "
            f"{modality_b}: {dim_b}; set shared_projector=False")
      self.projector = Projector(dim_a, projector, dtype=dtype, rngs=rngs)
      self.projectors = None
    else:
      self.projector = None
      self.projectors = nnx.Dict({
          modality_a: Projector(dim_a, projector, dtype=dtype, rngs=rngs),
          modality_b: Projector(dim_b, projector, dtype=dtype, rngs=rngs)})

  def _pooled(self, inputs: dict, modality: str) -> jax.Array:
    x = self.backbone.encode(inputs, modality)
    return x.mean(axis=(1, 2)) if x.ndim == 4 else x

  def __call__(self, inputs: dict) -> dict:
    out = {}
    for key, modality in (("z_a", self.modality_a), ("z_b", self.modality_b)):
      project = self.projector if self.projector is not None else self.projectors[modality]
      out[key] = project(self._pooled(inputs, modality)).astype(jnp.float32)
    return out

  def features(self, inputs: dict) -> jax.Array:
    """Pooled backbone features of both modalities, concatenated [a, b]: [B, F_a + F_b], float32."""
    return jnp.concatenate(
        [self._pooled(inputs, m).astype(jnp.float32) for m in (self.modality_a, self.modality_b)], axis=-1)


class SimCLREncoder(nnx.Module):
  """inputs -> {'z': [B, D]}: backbone on the (early-fused) modalities, global pool, projector.

  Its `backbone` has the paths of a supervised early-fusion model on the same modalities (e.g.
  `backbone/encoders/s2`), so fine-tuning loads it with an identity mapping.

  The engine calls it once on `inputs` and once on `inputs2` (the two augmented views).
  """

  def __init__(self, modalities: Sequence[str], *, backbone: str = "resnet18", width: int = 64,
               image_size: int = constants.PATCH_SIZE, projector: Sequence[int] = DEFAULT_PROJECTOR,
               dtype=jnp.float32, rngs: nnx.Rngs):
    self.backbone = FusionTrunk(modalities, fusion="early", backbone=backbone, width=width,
                                image_size=image_size, dtype=dtype, rngs=rngs)
    self.projector = Projector(self.backbone.out_channels, projector, dtype=dtype, rngs=rngs)

  def features(self, inputs: dict) -> jax.Array:
    """Pooled backbone features [B, F], float32."""
    return self.backbone(inputs).astype(jnp.float32).mean(axis=(1, 2))

  def __call__(self, inputs: dict) -> dict:
    pooled = self.backbone(inputs).mean(axis=(1, 2))
    return {"z": self.projector(pooled).astype(jnp.float32)}


@MODELS.register("dual_encoder")
def _build_dual_encoder(config: Any, *, rngs: nnx.Rngs) -> DualEncoder:
  model_cfg = config["model"]
  return DualEncoder(
      _get(model_cfg, "modality_a", "s2"), _get(model_cfg, "modality_b", "s1"),
      backbone=_get(model_cfg, "backbone", "resnet18"), width=int(_get(model_cfg, "width", 64)),
      image_size=int(_get(config.get("data", None), "image_size", constants.PATCH_SIZE)),
      projector=tuple(_get(model_cfg, "projector", DEFAULT_PROJECTOR)),
      shared_projector=bool(_get(model_cfg, "shared_projector", True)),
      mlp_features=tuple(_get(model_cfg, "mlp_features", (64, 64))), dtype=model_dtype(config), rngs=rngs)


@MODELS.register("simclr")
def _build_simclr(config: Any, *, rngs: nnx.Rngs) -> SimCLREncoder:
  model_cfg, data_cfg = config["model"], config.get("data", None)
  modalities = _get(model_cfg, "modalities", None) or _get(data_cfg, "modalities", None)
  return SimCLREncoder(
      modalities, backbone=_get(model_cfg, "backbone", "resnet18"), width=int(_get(model_cfg, "width", 64)),
      image_size=int(_get(data_cfg, "image_size", constants.PATCH_SIZE)),
      projector=tuple(_get(model_cfg, "projector", DEFAULT_PROJECTOR)), dtype=model_dtype(config), rngs=rngs)
