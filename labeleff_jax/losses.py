"""Masked supervised losses (CE, BCE, MSE, MAE) and the NT-Xent contrastive loss, sharding-safe."""

from typing import Any

import jax
import jax.numpy as jnp

from labeleff_jax import sharding
from labeleff_jax.sharding import DATA_AXIS

# ---------------------------------------------------------------------------------------------------------
# Masks and reductions.
#
# Every supervised loss comes in two forms: `NAME(...)` returns the mean over valid elements, and
# `NAME_sum_and_count(...)` returns (sum of per-element losses, number of valid elements) so that an
# evaluation loop can add them up over a whole split and divide once at the end. Under `jax.jit` with the
# batch sharded over a mesh the sums run over the global batch, so the mean is that of the global batch.
# ---------------------------------------------------------------------------------------------------------


def valid_mask(mask: Any, shape: tuple[int, ...], what: str = "mask") -> jax.Array:
  """Broadcasts a boolean mask, aligned on the leading axes, to `shape` (None means all valid).

  Axes are matched from the left (unlike numpy's broadcasting): a per-example mask [B] applies to every
  pixel of a [B, H, W] target and to every label of a [B, L] multi-hot target. Each mask axis must equal
  the target's or be 1, so [B], [B, 1] and [B, H, W] all work. Non-zero entries count as valid.
  """
  shape = tuple(shape)
  if mask is None:
    return jnp.ones(shape, dtype=bool)
  mask = jnp.asarray(mask)
  if mask.ndim > len(shape) or any(m not in (n, 1) for m, n in zip(mask.shape, shape)):
    raise ValueError(
        f"{what} of shape {tuple(mask.shape)} does not match the leading axes of shape {shape}; "
        "expected e.g. [B], [B, 1, ...] or the full shape.")
  if mask.dtype != jnp.bool_:
    mask = mask != 0
  mask = mask.reshape(mask.shape + (1,) * (len(shape) - mask.ndim))
  return jnp.broadcast_to(mask, shape)


def _sum_and_count(per_element: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
  # jnp.where instead of a product, so a NaN or inf at an ignored element cannot leak into the sum.
  total = jnp.sum(jnp.where(valid, per_element, 0.0), dtype=jnp.float32)
  count = jnp.sum(valid, dtype=jnp.int32)
  return total, count


def mean_from_sum_and_count(total: jax.Array, count: jax.Array) -> jax.Array:
  """total / count, and 0 (not NaN) when nothing is valid, so an all-padding batch adds no gradient."""
  return total / jnp.maximum(count, 1).astype(jnp.float32)


def _check_same_shape(a: jax.Array, b: jax.Array, names: str) -> None:
  if a.shape != b.shape:
    # Silent broadcasting ([B, 1] against [B] gives [B, B]) is the classic regression-loss bug.
    raise ValueError(f"{names} must have the same shape, got {a.shape} and {b.shape}.")


# ---------------------------------------------------------------------------------------------------------
# Classification and segmentation: softmax cross-entropy with integer labels.
# ---------------------------------------------------------------------------------------------------------


def softmax_cross_entropy_sum_and_count(
    logits: jax.Array, labels: jax.Array, mask: Any = None) -> tuple[jax.Array, jax.Array]:
  """Sum of per-element softmax cross-entropy over valid elements, and their number.

  logits: [..., C] (any float dtype; computed in float32). labels: integer [...], e.g. [B] for
  classification or [B, H, W] for segmentation. Labels outside 0..C-1 (constants.LULC_IGNORE = 255 for
  no-data pixels) are ignored, as are elements where `mask` (shape a prefix of labels.shape) is False.
  """
  logits = jnp.asarray(logits)
  labels = jnp.asarray(labels)
  if logits.ndim != labels.ndim + 1 or logits.shape[:-1] != labels.shape:
    raise ValueError(
        f"logits must have shape labels.shape + (num_classes,), got {logits.shape} and {labels.shape}.")
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise TypeError(f"labels must be integer class indices, got dtype {labels.dtype}.")
  num_classes = logits.shape[-1]
  labels = labels.astype(jnp.int32)
  valid = valid_mask(mask, labels.shape) & (labels >= 0) & (labels < num_classes)
  # Ignored elements gather class 0 instead of an out-of-range index; their loss is then discarded.
  safe_labels = jnp.where(valid, labels, 0)
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  label_log_probs = jnp.take_along_axis(log_probs, safe_labels[..., None], axis=-1)[..., 0]
  return _sum_and_count(-label_log_probs, valid)


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array, mask: Any = None) -> jax.Array:
  """Mean softmax cross-entropy over valid elements (see softmax_cross_entropy_sum_and_count)."""
  return mean_from_sum_and_count(*softmax_cross_entropy_sum_and_count(logits, labels, mask))


