"""Orbax checkpoints of a run: train state (model + optimizer), data-iterator state and loop metadata.

One `CheckpointManager` per workdir (`WORKDIR/checkpoints/`), one composite checkpoint per saved step:
- `state`: the pure-dict pytree of the trainable state (parameters, BatchNorm statistics, optimizer
  state). RNG streams are not saved: dropout keys are re-derived from (seed, step) every step.
- `data`: the input iterator's JSON state, so a resumed run sees exactly the batches it would have.
- `meta`: JSON with the step, epoch and anything else the loop needs to continue.
"""

import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp


class RunCheckpointer:
  """Saves and restores the checkpoints of one run directory."""

  def __init__(self, workdir: str | pathlib.Path, *, max_to_keep: int = 2, asynchronous: bool = True):
    self.directory = pathlib.Path(workdir).absolute() / "checkpoints"
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True, enable_async_checkpointing=asynchronous)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data", "meta"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_state: dict, meta: dict, *, force: bool = True) -> None:
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
        meta=ocp.args.JsonSave(meta)), force=force)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict, dict]:
    """Restores `step` into arrays shaped and sharded like `abstract_state` (a ShapeDtypeStruct tree)."""
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
        meta=ocp.args.JsonRestore()))
    return restored["state"], restored["data"], restored["meta"]

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
