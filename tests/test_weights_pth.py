"""labeleff_jax.weights.pth: torch.save files read without torch, compared with what torch itself wrote.

The fixtures under tests/fixtures/pth were written by scripts/torch_fixtures/reader_cases.py (torch 2.13);
each readable NAME.pth has NAME.npz with torch's own .numpy() of every tensor (raw bits for bfloat16 and
float8) and "__dtypes__", the "key=dtype name" list. Damaged files are derived from the fixtures here, and
the bounds checks use zips built by hand (_write_pth), since torch never writes out-of-bounds tensors.
"""

import argparse
import pathlib
import pickle
import pickletools
import struct
import zipfile

import ml_dtypes
import numpy as np
import pytest

from labeleff_jax.weights import pth

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "pth"
READABLE = ["dtypes", "views", "renamed_root"]


def _expected(name: str):
  with np.load(FIXTURES / f"{name}.npz") as npz:
    dtypes = dict(entry.split("=", 1) for entry in npz["__dtypes__"])
    return {key: npz[key] for key in dtypes}, dtypes


def _opcodes(path) -> list[tuple[str, object]]:
  """The (opcode name, argument) pairs of a torch.save file's pickle."""
  with zipfile.ZipFile(path) as archive:
    data = archive.read(next(n for n in archive.namelist() if n.endswith("/data.pkl")))
  return [(op.name, arg) for op, arg, _ in pickletools.genops(data)]


def _globals(path) -> set[str]:
  """The 'module name' globals (protocol-2 GLOBAL opcodes) a torch.save file's pickle references."""
  return {arg for name, arg in _opcodes(path) if name == "GLOBAL"}


def _rewrite(source, target, drop=(), replace=None):
  """A copy of the zip `source` without the members `drop` and with `replace` {name: bytes}."""
  replace = replace or {}
  with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
    for info in old.infolist():
      if info.filename not in drop:
        new.writestr(info, replace.get(info.filename, old.read(info.filename)))
  return target


# A hand-built torch-style pickle: {name: _rebuild_tensor_v2(storage, offset, size, stride, False, {})}.
def _str(text: str) -> bytes:
  data = text.encode()
  return b"X" + struct.pack("<I", len(data)) + data


def _int(value: int) -> bytes:
  return b"J" + struct.pack("<i", value)


def _ints(values) -> bytes:
  return b"(" + b"".join(_int(v) for v in values) + b"t"


def _tensor_pickle(tensors: dict) -> bytes:
  """tensors: {name: (storage class, key, numel, offset, size, stride[, metadata {str: bool}])}."""
  out = [b"\x80\x02}"]
  for name, (storage_class, key, numel, offset, size, stride, *metadata) in tensors.items():
    storage = (b"(" + _str("storage") + f"ctorch\n{storage_class}\n".encode() + _str(key) + _str("cpu")
               + _int(numel) + b"tQ")
    hooks = b"ccollections\nOrderedDict\n)R"
    extra = b"".join(b"}" + b"".join(_str(k) + (b"\x88" if v else b"\x89") + b"s" for k, v in m.items())
                     for m in metadata)
    out.append(_str(name) + b"ctorch._utils\n_rebuild_tensor_v2\n(" + storage + _int(offset) + _ints(size)
               + _ints(stride) + b"\x89" + hooks + extra + b"tRs")
  return b"".join(out) + b"."


def _write_pth(path, tensors: dict, records: dict, root="hand made", byteorder=b"little"):
  with zipfile.ZipFile(path, "w") as archive:
    archive.writestr(f"{root}/data.pkl", _tensor_pickle(tensors))
    if byteorder is not None:
      archive.writestr(f"{root}/byteorder", byteorder)
    for key, data in records.items():
      archive.writestr(f"{root}/data/{key}", data)
    archive.writestr(f"{root}/version", b"3\n")
  return path


SIX = np.arange(6, dtype="<f4") * 1.5 - 2.0  # one 6-element float32 storage for the hand-built files


# ---------------------------------------------------------------------------------------------------------
# Torch-written files read exactly.


@pytest.mark.parametrize("name", READABLE)
def test_every_tensor_equals_torch(name):
  got = pth.read_pth(FIXTURES / f"{name}.pth")
  expected, dtypes = _expected(name)
  assert sorted(got) == sorted(expected)
  for key, want in expected.items():
    array = got[key]
    assert array.dtype.name == dtypes[key], key
    assert array.shape == want.shape, key
    # Bitwise (bfloat16/float8 against their raw bits, the rest against torch's .numpy()).
    assert array.tobytes() == want.tobytes(), key
    assert array.flags.c_contiguous and array.flags.writeable, key


