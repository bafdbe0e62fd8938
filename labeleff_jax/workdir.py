"""What a run's workdir guarantees: one run at a time (a lock), and one config per run (its identity).

Identity: the resolved config, flattened to `section.key` paths, minus the keys that only say how a run
executes (where the data lies, how many input workers, how often to checkpoint); its fingerprint is a
SHA-256 of that. Checkpoints and summary.json carry both, so a rerun can tell a resume of the same run
from a different config pointed at an old workdir, and name the keys that differ.

Lock: process 0 holds an exclusive `fcntl` lock on WORKDIR/.lock while the run lives. The kernel drops it
when the process dies, however it dies, so a lock left by a killed run is never in the way; the file
names the holder (host, pid) for the error message.
"""

import fcntl
import hashlib
import json
import os
import pathlib
import socket
from typing import Any

import ml_collections

# Keys that change how a run executes but not what it computes: a resume may change them freely.
EXECUTION_ONLY_KEYS = frozenset({
    "data.data_dir", "data.manual_dir", "data.num_workers", "data.worker_type",
    "train.checkpoint_every_steps",
})


class ConfigChangedError(ValueError):
  """The workdir holds a run of another config."""


class WorkdirInUseError(RuntimeError):
  """Another live process runs in this workdir."""


def _plain(value: Any) -> Any:
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  if isinstance(value, dict):
    return {str(k): _plain(v) for k, v in value.items()}
  return value


def _flatten(tree: Any, prefix: str = "") -> dict:
  flat = {}
  for key, value in tree.items():
    path = f"{prefix}{key}"
    if isinstance(value, dict) and value:
      flat.update(_flatten(value, path + "."))
    else:
      flat[path] = _plain(value)
  return flat


def identity(config: ml_collections.ConfigDict) -> dict:
  """The config keys that define what a run computes, flattened to 'section.key' -> JSON-able value."""
  flat = _flatten(json.loads(config.to_json_best_effort()))
  return {key: value for key, value in sorted(flat.items()) if key not in EXECUTION_ONLY_KEYS}


def fingerprint(run_identity: dict) -> str:
  return hashlib.sha256(json.dumps(run_identity, sort_keys=True).encode()).hexdigest()[:16]


def differences(old: dict, new: dict) -> dict:
  """{key: (old value, new value)} for every key whose value differs ('<absent>' where one side lacks it)."""
  missing = "<absent>"
  return {key: (old.get(key, missing), new.get(key, missing)) for key in sorted(set(old) | set(new))
          if old.get(key, missing) != new.get(key, missing)}


def describe(changed: dict, limit: int = 12) -> str:
  lines = [f"  {key}: {old!r} -> {new!r}" for key, (old, new) in list(changed.items())[:limit]]
  if len(changed) > limit:
    lines.append(f"  ... and {len(changed) - limit} more")
  return "\n".join(lines)


class WorkdirLock:
  """An exclusive lock on WORKDIR/.lock for the life of a run (taken by process 0 only)."""

  def __init__(self, workdir: str | pathlib.Path):
    self.path = pathlib.Path(workdir) / ".lock"
    self._handle = None

  def acquire(self) -> None:
    self.path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(self.path, "a+")  # pylint: disable=consider-using-with  (held until release)
    try:
      fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      handle.seek(0)
      holder = handle.read().strip() or "another process"
      handle.close()
      raise WorkdirInUseError(
          f"workdir {self.path.parent} is in use by {holder}: wait for that run to end, stop it, or choose "
          "another --workdir (two runs in one workdir would interleave their checkpoints and "
          "metrics)") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on host {socket.gethostname()}\n")
    handle.flush()
    self._handle = handle

  def release(self) -> None:
    if self._handle is not None:
      fcntl.flock(self._handle, fcntl.LOCK_UN)
      self._handle.close()
      self._handle = None

  def __enter__(self):
    self.acquire()
    return self

  def __exit__(self, *exc):
    self.release()
