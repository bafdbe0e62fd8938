"""Pooling and upsampling with torch's semantics on NHWC arrays: MaxPool2d(2), the ResNet stem's
MaxPool2d(3, 2, 1) and Upsample(bilinear, align_corners=True)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def _pool_corners(x: jax.Array) -> list:
  """The four elements of every 2x2 window, each [B, H//2, W//2, C], in row-major window order."""
  batch, height, width, channels = x.shape
  x = x[:, : height // 2 * 2, : width // 2 * 2, :].reshape(batch, height // 2, 2, width // 2, 2, channels)
  return [x[:, :, i, :, j, :] for i in (0, 1) for j in (0, 1)]


def max_pool_2x2(x: jax.Array) -> jax.Array:
  """torch's MaxPool2d(2): non-overlapping 2x2 windows, odd trailing rows/columns dropped.

  The output selects, per window, the first corner (row-major) that equals the maximum, as torch does, so
  the gradient reaches exactly that one element: the nested selects leave no window without a gradient
  and none with two, however XLA rounds a recomputed input. (Differentiating `max` compares the input
  with the maximum again in the backward pass, which missed or split windows.) Ordinary ops only, so
  forward-mode autodiff works too.
  """
  c0, c1, c2, c3 = _pool_corners(x)
  top = jnp.maximum(jnp.maximum(c0, c1), jnp.maximum(c2, c3))
  return jnp.where(c0 == top, c0, jnp.where(c1 == top, c1, jnp.where(c2 == top, c2, c3)))


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
  interpolation is written out: one small dense matrix per spatial axis, which XLA lowers to matmuls.
  """
  _, height, width, _ = x.shape
  rows = jnp.asarray(align_corners_matrix(height, height * scale), x.dtype)
  cols = jnp.asarray(align_corners_matrix(width, width * scale), x.dtype)
  x = jnp.einsum("ih,bhwc->biwc", rows, x)
  return jnp.einsum("jw,biwc->bijc", cols, x)