def test_dtypes_fixture():
  assert {"torch BFloat16Storage", "torch BoolStorage", "torch._utils _rebuild_tensor_v3",
          "torch.storage UntypedStorage", "torch float8_e4m3fn"} <= _globals(FIXTURES / "dtypes.pth")
  got = pth.read_pth(FIXTURES / "dtypes.pth")
  assert got["bfloat16"].dtype == np.dtype(ml_dtypes.bfloat16)
  assert got["float8_e5m2"].dtype == np.dtype(ml_dtypes.float8_e5m2)
  assert got["uint16"].dtype == np.uint16 and got["bool"].dtype == np.bool_
  assert got["scalar"].shape == () and got["scalar"] == np.float32(2.5)
  assert got["bn.num_batches_tracked"].shape == () and got["bn.num_batches_tracked"].dtype == np.int64
  assert int(got["bn.num_batches_tracked"]) == 1234
  assert got["int64"].dtype == np.int64 and np.abs(got["int64"]).max() > 2**31  # really 64-bit values


def test_views_strides_offsets_and_shared_storage():
  got = pth.read_pth(FIXTURES / "views.pth")
  prefix = "state_dict.module."
  base = got[prefix + "encoder_q.base"]
  assert base.shape == (4, 6)
  np.testing.assert_array_equal(got[prefix + "encoder_q.row_slice"], base[1:3])
  np.testing.assert_array_equal(got[prefix + "encoder_q.transposed"], base.T)
  np.testing.assert_array_equal(got[prefix + "encoder_q.every_other"], base[:, ::2])
  np.testing.assert_array_equal(got[prefix + "encoder_q.column"], base[:, 4])
  assert got[prefix + "encoder_q.element"].shape == () and got[prefix + "encoder_q.element"] == base[2, 3]
  np.testing.assert_array_equal(got[prefix + "shared_b"], got[prefix + "shared_a"])
  np.testing.assert_array_equal(got[prefix + "shared_tail"], got[prefix + "shared_a"][2:])
  # Each key gets its own array, even where torch's tensors shared one storage or were one object.
  assert not np.shares_memory(got[prefix + "shared_a"], got[prefix + "shared_b"])
  assert not np.shares_memory(got[prefix + "shared_a"], got[prefix + "shared_tail"])
  assert not np.shares_memory(base, got[prefix + "encoder_q.transposed"])
  obj = pth.read_pth_object(FIXTURES / "views.pth")["state_dict"]
  assert obj["module.shared_a"] is obj["module.shared_b"]  # one object, as torch.load gives it
  with zipfile.ZipFile(FIXTURES / "views.pth") as archive:
    records = [name for name in archive.namelist() if "/data/" in name]
  assert len(records) < len(got)  # the fixture really shares storages between tensors


def test_shared_storage_read_once(monkeypatch):
  reads = []
  original = zipfile.ZipFile.read

  def counting_read(self, name, pwd=None):
    reads.append(name)
    return original(self, name, pwd)

  monkeypatch.setattr(zipfile.ZipFile, "read", counting_read)
  got = pth.read_pth(FIXTURES / "views.pth")
  storage_reads = [name for name in reads if "/data/" in name]
  assert sorted(storage_reads) == sorted(set(storage_reads))
  assert len(storage_reads) < len(got)


def test_nested_keys_joined_and_non_tensor_leaves():
  assert {"torch._utils _rebuild_parameter", "argparse Namespace"} <= _globals(FIXTURES / "views.pth")
  flat = pth.read_pth(FIXTURES / "views.pth")
  assert "state_dict.module.param" in flat and "state_dict.module.conv.weight" in flat
  assert "optimizer.state.0.momentum_buffer" in flat  # int keys of the optimizer state, as strings
  assert not [key for key in flat if not key.startswith(("state_dict.", "optimizer.state."))]
  obj = pth.read_pth_object(FIXTURES / "views.pth")
  assert obj["epoch"] == 7 and obj["name"] == "x" and obj["losses"] == [0.5, 0.25]
  assert obj["optimizer"]["param_groups"][0]["params"] == [0, 1]
  assert obj["optimizer"]["param_groups"][0]["momentum"] == 0.9
  np.testing.assert_array_equal(obj["state_dict"]["module.param"], flat["state_dict.module.param"])
  # argparse.Namespace comes back as a plain dict subclass, never the real class.
  assert type(obj["args"]) is pth.PickledNamespace and not isinstance(obj["args"], argparse.Namespace)
  assert obj["args"] == {"lr": 0.1, "arch": "resnet18", "bands": ["B2", "B3"]}


