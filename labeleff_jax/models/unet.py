"""The reference U-Net backbone (milesial style, docs/reference.md) in Flax NNX, NHWC."""

import jax
import jax.numpy as jnp
from flax import nnx

from labeleff_jax.models import resampling, torch_style
from labeleff_jax.models.registry import BACKBONES


class DoubleConv(nnx.Module):
  """(Conv3x3 pad 1 with bias -> BatchNorm -> ReLU) x 2, the reference's building block."""

  def __init__(self, in_channels: int, out_channels: int, mid_channels: int | None = None, *,
               dtype=jnp.float32, rngs: nnx.Rngs):
    mid_channels = mid_channels or out_channels
    self.conv1 = torch_style.conv(in_channels, mid_channels, 3, padding=1, dtype=dtype, rngs=rngs)
    self.bn1 = torch_style.batch_norm(mid_channels, dtype=dtype, rngs=rngs)
    self.conv2 = torch_style.conv(mid_channels, out_channels, 3, padding=1, dtype=dtype, rngs=rngs)
    self.bn2 = torch_style.batch_norm(out_channels, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = nnx.relu(self.bn1(self.conv1(x)))
    return nnx.relu(self.bn2(self.conv2(x)))


class Down(nnx.Module):
  """MaxPool 2x2 (floor, like torch) then DoubleConv."""

  def __init__(self, in_channels: int, out_channels: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.conv = DoubleConv(in_channels, out_channels, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.conv(resampling.max_pool_2x2(x))


def pad_to(x: jax.Array, height: int, width: int) -> jax.Array:
  """Zero-pads NHWC `x` to `height` x `width`, the smaller half first (the reference's F.pad split)."""
  dy, dx = height - x.shape[1], width - x.shape[2]
  if dy < 0 or dx < 0:
    raise ValueError(f"cannot pad {x.shape[1:3]} down to {(height, width)}")
  if dy == 0 and dx == 0:
    return x
  return jnp.pad(x, ((0, 0), (dy // 2, dy - dy // 2), (dx // 2, dx - dx // 2), (0, 0)))


class Up(nnx.Module):
  """Bilinear x2 (align_corners=True), pad to the skip's size, concat [skip, up], DoubleConv(mid=in//2)."""

  def __init__(self, in_channels: int, out_channels: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.conv = DoubleConv(in_channels, out_channels, in_channels // 2, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, skip: jax.Array) -> jax.Array:
    x = resampling.upsample_bilinear_align_corners(x, 2)
    x = pad_to(x, skip.shape[1], skip.shape[2])
    return self.conv(jnp.concatenate([skip, x], axis=-1))


@BACKBONES.register("unet")
class UNet(nnx.Module):
  """U-Net feature extractor: [B,H,W,C_in] -> [B,H,W,width] (no output layer; heads add their own).

  With width 64 this is exactly the reference backbone: encoder 64-128-256-512-512 (each level halves the
  size with floor: 120 -> 60 -> 30 -> 15 -> 7), decoder Up(1024->256), Up(512->128), Up(256->64),
  Up(128->64).
  """

  def __init__(self, in_channels: int, *, width: int = 64, dtype=jnp.float32, rngs: nnx.Rngs):
    if in_channels < 1 or width < 1:
      raise ValueError(f"U-Net needs in_channels >= 1 and width >= 1, got {in_channels}, {width}")
    w = width
    self.out_channels = w
    self.inc = DoubleConv(in_channels, w, dtype=dtype, rngs=rngs)
    self.down1 = Down(w, 2 * w, dtype=dtype, rngs=rngs)
    self.down2 = Down(2 * w, 4 * w, dtype=dtype, rngs=rngs)
    self.down3 = Down(4 * w, 8 * w, dtype=dtype, rngs=rngs)
    self.down4 = Down(8 * w, 8 * w, dtype=dtype, rngs=rngs)
    self.up1 = Up(16 * w, 4 * w, dtype=dtype, rngs=rngs)
    self.up2 = Up(8 * w, 2 * w, dtype=dtype, rngs=rngs)
    self.up3 = Up(4 * w, w, dtype=dtype, rngs=rngs)
    self.up4 = Up(2 * w, w, dtype=dtype, rngs=rngs)

  @staticmethod
  def feature_size(image_size: int) -> int:
    """Side of the output feature map for a square input: the U-Net keeps the input resolution."""
    if image_size < 16:
      raise ValueError(f"the U-Net halves the input 4 times; config.data.image_size must be >= 16, "
                       f"got {image_size}")
    return image_size

  def __call__(self, x: jax.Array) -> jax.Array:
    x1 = self.inc(x)
    x2 = self.down1(x1)
    x3 = self.down2(x2)
    x4 = self.down3(x3)
    x5 = self.down4(x4)
    x = self.up1(x5, x4)
    x = self.up2(x, x3)
    x = self.up3(x, x2)
    return self.up4(x, x1)
