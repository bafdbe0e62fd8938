"""Metric writers: JSON lines (`metrics.jsonl`) and TensorBoard event files, written by process 0 only.

TensorBoard files come from tensorboardX, which needs no TensorFlow.
"""

import json
import math
import os
import pathlib

import jax


def is_writer() -> bool:
  """Whether this process writes a run's files: process 0 of a multi-process run, or the only one."""
  return jax.process_index() == 0


def write_text(path: str | pathlib.Path, text: str) -> None:
  """Writes a whole file from process 0 only, atomically: a reader sees the old file or the new one.

  The text goes to a temporary file next to `path` that is then renamed over it, so a crash, a full disk
  or another process reading at the same moment never meets half a file.
  """
  if not is_writer():
    return
  path = pathlib.Path(path)
  temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
  try:
    temporary.write_text(text)
    os.replace(temporary, path)
  finally:
    temporary.unlink(missing_ok=True)


def _plain(value):
  """JSON-safe scalar (NaN/inf become strings so the file stays valid JSON)."""
  value = float(value) if not isinstance(value, (str, bool, int)) else value
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)
  return value


class MetricWriter:
  """Appends one JSON object per log event and mirrors scalars into TensorBoard."""

  def __init__(self, workdir: str | pathlib.Path, *, resume_step: int | None = None):
    self.enabled = is_writer()
    self.path = pathlib.Path(workdir) / "metrics.jsonl"
    self._tensorboard = None
    if not self.enabled:
      return
    if self.path.exists():
      # A resumed run repeats the steps after its last checkpoint: drop their stale log lines so the
      # file reads exactly like an uninterrupted run's.
      keep = []
      for line in self.path.read_text().splitlines():
        if line.strip() and (resume_step is not None and json.loads(line)["step"] <= resume_step):
          keep.append(line)
      write_text(self.path, "".join(line + "\n" for line in keep))
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    self._tensorboard = SummaryWriter(str(pathlib.Path(workdir) / "tensorboard"))

  def write(self, step: int, split: str, values: dict) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), "split": split, **{k: _plain(v) for k, v in values.items()}}
    with self.path.open("a") as f:
      f.write(json.dumps(record) + "\n")
    for key, value in values.items():
      if isinstance(value, (int, float)) and not isinstance(value, bool):
        self._tensorboard.add_scalar(f"{split}/{key}", value, step)

  def flush(self) -> None:
    if self._tensorboard is not None:
      self._tensorboard.flush()

  def close(self) -> None:
    if self._tensorboard is not None:
      self._tensorboard.close()


def read_metrics(workdir: str | pathlib.Path) -> list[dict]:
  """All records of a run's `metrics.jsonl`."""
  path = pathlib.Path(workdir) / "metrics.jsonl"
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
