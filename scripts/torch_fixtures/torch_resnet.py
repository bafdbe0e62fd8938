"""A torch ResNet-18/50 with torchvision's exact module and state-dict names, for writing weight fixtures.

torchvision's own classes are used where torchvision imports (`build`), but the committed fixtures always
come from this copy, so that they do not depend on torchvision's version or on its being installed (its
CPU wheels are not always available next to a CPU-only torch). Needs torch; never imported by the project.
"""

import torch
from torch import nn


class BasicBlock(nn.Module):
  expansion = 1

  def __init__(self, inplanes, planes, stride=1, downsample=None):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.relu = nn.ReLU(inplace=True)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.downsample = downsample

  def forward(self, x):
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    return self.relu(out + identity)


class Bottleneck(nn.Module):
  expansion = 4

  def __init__(self, inplanes, planes, stride=1, downsample=None):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)  # stride on the 3x3 ("v1.5")
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(planes * 4)
    self.relu = nn.ReLU(inplace=True)
    self.downsample = downsample

  def forward(self, x):
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    return self.relu(out + identity)


class ResNet(nn.Module):
  """torchvision.models.ResNet's structure and names: conv1, bn1, relu, maxpool, layer1..4, avgpool, fc."""

  def __init__(self, block, layers, *, in_channels=3, width=64, num_classes=1000):
    super().__init__()
    self.inplanes = width
    self.conv1 = nn.Conv2d(in_channels, width, 7, 2, 3, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    self.relu = nn.ReLU(inplace=True)
    self.maxpool = nn.MaxPool2d(3, 2, 1)
    self.layer1 = self._make_layer(block, width, layers[0])
    self.layer2 = self._make_layer(block, width * 2, layers[1], stride=2)
    self.layer3 = self._make_layer(block, width * 4, layers[2], stride=2)
    self.layer4 = self._make_layer(block, width * 8, layers[3], stride=2)
    self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
    self.fc = nn.Linear(width * 8 * block.expansion, num_classes)
    for module in self.modules():  # torchvision's init
      if isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

  def _make_layer(self, block, planes, blocks, stride=1):
    downsample = None
    if stride != 1 or self.inplanes != planes * block.expansion:
      downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                                 nn.BatchNorm2d(planes * block.expansion))
    layers = [block(self.inplanes, planes, stride, downsample)]
    self.inplanes = planes * block.expansion
    layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers)

  def forward(self, x):
    return self.fc(pooled_features(self, x))


def pooled_features(model, x):
  """Globally average-pooled features after layer4 ([N, C]) of a torchvision-named ResNet."""
  x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
  x = model.layer4(model.layer3(model.layer2(model.layer1(x))))
  return torch.flatten(model.avgpool(x), 1)


def build(arch, *, in_channels, width=64, num_classes=1000, prefer_torchvision=False):
  """ResNet-18 or -50 with `in_channels` inputs; torchvision's class (conv1 replaced) when asked and
  importable at width 64, else this module's copy. Returns (model, 'torchvision' or 'own copy')."""
  if prefer_torchvision and width == 64:
    try:
      import torchvision  # pylint: disable=g-import-not-at-top
      model = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
      model.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
      nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
      return model, f"torchvision {torchvision.__version__}"
    except Exception as error:  # noqa: BLE001  (an import of a mismatched wheel fails in many ways)
      print(f"torchvision not usable ({type(error).__name__}: {error}); using the own copy")
  block, layers = {"resnet18": (BasicBlock, (2, 2, 2, 2)), "resnet50": (Bottleneck, (3, 4, 6, 3))}[arch]
  return ResNet(block, layers, in_channels=in_channels, width=width, num_classes=num_classes), "own copy"


@torch.no_grad()
def randomize_batch_norm(model, generator, image_size=64):
  """Non-trivial BatchNorm state: statistics of one train-mode pass on random data (so activations stay
  O(1) through the depth), then random per-channel scale and bias, and an odd num_batches_tracked."""
  in_channels = model.conv1.in_channels
  norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
  for norm in norms:
    norm.momentum = 1.0  # running statistics := this batch's
  model.train()
  model(torch.rand(4, in_channels, image_size, image_size, generator=generator))
  for norm in norms:
    norm.momentum = 0.1
    channels = norm.num_features
    norm.weight.copy_(0.5 + torch.rand(channels, generator=generator))
    norm.bias.copy_(0.2 * torch.randn(channels, generator=generator))
    # Spread the statistics too, so that swapping mean and variance cannot go unnoticed.
    norm.running_mean.add_(0.1 * torch.randn(channels, generator=generator))
    norm.running_var.mul_(0.5 + torch.rand(channels, generator=generator))
    norm.num_batches_tracked.fill_(1234)
  model.eval()


@torch.no_grad()
def randomize_linear(linear, generator):
  bound = 1.0 / linear.in_features ** 0.5
  linear.weight.copy_(bound * (2 * torch.rand(linear.weight.shape, generator=generator) - 1))
  if linear.bias is not None:
    linear.bias.copy_(bound * (2 * torch.rand(linear.bias.shape, generator=generator) - 1))
