"""Writes the .pth + .npz fixtures of tests/test_weights_layouts.py with torch (not a project dependency).

Run with a throwaway torch: `/tmp/torchvenv/bin/python scripts/torch_fixtures/resnet_cases.py --out
tests/fixtures/pth`. Every number comes from fixed seeds, so a rerun writes the same arrays (torch's zip
files still differ byte-wise: each holds a fresh serialization id).

Files, each `NAME.pth` with `NAME.npz` beside it (torch's features for a fixed input, eval mode):
- resnet18_w8_s2: torchvision-layout ResNet-18, width 8, 13 input channels (S2 with B10), fc 10 classes.
- resnet50_w4_s2: torchvision-layout ResNet-50, width 4 (bottlenecks 16 out), 13 input channels, fc.
- moco_resnet18_w2: an SSL4EO-S12 MoCo-v2 checkpoint {epoch, arch, state_dict: module.encoder_q.* (with
  the MLP head fc.0/fc.2), module.encoder_k.* (other values), module.queue, module.queue_ptr; optimizer}.
- dino_resnet18_w2: an SSL4EO-S12 DINO checkpoint {student, teacher: module.backbone.* and module.head.*
  (weight-normed last layer), optimizer, epoch, dino_loss.center}; teacher and student differ.
- dual_resnet18_w2: Scheibenreif et al.'s dual ResNet as SSLTransformerRS saves it, {"state_dict":
  {backbone1.* (S1, 2 channels VV, VH), backbone2.* (S2, 13 channels)}, "epoch"}, each backbone's fc its
  own SimCLR head fc.0 Linear(16, 16), ReLU, fc.2 Linear(16, 16): the shapes of
  `configs.contrastive.get_config("tiny,separate_projectors")` with model.width = 2 and model.projector =
  (16, 16), so that dual encoder loads it whole (encoders and both projectors).
The npz hold `input` (NCHW 2 x C x 33 x 33, values k/256 in [0, 1), stored as float16, which holds them
exactly), `features` (float32, pooled after layer4) and, for 13 bands, `features_b10_zero` (the same input
with B10, channel 10, set to 0); the dual one `input_s1`, `input_s2`, `features_s1`, `features_s2`,
`features_s2_b10_zero`, `projection_s1`, `projection_s2` (each backbone's fc head on its pooled features).
Widths: the two torchvision files are 8 (ResNet-18) and 4 (ResNet-50); the MoCo, DINO and dual files hold
two ResNets each and are at width 2, so that all files together stay near 2 MB.
"""

import argparse
import pathlib

import numpy as np
import torch
from torch import nn

import torch_resnet

B10 = 10  # index of B10 among the 13 bands B01..B08, B8A, B09, B10, B11, B12
# Odd, so that every stride-2 layer meets an odd size (padding asymmetries show); layer4 is 2 x 2.
IMAGE = 33


def _input(channels: int, seed: int) -> torch.Tensor:
  generator = torch.Generator().manual_seed(seed)
  # Multiples of 1/256: exact in float32 (and float16), so the npz holds the very input torch saw.
  return torch.randint(0, 256, (2, channels, IMAGE, IMAGE), generator=generator).float() / 256


def _resnet(arch: str, in_channels: int, width: int, seed: int, num_classes: int = 10):
  torch.manual_seed(seed)
  model, _ = torch_resnet.build(arch, in_channels=in_channels, width=width, num_classes=num_classes)
  generator = torch.Generator().manual_seed(seed + 1)
  torch_resnet.randomize_batch_norm(model, generator, IMAGE)
  torch_resnet.randomize_linear(model.fc, generator)
  return model


@torch.no_grad()
def _features(model, x: torch.Tensor) -> dict:
  out = {"features": torch_resnet.pooled_features(model, x).numpy()}
  if x.shape[1] == 13:
    zeroed = x.clone()
    zeroed[:, B10] = 0
    out["features_b10_zero"] = torch_resnet.pooled_features(model, zeroed).numpy()
  return out


def _save(out: pathlib.Path, name: str, checkpoint, arrays: dict) -> None:
  torch.save(checkpoint, out / f"{name}.pth")
  stored = {key: np.asarray(value, np.float16 if key.startswith("input") else np.float32)
            for key, value in arrays.items()}
  assert all(np.array_equal(stored[key], np.asarray(value)) for key, value in arrays.items()
             if key.startswith("input")), "inputs must be exact in float16"
  np.savez_compressed(out / f"{name}.npz", **stored)
  print(f"{name}: {(out / f'{name}.pth').stat().st_size / 1e3:.0f} kB pth, "
        f"{(out / f'{name}.npz').stat().st_size / 1e3:.0f} kB npz; npz keys {sorted(arrays)}")


def _prefixed(state: dict, prefix: str) -> dict:
  return {prefix + key: value for key, value in state.items()}


def torchvision_cases(out: pathlib.Path) -> None:
  for name, arch, width, seed in (("resnet18_w8_s2", "resnet18", 8, 100),
                                  ("resnet50_w4_s2", "resnet50", 4, 200)):
    model = _resnet(arch, 13, width, seed)
    x = _input(13, seed + 2)
    _save(out, name, model.state_dict(), {"input": x, **_features(model, x)})


