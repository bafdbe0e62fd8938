"""Encoders for vector modalities (season, climate zone, ERA-5): a small ReLU MLP, so they can join late fusion."""

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from labeleff_jax.models import torch_style

DEFAULT_MLP_FEATURES = (64, 64)


class MLPEncoder(nnx.Module):
  """[B, in_features] -> [B, features[-1]]: Linear -> ReLU for every entry of `features`.

  The last layer keeps its ReLU so the output lives on the same (non-negative) scale as the image backbones'
  post-ReLU feature maps it is concatenated with.
  """

  def __init__(self, in_features: int, features: Sequence[int] = DEFAULT_MLP_FEATURES, *,
               dtype=jnp.float32, rngs: nnx.Rngs):
    features = tuple(int(f) for f in features)
    sizes = (in_features,) + features
    self.layers = nnx.List([torch_style.linear(a, b, dtype=dtype, rngs=rngs)
                            for a, b in zip(sizes, sizes[1:])])
    self.out_features = features[-1]

  def __call__(self, x: jax.Array) -> jax.Array:
    for layer in self.layers:
      x = nnx.relu(layer(x))
    return x
