"""Building blocks shared by the models: PyTorch-like layers and initialisers, dtypes, pooling, upsampling."""

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from labeleff_jax.models.registry import COMPUTE_DTYPES, check_choice

# ---------------------------------------------------------------------------------------------------------
# Initialisers. PyTorch's (kept so that the reference's recipes, e.g. SGD lr 1e-4 for 5 epochs, mean the
# same here) drawn from fixed-size random blocks: XLA compiles a random kernel for every distinct shape,
# which costs ~1 s per shape on a loaded 2-core CPU and dominated building a model (tens of seconds for a
# U-Net). With blocks, one random kernel is compiled once and each shape only needs a cheap slice+reshape.
# ---------------------------------------------------------------------------------------------------------
_RANDOM_BLOCK = 1 << 16


@functools.partial(jax.jit, static_argnames=("distribution",))
def _random_block(key: jax.Array, distribution: str) -> jax.Array:
  if distribution == "uniform":
    return jax.random.uniform(key, (_RANDOM_BLOCK,), jnp.float32, -1.0, 1.0)
  return jax.random.normal(key, (_RANDOM_BLOCK,), jnp.float32)


@functools.partial(jax.jit, static_argnames=("shape", "dtype"))
def _scaled_prefix(values: jax.Array, scale: jax.Array, shape: tuple, dtype) -> jax.Array:
  return (values[: math.prod(shape)].reshape(shape) * scale).astype(dtype)


