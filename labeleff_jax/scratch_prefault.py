"""Writes XLA:CPU's scratch block first thing in every train step, on hosts that take freed memory back.

XLA:CPU allocates all temporaries of one execution as a single block (955 MB for the reference U-Net's
batch-8 float32 step) and frees it when the execution ends; glibc hands a block that large back to the
kernel. On a VM whose balloon device reports free pages to the hypervisor (virtio-balloon free page
reporting), a reporting pass every ~2 s gives up to 128-192 MiB of the free memory to the host, and the
step that needs those pages again waits ~4.4 ms per 2 MiB for the host to supply them (~0.2 ms otherwise).
A step writes its block gradually over its first ~0.7 s, so a pass that lands then finds much of it free:
on the 2-core VM this project is measured on, two steps in three lost 0.2-0.45 s that way.

The fix here: compile the step once to learn its scratch size, then compile it again with a first
operation that writes an int32 buffer as large as the whole block, ordered (by an optimization barrier)
before everything else, so that nothing else is live beside it and it covers the block from end to end.
The block is then back in the process ~75 ms into the step. A pass that lands within those ~75 ms
still costs the step (with the ~2 s between passes that happens when steps take 1.93-2.0 s). Measured on
that VM (benchmarks/README.md): batch-8 step 2.07-2.08 -> 1.85-1.91 s in a loop; 0-4 of 20 steps hit in
four benchmark runs, against 15 of 20 in the last run without it. Costs: a second compilation and a
larger block (with the buffer the other temporaries pack less tightly: 955 -> 1242 MB). Results are
bit-identical: the buffer only feeds an extra output, dropped again. It made the contrastive
dual-encoder step slower (the host took 410-570 MiB in every step with it; why is not understood), so
`train.prefault_scratch` is off unless a config measured a gain (configs/supervised.py).
"""

import glob
import math

from absl import logging
import jax
import jax.numpy as jnp

MODES = ("auto", "on", "off")
# VIRTIO_BALLOON_F_REPORTING: the balloon device takes free page hints (virtio spec, "Balloon Device").
FREE_PAGE_REPORTING_FEATURE_BIT = 5
BALLOON_FEATURE_FILES = "/sys/bus/virtio/drivers/virtio_balloon/*/features"
# "auto" leaves smaller blocks alone: the second compilation costs more than it wins back there (the
# quickstart's 320 MB block: 102 -> 134 s for its 90-step run, the extra compile included).
MIN_AUTO_SCRATCH_BYTES = 512 << 20
# The buffer is sized from the plain step's block with this headroom (adding the buffer makes the other
# temporaries pack less tightly: the U-Net's 955 MB block needs 1184 MB beside it), in whole 2 MiB pages;
# if the block still outgrows it, it is compiled again with the buffer as large as that block.
HEADROOM = 1.3
PAGE_BYTES = 2 << 20
MAX_RESIZES = 2


def host_reports_free_pages(feature_files: str = BALLOON_FEATURE_FILES) -> bool:
  """Whether a virtio balloon device on this machine takes free page reports (Linux sysfs)."""
  for path in glob.glob(feature_files):
    try:
      with open(path) as f:
        bits = f.read().strip()
    except OSError:
      continue
    if len(bits) > FREE_PAGE_REPORTING_FEATURE_BIT and bits[FREE_PAGE_REPORTING_FEATURE_BIT] == "1":
      return True
  return False


def wanted(mode: str, platform: str) -> bool:
  """Whether the train step should be compiled through `PrefaultingStep` (it still checks the size)."""
  if mode not in MODES:
    raise ValueError(f"train.prefault_scratch={mode!r}; choose one of {MODES}")
  if platform != "cpu" or mode == "off":
    return False  # GPU and TPU temporaries live in the device allocator's pool: nothing to win there
  return mode == "on" or host_reports_free_pages()


