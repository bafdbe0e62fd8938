"""Host memory for input batches, and the worker processes that fill it in place (data.num_workers > 0).

Numpy and the standard library only: no jax here, and no device is ever touched in a worker process
(the row fillers they unpickle import jax's modules but never start a backend).

- `BufferLayout` carves a nested dict of row-major arrays (one batch) out of one flat byte arena.
- `BufferPool` recycles arenas once nothing refers to them any more: a fresh ~50 MB batch is fresh pages,
  and faulting and zeroing them cost the kernel ~0.4 ms per example (40 % of the pipeline's work in a
  measurement). Its arenas are private memory, or shared memory that worker processes can write.
- `ProcessReader` runs a picklable batch filler (`fill(batch_index, out)`) in spawned worker processes that
  write each batch straight into a shared arena; the main process only wraps the arena as numpy arrays,
  which jax adopts without a copy on CPU. Threads cannot do this work in parallel: the per-example decoding
  and bookkeeping hold the GIL, and on a 2-core machine two grain threads made 1.07-1.15x the batches of the
  caller alone, two processes 1.49-1.69x (benchmarks/input_pipeline.py, two runs).
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import mmap
import multiprocessing
import os
import pickle
import queue
import sys
import threading
import time
import traceback
from collections.abc import Mapping
from multiprocessing import shared_memory

import numpy as np

# XLA's CPU client aliases a numpy array instead of copying it when the data is aligned to 64 bytes; a copy
# of a 32 x 120 x 120 batch (~50 MB with a one-hot land-cover input) cost ~0.5 ms of CPU per example.
HOST_ALIGNMENT = 64
# Where Linux exposes POSIX shared memory (multiprocessing.shared_memory's segments) as files.
_SHM_DIR = "/dev/shm"
# How long the main process waits for a result before it checks that the workers are still alive.
_POLL_SECONDS = 1.0


@functools.cache
def retain_freed_host_memory() -> bool:
  """Asks glibc's malloc to keep freed blocks of up to 32 MB for reuse instead of unmapping them.

  Every example read is a fresh ~0.5 MB bytes object (several, counting the decoder's), and by default
  glibc serves those from new mmap'd pages and unmaps them on free: ~500 page faults per example, ~0.3 ms of
  kernel time. glibc lifts that threshold by itself once the process frees a big block, which the pipeline
  did while it allocated a new buffer for every batch; with recycled buffers it never does. Process-wide,
  and harmless elsewhere: freed memory stays mapped (up to 64 MB per malloc arena) instead of going back to
  the OS. Returns False where malloc is not glibc's (nothing changes there).
  """
  try:
    mallopt = ctypes.CDLL(None).mallopt
  except (OSError, AttributeError):
    return False
  m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
  return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 64 << 20))


# ---------------------------------------------------------------------------------------------------------
# Batch memory.
# ---------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class BufferLayout:
  """Where each leaf of a batch lives in a flat arena: (path, byte offset, shape, dtype) per leaf."""
  fields: tuple
  nbytes: int

  @classmethod
  def from_template(cls, template: Mapping, rows: int) -> BufferLayout:
    """The layout of `rows` stacked copies of `template` (a nested dict of arrays or scalars: one row)."""
    fields = []
    offset = 0
    for path, leaf in _flatten(template):
      if leaf is None:  # an empty dict (e.g. no labels): kept, so the batch has the template's structure
        fields.append((path, offset, None, None))
        continue
      leaf = np.asarray(leaf)
      shape = (rows,) + leaf.shape
      fields.append((path, offset, shape, leaf.dtype.str))
      num_bytes = int(np.prod(shape, dtype=np.int64)) * leaf.dtype.itemsize
      offset += -(-num_bytes // HOST_ALIGNMENT) * HOST_ALIGNMENT  # every leaf starts aligned
    return cls(tuple(fields), offset)

  def views(self, arena: np.ndarray) -> dict:
    """The batch as views into `arena` (uint8, at least nbytes + HOST_ALIGNMENT long)."""
    start = -arena.ctypes.data % HOST_ALIGNMENT
    batch = {}
    for path, offset, shape, dtype in self.fields:
      node = batch
      for key in path[:-1]:
        node = node.setdefault(key, {})
      if shape is None:
        node[path[-1]] = {}
        continue
      dtype = np.dtype(dtype)
      num_bytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
      node[path[-1]] = arena[start + offset:start + offset + num_bytes].view(dtype).reshape(shape)
    return batch


def _flatten(tree: Mapping, prefix: tuple = ()):
  for key in sorted(tree):
    value = tree[key]
    if isinstance(value, Mapping) and not value:
      yield prefix + (key,), None
    elif isinstance(value, Mapping):
      yield from _flatten(value, prefix + (key,))
    else:
      yield prefix + (key,), value


class BufferPool:
  """Arenas for batches of one layout, handed out again once no array refers to them.

  Every leaf of a batch is a view of its arena, and numpy points a view's `base` at the arena (the array
  that owns the memory, or wraps the shared memory). A jax.Array made from a leaf on a CPU device aliases
  the memory and holds a reference until it is deleted; a transfer to an accelerator holds one until it
  completes. An arena whose only references are the pool's own is therefore garbage that nobody can see,
  and only such an arena is reused; otherwise the pool makes a new one, so it holds as many arenas as
  batches were ever alive at once (the read-ahead, the caller's, the steps still running). Whoever fills a
  batch overwrites all of it, so a reused arena never shows an earlier batch's values.

  With `shared=True` the arenas are named shared memory that other processes can attach (`shared_name`).
  """

  def __init__(self, layout: BufferLayout, *, shared: bool = False):
    retain_freed_host_memory()
    self.layout = layout
    self._shared = shared
    self._segments = []  # SharedMemory of each shared arena (kept alive, unlinked at close)
    self._lock = threading.Lock()
    # The reference count of an arena nobody else holds, measured by the same call that later tests the
    # arenas, so that interpreter details of how arguments are counted cancel out.
    self._arenas = [self._new_arena()]
    self._idle_references = self._references(0)

  def _references(self, arena_id: int) -> int:
    return sys.getrefcount(self._arenas[arena_id])

  def _new_arena(self) -> np.ndarray:
    size = self.layout.nbytes + HOST_ALIGNMENT
    if not self._shared:
      return np.empty(size, np.uint8)
    segment = shared_memory.SharedMemory(create=True, size=size)
    arena = map_shared(segment.name, size)
    segment.close()  # the segment's own mapping; the arena has its own (see map_shared)
    self._segments.append(segment)  # for the name, and to unlink it at close
    return arena

  def take(self) -> tuple[int, dict]:
    """(arena id, a batch of uninitialised arrays in that arena)."""
    with self._lock:
      for arena_id in range(len(self._arenas)):
        if self._references(arena_id) <= self._idle_references:
          break
      else:
        self._arenas.append(self._new_arena())
        arena_id = len(self._arenas) - 1
      return arena_id, self.layout.views(self._arenas[arena_id])

  def shared_name(self, arena_id: int) -> str:
    return self._segments[arena_id].name

  def close(self) -> None:
    """Releases the shared memory (batches still referenced stay readable until they are deleted)."""
    for segment in self._segments:
      try:
        segment.unlink()
      except FileNotFoundError:
        pass
    self._segments = []


# ---------------------------------------------------------------------------------------------------------
# Worker processes.
# ---------------------------------------------------------------------------------------------------------
class WorkerError(RuntimeError):
  """A batch failed in a worker process; the message carries the worker's traceback."""


def map_shared(name: str, size: int) -> np.ndarray:
  """Maps the named shared-memory segment as a writable uint8 array that keeps the mapping alive.

  Not SharedMemory.buf: numpy lets go of a buffer export right away and keeps only a reference, so
  SharedMemory.close() (also run by its __del__) would unmap memory that arrays still point to. An mmap
  object referenced by the array is unmapped only when the last array using it is gone.
  """
  path = os.path.join(_SHM_DIR, name.lstrip("/"))
  if not os.path.isdir(_SHM_DIR):
    raise OSError(f"{_SHM_DIR} does not exist: worker processes need Linux shared memory; set "
                  "data.worker_type='thread' (or data.num_workers=0).")
  descriptor = os.open(path, os.O_RDWR)
  try:
    mapping = mmap.mmap(descriptor, size)
  finally:
    os.close(descriptor)
  return np.frombuffer(mapping, np.uint8)


def _worker_main(filler_bytes: bytes, layout: BufferLayout, tasks, results) -> None:
  """A worker process: fills the batches named by `tasks` into shared arenas until it reads None."""
  retain_freed_host_memory()
  attached = {}
  try:
    filler = pickle.loads(filler_bytes)
  except BaseException as error:  # pylint: disable=broad-except
    results.put((-1, _describe(error), 0.0))
    return
  while True:
    task = tasks.get()
    if task is None:
      return
    batch_index, name = task
    start = time.process_time()
    try:
      if name not in attached:
        attached[name] = map_shared(name, layout.nbytes + HOST_ALIGNMENT)
      filler.fill(batch_index, layout.views(attached[name]))
      results.put((batch_index, None, time.process_time() - start))
    except BaseException as error:  # pylint: disable=broad-except
      results.put((batch_index, _describe(error), time.process_time() - start))


def _describe(error: BaseException) -> tuple:
  """The error as (exception if it pickles, else None, formatted traceback)."""
  text = "".join(traceback.format_exception(error))
  try:
    pickle.loads(pickle.dumps(error))
  except Exception:  # pylint: disable=broad-except
    error = None
  return error, text


def _raise(failure: tuple):
  error, text = failure
  if error is not None:
    raise error from WorkerError(f"in an input worker process:\n{text}")
  raise WorkerError(f"An input worker process failed:\n{text}")


class ProcessReader:
  """Batches 0..num_batches-1 (in order, from `start`) filled by `num_workers` spawned processes.

  Up to `depth` batches are in flight. The main process chooses each batch's arena from `pool` (shared)
  and keeps the batch's views until it hands them out, so the pool never reuses an arena a worker writes.
  `worker_cpu_seconds` adds up the workers' CPU time of the batches handed out so far.
  """

  def __init__(self, filler, pool: BufferPool, *, num_workers: int, depth: int, num_batches: int,
               start: int = 0):
    try:
      filler_bytes = pickle.dumps(filler)
    except Exception as error:  # pylint: disable=broad-except
      raise TypeError(f"data.num_workers > 0 runs the input pipeline in worker processes, which need a "
                      f"picklable data source; this one is not ({error}). Use data.worker_type='thread' or "
                      "data.num_workers=0.") from error
    context = multiprocessing.get_context("spawn")  # fork is unsafe once jax runs threads
    self._pool = pool
    self._tasks = context.Queue()
    self._results = context.Queue()
    self._workers = [
        context.Process(target=_worker_main, args=(filler_bytes, pool.layout, self._tasks, self._results),
                        name=f"labeleff-data-worker-{i}", daemon=True)
        for i in range(num_workers)]
    for worker in self._workers:
      worker.start()
    self._depth = max(1, depth)
    self._num_batches = num_batches
    self._next = self._submitted = start
    self._pending = {}  # batch index -> views of a batch a worker is filling
    self._done = {}  # batch index -> (views of a filled batch, worker CPU seconds, failure or None)
    self._closed = False
    self.worker_cpu_seconds = 0.0

  def _submit_ahead(self) -> None:
    while self._submitted < min(self._next + self._depth, self._num_batches):
      arena_id, views = self._pool.take()
      self._tasks.put((self._submitted, self._pool.shared_name(arena_id)))
      self._pending[self._submitted] = views
      self._submitted += 1

  def _receive(self) -> None:
    while True:
      try:
        batch_index, failure, cpu_seconds = self._results.get(timeout=_POLL_SECONDS)
        break
      except queue.Empty:
        dead = [worker for worker in self._workers if not worker.is_alive()]
        if dead:
          self.close()
          raise WorkerError(f"Input worker process {dead[0].name} exited with code {dead[0].exitcode} "
                            "(killed, out of memory?); see the log above.") from None
    if batch_index == -1 and failure is not None:  # the worker could not even start
      self.close()
      _raise(failure)
    if batch_index in self._pending:
      # A failed batch is kept until it is asked for: reading ahead must not fail earlier batches.
      self._done[batch_index] = (self._pending.pop(batch_index), cpu_seconds, failure)

  def __next__(self) -> dict:
    if self._closed:
      raise RuntimeError("The input worker processes were closed.")
    if self._next >= self._num_batches:
      raise StopIteration
    self._submit_ahead()
    while self._next not in self._done:
      self._receive()
    batch, cpu_seconds, failure = self._done.pop(self._next)
    self.worker_cpu_seconds += cpu_seconds
    if failure is not None:
      self.close()
      _raise(failure)
    self._next += 1
    self._submit_ahead()
    return batch

  def wait_until_idle(self) -> None:
    """Blocks until the batches in flight are filled (the workers then wait for more)."""
    while self._pending:
      self._receive()

  def seek(self, batch_index: int) -> None:
    """Continue with batch `batch_index`; batches read ahead are discarded."""
    # Workers may still be writing the arenas of batches in flight: wait for them before letting go.
    self.wait_until_idle()
    self._done.clear()
    self._next = self._submitted = batch_index

  def close(self) -> None:
    if self._closed:
      return
    self._closed = True
    for _ in self._workers:
      self._tasks.put(None)
    for worker in self._workers:
      worker.join(timeout=5)
      if worker.is_alive():
        worker.terminate()
        worker.join(timeout=5)
    for channel in (self._tasks, self._results):
      channel.cancel_join_thread()
      channel.close()
    self._pending.clear()
    self._done.clear()
    self._pool.close()
