"""Reads PyTorch .pth files (torch.save's zip format) as numpy arrays, without torch and without running code.

A .pth file written by torch.save since torch 1.6 is a zip archive with one root folder (torch names it after
the file's stem, or 'archive' for file objects; it is read from the archive, never assumed):
  ROOT/data.pkl      the pickled object; every tensor's bytes are out of band, as persistent ids
  ROOT/data/<key>    one record per storage, the raw little-endian bytes
  ROOT/byteorder     'little' (absent in files from older torch versions, which wrote little-endian)
  ROOT/version, ROOT/.format_version, ROOT/.storage_alignment, ROOT/.data/serialization_id: not needed here
The pickle is read by a restricted unpickler: it resolves only the globals such files need (OrderedDict,
torch's tensor/parameter rebuild functions, storage classes, dtypes, argparse.Namespace as a plain dict) to
functions of this module, and refuses every other global with a PthError naming it, so a malicious file
cannot run code. `pickle.load` (unrestricted) and `eval` are never used.

What torch 2.13 pickles for a state dict: `collections.OrderedDict`, `torch._utils._rebuild_tensor_v2` over
the legacy typed-storage classes (`torch.FloatStorage`, `torch.BFloat16Storage`, ...) for the classic dtypes,
`torch._utils._rebuild_tensor_v3` over `torch.storage.UntypedStorage` plus a dtype global (`torch.uint16`,
`torch.float8_e4m3fn`, ...) for the newer dtypes, `torch._utils._rebuild_parameter` (or
`_rebuild_parameter_with_state` for a Parameter carrying Python attributes) for nn.Parameter, and
`argparse.Namespace` where a training script saved its `args` (MAE, DINO).

dtypes: bfloat16 and float8 come back as ml_dtypes types (ml_dtypes is a jax dependency). Without ml_dtypes,
bfloat16 is converted to float32 (exactly: bfloat16 is the upper half of a float32) and float8 is an error.

Not supported (each a PthError that says so): the legacy pre-1.6 format (re-save it with torch), big-endian
files, quantized and sparse tensors, tensors with the conj/neg bit set, pickled modules or other objects.
"""

import _compat_pickle
import collections
import io
import os
import pickle
import zipfile
import zlib
from typing import Any

import numpy as np

try:
  import ml_dtypes as _ml_dtypes
except ImportError:  # pragma: no cover - ml_dtypes ships with jax
  _ml_dtypes = None


class PthError(ValueError):
  """A .pth file this reader cannot or will not read (damaged, legacy format, forbidden global, ...)."""


# torch's legacy pickle magic number, the first thing a pre-1.6 torch.save file pickles.
_LEGACY_MAGIC = (0x1950A86A20F9469CFC6C).to_bytes(10, "little")

# The storage classes torch pickles as globals, by their dtype's name (ml_dtypes names for the types numpy
# lacks). Torch 1.6 to 2.13 writes `torch.<Name>Storage` for these whatever the device ('cuda:0' is only the
# location string in the persistent id, ignored here: everything loads to host memory).
_STORAGE_DTYPES = {
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "DoubleStorage": "float64",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128",
}

# `torch.<dtype>` globals (torch pickles a dtype as the global of its canonical name): the classic ones,
# plus those torch >= 2.1 saves with _rebuild_tensor_v3 over an untyped storage.
_TORCH_DTYPES = {
    "float32": "float32", "float16": "float16", "bfloat16": "bfloat16", "float64": "float64",
    "int64": "int64", "int32": "int32", "int16": "int16", "int8": "int8", "uint8": "uint8", "bool": "bool",
    "complex64": "complex64", "complex128": "complex128",
    "uint16": "uint16", "uint32": "uint32", "uint64": "uint64",
    "float8_e4m3fn": "float8_e4m3fn", "float8_e5m2": "float8_e5m2", "float8_e4m3fnuz": "float8_e4m3fnuz",
    "float8_e5m2fnuz": "float8_e5m2fnuz", "float8_e8m0fnu": "float8_e8m0fnu",
}