def moco_case(out: pathlib.Path) -> None:
  encoder_q = _resnet("resnet18", 13, 2, 300)
  dim_mlp, dim = encoder_q.fc.in_features, 16
  torch.manual_seed(301)
  # MoCo-v2 (mlp=True) replaces fc by Linear(dim_mlp, dim_mlp), ReLU, Linear(dim_mlp, dim).
  encoder_q.fc = nn.Sequential(nn.Linear(dim_mlp, dim_mlp), nn.ReLU(), nn.Linear(dim_mlp, dim))
  encoder_k = _resnet("resnet18", 13, 2, 310)  # a momentum copy has drifted: other values on purpose
  encoder_k.fc = nn.Sequential(nn.Linear(dim_mlp, dim_mlp), nn.ReLU(), nn.Linear(dim_mlp, dim))
  state = {**_prefixed(encoder_q.state_dict(), "module.encoder_q."),
           **_prefixed(encoder_k.state_dict(), "module.encoder_k.")}
  generator = torch.Generator().manual_seed(302)
  state["module.queue"] = nn.functional.normalize(torch.randn(dim, 64, generator=generator), dim=0)
  state["module.queue_ptr"] = torch.tensor([32], dtype=torch.long)
  optimizer = torch.optim.SGD(encoder_q.parameters(), lr=0.03, momentum=0.9, weight_decay=1e-4)
  checkpoint = {"epoch": 100, "arch": "resnet18", "state_dict": state, "optimizer": optimizer.state_dict()}
  x = _input(13, 303)
  _save(out, "moco_resnet18_w2", checkpoint, {"input": x, **_features(encoder_q, x)})


def _dino_head(in_dim: int, generator) -> dict:
  """DINOHead's state: mlp Linear-GELU-Linear-GELU-Linear, then a weight-normed last layer."""
  shapes = {"mlp.0.weight": (32, in_dim), "mlp.0.bias": (32,), "mlp.2.weight": (32, 32), "mlp.2.bias": (32,),
            "mlp.4.weight": (8, 32), "mlp.4.bias": (8,), "last_layer.weight_g": (24, 1),
            "last_layer.weight_v": (24, 8)}
  return {key: torch.randn(shape, generator=generator) for key, shape in shapes.items()}


def _backbone(model) -> dict:
  return {key: value for key, value in model.state_dict().items() if not key.startswith("fc.")}


def dino_case(out: pathlib.Path) -> None:
  teacher = _resnet("resnet18", 13, 2, 400)
  student = _resnet("resnet18", 13, 2, 410)
  generator = torch.Generator().manual_seed(402)
  # DINO replaces the backbone's fc by Identity; DDP wraps both networks (ResNets have BatchNorm).
  checkpoint = {
      "student": {**_prefixed(_backbone(student), "module.backbone."),
                  **_prefixed(_dino_head(16, generator), "module.head.")},
      "teacher": {**_prefixed(_backbone(teacher), "module.backbone."),
                  **_prefixed(_dino_head(16, generator), "module.head.")},
      "optimizer": torch.optim.SGD(student.parameters(), lr=0.1).state_dict(),
      "epoch": 100,
      "dino_loss": {"center": torch.randn(1, 24, generator=generator)},
  }
  x = _input(13, 403)
  _save(out, "dino_resnet18_w2", checkpoint, {"input": x, **_features(teacher, x)})


class DualResNet(nn.Module):
  """SSLTransformerRS's DoubleResNetSimCLR: two torchvision ResNets whose fc is each one's own SimCLR head
  Sequential(Linear(d, d), ReLU, Linear(d, emb_dim))."""

  def __init__(self, width: int, emb_dim: int):
    super().__init__()
    self.backbone1 = _resnet("resnet18", 2, width, 500)
    self.backbone2 = _resnet("resnet18", 13, width, 510)
    torch.manual_seed(520)
    features = width * 8
    for backbone in (self.backbone1, self.backbone2):
      backbone.fc = nn.Sequential(nn.Linear(features, features), nn.ReLU(), nn.Linear(features, emb_dim))


@torch.no_grad()
def dual_case(out: pathlib.Path) -> None:
  model = DualResNet(2, 16).eval()
  x1, x2 = _input(2, 530), _input(13, 531)
  f1 = torch_resnet.pooled_features(model.backbone1, x1)
  f2 = torch_resnet.pooled_features(model.backbone2, x2)
  zeroed = x2.clone()
  zeroed[:, B10] = 0
  arrays = {"input_s1": x1, "input_s2": x2, "features_s1": f1, "features_s2": f2,
            "features_s2_b10_zero": torch_resnet.pooled_features(model.backbone2, zeroed),
            "projection_s1": model.backbone1.fc(f1), "projection_s2": model.backbone2.fc(f2)}
  # SSLTransformerRS saves {"state_dict": model.state_dict(), ...} (its loader reads weights["state_dict"]).
  _save(out, "dual_resnet18_w2", {"state_dict": model.state_dict(), "epoch": 200}, arrays)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("tests/fixtures/pth"))
  out = parser.parse_args().out
  out.mkdir(parents=True, exist_ok=True)
  torch.use_deterministic_algorithms(True)
  torchvision_cases(out)
  moco_case(out)
  dino_case(out)
  dual_case(out)


if __name__ == "__main__":
  main()
