"""Orbax checkpoints of a run: train state (model + optimizer), data-iterator state and loop metadata.

One `CheckpointManager` per workdir (`WORKDIR/checkpoints/`), one composite checkpoint per saved step:
- `state`: the pure-dict pytree of the trainable state (parameters, BatchNorm statistics, optimizer
  state). RNG streams are not saved: dropout keys are re-derived from (seed, step) every step.
- `data`: the input iterator's JSON state, so a resumed run sees exactly the batches it would have.
- `meta`: JSON with the step, the run's config identity (labeleff_jax/workdir.py) and a CRC-32 of every
  state array, computed from the arrays before they are written.

A checkpoint is only written from finite state, and verified against its checksums when restored: a
damaged or unreadable latest checkpoint is moved to `WORKDIR/checkpoints_damaged/STEP` (named in the log)
and the run falls back to the previous one.
"""

import pathlib
import shutil
from typing import Any

from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp

from labeleff_jax import sharding


class NonFiniteStateError(FloatingPointError):
  """The train state holds NaN or infinite values: it is not checkpointed."""


class DamagedCheckpointError(RuntimeError):
  """No checkpoint of the workdir could be restored intact."""


def non_finite_paths(host_tree: Any) -> list[str]:
  return [jax.tree_util.keystr(path) for path, leaf in jax.tree_util.tree_flatten_with_path(host_tree)[0]
          if np.issubdtype(np.asarray(leaf).dtype, np.inexact) and not np.all(np.isfinite(leaf))]


class RunCheckpointer:
  """Saves, verifies and restores the checkpoints of one run directory."""

  def __init__(self, workdir: str | pathlib.Path, *, max_to_keep: int = 2, asynchronous: bool = True):
    self.directory = pathlib.Path(workdir).absolute() / "checkpoints"
    self.quarantine = self.directory.with_name("checkpoints_damaged")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True, enable_async_checkpointing=asynchronous)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "data", "meta"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_state: dict, meta: dict, *, force: bool = True) -> None:
    """Writes `step` (asynchronously), after checking that every state array is finite."""
    host = sharding.to_host(state)
    bad = non_finite_paths(host)
    if bad:
      raise NonFiniteStateError(f"the train state holds NaN or infinite values at step {step} ({bad[:3]}, "
                                f"{len(bad)} arrays): not checkpointed")
    meta = {**meta, "checksums": sharding.checksums(host)}
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
        meta=ocp.args.JsonSave(meta)), force=force)

  def read_meta(self, step: int) -> dict | None:
    """The `meta` item of `step`, or None when it cannot be read (restore_latest will say why)."""
    try:
      return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception:  # pylint: disable=broad-except  (any damage: handled when restoring)
      return None

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict, dict]:
    """Restores `step` into arrays shaped and sharded like `abstract_state`; raises if it is damaged."""
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
        meta=ocp.args.JsonRestore()))
    state, data_state, meta = restored["state"], restored["data"], restored["meta"]
    expected = meta.get("checksums")
    if expected is not None:
      actual = sharding.checksums(sharding.to_host(state))
      differing = sorted(key for key in expected.keys() | actual.keys()
                         if expected.get(key) != actual.get(key))
      if differing:
        raise DamagedCheckpointError(f"{len(differing)} arrays differ from the checksums written with them "
                                     f"(first: {differing[0]})")
    return state, data_state, meta

  def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict, dict] | None:
    """(step, state, data state, meta) of the newest intact checkpoint; None when there is none at all.

    Every damaged newer checkpoint is moved aside to `checkpoints_damaged/` and reported. When none is
    intact, raises DamagedCheckpointError with what to do.
    """
    steps = sorted(self.manager.all_steps(), reverse=True)
    if not steps:
      return None
    for step in steps:
      try:
        return (step, *self.restore(step, abstract_state))
      except Exception as error:  # pylint: disable=broad-except  (tensorstore, JSON, structure, checksum)
        logging.error("checkpoint %s is damaged (%s: %s); moving it to %s and trying an older one",
                      self.directory / str(step), type(error).__name__, str(error).splitlines()[0][:300],
                      self.quarantine)
        self._move_aside(step)
    raise DamagedCheckpointError(
        f"no intact checkpoint under {self.directory}: the damaged ones were moved to {self.quarantine}. "
        f"Delete {self.directory} to start the run afresh (or restore the files from a backup).")

  def _move_aside(self, step: int) -> None:
    if jax.process_index() == 0:
      self.quarantine.mkdir(parents=True, exist_ok=True)
      target = self.quarantine / str(step)
      if target.exists():
        shutil.rmtree(target)
      shutil.move(str(self.directory / str(step)), str(target))
    sharding.wait_for_every_process(f"checkpoint {step} moved aside")
    self.manager.reload()

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs (with shardings) of a tree of arrays, the target of a restore."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def find_checkpoint(path: str | pathlib.Path) -> tuple[pathlib.Path, int]:
  """Resolves a run workdir, its `checkpoints/` folder or one step folder to (manager dir, step)."""
  path = pathlib.Path(path).absolute()
  if not path.exists():
    raise FileNotFoundError(f"init_from: {path} does not exist")
  candidates = [path / "checkpoints", path]
  for directory in candidates:
    if directory.is_dir() and any(child.name.isdigit() for child in directory.iterdir()):
      steps = sorted(int(child.name) for child in directory.iterdir() if child.name.isdigit())
      return directory, steps[-1]
  if path.name.isdigit() and path.parent.is_dir():
    return path.parent, int(path.name)
  raise FileNotFoundError(f"init_from: no orbax checkpoint under {path} (expected a run workdir, its "
                          "checkpoints/ folder, or a numbered step folder)")
