"""benchmarks/conv_profile.py: FLOPs read from compiled HLO, and thunks attributed to the convolution scopes."""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from labeleff_jax.cpu import convolutions

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "conv_profile.py"


def load_script():
  spec = importlib.util.spec_from_file_location("conv_profile_benchmark", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_flops_of_dots_and_convolutions_match_their_shapes():
  profile = load_script()
  a = jnp.ones((24, 40), jnp.float32)
  b = jnp.ones((40, 16), jnp.float32)
  x = jnp.ones((2, 9, 9, 3), jnp.float32)
  w = jnp.ones((3, 3, 3, 5), jnp.float32)

  def program(a, b, x, w):
    conv = jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jnp.tanh(a @ b), conv

  info = profile.parse_hlo(jax.jit(program).lower(a, b, x, w).compile().as_text())
  flops = sorted(f for _, f in info.values() if f)
  # 2 * M * N * K for the matmul; 2 * output elements * 3 * 3 * input channels for the convolution.
  assert flops == sorted([2 * 24 * 16 * 40, 2 * (2 * 9 * 9 * 5) * 3 * 3 * 3])


def test_every_convolution_scope_reaches_the_compiled_program_and_is_attributed():
  profile = load_script()
  x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 16, 16, 4)), jnp.float32)
  w = jnp.asarray(np.random.default_rng(1).normal(size=(3, 3, 4, 6)), jnp.float32)

  def loss(x, w, strides):
    return jnp.sum(jnp.sin(convolutions._conv_nhwc(x, w, strides, ((1, 1), (1, 1)))))

  grads = jax.jit(jax.grad(lambda x, w: loss(x, w, (1, 1)) + loss(x, w, (2, 2)), (0, 1)))
  info = profile.parse_hlo(grads.lower(x, w).compile().as_text())
  seen = {profile.category(op_name, name) for name, (op_name, _) in info.items()}
  for scope in profile.SCOPES:
    assert any(what == scope for _, what in seen), scope
  # The kernel gradient's A dy A^T and the gradient matmuls are backward work; the forward input
  # transform is forward work.
  assert ("backward", "winograd_gradient_transform") in seen
  assert ("forward", "winograd_input_transform") in seen
  assert profile.category("jit(f)/transpose(jvp())/conv_general_dilated", "x") == ("backward",
                                                                                  "xla_convolution")
  assert profile.category("jit(f)/jvp()/reduce_sum", "x") == ("forward", "reduce_sum")