def _draw(key: jax.Array, shape, distribution: str, scale: float, dtype) -> jax.Array:
  """`scale` * U(-1, 1) or N(0, 1) samples of `shape`, from independent blocks fold_in(key, i)."""
  shape = tuple(int(d) for d in shape)
  num_blocks = max(1, -(-math.prod(shape) // _RANDOM_BLOCK))
  blocks = [_random_block(jax.random.fold_in(key, i), distribution) for i in range(num_blocks)]
  values = blocks[0] if num_blocks == 1 else jnp.concatenate(blocks)
  return _scaled_prefix(values, jnp.float32(scale), shape, jnp.dtype(dtype))


def _fan_in(shape) -> int:
  return math.prod(shape[:-1])  # HWIO conv kernels and [in, out] dense kernels


def torch_default_kernel_init(key, shape, dtype=jnp.float32):
  """torch's Conv2d/Linear default (kaiming_uniform, a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  return _draw(key, shape, "uniform", 1.0 / math.sqrt(_fan_in(shape)), dtype)


def torch_resnet_kernel_init(key, shape, dtype=jnp.float32):
  """torchvision's ResNet convs: kaiming_normal_(mode='fan_out', nonlinearity='relu'), N(0, 2 / fan_out)."""
  fan_out = math.prod(shape[:-2]) * shape[-1]
  return _draw(key, shape, "normal", math.sqrt(2.0 / fan_out), dtype)


def torch_default_bias_init(fan_in: int):
  """Bias init of torch's Conv2d/Linear: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (fan_in of the kernel)."""
  bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0

  def init(key, shape, dtype=jnp.float32):
    return _draw(key, shape, "uniform", bound, dtype)

  return init


def resolve_dtype(name: str) -> Any:
  """Maps config.train.compute_dtype to a jnp dtype."""
  check_choice(name, COMPUTE_DTYPES, "config.train.compute_dtype")
  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


# ---------------------------------------------------------------------------------------------------------
# Convolutions on CPU. Three rewrites of what XLA:CPU does by itself, all only on the CPU platform (GPU and
# TPU backends keep their own convolutions, chosen with lax.platform_dependent):
# 1. The kernel gradient. XLA:CPU lowers it to a convolution whose "kernel" is the whole output map, which
#    runs at a few GFLOP/s: at 120 px it took 2-9x the time of the forward convolution. It is a sum over
#    positions of input patches times output gradients, i.e. one matmul per kernel tap (kh * kw matmuls
#    contracting over batch and positions), 2-8x faster here. Im2col (one GEMM over all taps) and
#    flattened-offset variants were measured too and were slower.
# 2. Winograd convolution (Lavin & Gray, 2016) for the 3x3 / stride 1 / pad 1 float32 convolutions that
#    dominate the U-Net. F(m x m, 3 x 3) computes an m x m output tile from an (m+2) x (m+2) input window
#    with (m+2)^2 multiply-adds per channel pair instead of 9 m^2 (F(2x2): 16 vs 36, F(3x3): 25 vs 81,
#    F(4x4): 36 vs 144), as (m+2)^2 independent matmuls with cheap additions around them. Forward, input
#    gradient (the same convolution of the output gradient with the flipped kernel) and kernel gradient all
#    use it; the backward pass recomputes the input transform instead of keeping it (2.25-4x the input).
#    Measured on the 2-core CPU, fwd + bwd of one layer at batch 8 vs the direct convolution with rewrite 1:
#    F(2x2) 2.4x at 120 px / 64 channels, 1.8x at 60 and 30 px, 1.1x at 15 px, 0.7x at 7 px (too few
#    tiles). Tile sizes by whole U-Net step (batch 8, back to back): F(2x2) from 12 px 2.51 s; F(3x3) there
#    instead (the U-Net's 60, 30 and 15 px divide by 3: no padded tiles) 2.18-2.22 s, also at 7 px 2.30 s;
#    F(4x4) at 120 px beat F(3x3) there (2.43 s with F(3x3) everywhere) and lost at 60 and 30 px. Rerun
#    after the kernel transforms became one matmul (_winograd_kernels), medians of 6 steps: F(3x3) from
#    12 px 2.09 s, F(4x4) from 60 px 2.11 s, from 30 px 2.14 s; per layer (fwd + bwd), F(5x5) (points 0,
#    +-1, +-2, 1/2) at 15-60 px and F(6x6) at 30-120 px were slower than F(3x3) / F(4x4) at every size:
#    more, smaller matmuls that re-read more transformed weights. WINOGRAD_TILE_BY_MIN_SIZE encodes this.
#    Results differ from the direct convolution by float32 rounding: ~1e-6 relative for F(2x2) and F(3x3),
#    ~1e-5 for F(4x4).
# 3. Pointwise (1x1) convolutions as matmuls over channels (pointwise_conv).
# ---------------------------------------------------------------------------------------------------------
_NHWC = ("NHWC", "HWIO", "NHWC")

# Winograd transforms F(m x m, 3 x 3) by output tile size m (Lavin & Gray, 2016): input transform B^T,
# kernel transform G, output transform A^T (Toom-Cook at the points 0, 1, -1, 2, -2 (as far as needed) and
# infinity; B^T for m = 3 solved from A^T diag(G g) B^T d = correlation(d, g)). Windows of m + 2 input
# pixels overlap by 2.
_WINOGRAD = {
    2: (np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], np.float32),
        np.array([[1, 0, 0], [1 / 2, 1 / 2, 1 / 2], [1 / 2, -1 / 2, 1 / 2], [0, 0, 1]], np.float32),
        np.array([[1, 1, 1, 0], [0, 1, -1, -1]], np.float32)),
    3: (np.array([[2, -1, -2, 1, 0], [0, -2, -1, 1, 0], [0, 2, -3, 1, 0], [0, -1, 0, 1, 0],
                  [0, 2, -1, -2, 1]], np.float32),
        np.array([[1 / 2, 0, 0], [-1 / 2, -1 / 2, -1 / 2], [-1 / 6, 1 / 6, -1 / 6], [1 / 6, 1 / 3, 2 / 3],
                  [0, 0, 1]], np.float32),
        np.array([[1, 1, 1, 1, 0], [0, 1, -1, 2, 0], [0, 1, 1, 4, 1]], np.float32)),
    4: (np.array([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0], [0, -2, -1, 2, 1, 0],
                  [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]], np.float32),
        np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6], [1 / 24, 1 / 12, 1 / 6],
                  [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]], np.float32),
        np.array([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]],
                 np.float32)),
}
# (smallest output side, tile), first match wins: F(4x4) from 90 px, F(3x3) from 12 px, direct below.
WINOGRAD_TILE_BY_MIN_SIZE = ((90, 4), (12, 3))


