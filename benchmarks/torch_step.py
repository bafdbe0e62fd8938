"""PyTorch reference train steps (U-Net SGD, dual-encoder NT-Xent Adam), optionally under bf16 autocast.

    /tmp/torchvenv/bin/python benchmarks/torch_step.py unet|dual BATCH STEPS [--autocast] [--threads 2]

Imports the models of ../shared/bench/torch_reference.py by path (never installed in the project venv) and
times the same step as its `step` command: one warm-up step, then STEPS timed steps. `--autocast` wraps the
forward pass and the loss in `torch.autocast("cpu", dtype=torch.bfloat16)`, the usual torch mixed precision
recipe (backward and optimizer stay outside, parameters stay float32). Prints one JSON line.
"""

import argparse
import importlib.util
import json
import pathlib
import resource
import time

import torch
import torch.nn.functional as F

REFERENCE = pathlib.Path(__file__).resolve().parents[2] / "shared" / "bench" / "torch_reference.py"


def load_reference(path: pathlib.Path):
  spec = importlib.util.spec_from_file_location("torch_reference", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def nt_xent(z: torch.Tensor, temperature: float) -> torch.Tensor:
  """NT-Xent over [z_a; z_b] (2B rows): row i's positive is row i +- B, every other row a negative."""
  z = F.normalize(z.float(), dim=1)
  n = z.shape[0] // 2
  logits = z @ z.t() / temperature
  logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool), float("-inf"))
  targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
  return F.cross_entropy(logits, targets)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("model", choices=("unet", "dual"))
  parser.add_argument("batch", type=int)
  parser.add_argument("steps", type=int)
  parser.add_argument("--autocast", action="store_true")
  parser.add_argument("--threads", type=int, default=2)
  parser.add_argument("--reference", default=str(REFERENCE))
  args = parser.parse_args()
  torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  ref = load_reference(pathlib.Path(args.reference))
  b = args.batch
  if args.model == "unet":  # exactly torch_reference.py's `step`
    model = ref.ClassificationUNet(12, 12)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    inputs = (torch.rand(b, 12, 120, 120),)
    y = torch.randint(0, 12, (b,))
    loss_of = lambda out: F.cross_entropy(out, y)  # noqa: E731
  else:  # the lecture's contrastive recipe: Adam 3e-4, NT-Xent at temperature 0.1 over S2/S1 pairs
    model = ref.DualEncoder()
    opt = torch.optim.Adam(model.parameters(), lr=3e-4)
    inputs = (torch.rand(b, 12, 120, 120), torch.rand(b, 2, 120, 120))
    loss_of = lambda out: nt_xent(out, 0.1)  # noqa: E731
  model.train()

  def step():
    opt.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.autocast):
      loss = loss_of(model(*inputs))
    loss.backward()
    opt.step()
    return float(loss)

  start = time.perf_counter()
  first_loss = step()
  first_s = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(args.steps):
    step()
  dt = (time.perf_counter() - start) / args.steps
  print(json.dumps({"images_per_s": b / dt, "step_s": dt, "first_step_s": first_s, "first_loss": first_loss,
                    "threads": torch.get_num_threads(), "torch": torch.__version__,
                    "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                    "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


if __name__ == "__main__":
  main()
