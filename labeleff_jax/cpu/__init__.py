"""Optional speed-ups for running labeleff_jax on CPUs; nothing here is loaded on GPU or TPU by default.

- `use_fast_convolutions(model)`: routes a model's convolutions through `convolutions` (Winograd,
  pointwise matmuls, tap-wise kernel gradients), and `initializers.block_draw` draws the initial weights
  with one compiled random kernel. `create_model` uses both when `config.model.conv_impl` is 'cpu_fast',
  or 'auto' on a CPU backend.
- The process-level half of the CPU recipe (an allocator that keeps freed memory, XLA:CPU's scheduler
  flag) cannot be set from inside a running Python process: it lives in scripts/cpu_env.sh.
docs/performance_cpu.md explains both and what they were measured to gain.
"""

from flax import nnx

from labeleff_jax.cpu import convolutions
from labeleff_jax.cpu.initializers import block_draw

__all__ = ["block_draw", "convolutions", "use_fast_convolutions"]


def use_fast_convolutions(model: nnx.Module) -> int:
  """Makes every nnx.Conv in `model` use the CPU kernels; returns how many convolutions it changed."""
  changed = 0
  for _, node in nnx.iter_graph(model):
    if isinstance(node, nnx.Conv):
      node.conv_general_dilated = convolutions.conv_general_dilated
      changed += 1
  return changed