# ---------------------------------------------------------------------------------------------------------
# Multi-label classification: sigmoid binary cross-entropy.
# ---------------------------------------------------------------------------------------------------------


def sigmoid_binary_cross_entropy_sum_and_count(
    logits: jax.Array, targets: jax.Array, mask: Any = None) -> tuple[jax.Array, jax.Array]:
  """Sum of per-element binary cross-entropy with logits over valid elements, and their number.

  logits and targets have the same shape, e.g. [B, L]; targets are in [0, 1] (multi-hot or soft).
  Every (example, label) pair is one element; `mask` [B] drops whole examples.
  """
  logits = jnp.asarray(logits).astype(jnp.float32)
  targets = jnp.asarray(targets).astype(jnp.float32)
  _check_same_shape(logits, targets, "logits and targets")
  valid = valid_mask(mask, logits.shape)
  # log(1 + exp(-|x|)) form: no overflow for large |x|, unlike log(sigmoid(x)).
  per_element = jnp.maximum(logits, 0.0) - logits * targets + jnp.log1p(jnp.exp(-jnp.abs(logits)))
  return _sum_and_count(per_element, valid)


def sigmoid_binary_cross_entropy(logits: jax.Array, targets: jax.Array, mask: Any = None) -> jax.Array:
  """Mean binary cross-entropy with logits over valid elements."""
  return mean_from_sum_and_count(*sigmoid_binary_cross_entropy_sum_and_count(logits, targets, mask))


# ---------------------------------------------------------------------------------------------------------
# Regression.
# ---------------------------------------------------------------------------------------------------------


def _regression_sum_and_count(pred, target, mask, error_fn):
  pred = jnp.asarray(pred).astype(jnp.float32)
  target = jnp.asarray(target).astype(jnp.float32)
  _check_same_shape(pred, target, "pred and target")
  return _sum_and_count(error_fn(pred - target), valid_mask(mask, pred.shape))


def mse_sum_and_count(pred: jax.Array, target: jax.Array, mask: Any = None) -> tuple[jax.Array, jax.Array]:
  """Sum of squared errors over valid elements, and their number (pred and target: same shape)."""
  return _regression_sum_and_count(pred, target, mask, jnp.square)


def mse(pred: jax.Array, target: jax.Array, mask: Any = None) -> jax.Array:
  """Mean squared error over valid elements."""
  return mean_from_sum_and_count(*mse_sum_and_count(pred, target, mask))


def mae_sum_and_count(pred: jax.Array, target: jax.Array, mask: Any = None) -> tuple[jax.Array, jax.Array]:
  """Sum of absolute errors over valid elements, and their number (pred and target: same shape)."""
  return _regression_sum_and_count(pred, target, mask, jnp.abs)


def mae(pred: jax.Array, target: jax.Array, mask: Any = None) -> jax.Array:
  """Mean absolute error over valid elements."""
  return mean_from_sum_and_count(*mae_sum_and_count(pred, target, mask))


# ---------------------------------------------------------------------------------------------------------
# NT-Xent (SimCLR) over the 2B embeddings of two views, and the reference's "matching accuracy".
# ---------------------------------------------------------------------------------------------------------