def _xla_conv(x, w, strides, padding):
  return jax.lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_NHWC)


def winograd_tile(x_shape, w_shape, strides, padding, dtype) -> int | None:
  """The output tile size of the Winograd convolution the CPU path uses here, None for the direct one."""
  if not (tuple(w_shape[:2]) == (3, 3) and tuple(strides) == (1, 1)
          and tuple(map(tuple, padding)) == ((1, 1), (1, 1)) and jnp.dtype(dtype) == jnp.float32):
    return None
  return next((tile for size, tile in WINOGRAD_TILE_BY_MIN_SIZE if min(x_shape[1], x_shape[2]) >= size), None)


def _linear_combination(coefficients, arrays):
  """sum(c * a) with constant coefficients, zero terms skipped: XLA fuses it into one elementwise loop."""
  total = None
  for coefficient, array in zip(coefficients, arrays):
    if coefficient == 0:
      continue
    term = array if coefficient == 1 else -array if coefficient == -1 else array * np.float32(coefficient)
    total = term if total is None else total + term
  return total


def _tiles(height: int, width: int, tile: int) -> tuple[int, int]:
  return -(-height // tile), -(-width // tile)


def _winograd_input_tiles(x: jax.Array, tile: int) -> list:
  """B^T d B of every (tile+2)^2 input window d (stride tile, input padded by 1): (tile+2)^2 arrays
  [windows, channels].

  Separate arrays, not one stacked [(tile+2)^2, windows, channels] array: XLA:CPU computes each as its own
  fused loop over strided slices, 3-4x faster than the concatenation a stack becomes.
  """
  bt = _WINOGRAD[tile][0]
  size = tile + 2
  _, height, width, channels = x.shape
  tiles_h, tiles_w = _tiles(height, width, tile)
  padded = jnp.pad(x, ((0, 0), (1, tile * tiles_h + 1 - height), (1, tile * tiles_w + 1 - width), (0, 0)))
  window = [padded[:, i:i + tile * (tiles_h - 1) + 1:tile, j:j + tile * (tiles_w - 1) + 1:tile]
            for i in range(size) for j in range(size)]
  return [_linear_combination(np.outer(bt[a], bt[b]).ravel(), window).reshape(-1, channels)
          for a in range(size) for b in range(size)]


def _winograd_output(products: list, output_shape, tile: int) -> jax.Array:
  """A^T M A of the transformed products [windows, channels]: the output, tile x tile pixels per window."""
  at = _WINOGRAD[tile][2]
  batch, height, width, channels = output_shape
  tiles_h, tiles_w = _tiles(height, width, tile)
  products = [m.reshape(batch, tiles_h, tiles_w, channels) for m in products]
  pixels = [[_linear_combination(np.outer(at[p], at[q]).ravel(), products) for q in range(tile)]
            for p in range(tile)]
  y = jnp.stack([jnp.stack(row, axis=3) for row in pixels], axis=2)  # [B, tiles_h, tile, tiles_w, tile, C]
  return y.reshape(batch, tile * tiles_h, tile * tiles_w, channels)[:, :height, :width]


def _winograd_kernels(w: jax.Array, tile: int) -> list:
  """G g G^T of every input/output channel pair of a 3x3 HWIO kernel: (tile+2)^2 arrays [in, out].

  One [(tile+2)^2, 9] x [9, in * out] matmul (kron(G, G) on the flattened taps), whose long side is the
  channel pairs. The einsum "ai,ijco,bj->abco" became matmuls with 3 or 5 columns in XLA:CPU (~0.3 s of a
  2.3 s batch-8 U-Net step); 25 or 36 elementwise sums of the taps re-read the weights for every output
  and cost about as much. The gradient goes back the same way, with kron(G, G)^T.
  """
  g = _WINOGRAD[tile][1]
  _, _, cin, cout = w.shape
  transformed = jnp.dot(np.kron(g, g), w.reshape(9, cin * cout))
  return [row.reshape(cin, cout) for row in transformed]


def winograd_conv3x3(x: jax.Array, w: jax.Array, tile: int) -> jax.Array:
  """3x3 convolution, stride 1, padding 1, NHWC/HWIO, by Winograd F(tile x tile, 3x3)."""
  kernels = _winograd_kernels(w, tile)
  products = [v @ u for v, u in zip(_winograd_input_tiles(x, tile), kernels)]
  return _winograd_output(products, x.shape[:3] + (w.shape[-1],), tile)


def winograd_kernel_gradient(x: jax.Array, dy: jax.Array, tile: int) -> jax.Array:
  """d(loss)/d(kernel) of winograd_conv3x3: G^T (V^T (A dy A^T)) G, one matmul per transformed position."""
  _, g, at = _WINOGRAD[tile]
  size = tile + 2
  _, height, width, channels = dy.shape
  tiles_h, tiles_w = _tiles(height, width, tile)
  dy = jnp.pad(dy, ((0, 0), (0, tile * tiles_h - height), (0, tile * tiles_w - width), (0, 0)))
  pixels = [dy[:, p::tile, q::tile] for p in range(tile) for q in range(tile)]
  inputs = _winograd_input_tiles(x, tile)
  grads = []
  for k, v in enumerate(inputs):
    a, b = divmod(k, size)
    dm = _linear_combination(np.outer(at[:, a], at[:, b]).ravel(), pixels)
    grads.append(jax.lax.dot_general(v, dm.reshape(-1, channels), (((0,), (0,)), ((), ())),
                                     preferred_element_type=jnp.float32))
  grads = jnp.stack(grads).reshape(size * size, -1)
  return jnp.dot(np.kron(g, g).T, grads).reshape(3, 3, x.shape[-1], channels)


def kernel_gradient(x: jax.Array, dy: jax.Array, kernel_shape: tuple, strides, padding) -> jax.Array:
  """d(loss)/d(kernel) of an NHWC/HWIO convolution: for each tap (i, j), patches(i, j)^T @ dy."""
  kh, kw, cin, cout = kernel_shape
  batch, out_h, out_w, _ = dy.shape
  (top, bottom), (left, right) = padding
  xp = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
  dy2 = dy.reshape(-1, cout)
  taps = []
  for i in range(kh):
    for j in range(kw):
      patch = jax.lax.slice(
          xp, (0, i, j, 0), (batch, i + strides[0] * (out_h - 1) + 1, j + strides[1] * (out_w - 1) + 1, cin),
          (1, strides[0], strides[1], 1))
      taps.append(jax.lax.dot_general(patch.reshape(-1, cin), dy2, (((0,), (0,)), ((), ())),
                                      preferred_element_type=jnp.float32))
  return jnp.stack(taps).reshape(kernel_shape)


def is_pointwise(w_shape, strides, padding) -> bool:
  """A 1x1 / stride-1 / unpadded convolution: a matmul over channels at every pixel."""
  return tuple(w_shape[:2]) == (1, 1) and tuple(strides) == (1, 1) and all(p == (0, 0) for p in padding)


def pointwise_conv(x: jax.Array, w: jax.Array) -> jax.Array:
  """A pointwise convolution as one [pixels, in] x [in, out] matmul. XLA:CPU's own convolution took 3.7x
  (64 -> 1 channels, the reference head at 120 px, forward and both gradients) and 2x (64 -> 12) as long."""
  return (x.reshape(-1, x.shape[-1]) @ w[0, 0]).reshape(*x.shape[:-1], w.shape[-1])


def _conv_forward(x, w, strides, padding):
  if is_pointwise(w.shape, strides, padding):
    cpu = pointwise_conv
  else:
    tile = winograd_tile(x.shape, w.shape, strides, padding, x.dtype)
    if tile is None:
      return _xla_conv(x, w, strides, padding)
    cpu = functools.partial(winograd_conv3x3, tile=tile)
  return jax.lax.platform_dependent(x, w, cpu=cpu, default=lambda x, w: _xla_conv(x, w, strides, padding))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_nhwc(x, w, strides, padding):
  return _conv_forward(x, w, strides, padding)


def _conv_nhwc_fwd(x, w, strides, padding):
  return _conv_forward(x, w, strides, padding), (x, w)


def _conv_nhwc_bwd(strides, padding, residuals, dy):
  x, w = residuals

  def xla_gradients(x, w, dy):
    _, vjp = jax.vjp(lambda x, w: _xla_conv(x, w, strides, padding), x, w)
    return vjp(dy)

  def cpu_gradients(x, w, dy):
    if is_pointwise(w.shape, strides, padding):
      # Matmuls contracting one flattened pixel axis (a dot_general over (N, H, W) at once is slow here).
      dx = pointwise_conv(dy, w.transpose(0, 1, 3, 2))
      return dx, kernel_gradient(x, dy, w.shape, strides, padding).astype(w.dtype)
    tile = winograd_tile(x.shape, w.shape, strides, padding, x.dtype)
    if tile is not None:
      # The input gradient of a 'same' 3x3 convolution is the same convolution of dy with the kernel
      # flipped in space and transposed in channels.
      dx = winograd_conv3x3(dy, jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2), tile)
      return dx, winograd_kernel_gradient(x, dy, tile).astype(w.dtype)
    _, input_vjp = jax.vjp(lambda x: _xla_conv(x, w, strides, padding), x)
    (dx,) = input_vjp(dy)
    return dx, kernel_gradient(x, dy, w.shape, strides, padding).astype(w.dtype)

  return jax.lax.platform_dependent(x, w, dy, cpu=cpu_gradients, default=xla_gradients)