def test_archive_root_read_from_the_file(tmp_path):
  def root(path):
    with zipfile.ZipFile(path) as archive:
      return archive.namelist()[0].split("/")[0]

  assert root(FIXTURES / "dtypes.pth") == "archive"
  assert root(FIXTURES / "views.pth") == "views"
  assert root(FIXTURES / "renamed_root.pth") == "other_root"  # neither 'archive' nor the stem
  assert "STACK_GLOBAL" in {name for name, _ in _opcodes(FIXTURES / "renamed_root.pth")}  # protocol 4
  path = _write_pth(tmp_path / "w.pth", {"w": ("FloatStorage", "0", 6, 0, (6,), (1,))},
                    {"0": SIX.tobytes()}, root="some root")
  np.testing.assert_array_equal(pth.read_pth(path)["w"], SIX)


def test_flattening_edges(monkeypatch):
  array = np.zeros(2)
  monkeypatch.setattr(pth, "read_pth_object", lambda path: array)
  assert pth.read_pth("bare.pth").keys() == {""}  # a file holding one bare tensor
  monkeypatch.setattr(pth, "read_pth_object", lambda path: {"layers": [array, 3, (array,)], "n": None})
  assert sorted(pth.read_pth("list.pth")) == ["layers.0", "layers.2.0"]
  monkeypatch.setattr(pth, "read_pth_object", lambda path: {"a.b": array, "a": {"b": array}})
  with pytest.raises(pth.PthError, match="a.b"):
    pth.read_pth("clash.pth")


# ---------------------------------------------------------------------------------------------------------
# Refused files: every error names the file.


def test_forbidden_global_refused_and_not_called(capsys):
  path = FIXTURES / "forbidden_global.pth"
  assert "__builtin__ print" in _globals(path)
  with pytest.raises(pth.PthError, match=r"builtins\.print") as error:
    pth.read_pth(path)
  assert str(path) in str(error.value)
  assert "PTH-FIXTURE" not in capsys.readouterr().out


def test_pickled_module_refused():
  path = FIXTURES / "whole_module.pth"
  with pytest.raises(pth.PthError, match=r"torch\.nn\.modules\.linear\.Linear") as error:
    pth.read_pth(path)
  assert "state_dict()" in str(error.value) and str(path) in str(error.value)


def test_legacy_format_says_how_to_resave():
  path = FIXTURES / "legacy.pth"
  assert not zipfile.is_zipfile(path)
  with pytest.raises(pth.PthError, match="legacy") as error:
    pth.read_pth(path)
  assert "torch.save(torch.load(" in str(error.value) and str(path) in str(error.value)