def _numpy_dtype(name: str, path) -> np.dtype:
  """The little-endian numpy dtype called `name` (ml_dtypes for bfloat16 and float8)."""
  if name == "bool":
    return np.dtype(np.bool_)
  if hasattr(np, name):
    return np.dtype(name).newbyteorder("<")
  if _ml_dtypes is not None and hasattr(_ml_dtypes, name):
    return np.dtype(getattr(_ml_dtypes, name))
  if name == "bfloat16":
    return np.dtype("<u2")  # read as raw bits; _Storage turns them into float32
  raise PthError(f"{path}: tensors of dtype {name} need the ml_dtypes package (pip install ml_dtypes)")


class _StorageType:
  """What a storage-class global unpickles to: only its dtype name matters."""

  def __init__(self, name: str, dtype_name: str):
    self.name, self.dtype_name = name, dtype_name

  def __repr__(self):
    return f"torch.{self.name}"


class _Dtype:
  """What a `torch.<dtype>` global unpickles to (a checkpoint may store one as a plain value, too)."""

  def __init__(self, name: str):
    self.name = name

  def __repr__(self):
    return f"torch.{self.name}"


class PickledNamespace(dict):
  """Stands in for argparse.Namespace (a training script's `args`): its attributes as a plain dict."""

  def __setstate__(self, state):
    if isinstance(state, tuple) and len(state) == 2:  # (dict state, slot state): both plain dicts
      state = {**(state[0] or {}), **(state[1] or {})}
    if not isinstance(state, dict):
      raise pickle.UnpicklingError(f"argparse.Namespace state is a {type(state).__name__}, not a dict")
    self.update(state)


class _Storage:
  """One storage record as a 1-d little-endian array; an UntypedStorage's is bytes (uint8)."""

  def __init__(self, key: str, array: np.ndarray, storage_type: _StorageType):
    self.key, self.array, self.storage_type = key, array, storage_type
    self.untyped = storage_type.name == "UntypedStorage"


def _check_ints(value, what: str, path) -> tuple[int, ...]:
  if not isinstance(value, (tuple, list)) or not all(type(v) is int for v in value):
    raise PthError(f"{path}: tensor {what} {value!r} is not a tuple of integers")
  return tuple(value)


def _view(storage: _Storage, dtype: np.dtype, offset, size, stride, path) -> np.ndarray:
  """The tensor (a contiguous copy) that `size`/`stride`/`offset` (in elements) describe over `storage`."""
  if not isinstance(storage, _Storage):
    raise PthError(f"{path}: a tensor's storage is a {type(storage).__name__}, not a storage record")
  size, stride = _check_ints(size, "size", path), _check_ints(stride, "stride", path)
  if type(offset) is not int:
    raise PthError(f"{path}: tensor storage offset {offset!r} is not an integer")
  data = storage.array
  if data.dtype != dtype:  # _rebuild_tensor_v3: the untyped storage's bytes reinterpreted as `dtype`
    if data.nbytes % dtype.itemsize:
      raise PthError(f"{path}: storage data/{storage.key} holds {data.nbytes} bytes, not a whole number of "
                     f"{dtype.name} elements")
    data = data.view(dtype)
  numel = data.size
  where = f"{path}: tensor of size {size}, stride {stride}, offset {offset} over storage data/{storage.key}"
  if len(size) != len(stride) or any(s < 0 for s in size) or any(s < 0 for s in stride) or offset < 0:
    raise PthError(f"{where} ({numel} elements): negative or mismatched size/stride/offset")
  if 0 in size:
    return np.zeros(size, dtype)
  last = offset + sum((s - 1) * st for s, st in zip(size, stride))
  if last >= numel:  # torch would refuse too; as_strided would read past the buffer
    raise PthError(f"{where} reaches element {last}, past the storage's {numel} elements")
  # as_strided goes through __array_interface__, which loses ml_dtypes types (bfloat16 comes back as '<V2'):
  # stride over same-sized raw bits, and view the copy as the dtype.
  bits = np.dtype(f"<u{dtype.itemsize}") if dtype.itemsize in (1, 2, 4, 8) else np.dtype(f"V{dtype.itemsize}")
  view = np.lib.stride_tricks.as_strided(data.view(bits)[offset:], shape=size,
                                         strides=tuple(s * dtype.itemsize for s in stride), writeable=False)
  try:
    # A copy: the caller gets its own C-contiguous array, not a window that keeps the whole storage alive.
    return np.array(view, copy=True, order="C").view(dtype)
  except MemoryError as error:  # stride-0 (expanded) dims can describe far more elements than stored
    raise PthError(f"{where}: {np.prod(size)} elements do not fit in memory") from error


