"""Early and late fusion of N modalities (images and vectors) into one backbone feature map.

Early fusion concatenates the channels of every modality in config.data.modalities order, vector modalities
"blown up" to constant planes (the reference's season channel), and runs one backbone.

Late fusion gives each modality its own encoder and concatenates their feature maps along channels, in
config.data.modalities order (the reference concatenates [S1, S2], i.e. modalities ['s1', 's2']):
- image modality -> backbone -> [B, h, w, C];
- vector modality -> MLP encoder -> [B, D], blown up to [B, h, w, D] planes. A global-pool head averages
  a constant plane back to the vector itself, so for the pool head this is exactly "concatenate after
  pooling", and the reference head sees the vector at every pixel.
With shared_backbone, all image modalities run through one backbone, `shared_image_encoder` (their channel
counts must match); `encoders` then holds only the vector encoders.
"""

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from labeleff_jax import config_checks
from labeleff_jax.data import constants
from labeleff_jax.models.mlp import MLPEncoder
from labeleff_jax.models.registry import BACKBONES


def blow_up(vector: jax.Array, height: int, width: int) -> jax.Array:
  """[B, D] (or [B] for a scalar) -> [B, height, width, D] constant planes."""
  if vector.ndim == 1:
    vector = vector[:, None]
  return jnp.broadcast_to(vector[:, None, None, :], (vector.shape[0], height, width, vector.shape[-1]))


def get_input(inputs: dict, modality: str, dtype) -> jax.Array:
  """inputs[modality] in the compute dtype, with its shape checked (NHWC image or [B, D] vector).

  A land-cover class map ([B, H, W] integers, as the pipeline sends it) becomes its one-hot here; codes
  outside 0..10 (255: no data) give all-zero pixels.
  """
  if modality not in inputs:
    raise KeyError(f"inputs has no modality {modality!r} (the model needs {modality!r}; got "
                   f"{sorted(inputs)})")
  x = jnp.asarray(inputs[modality])
  expected = constants.MODALITIES[modality]
  if modality == "lulc" and x.ndim == 3 and jnp.issubdtype(x.dtype, jnp.integer):
    return jax.nn.one_hot(x, expected, dtype=dtype)
  if modality in constants.IMAGE_MODALITIES:
    if x.ndim != 4 or x.shape[-1] != expected:
      raise ValueError(f"inputs[{modality!r}] must be [B, H, W, {expected}] (channels last), got {x.shape}")
  else:
    if x.ndim == 1 and expected == 1:
      x = x[:, None]
    if x.ndim != 2 or x.shape[-1] != expected:
      raise ValueError(f"inputs[{modality!r}] must be [B, {expected}], got {x.shape}")
  return x.astype(dtype)


def _image_size_of(inputs: dict, modalities: Sequence[str], default: int) -> tuple[int, int]:
  for name in modalities:
    if name in constants.IMAGE_MODALITIES and name in inputs:
      return inputs[name].shape[1], inputs[name].shape[2]
  return default, default


def stack_channels(inputs: dict, modalities: Sequence[str], dtype, image_size: int) -> jax.Array:
  """Early fusion input: every modality's channels concatenated in order, vectors blown up to planes."""
  height, width = _image_size_of(inputs, modalities, image_size)
  parts = []
  for name in modalities:
    x = get_input(inputs, name, dtype)
    if name in constants.VECTOR_MODALITIES:
      x = blow_up(x, height, width)
    elif x.shape[1:3] != (height, width):
      raise ValueError(f"inputs[{name!r}] is {x.shape[1:3]} pixels, the other images {(height, width)}")
    parts.append(x)
  return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=-1)


def fused_channels(modalities: Sequence[str]) -> int:
  return sum(constants.MODALITIES[name] for name in modalities)


