"""PyTorch-style layers for NHWC models: torch's default initialisers, Conv2d, Linear and BatchNorm2d.

Torch's initialisers are kept so that the reference's recipes (e.g. SGD lr 1e-4 for 5 epochs) mean the same
here. They take their random numbers from `draw`, plain `jax.random` by default; a builder may swap in
another source of the same distributions for the duration of one construction (`drawing_with`), which is
how `config.model.conv_impl='cpu_fast'` draws from fixed-size blocks (labeleff_jax/cpu/initializers.py).
"""

import contextlib
import contextvars
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx


def plain_draw(key: jax.Array, shape: tuple, distribution: str) -> jax.Array:
  """float32 samples of U(-1, 1) ('uniform') or N(0, 1) ('normal') of `shape`."""
  if distribution == "uniform":
    return jax.random.uniform(key, shape, jnp.float32, -1.0, 1.0)
  return jax.random.normal(key, shape, jnp.float32)


_draw = contextvars.ContextVar("draw", default=plain_draw)


@contextlib.contextmanager
def drawing_with(draw: Callable[[jax.Array, tuple, str], jax.Array]):
  """Inside the block, the initialisers below take their samples from `draw` (same signature as
  `plain_draw`)."""
  token = _draw.set(draw)
  try:
    yield
  finally:
    _draw.reset(token)


def _scaled(key, shape, distribution: str, scale: float, dtype) -> jax.Array:
  shape = tuple(int(d) for d in shape)
  return (_draw.get()(key, shape, distribution) * jnp.float32(scale)).astype(dtype)


def _fan_in(shape) -> int:
  return math.prod(shape[:-1])  # HWIO conv kernels and [in, out] dense kernels


def torch_default_kernel_init(key, shape, dtype=jnp.float32):
  """torch's Conv2d/Linear default (kaiming_uniform, a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  return _scaled(key, shape, "uniform", 1.0 / math.sqrt(_fan_in(shape)), dtype)


def torch_resnet_kernel_init(key, shape, dtype=jnp.float32):
  """torchvision's ResNet convs: kaiming_normal_(mode='fan_out', nonlinearity='relu'), N(0, 2 / fan_out)."""
  fan_out = math.prod(shape[:-2]) * shape[-1]
  return _scaled(key, shape, "normal", math.sqrt(2.0 / fan_out), dtype)


def torch_default_bias_init(fan_in: int):
  """Bias init of torch's Conv2d/Linear: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (fan_in of the kernel)."""
  bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0

  def init(key, shape, dtype=jnp.float32):
    return _scaled(key, shape, "uniform", bound, dtype)

  return init


def conv(in_channels: int, out_channels: int, kernel_size: int, *, stride: int = 1, padding: int = 0,
         use_bias: bool = True, kernel_init=torch_default_kernel_init, dtype=jnp.float32,
         rngs: nnx.Rngs) -> nnx.Conv:
  """A torch-style Conv2d (symmetric integer padding, torch default init) for NHWC inputs."""
  fan_in = in_channels * kernel_size * kernel_size
  return nnx.Conv(
      in_channels, out_channels, (kernel_size, kernel_size), strides=(stride, stride),
      padding=((padding, padding), (padding, padding)), use_bias=use_bias,
      kernel_init=kernel_init, bias_init=torch_default_bias_init(fan_in),
      dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


def linear(in_features: int, out_features: int, *, dtype=jnp.float32, rngs: nnx.Rngs) -> nnx.Linear:
  """A torch-style nn.Linear (torch default init)."""
  return nnx.Linear(
      in_features, out_features, kernel_init=torch_default_kernel_init,
      bias_init=torch_default_bias_init(in_features), dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


def batch_norm(num_features: int, *, dtype=jnp.float32, rngs: nnx.Rngs) -> nnx.BatchNorm:
  """BatchNorm2d with torch's defaults: torch momentum 0.1 is flax momentum 0.9, eps 1e-5.

  Statistics are reduced in float32 and the running averages are stored in float32 whatever `dtype` is
  (flax promotes the reductions); only the normalised output is in the compute dtype.
  One difference to torch remains: the running variance is updated with the biased batch variance
  (torch uses the unbiased one), a factor n/(n-1) with n = batch * height * width pixels.
  """
  return nnx.BatchNorm(num_features, momentum=0.9, epsilon=1e-5, dtype=dtype, param_dtype=jnp.float32,
                       rngs=rngs)
