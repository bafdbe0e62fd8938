"""Tests of labeleff_jax.weights catalog and fetch: well-formed entries, resolve errors, checked downloads."""

import dataclasses
import hashlib
import re

import pytest

from labeleff_jax.data import constants
from labeleff_jax.weights import catalog
from labeleff_jax.weights import fetch

_HEX = re.compile(r"[0-9a-f]{8,64}")


def _entry(url: str, sha: str | None, name: str = "local_test", **changes) -> catalog.WeightsEntry:
  """A catalogue-shaped entry pointing anywhere (file:// in these tests, so nothing touches the network)."""
  base = dataclasses.replace(catalog.get("torchgeo_resnet18_s2_all_moco"), name=name, url=url,
                             sha256_prefix=sha)
  return dataclasses.replace(base, **changes)


def _source_file(tmp_path, content: bytes = b"pretend checkpoint bytes " * 1000):
  src = tmp_path / "src" / "weights-0000.pth"
  src.parent.mkdir()
  src.write_bytes(content)
  return src, hashlib.sha256(content).hexdigest()


# ---------------------------------------------------------------------------------------------------------
# The catalogue itself.
# ---------------------------------------------------------------------------------------------------------
def test_every_entry_is_well_formed():
  entries = list(catalog._ENTRIES)
  assert len({e.name for e in entries}) == len(entries), "two entries share a name"
  assert catalog.names() == sorted(e.name for e in entries)
  s2_names = set(constants.S2_BANDS) | {"B10"}  # ben-ge's L2A bands plus L1C's cirrus band
  s1_names = set(constants.S1_BANDS)
  for e in entries:
    assert catalog.entry_problems(e) == [], e.name
    assert e.url.startswith("https://"), e.name
    assert e.architecture in ("resnet18", "resnet50") and e.modality in ("s1", "s2"), e.name
    assert set(e.bands) <= (s2_names if e.modality == "s2" else s1_names), (e.name, e.bands)
    assert len(set(e.bands)) == len(e.bands), e.name
    assert e.sha256_prefix is None or _HEX.fullmatch(e.sha256_prefix), e.name
    hub = re.search(r"-([a-f0-9]*)\.", e.file_name)  # torch.hub's hash-in-file-name convention
    if hub and len(hub.group(1)) >= 8:
      assert e.sha256_prefix == hub.group(1), e.name
    norm = e.normalization_info
    if norm.mean is not None:  # per-channel statistics must fit the channels, a scalar fits any
      assert len(norm.mean) in (1, e.in_channels) and len(norm.std) == len(norm.mean), e.name
    assert (e.layout == "dual_resnet") == (e.subtree in ("backbone1", "backbone2")), e.name
    assert e.source and e.licence and e.citation, e.name
    assert e.file_name and "/" not in e.file_name, e.name


def test_published_facts_are_recorded_as_read():
  e = catalog.get("torchgeo_resnet18_s2_all_moco")
  assert e.file_name == "resnet18_sentinel2_all_moco-59bfdff9.pth" and e.sha256_prefix == "59bfdff9"
  # SSL4EO-S12 (and torchgeo) order: B01..B08, B8A, B09, B10, B11, B12; S1 (VV, VH).
  assert e.bands == ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11",
                     "B12")
  assert catalog.get("torchgeo_resnet50_s1_moco").bands == ("VV", "VH")
  assert catalog.get("ssl4eo_resnet50_s1_moco").bands == ("VV", "VH")
  assert catalog.get("torchgeo_resnet50_s2_all_seco_eco").bands == constants.S2_BANDS
  assert catalog.get("torchgeo_resnet50_s2_rgb_moco").bands == ("B04", "B03", "B02")
  assert catalog.get("ssl4eo_resnet50_s2_all_moco").layout == "moco"
  assert catalog.get("ssl4eo_resnet50_s2_all_dino").layout == "dino"
  dual = [catalog.get(f"scheibenreif_resnet50_{m}_sen12ms") for m in ("s1", "s2")]
  assert [d.subtree for d in dual] == ["backbone1", "backbone2"] and dual[0].url == dual[1].url
  assert catalog.NORMALIZATIONS["s1_db_zscore_ssl4eo"].mean == (-12.59, -20.26)