class FusionTrunk(nnx.Module):
  """inputs dict -> fused feature map [B, feature_size, feature_size, out_channels] (early or late fusion).

  Encoders live in `self.encoders`, keyed by modality for late fusion and by the joined modality names
  (e.g. 's2_s1_season'; just 's2' for one modality) for early fusion, so a backbone's parameter paths name
  what it has seen. Every model holds its trunk as `backbone`, so the S2 ResNet of a contrastive run
  (`backbone/encoders/s2`) restores into a supervised S2 model under the same path.
  """

  def __init__(self, modalities: Sequence[str], *, fusion: str = "early", backbone: str = "unet",
               width: int = 64, image_size: int = constants.PATCH_SIZE, shared_backbone: bool = False,
               mlp_features: Sequence[int] = (64, 64), dtype=jnp.float32, rngs: nnx.Rngs):
    modalities = config_checks.check_modalities(modalities, "config.data.modalities")
    config_checks.check_choice(fusion, config_checks.FUSIONS, "config.model.fusion")
    build_backbone = BACKBONES.get(backbone)
    self.modalities = modalities
    self.fusion = fusion
    self.image_size = image_size
    self.dtype = dtype
    if fusion == "early":
      net = build_backbone(fused_channels(modalities), width=width, dtype=dtype, rngs=rngs)
      self.encoders = nnx.Dict({"_".join(modalities): net})
      self.shared_image_encoder = None
      self.feature_dims = (net.out_channels,)
      self.out_channels = net.out_channels
      self.feature_size = net.feature_size(image_size)
      return

    images = [m for m in modalities if m in constants.IMAGE_MODALITIES]
    encoders = {}
    shared = None
    if shared_backbone:
      shared = build_backbone(constants.MODALITIES[images[0]], width=width, dtype=dtype, rngs=rngs)
    feature_dims = []
    feature_size = None
    for name in modalities:
      if name in constants.IMAGE_MODALITIES:
        net = shared if shared is not None else build_backbone(
            constants.MODALITIES[name], width=width, dtype=dtype, rngs=rngs)
        feature_dims.append(net.out_channels)
        feature_size = net.feature_size(image_size)
        if shared is None:
          encoders[name] = net
      else:
        net = MLPEncoder(constants.MODALITIES[name], mlp_features, dtype=dtype, rngs=rngs)
        feature_dims.append(net.out_features)
        encoders[name] = net
    if feature_size is None:  # vectors only: planes of the size the backbone would have produced
      feature_size = build_backbone.feature_size(image_size)
    self.encoders = nnx.Dict(encoders)
    self.shared_image_encoder = shared
    self.feature_dims = tuple(feature_dims)  # channels each modality contributes, in modality order
    self.out_channels = sum(feature_dims)
    self.feature_size = feature_size

  def encode(self, inputs: dict, modality: str) -> jax.Array:
    """Late fusion, one modality: its feature map [B, h, w, C] (image) or encoding [B, D] (vector)."""
    if self.fusion != "late" or modality not in self.modalities:
      raise ValueError(f"encode({modality!r}) needs late fusion over it; this trunk is {self.fusion} fusion "
                       f"of {list(self.modalities)}")
    if modality in constants.IMAGE_MODALITIES and self.shared_image_encoder is not None:
      encoder = self.shared_image_encoder
    else:
      encoder = self.encoders[modality]
    return encoder(get_input(inputs, modality, self.dtype))

  def __call__(self, inputs: dict) -> jax.Array:
    if self.fusion == "early":
      (net,) = self.encoders.values()
      return net(stack_channels(inputs, self.modalities, self.dtype, self.image_size))
    maps = {}
    for name in self.modalities:
      if name in constants.IMAGE_MODALITIES:
        maps[name] = self.encode(inputs, name)
    # Planes match the image maps actually produced (a pool head accepts other input sizes).
    height, width = next((m.shape[1], m.shape[2]) for m in maps.values()) if maps else (
        self.feature_size, self.feature_size)
    for name in self.modalities:
      if name in constants.VECTOR_MODALITIES:
        maps[name] = blow_up(self.encode(inputs, name), height, width)
    parts = [maps[name] for name in self.modalities]
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=-1)

