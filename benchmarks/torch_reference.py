"""The lecture's PyTorch models, rebuilt here so the benchmarks can count their parameters and time their steps.

This file is the torch side of `train_step.py` and `contrastive_step.py`. It needs torch, which is never a
dependency of the project: run it with the python of a throwaway venv,

    python3 -m venv /tmp/torchvenv && /tmp/torchvenv/bin/pip install torch==2.13.0 numpy
    /tmp/torchvenv/bin/python benchmarks/torch_reference.py counts
    /tmp/torchvenv/bin/python benchmarks/torch_reference.py step unet|dual BATCH STEPS \
        [--warmup W] [--threads N] [--autocast]

`counts` prints {model: parameters} for the five reference models as one JSON object. `step` trains one
model on random inputs, W untimed warm-up steps and then STEPS steps timed one by one, and prints one JSON
line (images_per_s, step_s, step_times_s, first/last loss, peak RSS, torch version and CPU capability).

The models follow the reference layer for layer (docs/reference.md lists them with their parameter counts),
so the counts match the lecture's to the parameter and a timed step does the reference's arithmetic:
- U-Net backbone in the style of milesial/Pytorch-UNet: 64-128-256-512-512 encoder, bilinear decoder.
- Heads: Conv1x1 -> flatten 120x120 -> dropout -> Linear (classification, regression), Conv1x1 (segmentation).
- The contrastive dual encoder: two torchvision-layout ResNet-18 (written out here, torchvision is not
  needed) that share one projector module as their `fc`.
"""

import argparse
import json
import resource
import statistics
import time

import torch
from torch import nn
import torch.nn.functional as F

PATCH_SIZE = 120  # ben-ge patches are 120 x 120 px; the flatten heads are sized for exactly that
NUM_S2_BANDS = 12
NUM_S1_BANDS = 2
NUM_CLIMATE_ZONES = 12
NUM_LULC_CLASSES = 11


