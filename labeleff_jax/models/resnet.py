"""ResNet-18/50 backbones in the torchvision layout (NHWC), with a stem for any number of input channels."""

import jax
import jax.numpy as jnp
from flax import nnx

from labeleff_jax.models import resampling, torch_style
from labeleff_jax.models.registry import BACKBONES


def _resnet_conv(in_channels, out_channels, kernel_size, *, stride=1, padding=0, dtype, rngs):
  # torchvision ResNets use bias-free convs with kaiming_normal(fan_out) init.
  return torch_style.conv(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                          use_bias=False, kernel_init=torch_style.torch_resnet_kernel_init, dtype=dtype,
                          rngs=rngs)


class Downsample(nnx.Module):
  """The projection shortcut: Conv1x1 (stride) without bias -> BatchNorm."""

  def __init__(self, in_channels: int, out_channels: int, stride: int, *, dtype, rngs: nnx.Rngs):
    self.conv = _resnet_conv(in_channels, out_channels, 1, stride=stride, dtype=dtype, rngs=rngs)
    self.bn = torch_style.batch_norm(out_channels, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.bn(self.conv(x))


class BasicBlock(nnx.Module):
  """Two 3x3 convs with a residual connection (ResNet-18/34)."""
  expansion = 1

  def __init__(self, in_channels: int, planes: int, stride: int, *, dtype, rngs: nnx.Rngs):
    out_channels = planes * self.expansion
    self.conv1 = _resnet_conv(in_channels, planes, 3, stride=stride, padding=1, dtype=dtype, rngs=rngs)
    self.bn1 = torch_style.batch_norm(planes, dtype=dtype, rngs=rngs)
    self.conv2 = _resnet_conv(planes, out_channels, 3, padding=1, dtype=dtype, rngs=rngs)
    self.bn2 = torch_style.batch_norm(out_channels, dtype=dtype, rngs=rngs)
    self.downsample = (Downsample(in_channels, out_channels, stride, dtype=dtype, rngs=rngs)
                       if stride != 1 or in_channels != out_channels else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    shortcut = x if self.downsample is None else self.downsample(x)
    y = nnx.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    return nnx.relu(y + shortcut)


class Bottleneck(nnx.Module):
  """1x1 -> 3x3 (stride here, torchvision's 'v1.5') -> 1x1 x4, with a residual connection (ResNet-50)."""
  expansion = 4

  def __init__(self, in_channels: int, planes: int, stride: int, *, dtype, rngs: nnx.Rngs):
    out_channels = planes * self.expansion
    self.conv1 = _resnet_conv(in_channels, planes, 1, dtype=dtype, rngs=rngs)
    self.bn1 = torch_style.batch_norm(planes, dtype=dtype, rngs=rngs)
    self.conv2 = _resnet_conv(planes, planes, 3, stride=stride, padding=1, dtype=dtype, rngs=rngs)
    self.bn2 = torch_style.batch_norm(planes, dtype=dtype, rngs=rngs)
    self.conv3 = _resnet_conv(planes, out_channels, 1, dtype=dtype, rngs=rngs)
    self.bn3 = torch_style.batch_norm(out_channels, dtype=dtype, rngs=rngs)
    self.downsample = (Downsample(in_channels, out_channels, stride, dtype=dtype, rngs=rngs)
                       if stride != 1 or in_channels != out_channels else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    shortcut = x if self.downsample is None else self.downsample(x)
    y = nnx.relu(self.bn1(self.conv1(x)))
    y = nnx.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    return nnx.relu(y + shortcut)


class ResNet(nnx.Module):
  """torchvision ResNet without avgpool/fc: [B,H,W,C_in] -> [B,h,w,out_channels] (h = H/32, rounded up).

  Stem: Conv7x7 stride 2 pad 3 (no bias) -> BN -> ReLU -> MaxPool 3x3 stride 2 pad 1; then four stages of
  `blocks_per_stage` blocks with width * (1, 2, 4, 8) planes, the first block of stages 2-4 striding by 2.
  """

  def __init__(self, in_channels: int, *, block: type, blocks_per_stage: tuple[int, ...], width: int = 64,
               dtype=jnp.float32, rngs: nnx.Rngs):
    if in_channels < 1 or width < 1:
      raise ValueError(f"ResNet needs in_channels >= 1 and width >= 1, got {in_channels}, {width}")
    self.conv1 = _resnet_conv(in_channels, width, 7, stride=2, padding=3, dtype=dtype, rngs=rngs)
    self.bn1 = torch_style.batch_norm(width, dtype=dtype, rngs=rngs)
    blocks = []
    channels = width
    for stage, num_blocks in enumerate(blocks_per_stage):
      planes = width * 2 ** stage
      for index in range(num_blocks):
        stride = 2 if stage > 0 and index == 0 else 1
        blocks.append(block(channels, planes, stride, dtype=dtype, rngs=rngs))
        channels = planes * block.expansion
    self.blocks = nnx.List(blocks)
    self.out_channels = channels

  @staticmethod
  def feature_size(image_size: int) -> int:
    """Side of the output feature map: five halvings, each floor((n - 1) / 2) + 1 like torch's arithmetic."""
    size = image_size
    for _ in range(5):  # conv1, maxpool, stages 2, 3, 4
      size = (size - 1) // 2 + 1
    return size

  def __call__(self, x: jax.Array) -> jax.Array:
    x = nnx.relu(self.bn1(self.conv1(x)))
    x = resampling.max_pool_3x3_stride2(x)
    for block in self.blocks:
      x = block(x)
    return x


@BACKBONES.register("resnet18")
def resnet18(in_channels: int, *, width: int = 64, dtype=jnp.float32, rngs: nnx.Rngs) -> ResNet:
  return ResNet(in_channels, block=BasicBlock, blocks_per_stage=(2, 2, 2, 2), width=width, dtype=dtype,
                rngs=rngs)


@BACKBONES.register("resnet50")
def resnet50(in_channels: int, *, width: int = 64, dtype=jnp.float32, rngs: nnx.Rngs) -> ResNet:
  return ResNet(in_channels, block=Bottleneck, blocks_per_stage=(3, 4, 6, 3), width=width, dtype=dtype,
                rngs=rngs)


# Builders expose the feature-map size like the U-Net class does, so it is known before building.
resnet18.feature_size = ResNet.feature_size
resnet50.feature_size = ResNet.feature_size