_conv_nhwc.defvjp(_conv_nhwc_fwd, _conv_nhwc_bwd)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, precision=None, **kwargs):
  """Drop-in for lax.conv_general_dilated (nnx.Conv's hook): plain NHWC/HWIO convolutions with explicit
  padding get the fast kernel gradient, anything else goes to lax unchanged."""
  plain = (
      lhs.ndim == 4 and not isinstance(padding, str) and feature_group_count == 1 and precision is None
      and all(d in (None, 1) for d in tuple(lhs_dilation or ()) + tuple(rhs_dilation or ()))
      and kwargs.get("preferred_element_type") is None and kwargs.get("out_sharding") is None
      and dimension_numbers == jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC))
  if not plain:
    return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                        dimension_numbers, feature_group_count, precision=precision, **kwargs)
  return _conv_nhwc(lhs, rhs, tuple(window_strides), tuple(tuple(p) for p in padding))


def conv(in_channels: int, out_channels: int, kernel_size: int, *, stride: int = 1, padding: int = 0,
         use_bias: bool = True, kernel_init=torch_default_kernel_init, dtype=jnp.float32,
         rngs: nnx.Rngs) -> nnx.Conv:
  """A torch-style Conv2d (symmetric integer padding, torch default init) for NHWC inputs."""
  fan_in = in_channels * kernel_size * kernel_size
  return nnx.Conv(
      in_channels, out_channels, (kernel_size, kernel_size), strides=(stride, stride),
      padding=((padding, padding), (padding, padding)), use_bias=use_bias,
      kernel_init=kernel_init, bias_init=torch_default_bias_init(fan_in),
      dtype=dtype, param_dtype=jnp.float32, conv_general_dilated=conv_general_dilated, rngs=rngs)


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


