"""Tests of the optional CPU layer (labeleff_jax.cpu): its convolutions against XLA's, its initial-weight
draws, and when `config.model.conv_impl` chooses it."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from labeleff_jax import cpu
from labeleff_jax.cpu import convolutions
from labeleff_jax.models import create_model, resolve_conv_impl


@pytest.mark.parametrize("shape, kernel, stride, pad", [
    ((2, 9, 9, 3), 3, 1, 1), ((2, 11, 10, 3), 7, 2, 3), ((2, 8, 8, 4), 1, 2, 0), ((2, 9, 9, 4), 3, 2, 1)])
def test_conv_kernel_gradient_matches_xla(shape, kernel, stride, pad):
  rng = np.random.default_rng(kernel * 10 + stride)
  x = jnp.asarray(rng.normal(size=shape), jnp.float32)
  w = jnp.asarray(rng.normal(size=(kernel, kernel, shape[-1], 5)), jnp.float32)
  padding = ((pad, pad), (pad, pad))
  numbers = jax.lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))

  def loss(conv_fn, x, w):
    return jnp.sum(jnp.sin(conv_fn(x, w, (stride, stride), padding, dimension_numbers=numbers)))

  ours = jax.grad(lambda x, w: loss(convolutions.conv_general_dilated, x, w), (0, 1))(x, w)
  xla = jax.grad(lambda x, w: loss(jax.lax.conv_general_dilated, x, w), (0, 1))(x, w)
  np.testing.assert_allclose(ours[0], xla[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ours[1], xla[1], rtol=1e-4, atol=1e-4)


def test_pointwise_conv_is_a_matmul_that_matches_xla():
  rng = np.random.default_rng(11)
  x = jnp.asarray(rng.normal(size=(2, 7, 9, 6)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(1, 1, 6, 3)), jnp.float32)
  numbers = jax.lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
  assert convolutions.is_pointwise(w.shape, (1, 1), ((0, 0), (0, 0)))
  assert not convolutions.is_pointwise(w.shape, (2, 2), ((0, 0), (0, 0)))
  assert not convolutions.is_pointwise(w.shape, (1, 1), ((1, 1), (1, 1)))

  def loss(conv_fn, x, w):
    return jnp.sum(jnp.sin(conv_fn(x, w, (1, 1), ((0, 0), (0, 0)), dimension_numbers=numbers)))

  values = convolutions.conv_general_dilated(x, w, (1, 1), ((0, 0), (0, 0)), dimension_numbers=numbers)
  np.testing.assert_allclose(values, np.einsum("nhwc,co->nhwo", np.asarray(x), np.asarray(w[0, 0])),
                             rtol=1e-5, atol=1e-5)
  ours = jax.grad(lambda x, w: loss(convolutions.conv_general_dilated, x, w), (0, 1))
  xla = jax.grad(lambda x, w: loss(jax.lax.conv_general_dilated, x, w), (0, 1))(x, w)
  for got, want in zip(ours(x, w), xla):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  compiled = jax.jit(ours).lower(x, w).compile().as_text()
  assert "convolution(" not in compiled and " dot(" in compiled


@pytest.mark.parametrize("shape, cout, tile", [((2, 13, 12, 5), 7, 3), ((1, 16, 16, 8), 3, 3),
                                               ((1, 91, 90, 3), 4, 4)])
def test_winograd_conv_matches_xla(shape, cout, tile):
  """Eligible 3x3 convolutions take the Winograd path on CPU and agree with XLA's direct convolution."""
  rng = np.random.default_rng(shape[1])
  x = jnp.asarray(rng.normal(size=shape), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 3, shape[-1], cout)) / 3, jnp.float32)
  padding = ((1, 1), (1, 1))
  numbers = jax.lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
  assert convolutions.winograd_tile(x.shape, w.shape, (1, 1), padding, jnp.float32) == tile

  def loss(conv_fn, x, w):
    return jnp.sum(jnp.sin(conv_fn(x, w, (1, 1), padding, dimension_numbers=numbers)))

  ours = jax.jit(jax.value_and_grad(lambda x, w: loss(convolutions.conv_general_dilated, x, w), (0, 1)))
  compiled = ours.lower(x, w).compile().as_text()
  assert "convolution(" not in compiled and " dot(" in compiled  # the matmul form, not XLA's conv
  value, grads = ours(x, w)
  xla_value, xla_grads = jax.value_and_grad(
      lambda x, w: loss(jax.lax.conv_general_dilated, x, w), (0, 1))(x, w)
  # F(4x4, 3x3)'s transforms have larger constants (up to 8 and 1/24): ~10x the rounding of F(3x3, 3x3).
  tolerance = 1e-5 if tile < 4 else 1e-4
  np.testing.assert_allclose(value, xla_value, rtol=tolerance)
  np.testing.assert_allclose(convolutions.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=numbers),
                             jax.lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=numbers),
                             rtol=tolerance, atol=tolerance)
  np.testing.assert_allclose(grads[0], xla_grads[0], rtol=tolerance, atol=tolerance)
  np.testing.assert_allclose(grads[1], xla_grads[1], rtol=10 * tolerance, atol=10 * tolerance)


