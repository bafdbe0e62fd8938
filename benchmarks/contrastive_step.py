"""Benchmark: the contrastive dual-encoder train step (pairs/s, compile time, peak RSS), JAX vs PyTorch.

    python benchmarks/contrastive_step.py [--torch-python /tmp/torchvenv/bin/python] [--quick]
        [--recipes default,cpu_env] [--dtypes float32,bfloat16] [--out benchmarks/results/contrastive_step.json]

Same conventions as benchmarks/train_step.py (one fresh subprocess per configuration, peak RSS from
os.wait4, torch alternating with JAX under the same environment recipe, load average recorded). The JAX
step is the engine's: the default configs/contrastive.py (two ResNet-18 for S2 (12 ch) and S1 (2 ch),
shared projector, 22,772,096 parameters, NT-Xent at temperature 0.1, Adam 3e-4) at batch 64 pairs of
120x120 patches. The torch side is benchmarks/torch_reference.py's dual encoder with the same NT-Xent and
Adam. `images_per_s` in the runs counts pairs. `--quick`: float32 only.
"""

import argparse
import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import train_step as bench  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

BATCH = 64


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--torch-python", help="python of a venv with torch (e.g. /tmp/torchvenv/bin/python)")
  parser.add_argument("--quick", action="store_true", help="float32 only")
  parser.add_argument("--recipes", default="default,cpu_env", help=f"comma-separated, of {sorted(bench.RECIPES)}")
  parser.add_argument("--dtypes", default="float32,bfloat16")
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--out", default=str(bench.REPO / "benchmarks" / "results" / "contrastive_step.json"))
  args = parser.parse_args()
  dtypes = ["float32"] if args.quick else args.dtypes.split(",")
  recipes = args.recipes.split(",")
  env = bench.environment(args.torch_python)
  runs = []
  for dtype in dtypes:
    for recipe in recipes:
      runs.append(bench.run_jax("contrastive", BATCH, dtype, recipe, "auto", args.warmup, args.steps))
      if args.torch_python:
        runs.append(bench.run_torch(args.torch_python, "dual", BATCH, dtype == "bfloat16", recipe, args.warmup,
                                    args.steps))
  for run in runs:  # the unit of this benchmark is a S2/S1 pair
    if "images_per_s" in run:
      run["pairs_per_s"] = run["images_per_s"]
  env["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
  report = {"benchmark": "contrastive dual-encoder train step (configs/contrastive.py, batch 64 S2/S1 pairs, "
                         "120x120, NT-Xent, Adam 3e-4); images_per_s = pairs/s",
            "command": " ".join(["python", "benchmarks/contrastive_step.py"] + sys.argv[1:]),
            "environment": env, "runs": runs,
            "ratios": bench.summarize(runs, [BATCH], recipes, dtypes, ["auto"])}
  bench.write_report(report, args.out)


if __name__ == "__main__":
  main()