# ---------------------------------------------------------------------------------------------------------
# U-Net backbone.
# ---------------------------------------------------------------------------------------------------------
class DoubleConv(nn.Sequential):
  """Two rounds of Conv3x3 (padding 1, with bias) -> BatchNorm -> ReLU; `mid` channels in between."""

  def __init__(self, in_channels: int, out_channels: int, mid_channels: int | None = None):
    mid_channels = mid_channels or out_channels
    super().__init__(
        nn.Conv2d(in_channels, mid_channels, 3, padding=1), nn.BatchNorm2d(mid_channels), nn.ReLU(inplace=True),
        nn.Conv2d(mid_channels, out_channels, 3, padding=1), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class Down(nn.Sequential):
  """MaxPool 2x2 (floor: 15 px become 7) then DoubleConv."""

  def __init__(self, in_channels: int, out_channels: int):
    super().__init__(nn.MaxPool2d(2), DoubleConv(in_channels, out_channels))


class Up(nn.Module):
  """Bilinear x2 (align_corners=True), zero-pad to the skip's size, concat [skip, up], DoubleConv(mid=in//2)."""

  def __init__(self, in_channels: int, out_channels: int):
    super().__init__()
    self.conv = DoubleConv(in_channels, out_channels, in_channels // 2)

  def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
    # 7 px doubled is 14, one short of the 15 px skip: pad, the smaller half before.
    dy, dx = skip.shape[2] - x.shape[2], skip.shape[3] - x.shape[3]
    x = F.pad(x, (dx // 2, dx - dx // 2, dy // 2, dy - dy // 2))
    return self.conv(torch.cat((skip, x), dim=1))


class UNetBackbone(nn.Module):
  """[B, C, H, W] -> [B, 64, H, W] features; each task adds its own head."""

  def __init__(self, in_channels: int):
    super().__init__()
    self.inc = DoubleConv(in_channels, 64)
    self.down1 = Down(64, 128)
    self.down2 = Down(128, 256)
    self.down3 = Down(256, 512)
    self.down4 = Down(512, 512)  # not 1024: the bilinear decoder has no transposed conv to halve channels
    self.up1 = Up(1024, 256)
    self.up2 = Up(512, 128)
    self.up3 = Up(256, 64)
    self.up4 = Up(128, 64)
    self.out_channels = 64

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    skips = [self.inc(x)]
    for down in (self.down1, self.down2, self.down3):
      skips.append(down(skips[-1]))
    x = self.down4(skips[-1])
    for up in (self.up1, self.up2, self.up3, self.up4):
      x = up(x, skips.pop())
    return x


# ---------------------------------------------------------------------------------------------------------
# Heads.
# ---------------------------------------------------------------------------------------------------------
class FlattenHead(nn.Module):
  """Conv1x1 to one channel, flatten the 120x120 map, dropout, Linear(14400, outputs).

  The reference's classification head (dropout 0.5) and regression head (dropout 0.1). Its Linear layer
  holds 14400 x outputs weights, most of the head's parameters, and ties the model to 120 px inputs.
  """

  def __init__(self, in_channels: int, outputs: int, dropout: float, size: int = PATCH_SIZE):
    super().__init__()
    self.out_conv = nn.Conv2d(in_channels, 1, 1)
    self.fc = nn.Sequential(nn.Dropout(dropout), nn.Linear(size * size, outputs))

  def forward(self, features: torch.Tensor) -> torch.Tensor:
    return self.fc(torch.flatten(self.out_conv(features), 1))


def classification_head(in_channels: int, num_classes: int) -> FlattenHead:
  return FlattenHead(in_channels, num_classes, dropout=0.5)


def regression_head(in_channels: int) -> FlattenHead:
  return FlattenHead(in_channels, 1, dropout=0.1)


# ---------------------------------------------------------------------------------------------------------
# The U-Net models of the lecture.
# ---------------------------------------------------------------------------------------------------------
class ClassificationUNet(nn.Module):
  """U-Net + classification head: S2 only (12 channels) or early fusion ([S2, S1] stacked, 14 channels)."""

  def __init__(self, in_channels: int = NUM_S2_BANDS, num_classes: int = NUM_CLIMATE_ZONES):
    super().__init__()
    self.backbone = UNetBackbone(in_channels)
    self.head = classification_head(self.backbone.out_channels, num_classes)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.head(self.backbone(x))


class LateFusionUNet(nn.Module):
  """One U-Net per modality; their 64-channel features are stacked [S1, S2] before one shared head.

  Takes the early-fusion input (channels [S2 bands, S1 bands]) and splits it, as the reference does.
  """

  def __init__(self, num_classes: int = NUM_CLIMATE_ZONES):
    super().__init__()
    self.backbone_s1 = UNetBackbone(NUM_S1_BANDS)
    self.backbone_s2 = UNetBackbone(NUM_S2_BANDS)
    self.head = classification_head(2 * self.backbone_s2.out_channels, num_classes)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    s2, s1 = x[:, :NUM_S2_BANDS], x[:, NUM_S2_BANDS:]
    return self.head(torch.cat((self.backbone_s1(s1), self.backbone_s2(s2)), dim=1))


class MultiTaskUNet(nn.Module):
  """One S2 U-Net, three heads: land-cover segmentation, climate-zone classification, season regression."""

  def __init__(self, in_channels: int = NUM_S2_BANDS, num_climate_zones: int = NUM_CLIMATE_ZONES,
               num_lulc_classes: int = NUM_LULC_CLASSES):
    super().__init__()
    self.backbone = UNetBackbone(in_channels)
    width = self.backbone.out_channels
    self.segmentation = nn.Conv2d(width, num_lulc_classes, 1)
    self.classification = classification_head(width, num_climate_zones)
    self.regression = regression_head(width)

  def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    features = self.backbone(x)
    return self.segmentation(features), self.classification(features), self.regression(features)


# ---------------------------------------------------------------------------------------------------------
# ResNet-18 (torchvision layout and attribute names) and the contrastive dual encoder.
# ---------------------------------------------------------------------------------------------------------
class BasicBlock(nn.Module):
  """Two bias-free 3x3 convs with BatchNorm and a residual; a 1x1 projection where the shape changes."""

  def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
    super().__init__()
    self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
    self.bn1 = nn.BatchNorm2d(out_channels)
    self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
    self.bn2 = nn.BatchNorm2d(out_channels)
    self.downsample = None
    if stride != 1 or in_channels != out_channels:
      self.downsample = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                                      nn.BatchNorm2d(out_channels))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    shortcut = x if self.downsample is None else self.downsample(x)
    y = F.relu(self.bn1(self.conv1(x)), inplace=True)
    return F.relu(self.bn2(self.conv2(y)) + shortcut, inplace=True)


class ResNet18(nn.Module):
  """torchvision's resnet18 with a `in_channels`-band stem (7x7 stride 2 pad 3, no bias) and any `fc`.

  Initialised like the reference: torchvision's kaiming-normal (fan_out) for the convs of the body, while
  the stem keeps torch's default init, because the reference swaps in a fresh Conv2d after torchvision
  has initialised the model.
  """

  def __init__(self, in_channels: int, fc: nn.Module):
    super().__init__()
    self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
    self.bn1 = nn.BatchNorm2d(64)
    self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
    # layer1..layer4, two blocks each; every stage after the first halves the size and doubles the width.
    channels = 64
    for index, width in enumerate((64, 128, 256, 512)):
      stride = 1 if index == 0 else 2
      stage = nn.Sequential(BasicBlock(channels, width, stride), BasicBlock(width, width))
      setattr(self, f"layer{index + 1}", stage)
      channels = width
    self.avgpool = nn.AdaptiveAvgPool2d(1)
    self.fc = fc
    for module in self.modules():
      if isinstance(module, nn.Conv2d) and module is not self.conv1:
        nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = self.maxpool(F.relu(self.bn1(self.conv1(x)), inplace=True))
    x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
    return self.fc(torch.flatten(self.avgpool(x), 1))


class DualEncoder(nn.Module):
  """S2 and S1 ResNet-18 whose `fc` is the same projector Linear(512, 512) -> ReLU -> Linear(512, 256).

  The projector is one module registered under both encoders; `parameters()` yields each tensor once, so
  it is counted and updated once. Returns [z_s2; z_s1], 2B rows, as the NT-Xent loss expects.
  """

  def __init__(self, s2_channels: int = NUM_S2_BANDS, s1_channels: int = NUM_S1_BANDS, latent_dim: int = 256):
    super().__init__()
    self.projector = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, latent_dim))
    self.s2_encoder = ResNet18(s2_channels, self.projector)
    self.s1_encoder = ResNet18(s1_channels, self.projector)

  def forward(self, s2: torch.Tensor, s1: torch.Tensor) -> torch.Tensor:
    return torch.cat((self.s2_encoder(s2), self.s1_encoder(s1)))


def nt_xent(z: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
  """SimCLR's NT-Xent over z = [z_a; z_b] (2B rows), averaged over all 2B anchors.

  Row i's positive is its co-located partner i +- B; the other 2B - 2 rows are negatives and row i itself is
  left out (its logit set to -inf, which drops it from the softmax exactly as removing the column would).
  Computed in float32 even under autocast: at temperature 0.1 the logits reach +-10, and bf16 rounding of
  the similarities would show in the loss.
  """
  z = F.normalize(z.float(), dim=1)
  rows = z.shape[0]
  if rows % 2:
    raise ValueError(f"NT-Xent needs [z_a; z_b] with an even number of rows, got {rows}")
  logits = (z @ z.T) / temperature
  logits = logits.masked_fill(torch.eye(rows, dtype=torch.bool, device=z.device), float("-inf"))
  partner = (torch.arange(rows, device=z.device) + rows // 2) % rows
  return F.cross_entropy(logits, partner)


def matching_accuracy(z: torch.Tensor) -> float:
  """Top-1 rate at which a row's most similar other row is its partner (the lecture's 'matching accuracy')."""
  with torch.no_grad():
    z = F.normalize(z.float(), dim=1)
    rows = z.shape[0]
    similarity = (z @ z.T).fill_diagonal_(float("-inf"))
    partner = (torch.arange(rows, device=z.device) + rows // 2) % rows
    return (similarity.argmax(dim=1) == partner).float().mean().item()


# The five reference models under the names of the project's configs (configs/NAME.py).
MODELS = {
    "supervised": lambda: ClassificationUNet(NUM_S2_BANDS, NUM_CLIMATE_ZONES),
    "early_fusion": lambda: ClassificationUNet(NUM_S2_BANDS + NUM_S1_BANDS, NUM_CLIMATE_ZONES),
    "late_fusion": lambda: LateFusionUNet(NUM_CLIMATE_ZONES),
    "multitask": lambda: MultiTaskUNet(),
    "contrastive": lambda: DualEncoder(),
}

# What the lecture's models have; `counts` fails loudly if a change here breaks the match.
REFERENCE_PARAMETER_COUNTS = {
    "supervised": 17_445_389,
    "early_fusion": 17_446_541,
    "late_fusion": 34_712_205,
    "multitask": 17_460_570,
    "contrastive": 22_772_096,
}


def count_parameters(model: nn.Module) -> int:
  return sum(p.numel() for p in model.parameters())  # shared modules yield their tensors once


# ---------------------------------------------------------------------------------------------------------
# Timed train steps.
# ---------------------------------------------------------------------------------------------------------
def build_step(model_name: str, batch: int, autocast: bool):
  """Model, optimizer and random inputs of one benchmark; returns a function that runs one train step."""
  torch.manual_seed(0)
  if model_name == "unet":  # the lecture's supervised S2 climate-zone recipe: cross-entropy, plain SGD 1e-4
    model = MODELS["supervised"]()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    inputs = (torch.rand(batch, NUM_S2_BANDS, PATCH_SIZE, PATCH_SIZE),)
    labels = torch.randint(0, NUM_CLIMATE_ZONES, (batch,))
    loss_of = lambda logits: F.cross_entropy(logits, labels)  # noqa: E731
  elif model_name == "dual":  # the contrastive recipe: NT-Xent at temperature 0.1, Adam 3e-4
    model = MODELS["contrastive"]()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-4)
    inputs = (torch.rand(batch, NUM_S2_BANDS, PATCH_SIZE, PATCH_SIZE),
              torch.rand(batch, NUM_S1_BANDS, PATCH_SIZE, PATCH_SIZE))
    loss_of = lambda z: nt_xent(z, temperature=0.1)  # noqa: E731
  else:
    raise ValueError(f"unknown model {model_name!r}: expected unet or dual")
  model.train()

  def step() -> float:
    optimizer.zero_grad(set_to_none=True)
    # torch's usual mixed precision: forward and loss under autocast, backward and update outside, the
    # parameters and optimizer state staying float32.
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
      loss = loss_of(model(*inputs))
    loss.backward()
    optimizer.step()
    return loss.item()  # waits for the step, so the clock around it sees all of its work

  return step


def run_steps(model_name: str, batch: int, steps: int, warmup: int, threads: int, autocast: bool) -> dict:
  if batch < 1 or steps < 1 or warmup < 0 or threads < 1:
    raise ValueError("need BATCH >= 1, STEPS >= 1, --warmup >= 0, --threads >= 1")
  if model_name == "dual" and batch < 2:
    raise ValueError("the dual encoder needs BATCH >= 2: with one pair the partner is the only candidate "
                     "and NT-Xent is 0 whatever the model does")
  torch.set_num_threads(threads)
  step = build_step(model_name, batch, autocast)
  losses, times = [], []
  for _ in range(warmup + steps):
    start = time.perf_counter()
    losses.append(step())
    times.append(time.perf_counter() - start)
  timed = times[warmup:]
  step_s = statistics.fmean(timed)
  return {
      "model": model_name,
      "batch": batch,
      "autocast": autocast,
      "images_per_s": batch / step_s,
      "step_s": step_s,
      "step_times_s": [round(t, 3) for t in timed],
      "first_loss": losses[0],
      "last_loss": losses[-1],
      "first_step_s": times[0],
      "warmup_steps": warmup,
      "timed_steps": steps,
      "threads": torch.get_num_threads(),
      "torch": torch.__version__,
      "cpu_capability": torch.backends.cpu.get_cpu_capability(),
      # ru_maxrss is in KiB on Linux.
      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
  }


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  commands = parser.add_subparsers(dest="command", required=True)
  commands.add_parser("counts", help="print {model: parameters} of the five reference models as JSON")
  step = commands.add_parser("step", help="time train steps on random inputs, print one JSON line")
  step.add_argument("model", choices=("unet", "dual"))
  step.add_argument("batch", type=int)
  step.add_argument("steps", type=int, help="timed steps, each timed on its own")
  step.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
  step.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
  step.add_argument("--autocast", action="store_true", help="forward + loss under CPU bfloat16 autocast")
  return parser.parse_args(argv)


def main(argv=None) -> None:
  args = parse_args(argv)
  if args.command == "counts":
    counts = {name: count_parameters(build()) for name, build in MODELS.items()}
    print(json.dumps(counts))
    if counts != REFERENCE_PARAMETER_COUNTS:
      raise SystemExit(f"parameter counts differ from the reference's: {REFERENCE_PARAMETER_COUNTS}")
  else:
    print(json.dumps(run_steps(args.model, args.batch, args.steps, args.warmup, args.threads, args.autocast)),
          flush=True)


if __name__ == "__main__":
  main()
