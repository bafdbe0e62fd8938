"""Full-size ResNet-18/50 parity: torch's pooled features against ours after weights.convert, two steps.

`torch` step (a python with torch, e.g. /tmp/torchvenv): builds ResNet-18 and ResNet-50 at width 64 with 13
input channels (torchvision's classes with conv1 replaced where torchvision imports, else the copy in
torch_resnet.py with the same names), random weights and BatchNorm statistics, and writes DIR/NAME.pth
and DIR/NAME.npz (input 2 x 13 x 120 x 120, features, features_b10_zero).
`jax` step (the project's venv, no torch): reads each .pth with weights.pth.read_pth, converts it with
weights.convert.build_source, loads it with transfer.apply_mapping's identity mapping into our resnet18/50
(13 bands, and 12 bands without B10) and prints and writes (--json) the max relative difference of the
pooled features (max abs difference / max abs value); exit status 1 above --tolerance (1e-5).
full_size_parity.sh runs both.
"""

import argparse
import json
import pathlib
import sys
import time

ARCHS = ("resnet18", "resnet50")
B10 = 10


def torch_step(directory: pathlib.Path) -> None:
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top

  import torch_resnet  # pylint: disable=g-import-not-at-top

  torch.use_deterministic_algorithms(True)
  directory.mkdir(parents=True, exist_ok=True)
  for index, arch in enumerate(ARCHS):
    torch.manual_seed(1000 + index)
    model, implementation = torch_resnet.build(arch, in_channels=13, prefer_torchvision=True)
    generator = torch.Generator().manual_seed(2000 + index)
    torch_resnet.randomize_batch_norm(model, generator, image_size=120)
    x = torch.randint(0, 256, (2, 13, 120, 120), generator=generator).float() / 256
    zeroed = x.clone()
    zeroed[:, B10] = 0
    with torch.no_grad():
      features = torch_resnet.pooled_features(model, x)
      features_b10_zero = torch_resnet.pooled_features(model, zeroed)
    torch.save(model.state_dict(), directory / f"{arch}.pth")
    np.savez(directory / f"{arch}.npz", input=x.numpy(), features=features.numpy(),
             features_b10_zero=features_b10_zero.numpy(), implementation=np.array(implementation),
             torch_version=np.array(torch.__version__))
    print(f"torch: wrote {arch} ({implementation}, torch {torch.__version__}) to {directory}")


def jax_step(directory: pathlib.Path, json_path: pathlib.Path | None, tolerance: float) -> int:
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))  # the repository root
  # pylint: disable=g-import-not-at-top
  from flax import nnx
  from flax import traverse_util
  import jax
  import jax.numpy as jnp
  import numpy as np

  from labeleff_jax import transfer
  from labeleff_jax.models import resnet
  from labeleff_jax.weights import convert
  from labeleff_jax.weights.pth import read_pth
  # pylint: enable=g-import-not-at-top

  def int_keys(tree):
    if not isinstance(tree, dict):
      return tree
    return {(int(k) if k.isdigit() else k): int_keys(v) for k, v in tree.items()}

  @nnx.jit
  def pooled(model, x):
    return model(x).mean(axis=(1, 2))

  results = {"tolerance": tolerance, "device": str(jax.devices()[0]), "jax_version": jax.__version__}
  worst = 0.0
  for arch in ARCHS:
    state = read_pth(directory / f"{arch}.pth")
    with np.load(directory / f"{arch}.npz") as npz:
      expected = {key: npz[key] for key in npz.files}
    entry = {"implementation": str(expected["implementation"]),
             "torch_version": str(expected["torch_version"])}
    for bands, in_channels, x, reference in (
        (convert.S2_13_BANDS, 13, expected["input"], expected["features"]),
        (None, 12, np.delete(expected["input"], B10, axis=1), expected["features_b10_zero"])):
      # Abstract build, then every array from the file: eager initialisation of 25M parameters is slow.
      model = nnx.eval_shape(lambda: getattr(resnet, arch)(in_channels, rngs=nnx.Rngs(0)))  # noqa: B023
      model_state = nnx.state(model)
      target = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), nnx.to_pure_dict(model_state))
      start = time.perf_counter()
      source, info = convert.build_source(state, target, encoder_prefixes={"encoder": ""}, data_bands=bands)
      new_flat, report = transfer.apply_mapping(target, source, [("", "")])
      seconds = time.perf_counter() - start
      if report["fresh"]:
        raise SystemExit(f"{arch}: arrays not loaded: {report['fresh'][:5]}")
      nnx.replace_by_pure_dict(model_state, int_keys(traverse_util.unflatten_dict(new_flat, sep="/")))
      nnx.update(model, model_state)
      model.eval()
      ours = np.asarray(pooled(model, jnp.asarray(x.transpose(0, 2, 3, 1))))
      relative = float(np.max(np.abs(ours - reference)) / np.max(np.abs(reference)))
      worst = max(worst, relative)
      entry[f"{in_channels}_band"] = {
          "max_relative_difference": relative, "max_abs_feature": float(np.max(np.abs(reference))),
          "features": list(reference.shape), "layout": info["layout"], "architecture": info["architecture"],
          "width": info["width"], "bands": info["bands"], "skipped": info["skipped"],
          "arrays_loaded": len(report["loaded"]), "convert_and_map_seconds": round(seconds, 2)}
      print(f"{arch} {in_channels} bands{' (B10 dropped; torch: B10 = 0)' if in_channels == 12 else ''}: "
            f"max relative difference {relative:.2e} over {reference.shape} features "
            f"(max |feature| {np.max(np.abs(reference)):.3g}); {len(report['loaded'])} arrays; "
            f"bands {info['bands']}; skipped {info['skipped']}")
    results[arch] = entry
  results["max_relative_difference"] = worst
  results["passed"] = worst <= tolerance
  print(f"max relative difference {worst:.2e} (tolerance {tolerance:g}): "
        f"{'PASSED' if results['passed'] else 'FAILED'}")
  if json_path is not None:
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {json_path}")
  return 0 if results["passed"] else 1


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("step", choices=("torch", "jax"))
  parser.add_argument("--dir", type=pathlib.Path, required=True, help="folder for the .pth and .npz files")
  parser.add_argument("--json", type=pathlib.Path, default=None, help="jax step: write the results here")
  parser.add_argument("--tolerance", type=float, default=1e-5)
  args = parser.parse_args()
  if args.step == "torch":
    torch_step(args.dir)
  else:
    sys.exit(jax_step(args.dir, args.json, args.tolerance))


if __name__ == "__main__":
  main()