@pytest.mark.parametrize("changes, problem", [
    (dict(url="http://example.org/resnet-59bfdff9.pth"), "not https"),
    (dict(bands=("B01", "VV")), "not s2 band names"),
    (dict(modality="s1"), "not s1 band names"),
    (dict(bands=("B02", "B02")), "repeat"),
    (dict(sha256_prefix="59bfdff8"), "carries hash"),
    (dict(sha256_prefix=None), "carries hash"),
    (dict(sha256_prefix="59BFDFF9"), "hex"),
    (dict(layout="dual_resnet"), "subtree"),
    (dict(layout="keras"), "layout"),
    (dict(normalization="div255"), "normalization"),
    (dict(architecture="resnet34"), "architecture"),
    (dict(licence=" "), "licence is empty"),
])
def test_entry_problems_catches_a_bad_entry(changes, problem):
  good = catalog.get("torchgeo_resnet18_s2_all_moco")
  assert catalog.entry_problems(good) == []
  problems = catalog.entry_problems(dataclasses.replace(good, **changes))
  assert any(problem in p for p in problems), problems


def test_get_unknown_name_lists_known_names_closest_first():
  with pytest.raises(KeyError) as info:
    catalog.get("torchgeo_resnet50_s2_all_mocco")
  message = info.value.args[0]
  assert "torchgeo_resnet50_s2_all_mocco" in message
  listed = message.split("closest first: ")[1].split(", ")
  assert sorted(listed) == catalog.names()
  assert listed[0] == "torchgeo_resnet50_s2_all_moco"


def test_get_accepts_the_catalog_prefix():
  assert catalog.get("catalog:torchgeo_resnet50_s1_moco") is catalog.get("torchgeo_resnet50_s1_moco")


# ---------------------------------------------------------------------------------------------------------
# resolve.
# ---------------------------------------------------------------------------------------------------------
def test_resolve_missing_file_names_url_and_fetch_command(tmp_path, monkeypatch):
  monkeypatch.setenv(catalog.WEIGHTS_DIR_ENV, str(tmp_path / "my weights"))
  entry = catalog.get("torchgeo_resnet50_s2_all_moco")
  with pytest.raises(catalog.WeightsNotFoundError) as info:
    catalog.resolve("catalog:torchgeo_resnet50_s2_all_moco")
  assert isinstance(info.value, FileNotFoundError)
  message = str(info.value)
  assert entry.url in message
  # The exact command, with the folder quoted for the shell (it has a space).
  assert (f"python -m labeleff_jax.weights.fetch torchgeo_resnet50_s2_all_moco --dir '{tmp_path}/my weights'"
          in message)


def test_resolve_missing_manual_entry_says_where_to_save(tmp_path):
  with pytest.raises(catalog.WeightsNotFoundError) as info:
    catalog.resolve("catalog:ssl4eo_resnet50_s2_all_moco", tmp_path)
  message = str(info.value)
  assert "drive.google.com" in message and str(tmp_path / "ssl4eo_s12_B13_rn50_moco_full.pth") in message


def test_resolve_default_dir_without_env(monkeypatch, tmp_path):
  monkeypatch.delenv(catalog.WEIGHTS_DIR_ENV, raising=False)
  monkeypatch.setenv("HOME", str(tmp_path))
  assert catalog.default_weights_dir() == tmp_path / ".cache" / "labeleff_jax" / "weights"


def test_resolve_checks_the_hash_prefix(tmp_path):
  content = b"weights"
  sha = hashlib.sha256(content).hexdigest()
  good = _entry("https://example.org/w/model-x.pth", sha[:10], filename="model.pth")
  catalogue = {good.name: good}
  (tmp_path / "model.pth").write_bytes(content)
  assert catalog.resolve("catalog:local_test", tmp_path, catalogue) == tmp_path / "model.pth"
  (tmp_path / "model.pth").write_bytes(content + b"!")  # one byte more: a truncated or edited file
  with pytest.raises(catalog.WeightsHashError) as info:
    catalog.resolve("catalog:local_test", tmp_path, catalogue)
  assert str(tmp_path / "model.pth") in str(info.value)
  assert "damaged or a different file" in str(info.value)


