"""Writes the small torch.save files (and their expected arrays as .npz) that tests/test_weights_pth.py reads.

Needs only torch (and the numpy it brings); the tests themselves run without torch. Run from the repository
root with an environment that has torch:

  python scripts/torch_fixtures/reader_cases.py --out tests/fixtures/pth

Files written (fixed seeds; all but legacy.pth come out byte-identical on a rerun, legacy.pth's storage
keys are object ids, so only its content repeats):
- dtypes.pth: one tensor per dtype the reader maps (incl. bfloat16, complex64, uint16 and float8, the last
  two pickled by torch 2.x with _rebuild_tensor_v3 over an UntypedStorage), a 0-d tensor and a
  num_batches_tracked-like int64 scalar. Saved through a file object, so its zip root folder is 'archive'.
- views.pth: a checkpoint {"state_dict": ..., "epoch": 7, "name": "x", ...} whose tensors are views of one
  another (storage offset, t(), [:, ::2]), two entries sharing one storage, an nn.Parameter, nested dicts,
  an argparse.Namespace under "args" (MAE/DINO-style checkpoints store one) and an optimizer state dict.
- renamed_root.pth: saved as other_root.pth and renamed, so its zip root folder ('other_root') is neither
  'archive' nor the file's stem; pickled with protocol 4 (STACK_GLOBAL, frames) instead of torch's 2.
- forbidden_global.pth: a state dict whose pickle also references builtins.print (via __reduce__, with a
  harmless argument): the reader must refuse it by name without calling it.
- whole_module.pth: torch.save of an nn.Module object itself (not its state_dict): refused too.
- legacy.pth: the pre-1.6 non-zip format (_use_new_zipfile_serialization=False).
Each readable file has NAME.npz next to it: the flat "."-joined keys of its tensors, written from torch via
.numpy(); dtypes numpy lacks (bfloat16, float8) are stored as their raw bits (int16 / uint8), and the
array "__dtypes__" lists "key=dtype name" for every key, so the tests compare dtype names and bits.
"""

import argparse
import collections
import io
import os
import pathlib
import zipfile

import numpy as np
import torch

# Raw bits for the dtypes numpy has no type for; the name is what ml_dtypes calls the dtype.
_BITS = {
    torch.bfloat16: (torch.int16, "bfloat16"),
    torch.float8_e4m3fn: (torch.uint8, "float8_e4m3fn"),
    torch.float8_e5m2: (torch.uint8, "float8_e5m2"),
}


class PrintOnLoad:
  """Unpickles as builtins.print("...") in an unrestricted loader: visible, and harmless."""

  def __reduce__(self):
    return (print, ("PTH-FIXTURE: this print ran, so the loader executed a pickled global",))


def _expected(tree, prefix=""):
  """The flat "."-joined tensor leaves of `tree` as numpy arrays, and their dtype names."""
  arrays, dtypes = {}, {}
  if isinstance(tree, argparse.Namespace):
    tree = vars(tree)
  if isinstance(tree, dict):
    items = tree.items()
  elif isinstance(tree, (list, tuple)):
    items = enumerate(tree)
  elif isinstance(tree, torch.Tensor):
    tensor = tree.detach()
    if tensor.dtype in _BITS:
      bits, name = _BITS[tensor.dtype]
      arrays[prefix], dtypes[prefix] = tensor.contiguous().view(bits).numpy().copy(), name
    else:
      arrays[prefix] = tensor.numpy().copy()
      dtypes[prefix] = arrays[prefix].dtype.name
    return arrays, dtypes
  else:
    return arrays, dtypes
  for key, value in items:
    sub_arrays, sub_dtypes = _expected(value, f"{prefix}.{key}" if prefix else str(key))
    arrays.update(sub_arrays)
    dtypes.update(sub_dtypes)
  return arrays, dtypes


def _write_npz(obj, path: pathlib.Path) -> None:
  """np.savez's layout, with fixed member timestamps, so that reruns write identical bytes."""
  arrays, dtypes = _expected(obj)
  arrays["__dtypes__"] = np.array([f"{key}={name}" for key, name in sorted(dtypes.items())])
  with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
    for key, array in arrays.items():
      with archive.open(zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0)), "w") as member:
        np.lib.format.write_array(member, array.copy(order="C"), allow_pickle=False)