def l2_normalise(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """Rows scaled to unit L2 norm, in float32; safe for huge values and for all-zero rows."""
  x = jnp.asarray(x).astype(jnp.float32)
  # Dividing by the largest magnitude first keeps the squares finite for entries beyond ~1e19; the
  # scale is a constant for autodiff, which leaves the gradient of the (scale-invariant) result exact.
  scale = jax.lax.stop_gradient(jnp.max(jnp.abs(x), axis=-1, keepdims=True))
  x = x / jnp.where(scale > 0, scale, 1.0)
  squared_norm = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(squared_norm, eps * eps))


def _contrastive_shard_totals(z_a, z_b, pair_valid, temperature, axis_name):
  """Summed over shards: NT-Xent of this shard's valid anchors, how many match, how many there are.

  z_a, z_b are this shard's rows [b, D] of the global [B, D] views and pair_valid [b] their flags (the
  whole batch when axis_name is None). Anchors are this shard's rows of both views; candidates are all 2B
  rows of the global batch. Invalid pairs (padding) are neither anchors nor candidates.
  """
  a = l2_normalise(z_a)
  b = l2_normalise(z_b)
  local_size = a.shape[0]
  if axis_name is None:
    all_a, all_b, all_valid, first_row = a, b, pair_valid, 0
  else:
    # Gradients flow back through all_gather (its transpose is a reduce-scatter), so every device's
    # embeddings receive the gradient from being negatives of the other devices' anchors.
    all_a = jax.lax.all_gather(a, axis_name, tiled=True)
    all_b = jax.lax.all_gather(b, axis_name, tiled=True)
    all_valid = jax.lax.all_gather(pair_valid, axis_name, tiled=True)
    first_row = jax.lax.axis_index(axis_name) * local_size
  global_size = all_a.shape[0]
  anchors = jnp.concatenate([a, b])  # [2b, D]
  candidates = jnp.concatenate([all_a, all_b])  # [2B, D], row order of concat([z_a, z_b])
  anchor_valid = jnp.concatenate([pair_valid, pair_valid])
  candidate_valid = jnp.concatenate([all_valid, all_valid])
  # HIGHEST precision: GPUs/TPUs otherwise multiply float32 in reduced precision, and at temperature 0.1
  # an error of 1e-3 in a cosine is 1e-2 in a logit. The matrix is small, so this costs nothing.
  similarity = jnp.matmul(anchors, candidates.T, precision=jax.lax.Precision.HIGHEST)
  logits = similarity / temperature

  rows = first_row + jnp.arange(local_size)
  anchor_index = jnp.concatenate([rows, rows + global_size])  # global row of each anchor in [0, 2B)
  partner_index = jnp.concatenate([rows + global_size, rows])
  is_self = jnp.arange(2 * global_size)[None, :] == anchor_index[:, None]
  # Dropping the diagonal (the reference slices it out) is the same as giving it zero probability.
  logits = jnp.where(is_self | ~candidate_valid[None, :], -jnp.inf, logits)
  # Rows of padding anchors are zeroed, not left to -inf - -inf = NaN: a NaN there would reach the
  # gradient through jnp.where even though the row's loss is discarded.
  logits = jnp.where(anchor_valid[:, None], logits, 0.0)
  positive_logits = jnp.take_along_axis(logits, partner_index[:, None], axis=1)[:, 0]
  per_anchor = jax.nn.logsumexp(logits, axis=1) - positive_logits
  loss_total = jnp.sum(jnp.where(anchor_valid, per_anchor, 0.0))
  # Argmax takes the first maximum, as the reference's argmax over the diagonal-free matrix does.
  is_match = jnp.argmax(jax.lax.stop_gradient(logits), axis=1) == partner_index
  matched = jnp.sum(is_match & anchor_valid, dtype=jnp.int32)
  num_anchors = jnp.sum(anchor_valid, dtype=jnp.int32)
  if axis_name is not None:
    loss_total, matched, num_anchors = jax.lax.psum((loss_total, matched, num_anchors), axis_name)
  return loss_total, matched, num_anchors