def test_resolve_without_a_published_hash_takes_the_file(tmp_path):
  entry = _entry("https://example.org/w/model.pth", None)
  (tmp_path / "model.pth").write_bytes(b"anything")
  assert catalog.resolve("local_test", tmp_path, {entry.name: entry}) == tmp_path / "model.pth"


# ---------------------------------------------------------------------------------------------------------
# fetch.
# ---------------------------------------------------------------------------------------------------------
def test_download_writes_verifies_and_does_not_repeat(tmp_path):
  src, sha = _source_file(tmp_path)
  entry = _entry(src.as_uri(), sha[:8])
  out = tmp_path / "out"
  path = fetch.download(entry, out, log=lambda _: None)
  assert path == out / "weights-0000.pth" and path.read_bytes() == src.read_bytes()
  assert sorted(p.name for p in out.iterdir()) == ["weights-0000.pth"]  # no .partial left
  assert catalog.resolve("local_test", out, {entry.name: entry}) == path
  src.unlink()  # a second download would now fail: the verified file must be taken as it is
  assert fetch.download(entry, out, log=lambda _: None) == path


def test_download_refuses_a_hash_mismatch_and_keeps_nothing(tmp_path):
  src, sha = _source_file(tmp_path)
  wrong = format(int(sha[:8], 16) ^ 1, "08x")
  out = tmp_path / "out"
  with pytest.raises(fetch.FetchError) as info:
    fetch.download(_entry(src.as_uri(), wrong), out, log=lambda _: None)
  assert wrong in str(info.value) and "damaged or a different file" in str(info.value)
  assert list(out.iterdir()) == []


def test_download_replaces_a_damaged_existing_file(tmp_path):
  src, sha = _source_file(tmp_path)
  out = tmp_path / "out"
  out.mkdir()
  (out / "weights-0000.pth").write_bytes(b"truncated")
  path = fetch.download(_entry(src.as_uri(), sha[:8]), out, log=lambda _: None)
  assert path.read_bytes() == src.read_bytes()


def test_download_network_error_is_one_line_naming_the_url(tmp_path):
  missing = tmp_path / "nowhere" / "weights-0000.pth"
  out = tmp_path / "out"
  with pytest.raises(fetch.FetchError) as info:
    fetch.download(_entry(missing.as_uri(), "0" * 8), out, log=lambda _: None)
  message = str(info.value)
  assert "\n" not in message and missing.as_uri() in message and "by hand" in message and str(out) in message
  assert list(out.iterdir()) == []


def test_download_broken_midway_leaves_no_file(tmp_path, monkeypatch):
  class _Broken:
    headers = {"Content-Type": "application/octet-stream", "Content-Length": "100"}
    calls = 0

    def __enter__(self):
      return self

    def __exit__(self, *exc):
      return False

    def read(self, n):
      self.calls += 1
      if self.calls == 1:
        return b"x" * 10
      raise ConnectionResetError("connection reset by peer")

  monkeypatch.setattr(fetch.urllib.request, "urlopen", lambda *a, **k: _Broken())
  out = tmp_path / "out"
  with pytest.raises(fetch.FetchError, match="connection reset"):
    fetch.download(_entry("https://example.org/w/weights-0000.pth", "0" * 8), out, log=lambda _: None)
  assert list(out.iterdir()) == []


def test_download_manual_entry_says_how(tmp_path):
  entry = catalog.get("scheibenreif_resnet50_s2_sen12ms")
  with pytest.raises(fetch.FetchError) as info:
    fetch.download(entry, tmp_path, log=lambda _: None)
  assert entry.url in str(info.value) and str(tmp_path / entry.file_name) in str(info.value)


def test_main_fetches_lists_and_reports_failures(tmp_path, capsys):
  src, sha = _source_file(tmp_path)
  entry = _entry(src.as_uri(), sha[:8])
  out = tmp_path / "out"
  assert fetch.main(["catalog:local_test", "--dir", str(out)], {entry.name: entry}) == 0
  assert (out / "weights-0000.pth").read_bytes() == src.read_bytes()
  assert fetch.main(["local_test", "no_such_weights", "--dir", str(out)], {entry.name: entry}) == 1
  assert "no_such_weights" in capsys.readouterr().err
  assert fetch.main(["--list"]) == 0
  listed = capsys.readouterr().out.splitlines()
  assert [line.split()[0] for line in listed[1:]] == catalog.names()
