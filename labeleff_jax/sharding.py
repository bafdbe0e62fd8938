"""The device mesh and how batches live on it: the data axis, a batch's rows per process, shard_map helpers.

One mesh axis, `data`, carries the batch; parameters are replicated. Every module that places, splits or
reduces a batch takes these from here.
"""

import collections
import dataclasses
import zlib
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

DATA_AXIS = "data"


def make_mesh(num_devices: int = -1) -> jax.sharding.Mesh:
  """A 1-D `data` mesh over the first `num_devices` devices (-1: all), of every process, on whatever
  platform JAX found.

  Auto axis types let XLA propagate shardings through the model, so batch-wide reductions (BatchNorm
  statistics, the NT-Xent similarity matrix) need no sharding annotations in model code.
  """
  devices = jax.devices()
  count = len(devices) if num_devices in (-1, None) else num_devices
  if count > len(devices) or count < 1:
    raise ValueError(f"config.mesh.data={num_devices} but {len(devices)} devices are available")
  return jax.make_mesh((count,), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=devices[:count])


# ---------------------------------------------------------------------------------------------------------
# Moving whole trees between the hosts and the mesh, with one process or several.
# ---------------------------------------------------------------------------------------------------------
def replicate(tree: Any, mesh: jax.sharding.Mesh) -> Any:
  """Every leaf as a global array replicated on `mesh`, from the same values held by every process.

  With several processes `jax.device_put` cannot reach the other processes' devices, so each process
  contributes its own copy (`make_array_from_process_local_data` with a replicated sharding); the caller
  makes sure the copies agree (see `check_same_everywhere`).
  """
  replicated = NamedSharding(mesh, PartitionSpec())
  if jax.process_count() == 1:
    return jax.device_put(tree, replicated)

  def put(leaf):
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):  # typed keys have no numpy form
      return jax.random.wrap_key_data(put(jax.random.key_data(leaf)), impl=jax.random.key_impl(leaf))
    return jax.make_array_from_process_local_data(replicated, np.asarray(leaf))

  return jax.tree.map(put, tree)


def checksums(tree: Any) -> dict[str, int]:
  """CRC-32 of every leaf's bytes (this process's values), keyed by the leaf's tree path."""
  def crc(leaf):
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):  # typed keys have no numpy form
      leaf = jax.random.key_data(leaf)
    return zlib.crc32(np.ascontiguousarray(np.asarray(leaf)).tobytes())

  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(path): crc(leaf) for path, leaf in leaves}


_barrier_uses = collections.Counter()


def wait_for_every_process(name: str, *, timeout_s: int = 24 * 3600) -> None:
  """A barrier across the processes of a run (nothing with one process).

  It is a barrier of jax.distributed's coordination service, not a collective over the devices, so it
  never depends on how long JAX's CPU collectives (Gloo) wait for a late process. A process that dies ends
  the wait (the service's heartbeats); `timeout_s` only bounds a process that hangs.
  """
  if jax.process_count() == 1:
    return
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  _barrier_uses[name] += 1  # every process passes the same barriers in the same order; ids are single-use
  ocp.multihost.get_barrier_sync_fn()(key=f"{name} #{_barrier_uses[name]}", timeout_ms=timeout_s * 1000)


def compile_together(jitted: Callable, name: str) -> Callable:
  """`jitted` (a `jax.jit` function) for a run of several processes: its first call compiles it, waits
  until every process has compiled it, then runs it. So the processes reach its collectives together,
  however much longer one of them compiled (a loaded host, a different state of the compilation cache).
  JAX's CPU collectives (Gloo) need that: when a computation's first collective over a new set of devices
  starts more than 30 s later in one process than in another, the other fails ("Gloo context
  initialization failed: GetKeyValue() timed out"), measured with jax 0.10.2. With one process, `jitted`
  itself."""
  if jax.process_count() == 1:
    return jitted
  compiled = False

  def call(*args):
    nonlocal compiled
    if not compiled:
      jitted.lower(*args).compile()  # jit's own call below finds this executable in its cache
      wait_for_every_process(f"{name} compiled")
      compiled = True
    return jitted(*args)
  return call


def check_same_everywhere(tree: Any, what: str) -> None:
  """Raises unless every process holds bit-identical values (compared by a CRC-32 of each leaf's bytes)."""
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  paths, sums = zip(*checksums(tree).items())
  # uint32 survives the gather exactly (JAX would round float64 checksums to float32).
  local = np.asarray(sums, np.uint32)
  everywhere = np.asarray(multihost_utils.process_allgather(local))  # [processes, leaves]
  differing = [path for index, path in enumerate(paths) if np.any(everywhere[:, index] != local[index])]
  if differing:
    raise ValueError(f"{what} differs between processes at {differing[:5]} ({len(differing)} arrays); every "
                     "process must build it from the same config, seed and files")


def any_process(flag: bool) -> bool:
  """True on every process when `flag` is True on any of them (a collective with several processes)."""
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.any(multihost_utils.process_allgather(np.asarray([flag], np.int32))))


def to_host(tree: Any) -> Any:
  """Every leaf as a numpy array holding its whole global value, in every process.

  A collective when an array spans other processes' devices and is not replicated: every process must
  call it with the same tree.
  """
  def fetch(leaf):
    if not isinstance(leaf, jax.Array) or leaf.is_fully_addressable or leaf.is_fully_replicated:
      return np.asarray(leaf)
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))

  return jax.tree.map(fetch, tree)