class _Unpickler(pickle.Unpickler):
  """The restricted unpickler: known globals only, storages read from the zip on first use."""

  def __init__(self, data: bytes, archive: zipfile.ZipFile, root: str, path):
    super().__init__(io.BytesIO(data))
    self._archive, self._root, self._path = archive, root, path
    self._storages: dict[str, _Storage] = {}
    self._globals = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): self._rebuild_tensor_v2,
        ("torch._utils", "_rebuild_tensor_v3"): self._rebuild_tensor_v3,
        ("torch._utils", "_rebuild_parameter"): self._rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): self._rebuild_parameter_with_state,
        ("torch.storage", "UntypedStorage"): _StorageType("UntypedStorage", "uint8"),
        ("torch", "UntypedStorage"): _StorageType("UntypedStorage", "uint8"),
        ("argparse", "Namespace"): PickledNamespace,
    }
    self._globals.update({("torch", name): _StorageType(name, dtype)
                          for name, dtype in _STORAGE_DTYPES.items()})
    self._globals.update({("torch", name): _Dtype(name) for name in _TORCH_DTYPES})

  def find_class(self, module, name):
    # Protocol-2 pickles (torch.save's default) name Python 2 modules (__builtin__, copy_reg); map them with
    # pickle's own tables, so that the message names what would have run (builtins.print).
    module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
    module = _compat_pickle.IMPORT_MAPPING.get(module, module)
    found = self._globals.get((module, name))
    if found is None:
      hint = ""
      if module.startswith("torch.nn") or not module.startswith(("torch", "collections")):
        hint = (" (the file pickles an object, e.g. a whole nn.Module or optimizer object; this reader loads "
                "tensors, dicts, lists and plain values: save model.state_dict() instead)")
      raise PthError(f"{self._path}: the pickle references the global {module}.{name}, which a weights file "
                     f"does not need; refusing to load it{hint}")
    return found

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] in ("storage", b"storage")):
      raise PthError(f"{self._path}: unknown persistent id {pid!r:.200} (expected ('storage', type, key, "
                     "location, numel))")
    _, storage_type, key, _, numel = pid
    if not isinstance(storage_type, _StorageType) or not isinstance(key, str) or type(numel) is not int:
      raise PthError(f"{self._path}: malformed storage id {pid!r:.200}")
    storage = self._storages.get(key)
    if storage is None:
      storage = self._storages[key] = self._read_storage(storage_type, key, numel)
    elif storage.storage_type.name != storage_type.name:  # torch.save refuses to write this
      raise PthError(f"{self._path}: storage data/{key} is used as {storage.storage_type} and as "
                     f"{storage_type}")
    return storage

  def _read_storage(self, storage_type: _StorageType, key: str, numel: int) -> _Storage:
    dtype = _numpy_dtype(storage_type.dtype_name, self._path)
    name = f"{self._root}/data/{key}"
    try:
      info = self._archive.getinfo(name)
    except KeyError:
      raise PthError(f"{self._path}: the pickle refers to storage {key}, but the archive has no record "
                     f"{name}") from None
    nbytes = numel * dtype.itemsize
    if numel < 0 or info.file_size != nbytes:  # checked before reading: no decompressing of a huge record
      raise PthError(f"{self._path}: record {name} holds {info.file_size} bytes; {numel} elements of "
                     f"{storage_type} need {nbytes}")
    raw = _read_member(self._archive, name, self._path)
    array = np.frombuffer(raw, dtype=dtype)
    if storage_type.dtype_name == "bfloat16" and dtype == np.dtype("<u2"):  # no ml_dtypes: to float32
      array = (array.astype("<u4") << 16).view("<f4")
    return _Storage(key, array, storage_type)

  def _rebuild_tensor_v2(self, storage, storage_offset, size, stride, requires_grad=False,
                         backward_hooks=None, metadata=None):
    del requires_grad, backward_hooks  # autograd state: meaningless for numpy
    self._check_metadata(metadata)
    if not isinstance(storage, _Storage) or storage.untyped:
      raise PthError(f"{self._path}: _rebuild_tensor_v2 over {storage!r:.100}, not a typed storage")
    return _view(storage, storage.array.dtype, storage_offset, size, stride, self._path)

  def _rebuild_tensor_v3(self, storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype,
                         metadata=None):
    del requires_grad, backward_hooks
    self._check_metadata(metadata)
    if not isinstance(dtype, _Dtype):
      raise PthError(f"{self._path}: _rebuild_tensor_v3 with dtype {dtype!r:.100}, not a torch dtype")
    if not isinstance(storage, _Storage) or not storage.untyped:
      raise PthError(f"{self._path}: _rebuild_tensor_v3 over {storage!r:.100}, not an untyped storage")
    numpy_dtype = _numpy_dtype(_TORCH_DTYPES[dtype.name], self._path)
    if dtype.name == "bfloat16" and numpy_dtype == np.dtype("<u2"):
      raise PthError(f"{self._path}: an untyped-storage bfloat16 tensor needs the ml_dtypes package")
    return _view(storage, numpy_dtype, storage_offset, size, stride, self._path)

  def _check_metadata(self, metadata):
    # Torch records the conj and neg bits here; with either set the stored values are not the tensor's.
    if metadata and any(metadata.values()):
      raise PthError(f"{self._path}: a tensor with metadata {metadata!r:.200} (conj/neg bit), not supported")

  def _rebuild_parameter(self, data, requires_grad, backward_hooks):
    del requires_grad, backward_hooks
    return data

  def _rebuild_parameter_with_state(self, data, requires_grad, backward_hooks, state):
    del requires_grad, backward_hooks, state  # the state: Python attributes set on the Parameter
    return data