def with_scratch_write(step_fn, num_bytes: int):
  """(step_fn(*args, step), 0): the step after a first write of `num_bytes` of int32 scratch.

  The extra int32 output, read from the buffer, keeps XLA from dropping the write: a step that never
  uses its step number (constant schedule, no dropout) would otherwise lose the buffer as dead code.
  """
  size = -(-num_bytes // 4)

  def step_with_scratch_write(*args):
    *args, step = args
    zero = jnp.minimum(step, 0)  # 0 for every step the engine runs, but nothing XLA can fold
    scratch = jnp.broadcast_to(zero, (size,))
    # Read back through a conditional: XLA must materialize a conditional's operand, where a slice of
    # the broadcast itself would fold to the scalar and the buffer would never be written.
    first = jax.lax.cond(zero > 0, lambda s: s[zero], lambda s: s[zero + 1], scratch)
    # Everything the step computes waits for the buffer's read, so nothing is live beside the buffer.
    first, args, step = jax.lax.optimization_barrier((first, args, step))
    return step_fn(*args, step), first

  return step_with_scratch_write


class _WithoutScratchOutput:
  """A compiled `with_scratch_write` step, called like the plain step's executable."""

  def __init__(self, compiled):
    self.compiled = compiled

  def __call__(self, *args):
    return self.compiled(*args)[0]

  def memory_analysis(self):
    return self.compiled.memory_analysis()

  def as_text(self):
    return self.compiled.as_text()


def _whole_pages(num_bytes: float) -> int:
  return math.ceil(num_bytes / PAGE_BYTES) * PAGE_BYTES


class PrefaultingStep:
  """A jitted train step (last argument: the int32 step number) compiled with `with_scratch_write`.

  Called like the `jax.jit` function it replaces, and like it compiles once per input signature (shapes,
  dtypes, shardings); `lower(*args).compile()` returns the executable the calls use, as for `jax.jit`.
  `blocks` maps each signature to the plain step's scratch block, the buffer written first (0 where
  "auto" found the block too small) and the block of the executable used, in bytes.
  """

  def __init__(self, step_fn, *, donate_argnums, mode: str):
    self._step_fn = step_fn
    self._donate_argnums = donate_argnums
    self._mode = mode
    self._executables = {}
    self.blocks = {}

  def _jit(self, fn):
    return jax.jit(fn, donate_argnums=self._donate_argnums)

  def _compile(self, args):
    plain = self._jit(self._step_fn).lower(*args).compile()
    block = plain.memory_analysis().temp_size_in_bytes
    if self._mode == "auto" and block < MIN_AUTO_SCRATCH_BYTES:
      return plain, {"plain_block_bytes": block, "scratch_bytes": 0, "block_bytes": block}
    scratch = _whole_pages(max(block * HEADROOM, 1))
    for attempt in range(MAX_RESIZES + 1):
      compiled = self._jit(with_scratch_write(self._step_fn, scratch)).lower(*args).compile()
      grown = compiled.memory_analysis().temp_size_in_bytes
      # A few scalars are live beside the buffer; more than a page left unwritten means it was too small.
      if grown - scratch <= PAGE_BYTES or attempt == MAX_RESIZES:
        break
      scratch = _whole_pages(grown)
    if grown < scratch:  # the buffer is not in the block: nothing would be written first
      logging.warning("scratch pre-fault: XLA left the %d-byte buffer out of the %d-byte block; plain step",
                      scratch, grown)
      return plain, {"plain_block_bytes": block, "scratch_bytes": 0, "block_bytes": block}
    if grown - scratch > PAGE_BYTES:
      logging.warning("scratch pre-fault: the block (%d bytes) outgrew the %d bytes written", grown, scratch)
    logging.info("scratch pre-fault: step block %.0f MB, written first as %.0f MB (block now %.0f MB)",
                 block / 1e6, scratch / 1e6, grown / 1e6)
    return _WithoutScratchOutput(compiled), {"plain_block_bytes": block, "scratch_bytes": scratch,
                                             "block_bytes": grown}

  def compile(self, *args):
    """The executable for these arguments, compiled on first use."""
    signature = (jax.tree.structure(args),
                 tuple((x.shape, x.dtype, x.sharding) for x in jax.tree.leaves(args)))
    if signature not in self._executables:
      self._executables[signature], self.blocks[signature] = self._compile(args)
    return self._executables[signature]

  def lower(self, *args):
    """`jax.jit`'s ahead-of-time interface: `.lower(*args).compile()`."""
    return _Lowered(self, args)

  def __call__(self, *args):
    return self.compile(*args)(*args)


class _Lowered:

  def __init__(self, step, args):
    self._step, self._args = step, args

  def compile(self):
    return self._step.compile(*self._args)