# ---------------------------------------------------------------------------------------------------------
# Placing host rows on the mesh.
# ---------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class BatchLayout:
  """How one global batch is split: this process builds rows [row_start, row_stop)."""
  global_batch_size: int
  row_start: int
  row_stop: int
  sharding: NamedSharding

  @property
  def local_batch_size(self) -> int:
    return self.row_stop - self.row_start

  def to_global(self, host_batch):
    """Turns this process's numpy rows into global jax.Arrays sharded over the data axis."""
    def place(rows):
      global_shape = (self.global_batch_size,) + rows.shape[1:]
      return jax.make_array_from_process_local_data(self.sharding, rows, global_shape)
    return jax.tree.map(place, host_batch)


def batch_layout(mesh: jax.sharding.Mesh, global_batch_size: int, key: str) -> BatchLayout:
  """Checks `global_batch_size` against the mesh and finds this process's rows of it."""
  if DATA_AXIS not in mesh.shape:
    raise ValueError(f"The mesh has no '{DATA_AXIS}' axis (axes: {tuple(mesh.shape)}); batches are sharded "
                     f"over '{DATA_AXIS}'.")
  data_devices = mesh.shape[DATA_AXIS]
  if global_batch_size % data_devices:
    raise ValueError(f"{key}={global_batch_size} is not divisible by the {data_devices} devices of the "
                     f"mesh's '{DATA_AXIS}' axis.")
  batch_sharding = NamedSharding(mesh, PartitionSpec(DATA_AXIS))
  # The rows this process must supply are the union of its devices' shards; ask the sharding rather than
  # assume processes own equal consecutive blocks in process order.
  shards = batch_sharding.addressable_devices_indices_map((global_batch_size,)).values()
  starts = sorted({shard[0].indices(global_batch_size)[0] for shard in shards})
  stops = sorted({shard[0].indices(global_batch_size)[1] for shard in shards})
  row_start, row_stop = starts[0], stops[-1]
  covered = sum(stop - start for start, stop in zip(starts, stops))
  if covered != row_stop - row_start:
    raise ValueError("This process's devices hold non-contiguous rows of the batch; order the mesh's "
                     f"'{DATA_AXIS}' axis by process.")
  return BatchLayout(global_batch_size, row_start, row_stop, batch_sharding)


# ---------------------------------------------------------------------------------------------------------
# Finding the mesh a batch is sharded over (losses and metrics that mix rows of a batch).
#
# With Explicit mesh axes (the jax.make_mesh default since jax 0.9) operations that mix rows of a
# batch-sharded array (z @ z.T, scatter-adds into a replicated histogram) are sharding type errors, so
# those computations run per shard under jax.shard_map with explicit collectives. Auto axes would also
# work without it, but taking the same path everywhere keeps one code path tested.
# ---------------------------------------------------------------------------------------------------------


class _InsideShardMap:
  """Marker returned by batch_mesh when the axis is already manual: call collectives directly."""

  def __repr__(self):
    return "INSIDE_SHARD_MAP"


INSIDE_SHARD_MAP = _InsideShardMap()


def batch_mesh(array: jax.Array, mesh: Any = None, axis_name: str = DATA_AXIS) -> Any:
  """The mesh to shard_map `array`'s leading (batch) axis over, INSIDE_SHARD_MAP, or None.

  Looks, in order, at the `mesh` argument, the mesh in context (`jax.set_mesh`), and the mesh of the
  array's own sharding type. Returns None (plain single-program path) when no mesh has `axis_name`,
  when that axis has size 1, or when the batch does not split evenly over it (then the array cannot be
  sharded over the axis, and jit's automatic partitioning handles the replicated or Auto case).
  """
  if mesh is not None:
    if axis_name not in mesh.axis_names:
      raise ValueError(f"mesh has axes {mesh.axis_names}, no {axis_name!r} axis to shard the batch over.")
    candidate = mesh
  else:
    candidate = None
    context = jax.sharding.get_abstract_mesh()
    if not context.empty and axis_name in context.axis_names:
      if axis_name in context.manual_axes:
        return INSIDE_SHARD_MAP
      candidate = context
    else:
      sharding = getattr(jax.typeof(array), "sharding", None)
      array_mesh = getattr(sharding, "mesh", None)
      if array_mesh is not None and not array_mesh.empty and axis_name in array_mesh.axis_names:
        candidate = array_mesh
  if candidate is None:
    return None
  axis_size = dict(zip(candidate.axis_names, candidate.axis_sizes))[axis_name]
  if axis_size == 1 or array.shape[0] % axis_size != 0:
    return None
  return candidate


def map_over_batch_shards(per_shard_fn: Callable, mesh: Any, axis_name: str, batch_args: tuple,
                          replicated_args: tuple = ()) -> Any:
  """Runs per_shard_fn(*batch_shards, *replicated_args, axis_name) once per shard of the batch axis.

  `mesh` comes from batch_mesh. per_shard_fn must return values that are invariant over `axis_name`
  (after a psum), which come back replicated. With mesh None it runs once on the whole batch with
  axis_name None; with INSIDE_SHARD_MAP the arguments already are shards.
  """
  if mesh is None:
    return per_shard_fn(*batch_args, *replicated_args, None)
  if mesh is INSIDE_SHARD_MAP:
    return per_shard_fn(*batch_args, *replicated_args, axis_name)
  if axis_name in mesh.explicit_axes:
    # shard_map wants Explicit-axis inputs already laid out as in_specs says; this is a no-op for a batch
    # that is sharded over the axis already, and a split for one that is replicated.
    target = NamedSharding(mesh, PartitionSpec(axis_name))
    batch_args = tuple(jax.reshard(arg, target) for arg in batch_args)
  mapped = jax.shard_map(
      lambda *args: per_shard_fn(*args, axis_name),
      mesh=mesh,
      in_specs=(PartitionSpec(axis_name),) * len(batch_args) + (PartitionSpec(),) * len(replicated_args),
      out_specs=PartitionSpec(),
  )
  return mapped(*batch_args, *replicated_args)