def _read_member(archive: zipfile.ZipFile, name: str, path) -> bytes:
  try:
    return archive.read(name)  # checks the CRC-32
  except (zipfile.BadZipFile, zlib.error, EOFError, OSError, RuntimeError, NotImplementedError) as error:
    raise PthError(f"{path}: cannot read record {name} ({type(error).__name__}: {error})") from error


def _describe_non_zip(path, head: bytes) -> str:
  if head.startswith(b"\x80") and _LEGACY_MAGIC in head[:32]:
    return (f"{path} is in torch's legacy (pre-1.6) serialization format, which this reader does not read. "
            "Re-save it in the zip format, in an environment with torch: "
            "torch.save(torch.load(f, map_location='cpu'), f2)")
  if head.startswith(b"\x80"):
    return (f"{path} is a bare pickle, not a torch.save zip archive; if torch.save wrote it, it is torch's "
            "legacy (pre-1.6) format: re-save it with torch.save(torch.load(f, map_location='cpu'), f2) in "
            "an environment with torch")
  if head.startswith(b"PK"):
    return f"{path} is a damaged or truncated zip archive (no readable central directory)"
  return f"{path} is neither a zip archive (torch.save's format) nor a pickle; first bytes {head[:8]!r}"


def _root_of(archive: zipfile.ZipFile, path) -> str:
  """The archive's root folder: the one holding data.pkl (torch names it after the file, not fixed)."""
  roots = sorted({name[:-len("/data.pkl")] for name in archive.namelist()
                  if name.endswith("/data.pkl") and name.count("/") == 1})
  if len(roots) != 1:
    raise PthError(f"{path}: expected one ROOT/data.pkl record in the zip archive, found "
                   f"{len(roots)} ({roots[:5]}); not a torch.save file")
  return roots[0]