@pytest.mark.parametrize("tile", [2, 3, 4])
def test_winograd_every_tile_size_matches_xla(tile):
  rng = np.random.default_rng(tile)
  x = jnp.asarray(rng.normal(size=(2, 11, 14, 4)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 3, 4, 6)) / 3, jnp.float32)
  dy = jnp.asarray(rng.normal(size=(2, 11, 14, 6)), jnp.float32)
  conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  tolerance = 1e-5 if tile < 4 else 1e-4
  np.testing.assert_allclose(convolutions.winograd_conv3x3(x, w, tile), conv(x, w), rtol=tolerance, atol=tolerance)
  kernel_grad = jax.vjp(lambda w: conv(x, w), w)[1](dy)[0]
  np.testing.assert_allclose(convolutions.winograd_kernel_gradient(x, dy, tile), kernel_grad, rtol=10 * tolerance,
                             atol=10 * tolerance)


def test_winograd_only_where_it_pays():
  padding = ((1, 1), (1, 1))

  def tile(x_shape, kernel=3, stride=1, pad=padding, dtype=jnp.float32):
    return convolutions.winograd_tile(x_shape, (kernel, kernel, x_shape[-1], 64), (stride, stride), pad, dtype)

  assert tile((8, 7, 7, 512)) is None  # too few tiles
  assert tile((8, 15, 15, 512)) == 3 and tile((8, 30, 30, 256)) == 3
  assert tile((8, 60, 60, 128)) == 3 and tile((8, 120, 120, 64)) == 4
  assert tile((8, 60, 60, 64), stride=2) is None
  assert tile((8, 60, 60, 64), kernel=1, pad=((0, 0), (0, 0))) is None
  assert tile((8, 60, 60, 64), dtype=jnp.bfloat16) is None




def test_auto_takes_the_cpu_kernels_only_on_a_cpu_backend():
  assert resolve_conv_impl("auto", "cpu") == "cpu_fast"
  for backend in ("gpu", "cuda", "rocm", "tpu"):
    assert resolve_conv_impl("auto", backend) == "xla"
    assert resolve_conv_impl("cpu_fast", backend) == "cpu_fast"  # an explicit choice is kept
  assert resolve_conv_impl("xla", "cpu") == "xla"
  assert resolve_conv_impl("auto") == "cpu_fast"  # the tests run on the CPU backend
  with pytest.raises(ValueError, match="conv_impl='winograd'"):
    resolve_conv_impl("winograd")


def _unet_config(conv_impl):
  return ml_collections.ConfigDict({
      "data": {"modalities": ["s2"], "image_size": 16},
      "model": {"name": "unet", "width": 4, "conv_impl": conv_impl},
      "tasks": [{"name": "climatezone", "kind": "classification", "label": "climatezone", "num_classes": 12,
                 "head": "reference"}],
      "train": {"compute_dtype": "float32"}})


@pytest.mark.parametrize("conv_impl, uses_cpu_kernels", [("xla", False), ("cpu_fast", True), ("auto", True)])
def test_conv_impl_decides_which_convolution_every_layer_runs(conv_impl, uses_cpu_kernels):
  model = nnx.eval_shape(lambda: create_model(_unet_config(conv_impl), rngs=nnx.Rngs(0)))
  convs = [node for _, node in nnx.iter_graph(model) if isinstance(node, nnx.Conv)]
  assert len(convs) == 19  # 18 in the U-Net, one in the head
  expected = convolutions.conv_general_dilated if uses_cpu_kernels else jax.lax.conv_general_dilated
  assert all(conv.conv_general_dilated is expected for conv in convs)


def test_both_conv_impls_compute_the_same_model():
  """Same weights, same outputs and gradients up to float32 rounding, whichever kernels run."""
  x = {"s2": jnp.asarray(np.random.default_rng(0).random((2, 16, 16, 12), np.float32))}
  stock = create_model(_unet_config("xla"), rngs=nnx.Rngs(0))
  fast = create_model(_unet_config("cpu_fast"), rngs=nnx.Rngs(0))
  nnx.update(fast, nnx.state(stock))  # the two draw their initial weights differently
  stock.eval()
  fast.eval()

  def loss(model):
    return jnp.sum(jnp.sin(model(x)["climatezone"]))

  stock_loss, stock_grads = nnx.value_and_grad(loss)(stock)
  fast_loss, fast_grads = nnx.value_and_grad(loss)(fast)
  np.testing.assert_allclose(fast_loss, stock_loss, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5), fast_grads, stock_grads)


def test_block_draws_are_the_requested_distributions_without_repeats():
  key = jax.random.key(3)
  uniform = np.asarray(cpu.block_draw(key, (3 * cpu.initializers.BLOCK + 5,), "uniform"))
  assert uniform.min() >= -1 and uniform.max() <= 1 and abs(uniform.mean()) < 0.01
  blocks = uniform[:3 * cpu.initializers.BLOCK].reshape(3, -1)
  assert np.abs(np.corrcoef(blocks)[np.triu_indices(3, 1)]).max() < 0.02  # every block is a fresh draw
  normal = np.asarray(cpu.block_draw(key, (300, 300), "normal"))
  assert normal.shape == (300, 300) and abs(normal.std() - 1) < 0.01
  np.testing.assert_array_equal(cpu.block_draw(key, (4, 5), "normal"), normal.ravel()[:20].reshape(4, 5))