def dtypes_case():
  generator = torch.Generator().manual_seed(1)
  normal = torch.randn(3, 5, generator=generator)
  return collections.OrderedDict([
      ("float32", normal),
      ("float16", torch.randn(2, 3, generator=generator).half()),
      ("bfloat16", torch.randn(4, 3, generator=generator).bfloat16()),
      ("float64", torch.randn(2, 2, generator=generator).double()),
      ("int64", torch.randint(-2**40, 2**40, (5,), generator=generator)),
      ("int32", torch.randint(-2**30, 2**30, (2, 3), generator=generator, dtype=torch.int32)),
      ("int16", torch.randint(-2**14, 2**14, (3,), generator=generator, dtype=torch.int16)),
      ("int8", torch.randint(-128, 128, (4,), generator=generator, dtype=torch.int8)),
      ("uint8", torch.randint(0, 256, (2, 2), generator=generator, dtype=torch.uint8)),
      ("bool", torch.randn(5, generator=generator) > 0),
      ("complex64", torch.randn(3, generator=generator, dtype=torch.complex64)),
      ("uint16", torch.randint(0, 2**16, (4,), generator=generator, dtype=torch.int32).to(torch.uint16)),
      ("float8_e4m3fn", torch.randn(6, generator=generator).to(torch.float8_e4m3fn)),
      ("float8_e5m2", torch.randn(2, 3, generator=generator).to(torch.float8_e5m2)),
      ("scalar", torch.tensor(2.5)),
      ("bn.num_batches_tracked", torch.tensor(1234, dtype=torch.long)),
  ])


def views_case():
  generator = torch.Generator().manual_seed(2)
  base = torch.randn(4, 6, generator=generator)
  shared = torch.randn(5, generator=generator)
  conv = torch.nn.Conv2d(2, 3, 3)
  with torch.no_grad():
    conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator))
    conv.bias.copy_(torch.randn(conv.bias.shape, generator=generator))
  optimizer = torch.optim.SGD(conv.parameters(), lr=0.1, momentum=0.9)
  conv(torch.randn(1, 2, 5, 5, generator=generator)).sum().backward()
  optimizer.step()  # creates momentum buffers: an optimizer state dict with int keys and a param list
  state_dict = collections.OrderedDict([
      ("module.encoder_q.base", base),
      ("module.encoder_q.row_slice", base[1:3]),      # storage offset 6
      ("module.encoder_q.transposed", base.t()),      # strides (1, 6)
      ("module.encoder_q.every_other", base[:, ::2]),  # strides (6, 2)
      ("module.encoder_q.column", base[:, 4]),        # offset 4, stride 6
      ("module.encoder_q.element", base[2, 3]),       # 0-d view at offset 15
      ("module.shared_a", shared),
      ("module.shared_b", shared),                    # the same tensor twice: one storage, one record
      ("module.shared_tail", shared[2:]),
      ("module.param", torch.nn.Parameter(torch.randn(2, 2, generator=generator))),
      ("module.conv.weight", conv.weight),
      ("module.conv.bias", conv.bias),
  ])
  return {
      "state_dict": state_dict,
      "epoch": 7,
      "name": "x",
      "arch": "resnet18",
      "losses": [0.5, 0.25],
      "args": argparse.Namespace(lr=0.1, arch="resnet18", bands=["B2", "B3"]),
      "optimizer": optimizer.state_dict(),
  }


def renamed_case():
  generator = torch.Generator().manual_seed(3)
  return {"backbone.weight": torch.randn(3, 2, generator=generator), "backbone.bias": torch.zeros(3)}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True, type=pathlib.Path)
  out = parser.parse_args().out
  out.mkdir(parents=True, exist_ok=True)
  torch.manual_seed(0)

  dtypes = dtypes_case()
  buffer = io.BytesIO()  # torch names the zip root 'archive' for file objects
  torch.save(dtypes, buffer)
  (out / "dtypes.pth").write_bytes(buffer.getvalue())
  _write_npz(dtypes, out / "dtypes.npz")

  views = views_case()
  torch.save(views, out / "views.pth")  # zip root 'views': torch uses the file's stem
  _write_npz(views, out / "views.npz")

  renamed = renamed_case()
  torch.save(renamed, out / "other_root.pth", pickle_protocol=4)
  os.replace(out / "other_root.pth", out / "renamed_root.pth")
  _write_npz(renamed, out / "renamed_root.npz")

  torch.save({"weight": torch.ones(2), "hook": PrintOnLoad()}, out / "forbidden_global.pth")
  torch.save(torch.nn.Linear(2, 1), out / "whole_module.pth")
  torch.save({"weight": torch.arange(4.0)}, out / "legacy.pth", _use_new_zipfile_serialization=False)

  total = sum(path.stat().st_size for path in out.iterdir())
  print(f"wrote {len(list(out.iterdir()))} files, {total} bytes, to {out} (torch {torch.__version__})")


if __name__ == "__main__":
  main()
