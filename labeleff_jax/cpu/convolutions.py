"""Convolutions tuned for XLA:CPU (`config.model.conv_impl='cpu_fast'`); GPU and TPU never load them.

Three rewrites of what XLA:CPU does by itself, for NHWC inputs and HWIO kernels:
1. Winograd convolution (Lavin & Gray, 2016) for 3x3 / stride-1 / pad-1 float32 convolutions: F(m x m,
   3 x 3) computes an m x m output tile from an (m+2) x (m+2) input window with (m+2)^2 multiply-adds per
   channel pair instead of 9 m^2, as (m+2)^2 independent matmuls with cheap sums around them. Forward,
   input gradient (the same convolution of dy with the flipped kernel) and kernel gradient all use it.
2. Pointwise (1x1) convolutions as one matmul over channels.
3. Every other kernel gradient as one matmul per kernel tap: XLA:CPU lowers it to a convolution whose
   "kernel" is the whole output map, which runs far below the CPU's matmul rate.
Results differ from XLA's convolution by float32 rounding (~1e-6 relative, ~1e-5 for F(4x4)). The
gradients are hand-written (`jax.custom_vjp`), so these convolutions have no forward-mode derivative:
use `conv_impl='xla'` for `jax.jvp` / `jax.jacfwd`. Tile sizes and measurements: docs/performance_cpu.md.
Each part runs under a named scope (winograd_input_transform, winograd_matmuls, ...), so profiles of a
step, and benchmarks/conv_profile.py, can tell the transforms from the matmuls.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

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
# (smallest output side, tile), first match wins: F(4x4) from 90 px, F(3x3) from 12 px, direct below
# (fewer tiles than that do not pay for the transforms; docs/performance_cpu.md has the measurements).
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


@jax.named_scope("winograd_input_transform")
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


@jax.named_scope("winograd_output_transform")
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


@jax.named_scope("winograd_kernel_transform")
def _winograd_kernels(w: jax.Array, tile: int) -> list:
  """G g G^T of every input/output channel pair of a 3x3 HWIO kernel: (tile+2)^2 arrays [in, out].

  One [(tile+2)^2, 9] x [9, in * out] matmul (kron(G, G) on the flattened taps), whose long side is the
  channel pairs: XLA:CPU lowers the equivalent einsum to matmuls only 3-5 columns wide. The gradient goes
  back the same way, with kron(G, G)^T.
  """
  g = _WINOGRAD[tile][1]
  _, _, cin, cout = w.shape
  transformed = jnp.dot(np.kron(g, g), w.reshape(9, cin * cout))
  return [row.reshape(cin, cout) for row in transformed]


def winograd_conv3x3(x: jax.Array, w: jax.Array, tile: int) -> jax.Array:
  """3x3 convolution, stride 1, padding 1, NHWC/HWIO, by Winograd F(tile x tile, 3x3)."""
  kernels = _winograd_kernels(w, tile)
  inputs = _winograd_input_tiles(x, tile)
  with jax.named_scope("winograd_matmuls"):
    products = [v @ u for v, u in zip(inputs, kernels)]
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
    with jax.named_scope("winograd_gradient_transform"):
      dm = _linear_combination(np.outer(at[:, a], at[:, b]).ravel(), pixels)
    with jax.named_scope("winograd_matmuls"):
      grads.append(jax.lax.dot_general(v, dm.reshape(-1, channels), (((0,), (0,)), ((), ())),
                                       preferred_element_type=jnp.float32))
  with jax.named_scope("winograd_kernel_transform"):
    grads = jnp.stack(grads).reshape(size * size, -1)
    return jnp.dot(np.kron(g, g).T, grads).reshape(3, 3, x.shape[-1], channels)


@jax.named_scope("tapwise_kernel_gradient")
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
  """A pointwise convolution as one [pixels, in] x [in, out] matmul."""
  return (x.reshape(-1, x.shape[-1]) @ w[0, 0]).reshape(*x.shape[:-1], w.shape[-1])


def _conv_forward(x, w, strides, padding):
  if is_pointwise(w.shape, strides, padding):
    return pointwise_conv(x, w)
  tile = winograd_tile(x.shape, w.shape, strides, padding, x.dtype)
  if tile is None:
    return _xla_conv(x, w, strides, padding)
  return winograd_conv3x3(x, w, tile)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_nhwc(x, w, strides, padding):
  return _conv_forward(x, w, strides, padding)


def _conv_nhwc_fwd(x, w, strides, padding):
  return _conv_forward(x, w, strides, padding), (x, w)


def _conv_nhwc_bwd(strides, padding, residuals, dy):
  x, w = residuals
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


_conv_nhwc.defvjp(_conv_nhwc_fwd, _conv_nhwc_bwd)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, precision=None, **kwargs):
  """Drop-in for `lax.conv_general_dilated` (nnx.Conv's hook): plain NHWC/HWIO convolutions with explicit
  padding take the kernels above, anything else goes to lax unchanged."""
  plain = (
      lhs.ndim == 4 and not isinstance(padding, str) and feature_group_count == 1 and precision is None
      and all(d in (None, 1) for d in tuple(lhs_dilation or ()) + tuple(rhs_dilation or ()))
      and kwargs.get("preferred_element_type") is None and kwargs.get("out_sharding") is None
      and dimension_numbers == jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC))
  if not plain:
    return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                        dimension_numbers, feature_group_count, precision=precision, **kwargs)
  return _conv_nhwc(lhs, rhs, tuple(window_strides), tuple(tuple(p) for p in padding))