def read_pth_object(path) -> Any:
  """The object torch.save wrote to `path`: its dicts, lists and plain values, with numpy arrays for tensors.

  An nn.Parameter becomes its array, an OrderedDict stays one, an argparse.Namespace becomes a
  PickledNamespace (a dict). As with torch.load, one tensor object saved under two keys comes back as one
  array under both. Raises PthError for anything that is not a readable, safe torch.save zip file.
  """
  path = os.fspath(path)
  with open(path, "rb") as file:
    head = file.read(64)
  if not zipfile.is_zipfile(path):
    raise PthError(_describe_non_zip(path, head))
  try:
    archive = zipfile.ZipFile(path)
  except (zipfile.BadZipFile, OSError, ValueError) as error:
    raise PthError(f"{path}: damaged zip archive ({error})") from error
  with archive:
    root = _root_of(archive, path)
    if f"{root}/byteorder" in archive.namelist():
      byteorder = _read_member(archive, f"{root}/byteorder", path).decode("ascii", "replace").strip()
      if byteorder != "little":
        raise PthError(f"{path}: byteorder is {byteorder!r}; this reader reads little-endian files only "
                       "(a big-endian file needs re-saving with torch on a little-endian machine)")
    data = _read_member(archive, f"{root}/data.pkl", path)
    unpickler = _Unpickler(data, archive, root, path)
    try:
      return unpickler.load()
    except PthError:
      raise
    except (pickle.UnpicklingError, EOFError, TypeError, ValueError, KeyError, IndexError, AttributeError,
            MemoryError, RecursionError) as error:
      raise PthError(f"{path}: cannot unpickle {root}/data.pkl ({type(error).__name__}: {error})") from error


def _flatten(tree: Any, prefix: str, out: dict, seen: set, path) -> None:
  if isinstance(tree, np.ndarray):
    if prefix in out:
      raise PthError(f"{path}: two tensors flatten to the key {prefix!r}")
    # One tensor object saved under two keys unpickles as one array (pickle's memo); give each key its own,
    # so that changing one in place cannot change the other.
    out[prefix] = tree.copy() if id(tree) in seen else tree
    seen.add(id(tree))
  elif isinstance(tree, dict):
    for key, value in tree.items():
      _flatten(value, f"{prefix}.{key}" if prefix else str(key), out, seen, path)
  elif isinstance(tree, (list, tuple)):
    for index, value in enumerate(tree):
      _flatten(value, f"{prefix}.{index}" if prefix else str(index), out, seen, path)
  # Anything else (int, float, str, None, dtype) is not a tensor: dropped.


def read_pth(path) -> dict[str, np.ndarray]:
  """The tensors of the .pth file at `path` as a flat dict of numpy arrays, keys joined with ".".

  A checkpoint {"state_dict": {"module.conv1.weight": ...}, "epoch": 3} gives
  {"state_dict.module.conv1.weight": array}; non-tensor values (epoch, names, hyperparameters) are dropped
  (read_pth_object keeps them), list entries are keyed by index, and a file holding one bare tensor gives
  {"": array}. Every array is a C-contiguous array of its own (no two share memory, even where torch's
  tensors shared a storage or were one object), with torch's values, shape (() for 0-d) and dtype.
  """
  flat: dict[str, np.ndarray] = {}
  _flatten(read_pth_object(path), "", flat, set(), os.fspath(path))
  return flat