def test_truncated_and_random_files(tmp_path):
  data = (FIXTURES / "views.pth").read_bytes()
  truncated = tmp_path / "truncated.pth"
  truncated.write_bytes(data[:len(data) // 2])
  with pytest.raises(pth.PthError, match="truncated") as error:
    pth.read_pth(truncated)
  assert str(truncated) in str(error.value)
  noise = tmp_path / "noise.pth"
  noise.write_bytes(np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8).tobytes()[1:] + b"\0")
  with pytest.raises(pth.PthError, match="neither") as error:
    pth.read_pth(noise)
  assert str(noise) in str(error.value)
  bare = tmp_path / "bare_pickle.pth"
  bare.write_bytes(pickle.dumps({"weight": [1.0, 2.0]}, protocol=2))
  with pytest.raises(pth.PthError, match="bare pickle.*torch.save") as error:
    pth.read_pth(bare)
  assert str(bare) in str(error.value)


def test_missing_storage_record(tmp_path):
  path = _rewrite(FIXTURES / "views.pth", tmp_path / "missing.pth", drop={"views/data/0"})
  with pytest.raises(pth.PthError, match="views/data/0") as error:
    pth.read_pth(path)
  assert str(path) in str(error.value)


def test_missing_data_pkl(tmp_path):
  path = _rewrite(FIXTURES / "views.pth", tmp_path / "nopickle.pth", drop={"views/data.pkl"})
  with pytest.raises(pth.PthError, match="data.pkl") as error:
    pth.read_pth(path)
  assert str(path) in str(error.value)


def test_big_endian_refused(tmp_path):
  path = _rewrite(FIXTURES / "views.pth", tmp_path / "big.pth", replace={"views/byteorder": b"big"})
  with pytest.raises(pth.PthError, match="'big'.*little-endian") as error:
    pth.read_pth(path)
  assert str(path) in str(error.value)


def test_crc_error(tmp_path):
  data = bytearray((FIXTURES / "views.pth").read_bytes())
  with zipfile.ZipFile(FIXTURES / "views.pth") as archive:
    info = archive.getinfo("views/data/0")
  assert info.compress_type == zipfile.ZIP_STORED
  # The record's bytes start after its local header (30 bytes, the name, the extra field).
  name_length, extra_length = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
  data[info.header_offset + 30 + name_length + extra_length + 3] ^= 0x40
  path = tmp_path / "flipped.pth"
  path.write_bytes(bytes(data))
  with pytest.raises(pth.PthError, match="views/data/0.*CRC") as error:
    pth.read_pth(path)
  assert str(path) in str(error.value)


# ---------------------------------------------------------------------------------------------------------
# Hand-built files: bounds checks on size/stride/offset, record sizes, bfloat16 without ml_dtypes.


def test_hand_built_views_read_right(tmp_path):
  tensors = {
      "t": ("FloatStorage", "0", 6, 0, (3, 2), (1, 3)),   # the transpose of a (2, 3)
      "tail": ("FloatStorage", "0", 6, 4, (2,), (1,)),
      "strided": ("FloatStorage", "0", 6, 0, (2, 2), (3, 2)),
      "zero_d": ("FloatStorage", "0", 6, 5, (), ()),
      "empty": ("FloatStorage", "0", 6, 6, (0, 3), (3, 1)),
  }
  got = pth.read_pth(_write_pth(tmp_path / "ok.pth", tensors, {"0": SIX.tobytes()}))
  np.testing.assert_array_equal(got["t"], SIX.reshape(2, 3).T)
  np.testing.assert_array_equal(got["tail"], SIX[4:])
  np.testing.assert_array_equal(got["strided"], SIX[[[0, 2], [3, 5]]])
  assert got["zero_d"].shape == () and got["zero_d"] == SIX[5]
  assert got["empty"].shape == (0, 3)


@pytest.mark.parametrize("offset,size,stride", [
    (0, (7,), (1,)),          # one element too many
    (1, (6,), (1,)),          # the offset pushes the end past the storage
    (0, (2, 3), (4, 1)),      # the stride reaches element 6
    (6, (1,), (1,)),          # the offset alone is past the end
    (-1, (2,), (1,)),         # negative offset
    (2, (2,), (-1,)),         # negative stride
    (0, (2, 2), (1,)),        # size and stride of different lengths
])
def test_bounds_violations_refused(tmp_path, offset, size, stride):
  path = _write_pth(tmp_path / "bad.pth", {"w": ("FloatStorage", "0", 6, offset, size, stride)},
                    {"0": SIX.tobytes()})
  with pytest.raises(pth.PthError) as error:
    pth.read_pth(path)
  assert str(path) in str(error.value) and "data/0" in str(error.value)


def test_neg_bit_refused(tmp_path):
  tensors = {"plain": ("FloatStorage", "0", 6, 0, (6,), (1,), {"neg": False}),
             "negated": ("FloatStorage", "0", 6, 0, (6,), (1,), {"neg": True})}
  path = _write_pth(tmp_path / "neg.pth", tensors, {"0": SIX.tobytes()})
  with pytest.raises(pth.PthError, match="neg") as error:
    pth.read_pth(path)  # the stored values are not the tensor's: torch negates them on load
  assert str(path) in str(error.value)
  del tensors["negated"]
  np.testing.assert_array_equal(pth.read_pth(_write_pth(path, tensors, {"0": SIX.tobytes()}))["plain"], SIX)


def test_record_size_must_match_numel(tmp_path):
  path = _write_pth(tmp_path / "short.pth", {"w": ("FloatStorage", "0", 8, 0, (8,), (1,))},
                    {"0": SIX.tobytes()})
  with pytest.raises(pth.PthError, match="24 bytes") as error:
    pth.read_pth(path)
  assert str(path) in str(error.value)


def test_bfloat16_without_ml_dtypes(tmp_path, monkeypatch):
  bits = np.array([0x3F80, 0xC040, 0x0000, 0x4049], dtype="<u2")  # 1.0, -3.0, 0.0, 3.140625
  path = _write_pth(tmp_path / "bf16.pth", {"w": ("BFloat16Storage", "0", 4, 1, (3,), (1,))},
                    {"0": bits.tobytes()})
  assert pth.read_pth(path)["w"].view(np.uint16).tolist() == bits[1:].tolist()
  monkeypatch.setattr(pth, "_ml_dtypes", None)
  got = pth.read_pth(path)["w"]
  assert got.dtype == np.float32 and got.tolist() == [-3.0, 0.0, 3.140625]
  with pytest.raises(pth.PthError, match="float8_e4m3fn.*ml_dtypes"):
    pth.read_pth(FIXTURES / "dtypes.pth")