def nt_xent_and_matching_accuracy(
    z_a: jax.Array, z_b: jax.Array, temperature: Any = 0.1, *, mask: Any = None, mesh: Any = None,
    axis_name: str = DATA_AXIS) -> tuple[jax.Array, jax.Array]:
  """NT-Xent loss and matching accuracy of two views in one pass; see nt_xent and matching_accuracy."""
  z_a = jnp.asarray(z_a)
  z_b = jnp.asarray(z_b)
  if z_a.ndim != 2 or z_a.shape != z_b.shape:
    raise ValueError(f"z_a and z_b must both have shape [B, D], got {z_a.shape} and {z_b.shape}.")
  if z_a.shape[0] < 1:
    raise ValueError("NT-Xent needs at least one pair (B >= 1).")
  if isinstance(temperature, (int, float)) and not temperature > 0:
    raise ValueError(f"temperature must be positive, got {temperature}.")
  temperature = jnp.asarray(temperature, dtype=jnp.float32)
  if temperature.ndim != 0:
    raise ValueError(f"temperature must be a scalar, got shape {temperature.shape}.")
  if mask is not None and jnp.ndim(mask) != 1:
    raise ValueError(f"mask must flag pairs with shape [B], got shape {jnp.shape(mask)}.")
  pair_valid = valid_mask(mask, z_a.shape[:1])
  shard_mesh = sharding.batch_mesh(z_a, mesh, axis_name)
  loss_total, matched, num_anchors = sharding.map_over_batch_shards(
      _contrastive_shard_totals, shard_mesh, axis_name, (z_a, z_b, pair_valid), (temperature,))
  return (mean_from_sum_and_count(loss_total, num_anchors),
          mean_from_sum_and_count(matched.astype(jnp.float32), num_anchors))


def nt_xent(z_a: jax.Array, z_b: jax.Array, temperature: Any = 0.1, *, mask: Any = None,
            mesh: Any = None, axis_name: str = DATA_AXIS) -> jax.Array:
  """SimCLR's NT-Xent loss over the 2B embeddings of two views, averaged over all 2B anchors.

  z_a, z_b: [B, D], not yet normalised; row i of z_a and row i of z_b are a positive pair. The rows of
  concat([z_a, z_b]) are L2-normalised, their 2B x 2B cosine similarities divided by `temperature`, the
  diagonal dropped, and each row scored by cross-entropy with its partner as the target (the formulation
  of the reference, docs/reference.md). Computed in float32.

  mask: optional bool [B]; pairs flagged False (padding of evaluation batches) are dropped as anchors
  and as negatives, and the mean runs over the 2 * sum(mask) remaining anchors.

  Sharding: when the batch axis is sharded over the mesh axis `axis_name` (mesh given, in context via
  jax.set_mesh, or carried by the arrays' sharding), each device scores its own anchors against the
  all-gathered global batch, so the loss and its gradients equal the single-device ones.
  """
  return nt_xent_and_matching_accuracy(
      z_a, z_b, temperature, mask=mask, mesh=mesh, axis_name=axis_name)[0]


def matching_accuracy(z_a: jax.Array, z_b: jax.Array, *, mask: Any = None, mesh: Any = None,
                      axis_name: str = DATA_AXIS) -> jax.Array:
  """Fraction of the 2B anchors whose most similar other embedding (of 2B - 1) is their partner.

  The reference's "matching accuracy" (top-1 over the candidates of NT-Xent); `mask` as in nt_xent.
  """
  return nt_xent_and_matching_accuracy(z_a, z_b, 1.0, mask=mask, mesh=mesh, axis_name=axis_name)[1]


__all__ = [
    "l2_normalise", "mae", "mae_sum_and_count", "matching_accuracy", "mean_from_sum_and_count", "mse",
    "mse_sum_and_count", "nt_xent",
    "nt_xent_and_matching_accuracy", "sigmoid_binary_cross_entropy",
    "sigmoid_binary_cross_entropy_sum_and_count", "softmax_cross_entropy",
    "softmax_cross_entropy_sum_and_count", "valid_mask",
]
