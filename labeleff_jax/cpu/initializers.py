"""Random numbers for initialisers drawn from fixed-size blocks, so XLA:CPU compiles one random kernel.

XLA compiles a random-number kernel for every distinct parameter shape, and on a CPU that compile costs
up to a second per shape (tens of seconds for a model; docs/performance_cpu.md). Drawing every parameter
from whole 64k-sample blocks (fold_in(key, i) per block) and slicing off the prefix compiles one kernel per
distribution, and each shape only adds a cheap slice + reshape. Same distributions as
`torch_style.plain_draw`, other samples: a model built with `conv_impl='cpu_fast'` starts from other
initial weights than one built with 'xla' from the same seed.
"""

import functools
import math

import jax
import jax.numpy as jnp

BLOCK = 1 << 16


@functools.partial(jax.jit, static_argnames=("distribution",))
def _random_block(key: jax.Array, distribution: str) -> jax.Array:
  if distribution == "uniform":
    return jax.random.uniform(key, (BLOCK,), jnp.float32, -1.0, 1.0)
  return jax.random.normal(key, (BLOCK,), jnp.float32)


@functools.partial(jax.jit, static_argnames=("shape",))
def _prefix(values: jax.Array, shape: tuple) -> jax.Array:
  return values[: math.prod(shape)].reshape(shape)


def block_draw(key: jax.Array, shape: tuple, distribution: str) -> jax.Array:
  """float32 samples of U(-1, 1) or N(0, 1) of `shape`, from the blocks fold_in(key, 0), fold_in(key, 1)..."""
  num_blocks = max(1, -(-math.prod(shape) // BLOCK))
  blocks = [_random_block(jax.random.fold_in(key, i), distribution) for i in range(num_blocks)]
  return _prefix(blocks[0] if num_blocks == 1 else jnp.concatenate(blocks), shape)