def max_pool_2x2(x: jax.Array) -> jax.Array:
  """torch's MaxPool2d(2) on NHWC: non-overlapping 2x2 windows, odd trailing rows/columns dropped.

  The gradient goes to one element per window, the first maximum in row-major order (as in torch), chosen
  in the forward pass and kept. Differentiating `max` instead compares the input with the maximum again in
  the backward pass, where XLA may recompute the input in a different fusion with different rounding: the
  gradient then missed or split windows, and the U-Net's first-layer gradients changed by ~50 % under a
  1e-6 perturbation of the image (torch: 1 %). reduce_window's select_and_scatter gradient is exact too,
  but slow on CPU.
  """
  return _max_pool_2x2(x)


def _pool_corners(x: jax.Array) -> list:
  """The four elements of every 2x2 window, each [B, H//2, W//2, C], in row-major window order."""
  batch, height, width, channels = x.shape
  x = x[:, : height // 2 * 2, : width // 2 * 2, :].reshape(batch, height // 2, 2, width // 2, 2, channels)
  return [x[:, :, i, :, j, :] for i in (0, 1) for j in (0, 1)]


@jax.custom_vjp
def _max_pool_2x2(x):
  return _max_pool_2x2_fwd(x)[0]


def _max_pool_2x2_fwd(x):
  corners = _pool_corners(x)
  pooled = jnp.maximum(jnp.maximum(corners[0], corners[1]), jnp.maximum(corners[2], corners[3]))
  # Index of the first corner equal to the maximum (computed with the maximum, so they agree).
  winner = jnp.full(pooled.shape, 3, jnp.int8)
  for index in (2, 1, 0):
    winner = jnp.where(corners[index] == pooled, jnp.int8(index), winner)
  return pooled, (winner, x.shape)


def _max_pool_2x2_bwd(residuals, grad):
  winner, shape = residuals
  batch, height, width, channels = shape
  zero = jnp.zeros_like(grad)
  corners = [jnp.where(winner == index, grad, zero) for index in range(4)]
  rows = [jnp.stack(corners[2 * i:2 * i + 2], axis=3) for i in (0, 1)]  # [B, H//2, W//2, 2, C]
  dx = jnp.stack(rows, axis=2).reshape(batch, height // 2 * 2, width // 2 * 2, channels)
  return (jnp.pad(dx, ((0, 0), (0, height % 2), (0, width % 2), (0, 0))),)


_max_pool_2x2.defvjp(_max_pool_2x2_fwd, _max_pool_2x2_bwd)


def max_pool_3x3_stride2(x: jax.Array) -> jax.Array:
  """torch's MaxPool2d(3, stride=2, padding=1) on NHWC (the ResNet stem); padding never wins the max."""
  return nnx.max_pool(x, window_shape=(3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


def align_corners_matrix(in_size: int, out_size: int) -> np.ndarray:
  """[out_size, in_size] linear-interpolation weights of torch's align_corners=True resampling.

  Output pixel i samples the input at i * (in_size - 1) / (out_size - 1), so the corner pixels of input and
  output coincide. Built with numpy at trace time: the shapes are static.
  """
  weights = np.zeros((out_size, in_size), np.float32)
  if out_size == 1 or in_size == 1:
    weights[:, 0] = 1.0
    return weights
  scale = (in_size - 1) / (out_size - 1)
  for i in range(out_size):
    source = i * scale
    low = min(int(math.floor(source)), in_size - 1)
    frac = source - low
    high = min(low + 1, in_size - 1)
    weights[i, low] += 1.0 - frac
    weights[i, high] += frac
  return weights


def upsample_bilinear_align_corners(x: jax.Array, scale: int = 2) -> jax.Array:
  """torch's Upsample(scale_factor=scale, mode='bilinear', align_corners=True) on NHWC.

  jax.image.resize samples at half-pixel centres (align_corners=False), which gives different values, so the
  interpolation is written out: two small dense matrices, one per spatial axis, applied with einsum. XLA
  lowers them to matmuls, with no gathers in the forward or the backward pass.
  """
  _, height, width, _ = x.shape
  rows = jnp.asarray(align_corners_matrix(height, height * scale), x.dtype)
  cols = jnp.asarray(align_corners_matrix(width, width * scale), x.dtype)
  x = jnp.einsum("ih,bhwc->biwc", rows, x)
  return jnp.einsum("jw,biwc->bijc", cols, x)
