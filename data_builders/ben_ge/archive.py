"""Safe extraction of a ben-ge `.tar.gz` archive: every member is vetted before a single byte is written.

A tar member can name an absolute path, climb out with `..`, plant a link that points outside the target
(and then write through it), or create a device node. `safe_extract` refuses all of these and names the
member at fault. It checks the whole member list first, so a bad archive extracts nothing, and it extracts
into a temporary sibling folder that only becomes `target_dir` once everything is on disk, so an
interrupted extraction never looks finished.
"""

import os
import pathlib
import shutil
import tarfile
import tempfile

# Written last into an extracted folder; its content identifies the archive it came from, so a later call
# can reuse the extraction instead of unpacking gigabytes again.
EXTRACTION_MARKER = ".ben_ge_extracted"


class UnsafeArchiveError(ValueError):
  """A tar member that could write outside the target folder, or is not a plain file, folder or link."""


def _normalised_parts(name: str) -> list[str]:
  """Splits a member name into components, dropping empty and '.' parts (keeping '..' to be judged)."""
  return [part for part in name.replace("\\", "/").split("/") if part not in ("", ".")]


def _is_absolute(name: str) -> bool:
  # A Windows drive ("C:") or UNC prefix is as absolute as a leading slash once extracted on that system.
  return name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":")


def check_members(members: list[tarfile.TarInfo], archive_name: str) -> None:
  """Raises UnsafeArchiveError naming the first member that is not safe to extract.

  Allowed: regular files, folders, and symbolic or hard links whose target stays inside the archive's
  folder. Refused: absolute names, any `..` component in a name, links leaving the folder, links whose
  target passes through another link (the target could then be redirected), members stored beneath a
  link (writing through it could land anywhere), character/block devices, FIFOs and other special types.
  """
  link_names = {"/".join(_normalised_parts(m.name)) for m in members if m.issym() or m.islnk()}

  def refuse(member: tarfile.TarInfo, why: str) -> None:
    raise UnsafeArchiveError(f"{archive_name}: refusing to extract member {member.name!r}: {why}")

  for member in members:
    name = member.name
    if _is_absolute(name):
      refuse(member, "absolute path")
    parts = _normalised_parts(name)
    if ".." in parts:
      refuse(member, "'..' in the path")
    if not parts:
      if member.isdir():
        continue  # the archive root itself ("./")
      refuse(member, "empty name")
    for depth in range(1, len(parts)):
      if "/".join(parts[:depth]) in link_names:
        refuse(member, f"stored beneath the link {'/'.join(parts[:depth])!r}")

    if member.ischr() or member.isblk():
      refuse(member, "device file")
    if member.isfifo():
      refuse(member, "FIFO")
    if member.issym() or member.islnk():
      kind = "symbolic link" if member.issym() else "hard link"
      target = member.linkname
      if not target:
        refuse(member, f"{kind} without a target")
      if _is_absolute(target):
        refuse(member, f"{kind} to the absolute path {target!r}")
      # A symlink resolves relative to its own folder, a hard link relative to the archive root. Walk the
      # target one component at a time so that neither '..' nor an intermediate link can escape.
      current = parts[:-1] if member.issym() else []
      target_parts = _normalised_parts(target)
      for step, part in enumerate(target_parts):
        if part == "..":
          if not current:
            refuse(member, f"{kind} to {target!r} points outside the extraction folder")
          current.pop()
        else:
          current.append(part)
        is_last = step == len(target_parts) - 1
        if (not is_last or member.islnk()) and "/".join(current) in link_names:
          refuse(member, f"{kind} to {target!r} passes through another link")
      continue
    if not (member.isfile() or member.isdir()):
      refuse(member, f"unsupported member type {member.type!r}")


def _marker_text(tar_path: pathlib.Path) -> str:
  stat = tar_path.stat()
  return f"{tar_path.name} size={stat.st_size} mtime_ns={stat.st_mtime_ns}\n"


def is_extracted(tar_path, target_dir) -> bool:
  """True if `target_dir` holds a finished extraction of exactly this archive file."""
  marker = pathlib.Path(target_dir) / EXTRACTION_MARKER
  return marker.is_file() and marker.read_text() == _marker_text(pathlib.Path(tar_path))


def safe_extract(tar_path, target_dir) -> pathlib.Path:
  """Extracts the (optionally gzip-compressed) tar archive `tar_path` into `target_dir` and returns it.

  Raises UnsafeArchiveError, before writing anything, if any member is unsafe (see `check_members`);
  FileExistsError if `target_dir` exists and is not a finished extraction of this same archive (in which
  case it is reused as is). The archive is read twice (list, then extract) rather than trusting a member
  list that was only partially seen.
  """
  tar_path = pathlib.Path(tar_path)
  target_dir = pathlib.Path(target_dir)
  if not tar_path.is_file():
    raise FileNotFoundError(f"archive not found: {tar_path}")
  if target_dir.exists():
    if is_extracted(tar_path, target_dir):
      return target_dir
    raise FileExistsError(f"{target_dir} exists but is not a finished extraction of {tar_path}; "
                          "remove it to extract again")

  try:
    with tarfile.open(tar_path, mode="r:*") as archive:
      members = archive.getmembers()
  except (tarfile.TarError, EOFError, OSError) as error:
    raise UnsafeArchiveError(f"{tar_path}: not a readable tar archive ({error})") from error
  check_members(members, str(tar_path))

  vetted = {(m.name, m.type, m.linkname) for m in members}
  target_dir.parent.mkdir(parents=True, exist_ok=True)
  staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{target_dir.name}.partial-", dir=target_dir.parent))
  try:
    with tarfile.open(tar_path, mode="r:*") as archive:
      for member in archive:
        if (member.name, member.type, member.linkname) not in vetted:
          raise UnsafeArchiveError(f"{tar_path}: member {member.name!r} changed while extracting")
        if _normalised_parts(member.name):
          _extract_member(archive, member, staging)
    (staging / EXTRACTION_MARKER).write_text(_marker_text(tar_path))
    os.replace(staging, target_dir)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  return target_dir


def _extract_member(archive: tarfile.TarFile, member: tarfile.TarInfo, staging: pathlib.Path) -> None:
  """Extracts one vetted member; where Python has it (3.11.4+), the "data" filter checks it a second time
  against the real file system and drops set-uid bits."""
  if not hasattr(tarfile, "data_filter"):
    archive.extract(member, staging)
    return
  try:
    archive.extract(member, staging, filter="data")
  except tarfile.FilterError as error:
    raise UnsafeArchiveError(f"refusing to extract member {member.name!r}: {error}") from error
