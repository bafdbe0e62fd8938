"""Tests of data_builders.ben_ge.archive: safe extraction refuses every member that could escape the target."""

import io
import os
import pathlib
import re
import tarfile

import pytest

from data_builders.ben_ge import archive


def _add_file(tar: tarfile.TarFile, name: str, content: bytes = b"data") -> None:
  info = tarfile.TarInfo(name)
  info.size = len(content)
  tar.addfile(info, io.BytesIO(content))


def _add_special(tar: tarfile.TarFile, name: str, member_type: bytes, linkname: str = "") -> None:
  info = tarfile.TarInfo(name)
  info.type = member_type
  info.linkname = linkname
  tar.addfile(info)


def _make_tar(path: pathlib.Path, build) -> pathlib.Path:
  with tarfile.open(path, "w:gz") as tar:
    _add_file(tar, "ben-ge-800/ben-ge-800_meta.csv", b"patch_id\n")  # a harmless first member
    build(tar)
  return path


def _takes_tmp(build):
  return build.__code__.co_argcount == 2


def _tree(root: pathlib.Path) -> set[str]:
  return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_good_archive_extracts_files_dirs_and_inner_links(tmp_path):
  def build(tar):
    _add_special(tar, "ben-ge-800/dem", tarfile.DIRTYPE)
    _add_file(tar, "ben-ge-800/dem/a_dem.tif", b"elevation")
    _add_special(tar, "ben-ge-800/dem/alias.tif", tarfile.SYMTYPE, "a_dem.tif")
    _add_special(tar, "ben-ge-800/copy.tif", tarfile.LNKTYPE, "ben-ge-800/dem/a_dem.tif")
  tar_path = _make_tar(tmp_path / "ben-ge-800.tar.gz", build)
  target = tmp_path / "out" / "extracted"
  assert archive.safe_extract(tar_path, target) == target
  root = target / "ben-ge-800"
  assert (root / "dem" / "a_dem.tif").read_bytes() == b"elevation"
  assert (root / "dem" / "alias.tif").is_symlink()
  assert (root / "dem" / "alias.tif").read_bytes() == b"elevation"
  assert (root / "copy.tif").read_bytes() == b"elevation"
  assert archive.is_extracted(tar_path, target)
  # Only the target appeared next to it: the staging folder was renamed, not left behind.
  assert sorted(os.listdir(target.parent)) == ["extracted"]
  # A second call reuses the finished extraction instead of failing or unpacking again.
  (root / "marker_of_reuse").write_text("x")
  archive.safe_extract(tar_path, target)
  assert (root / "marker_of_reuse").exists()


def test_existing_foreign_target_is_not_overwritten(tmp_path):
  tar_path = _make_tar(tmp_path / "a.tar.gz", lambda tar: None)
  target = tmp_path / "target"
  target.mkdir()
  (target / "precious").write_text("keep")
  with pytest.raises(FileExistsError, match="not a finished extraction"):
    archive.safe_extract(tar_path, target)
  assert (target / "precious").read_text() == "keep"


UNSAFE_ARCHIVES = {
    # The absolute member points into the test's own tmp folder, whose whole tree is compared below.
    "absolute path": (lambda tar, tmp: _add_file(tar, f"{tmp}/evil_absolute.txt"), "{tmp}/evil_absolute.txt",
                      "absolute"),
    "dot-dot": (lambda tar: _add_file(tar, "ben-ge-800/../../evil_dotdot.txt"),
                "ben-ge-800/../../evil_dotdot.txt", r"'\.\.'"),
    "symlink escape": (lambda tar: _add_special(tar, "ben-ge-800/escape", tarfile.SYMTYPE, "../../.."),
                       "ben-ge-800/escape", "outside"),
    "absolute symlink": (lambda tar: _add_special(tar, "ben-ge-800/etc", tarfile.SYMTYPE, "/etc"),
                         "ben-ge-800/etc", "absolute"),
    "hardlink escape": (lambda tar: _add_special(tar, "ben-ge-800/passwd", tarfile.LNKTYPE, "../outside.txt"),
                        "ben-ge-800/passwd", "outside"),
    "character device": (lambda tar: _add_special(tar, "ben-ge-800/null", tarfile.CHRTYPE),
                         "ben-ge-800/null", "device"),
    "block device": (lambda tar: _add_special(tar, "ben-ge-800/disk", tarfile.BLKTYPE),
                     "ben-ge-800/disk", "device"),
    "fifo": (lambda tar: _add_special(tar, "ben-ge-800/pipe", tarfile.FIFOTYPE), "ben-ge-800/pipe", "FIFO"),
    # A link that stays inside, then a file written through it: the pair must not be trusted.
    "write through a link": (
        lambda tar: (_add_special(tar, "ben-ge-800/up", tarfile.SYMTYPE, "."),
                     _add_file(tar, "ben-ge-800/up/evil_through_link.txt")),
        "ben-ge-800/up/evil_through_link.txt", "beneath the link"),
    # Two links that each look harmless on their own: b -> a/.. where a -> . lands above the folder.
    "link chain": (
        lambda tar: (_add_special(tar, "a", tarfile.SYMTYPE, "."),
                     _add_special(tar, "b", tarfile.SYMTYPE, "a/..")),
        "b", "another link"),
}


@pytest.mark.parametrize("case", sorted(UNSAFE_ARCHIVES))
def test_unsafe_member_is_refused_and_nothing_is_written(tmp_path, case):
  build, member, reason = UNSAFE_ARCHIVES[case]
  if _takes_tmp(build):
    build = lambda tar, build=build: build(tar, tmp_path)  # noqa: E731
    member = member.format(tmp=tmp_path)
  sandbox = tmp_path / "sandbox"
  sandbox.mkdir()
  tar_path = _make_tar(sandbox / "ben-ge-800.tar.gz", build)
  target = sandbox / "deep" / "extracted"
  before = _tree(tmp_path)
  with pytest.raises(archive.UnsafeArchiveError) as raised:
    archive.safe_extract(tar_path, target)
  message = str(raised.value)
  assert repr(member) in message, message
  assert re.search(reason, message), message
  assert isinstance(raised.value, ValueError)
  # Nothing at all was written: not the harmless first member, not the target, not a staging folder,
  # and nothing above the sandbox.
  assert _tree(tmp_path) == before


def test_not_a_tar_file_is_a_clear_error(tmp_path):
  bad = tmp_path / "ben-ge-800.tar.gz"
  bad.write_bytes(b"this is not gzip")
  with pytest.raises(archive.UnsafeArchiveError, match="not a readable tar archive"):
    archive.safe_extract(bad, tmp_path / "out")
  assert not (tmp_path / "out").exists()
