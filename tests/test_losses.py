"""Tests of labeleff_jax.losses and the embedding spread against numpy; NT-Xent on 8 sharded devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from labeleff_jax import losses
from labeleff_jax import objectives
from labeleff_jax.data import constants

NUM_DEVICES = 8

# Jitted once here: op-by-op eager execution compiles every primitive separately and is far slower.
nt_xent = jax.jit(losses.nt_xent)
nt_xent_and_matching_accuracy = jax.jit(losses.nt_xent_and_matching_accuracy)
matching_accuracy = jax.jit(losses.matching_accuracy)
nt_xent_value_and_grads = jax.jit(jax.value_and_grad(losses.nt_xent, argnums=(0, 1)))


def _meshes():
  """A 1-D 'data' mesh with the default (Explicit) axis type and one with an Auto axis."""
  return {
      "explicit": jax.make_mesh((NUM_DEVICES,), ("data",)),
      "auto": jax.make_mesh((NUM_DEVICES,), ("data",), axis_types=(jax.sharding.AxisType.Auto,)),
  }


# ---------------------------------------------------------------------------------------------------------
# Independent numpy references.
# ---------------------------------------------------------------------------------------------------------


def _numpy_log_softmax(logits):
  logits = np.asarray(logits, np.float64)
  shifted = logits - logits.max(axis=-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def numpy_nt_xent(z_a, z_b, temperature):
  """NT-Xent and matching accuracy by looping over the 2B anchors, in float64 (an all-zero row stays zero:
  its cosine with every other row is 0)."""
  z = np.concatenate([z_a, z_b]).astype(np.float64)
  norms = np.linalg.norm(z, axis=1, keepdims=True)
  z = z / np.where(norms > 0, norms, 1.0)
  n = len(z)
  half = n // 2
  losses_per_anchor, correct = [], 0
  for i in range(n):
    partner = (i + half) % n
    others = [j for j in range(n) if j != i]
    logits = np.array([z[i] @ z[j] for j in others]) / temperature
    positive = logits[others.index(partner)]
    losses_per_anchor.append(np.logaddexp.reduce(logits) - positive)
    correct += others[int(np.argmax(logits))] == partner
  return float(np.mean(losses_per_anchor)), correct / n


def _reference_formulation_nt_xent(z_a, z_b, temperature):
  """Single-device jnp NT-Xent written like the PyTorch reference: slice out the diagonal, then CE (an
  all-zero row stays zero; the gradient with respect to such a row is not defined)."""
  z = jnp.concatenate([z_a, z_b])
  norms = jnp.linalg.norm(z, axis=1, keepdims=True)
  z = z / jnp.where(norms > 0, norms, 1.0)
  n = z.shape[0]
  similarity = z @ z.T
  off_diagonal = ~np.eye(n, dtype=bool)
  logits = similarity[off_diagonal].reshape(n, n - 1) / temperature
  partner = (np.arange(n) + n // 2) % n
  # With the diagonal removed, columns past the anchor's own index shift left by one.
  target = np.where(partner > np.arange(n), partner - 1, partner)
  log_probs = jax.nn.log_softmax(logits, axis=1)
  return -jnp.mean(log_probs[np.arange(n), target])


def _random_views(batch, dim, seed=0, scale=1.0):
  rng = np.random.default_rng(seed)
  z_a = (scale * rng.normal(size=(batch, dim))).astype(np.float32)
  z_b = (z_a + scale * 0.8 * rng.normal(size=(batch, dim))).astype(np.float32)
  return z_a, z_b


# ---------------------------------------------------------------------------------------------------------
# Masked supervised losses.
# ---------------------------------------------------------------------------------------------------------


def test_softmax_cross_entropy_segmentation_skips_ignored_pixels_and_masked_rows():
  rng = np.random.default_rng(1)
  batch, height, width, num_classes = 4, 5, 6, constants.NUM_LULC_CLASSES
  logits = rng.normal(size=(batch, height, width, num_classes)).astype(np.float32) * 3
  labels = rng.integers(0, num_classes, size=(batch, height, width))
  labels[rng.random(labels.shape) < 0.3] = constants.LULC_IGNORE
  valid_rows = np.array([True, False, True, True])

  keep = (labels != constants.LULC_IGNORE) & valid_rows[:, None, None]
  log_probs = _numpy_log_softmax(logits)
  expected_terms = -log_probs[keep, labels[keep]]

  total, count = jax.jit(losses.softmax_cross_entropy_sum_and_count)(logits, labels, valid_rows)
  assert int(count) == keep.sum()
  np.testing.assert_allclose(float(total), expected_terms.sum(), rtol=1e-5)
  mean = jax.jit(losses.softmax_cross_entropy)(logits, labels, valid_rows)
  np.testing.assert_allclose(float(mean), expected_terms.mean(), rtol=1e-5)


def test_softmax_cross_entropy_ignores_out_of_range_labels_without_gradient():
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(6, 3)).astype(np.float32)
  labels = np.array([0, 2, 255, -1, 3, 1])  # 255, -1 and 3 are not classes of a 3-class problem
  grads = jax.jit(jax.grad(losses.softmax_cross_entropy))(logits, labels)
  kept = np.array([0, 1, 5])
  np.testing.assert_array_equal(np.asarray(grads)[[2, 3, 4]], 0.0)
  expected = -_numpy_log_softmax(logits[kept])[np.arange(3), labels[kept]].mean()
  np.testing.assert_allclose(float(jax.jit(losses.softmax_cross_entropy)(logits, labels)), expected,
                             rtol=1e-6)


def test_softmax_cross_entropy_of_bfloat16_logits_is_float32():
  rng = np.random.default_rng(3)
  logits = jnp.asarray(rng.normal(size=(8, 5)) * 4, jnp.bfloat16)
  labels = rng.integers(0, 5, size=8)
  loss = jax.jit(losses.softmax_cross_entropy)(logits, labels)
  assert loss.dtype == jnp.float32
  as_float = np.asarray(logits.astype(jnp.float32))
  expected = -_numpy_log_softmax(as_float)[np.arange(8), labels].mean()
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)


def test_losses_with_nothing_valid_are_zero_not_nan():
  logits = np.ones((3, 4), np.float32)
  assert float(losses.softmax_cross_entropy(logits, np.full(3, 255))) == 0.0
  assert float(losses.mse(np.ones(3), np.zeros(3), mask=np.zeros(3, bool))) == 0.0


def test_sigmoid_binary_cross_entropy_matches_numpy_including_huge_logits():
  rng = np.random.default_rng(4)
  logits = (rng.normal(size=(5, 11)) * 4).astype(np.float32)
  logits[0, :3] = [300.0, -300.0, 80.0]
  targets = (rng.random((5, 11)) < 0.4).astype(np.float32)
  targets[0, :3] = [0.0, 1.0, 1.0]
  valid_rows = np.array([True, True, False, True, True])
  x = logits.astype(np.float64)
  # -[t log sigmoid(x) + (1 - t) log(1 - sigmoid(x))], with log sigmoid(x) = -log(1 + exp(-x)).
  per_element = targets * np.logaddexp(0.0, -x) + (1 - targets) * np.logaddexp(0.0, x)
  expected = per_element[valid_rows].mean()

  loss = jax.jit(losses.sigmoid_binary_cross_entropy)(logits, targets, valid_rows)
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
  total, count = jax.jit(losses.sigmoid_binary_cross_entropy_sum_and_count)(logits, targets, valid_rows)
  assert int(count) == 4 * 11
  assert np.isfinite(float(total))


def test_mse_and_mae_match_numpy_with_mask():
  rng = np.random.default_rng(5)
  pred = rng.normal(size=10).astype(np.float32)
  target = rng.normal(size=10).astype(np.float32)
  mask = rng.random(10) < 0.6
  np.testing.assert_allclose(float(losses.mse(pred, target, mask)), np.mean((pred - target)[mask] ** 2),
                             rtol=1e-5)
  np.testing.assert_allclose(float(losses.mae(pred, target, mask)), np.mean(np.abs(pred - target)[mask]),
                             rtol=1e-5)
  total, count = losses.mae_sum_and_count(pred, target, mask)
  assert int(count) == mask.sum()
  np.testing.assert_allclose(float(total), np.abs(pred - target)[mask].sum(), rtol=1e-5)


def test_mask_is_aligned_on_leading_axes_in_any_of_its_forms():
  rng = np.random.default_rng(15)
  logits = rng.normal(size=(4, 3, 3, 5)).astype(np.float32)
  labels = rng.integers(0, 5, size=(4, 3, 3))
  rows = np.array([True, False, True, True])
  expected = -np.take_along_axis(_numpy_log_softmax(logits[rows]), labels[rows][..., None], -1).mean()
  loss = jax.jit(losses.softmax_cross_entropy)
  for mask in (rows, rows[:, None, None], np.broadcast_to(rows[:, None, None], labels.shape), rows * 1.0):
    np.testing.assert_allclose(float(loss(logits, labels, mask)), expected, rtol=1e-5)


def test_bad_shapes_raise_clear_errors():
  with pytest.raises(ValueError, match="same shape"):
    losses.mse(np.zeros((4, 1)), np.zeros(4))
  with pytest.raises(ValueError, match="leading axes"):
    losses.softmax_cross_entropy(np.zeros((4, 3, 3, 2)), np.zeros((4, 3, 3), int), mask=np.ones(3, bool))
  with pytest.raises(ValueError, match="num_classes"):
    losses.softmax_cross_entropy(np.zeros((4, 2)), np.zeros((4, 2), int))
  with pytest.raises(TypeError, match="integer"):
    losses.softmax_cross_entropy(np.zeros((4, 2)), np.zeros(4, np.float32))


def test_masked_cross_entropy_is_the_same_sharded_over_8_devices():
  rng = np.random.default_rng(6)
  logits = rng.normal(size=(16, 3, 3, 4)).astype(np.float32)
  labels = rng.integers(0, 4, size=(16, 3, 3))
  labels[0, 0, :] = constants.LULC_IGNORE
  valid = np.arange(16) < 13  # a padded final batch
  expected = float(jax.jit(losses.softmax_cross_entropy)(logits, labels, valid))
  mesh = _meshes()["explicit"]
  with jax.set_mesh(mesh):
    sharded = [jax.device_put(x, P("data")) for x in (logits, labels, valid)]
    result = float(jax.jit(losses.softmax_cross_entropy)(*sharded))
  np.testing.assert_allclose(result, expected, rtol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# NT-Xent and matching accuracy.
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_nt_xent_matches_numpy_loop_over_anchors(temperature):
  z_a, z_b = _random_views(6, 5, seed=7)
  expected_loss, expected_accuracy = numpy_nt_xent(z_a, z_b, temperature)
  loss, accuracy = nt_xent_and_matching_accuracy(z_a, z_b, temperature)
  np.testing.assert_allclose(float(loss), expected_loss, rtol=1e-5)
  np.testing.assert_allclose(float(nt_xent(z_a, z_b, temperature)), expected_loss, rtol=1e-5)
  assert float(accuracy) == pytest.approx(expected_accuracy)
  # The test's jnp version of the reference's formulation agrees too (it is the gradient reference below).
  reference_loss = jax.jit(_reference_formulation_nt_xent)(z_a, z_b, temperature)
  np.testing.assert_allclose(float(reference_loss), expected_loss, rtol=1e-5)


def test_nt_xent_temperature_effect():
  z_a, z_b = _random_views(5, 8, seed=8)
  batch = z_a.shape[0]
  # An enormous temperature flattens all logits: the partner gets 1 / (2B - 1) of the probability.
  np.testing.assert_allclose(float(nt_xent(z_a, z_b, 1e6)), np.log(2 * batch - 1), rtol=1e-5)
  # Pairs that are more similar than any negative: a colder softmax is more confident.
  aligned = np.eye(batch, 8, dtype=np.float32)
  noisy = aligned + 0.05 * np.random.default_rng(9).normal(size=aligned.shape).astype(np.float32)
  cold, warm = (float(nt_xent(aligned, noisy, t)) for t in (0.05, 0.5))
  assert cold < warm


def test_nt_xent_is_stable_for_huge_norms_low_temperature_and_zero_rows():
  z_a, z_b = _random_views(4, 6, seed=10, scale=1e25)  # squares would overflow float32
  loss, grads = nt_xent_value_and_grads(z_a, z_b, 0.01)
  unit_a = z_a.astype(np.float64) / np.linalg.norm(z_a.astype(np.float64), axis=1, keepdims=True)
  unit_b = z_b.astype(np.float64) / np.linalg.norm(z_b.astype(np.float64), axis=1, keepdims=True)
  np.testing.assert_allclose(float(loss), numpy_nt_xent(unit_a, unit_b, 0.01)[0], rtol=1e-4)
  assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)

  # An all-zero embedding has cosine 0 with every other row: the loss is the numpy loop's with that row
  # kept at zero, and the other rows' gradients are the reference formulation's with that row's
  # similarities fixed at 0 (its own gradient is finite; it is not defined by the reference).
  with_zero_row = z_a / 1e25
  with_zero_row[0] = 0.0
  loss, (grad_a, grad_b) = nt_xent_value_and_grads(with_zero_row, z_b / 1e25, 0.5)
  np.testing.assert_allclose(float(loss), numpy_nt_xent(with_zero_row, z_b / 1e25, 0.5)[0], rtol=1e-5)
  assert np.all(np.isfinite(np.asarray(grad_a))) and np.all(np.isfinite(np.asarray(grad_b)))

  def reference_with_zero_first_row(rest_a, b):
    return _reference_formulation_nt_xent(jnp.concatenate([jnp.zeros_like(rest_a[:1]), rest_a]), b, 0.5)

  expected_a, expected_b = jax.grad(reference_with_zero_first_row, argnums=(0, 1))(
      jnp.asarray(with_zero_row[1:]), jnp.asarray(z_b / 1e25))
  np.testing.assert_allclose(np.asarray(grad_a)[1:], np.asarray(expected_a), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(np.asarray(grad_b), np.asarray(expected_b), rtol=1e-4, atol=1e-6)


def test_nt_xent_rejects_bad_input():
  with pytest.raises(ValueError, match=r"\[B, D\]"):
    losses.nt_xent(np.zeros((4, 3)), np.zeros((5, 3)), 0.1)
  with pytest.raises(ValueError, match="positive"):
    losses.nt_xent(np.ones((4, 3)), np.ones((4, 3)), 0.0)


def test_matching_accuracy_on_constructed_cases():
  batch = 6
  basis = np.eye(2 * batch, dtype=np.float32)
  z_a = basis[:batch] * 3.0  # the norm must not matter
  assert float(matching_accuracy(z_a, basis[:batch])) == 1.0

  # Turning k partners to the opposite direction makes both anchors of those k pairs miss (their partner
  # is the least similar candidate), and no other anchor: accuracy 1 - k / B.
  k = 2
  z_b = basis[:batch].copy()
  z_b[[1, 4]] *= -1.0
  assert float(matching_accuracy(z_a, z_b)) == pytest.approx(1 - k / batch)

  # A single wrong anchor: z_b[0] leans towards pair 1 (cos 0.89 with both its views, 0.45 with its own
  # partner), while z_a[0] still finds z_b[0] (cos 0.45 against 0 for everything else).
  z_b = basis[:batch].copy()
  z_b[0] = basis[0] + 2.0 * basis[1]
  assert float(matching_accuracy(z_a, z_b)) == pytest.approx((2 * batch - 1) / (2 * batch))


def test_nt_xent_mask_drops_padding_pairs_as_anchors_and_negatives():
  z_a, z_b = _random_views(8, 5, seed=11)
  valid = np.array([1, 1, 0, 1, 1, 1, 0, 1], bool)
  expected_loss, expected_accuracy = numpy_nt_xent(z_a[valid], z_b[valid], 0.2)
  loss, accuracy = nt_xent_and_matching_accuracy(z_a, z_b, 0.2, mask=valid)
  np.testing.assert_allclose(float(loss), expected_loss, rtol=1e-5)
  assert float(accuracy) == pytest.approx(expected_accuracy)
  grad_a = jax.jit(jax.grad(lambda a: losses.nt_xent(a, z_b, 0.2, mask=valid)))(z_a)
  np.testing.assert_array_equal(np.asarray(grad_a)[~valid], 0.0)
  assert np.all(np.isfinite(np.asarray(grad_a)))


def _loss_and_grads(fn, z_a, z_b):
  return jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))(z_a, z_b)


@pytest.mark.parametrize("axis_kind", ["explicit", "auto"])
def test_sharded_nt_xent_equals_single_device_loss_and_gradients(axis_kind):
  temperature = 0.1
  z_a, z_b = _random_views(16, 8, seed=12)  # global batch 16: 2 rows per device
  expected_loss, (expected_grad_a, expected_grad_b) = _loss_and_grads(
      lambda a, b: _reference_formulation_nt_xent(a, b, temperature), z_a, z_b)
  mesh = _meshes()[axis_kind]

  def check(result):
    loss, (grad_a, grad_b) = result
    np.testing.assert_allclose(float(loss), float(expected_loss), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grad_a), np.asarray(expected_grad_a), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(grad_b), np.asarray(expected_grad_b), rtol=1e-4, atol=1e-6)

  loss_fn = lambda a, b: losses.nt_xent(a, b, temperature)
  with jax.set_mesh(mesh):  # mesh in context, batch sharded over it
    sharded_a, sharded_b = jax.device_put(z_a, P("data")), jax.device_put(z_b, P("data"))
    check(_loss_and_grads(loss_fn, sharded_a, sharded_b))
  if axis_kind == "explicit":
    # No mesh in context: the sharding carried by the arrays, or the mesh passed explicitly.
    sharding = NamedSharding(mesh, P("data"))
    check(_loss_and_grads(loss_fn, jax.device_put(z_a, sharding), jax.device_put(z_b, sharding)))
    check(_loss_and_grads(lambda a, b: losses.nt_xent(a, b, temperature, mesh=mesh), z_a, z_b))


def test_sharded_matching_accuracy_and_mask_equal_single_device():
  z_a, z_b = _random_views(16, 3, seed=13)  # low dimension, so some anchors miss
  valid = np.arange(16) % 5 != 4
  expected_loss, expected_accuracy = numpy_nt_xent(z_a[valid], z_b[valid], 0.3)
  assert 0.0 < expected_accuracy < 1.0
  with jax.set_mesh(_meshes()["explicit"]):
    args = [jax.device_put(x, P("data")) for x in (z_a, z_b, valid)]
    loss, accuracy = jax.jit(
        lambda a, b, m: nt_xent_and_matching_accuracy(a, b, 0.3, mask=m))(*args)
    plain_accuracy = jax.jit(lambda a, b, m: losses.matching_accuracy(a, b, mask=m))(*args)
  np.testing.assert_allclose(float(loss), expected_loss, rtol=1e-5)
  assert float(accuracy) == pytest.approx(expected_accuracy)
  assert float(plain_accuracy) == pytest.approx(expected_accuracy)
  # Gradients: the reference formulation on the valid rows alone; padding rows get exactly zero.
  expected_a, expected_b = jax.grad(lambda a, b: _reference_formulation_nt_xent(a, b, 0.3), argnums=(0, 1))(
      z_a[valid], z_b[valid])
  with jax.set_mesh(_meshes()["explicit"]):
    grad_a, grad_b = jax.jit(jax.grad(lambda a, b, m: losses.nt_xent(a, b, 0.3, mask=m), argnums=(0, 1)))(
        *args)
  for grad, expected in ((grad_a, expected_a), (grad_b, expected_b)):
    grad = np.asarray(grad)
    np.testing.assert_array_equal(grad[~valid], 0.0)
    np.testing.assert_allclose(grad[valid], np.asarray(expected), rtol=1e-4, atol=1e-6)


def test_nt_xent_called_inside_a_users_shard_map_uses_the_global_batch():
  z_a, z_b = _random_views(16, 4, seed=14)
  expected = numpy_nt_xent(z_a, z_b, 0.2)[0]
  mesh = _meshes()["explicit"]
  per_device = jax.shard_map(lambda a, b: losses.nt_xent(a, b, 0.2), mesh=mesh,
                             in_specs=(P("data"), P("data")), out_specs=P())
  with jax.set_mesh(mesh):
    result = jax.jit(per_device)(jax.device_put(z_a, P("data")), jax.device_put(z_b, P("data")))
  np.testing.assert_allclose(float(result), expected, rtol=1e-5)


def test_embedding_spread_of_constructed_embeddings():
  # Half the rows along +e1, half along -e1 (any lengths: they are normalised first), in D = 4: per-dimension
  # std 1, 0, 0, 0, so the spread is mean(std) * sqrt(D) = 1/4 * 2 = 0.5.
  z = np.zeros((6, 4), np.float32)
  z[:, 0] = [3.0, -1.0, 0.5, -2.0, 7.0, -0.1]
  assert float(objectives.embedding_spread(jnp.asarray(z))) == pytest.approx(0.5, rel=1e-6)
  # Collapse: every row the same direction.
  assert float(objectives.embedding_spread(jnp.asarray(np.abs(z)))) == pytest.approx(0.0, abs=1e-6)
  # A random cloud against numpy; masked rows (here planted far off) do not count.
  rng = np.random.default_rng(0)
  cloud = rng.normal(size=(10, 5)).astype(np.float32)
  mask = np.array([1, 1, 0, 1, 1, 1, 0, 1, 1, 1], np.float32)
  cloud[mask == 0] = 100.0
  unit = cloud / np.linalg.norm(cloud, axis=1, keepdims=True)
  expected = np.mean(unit[mask == 1].std(axis=0)) * np.sqrt(5)
  got = objectives.embedding_spread(jnp.asarray(cloud), jnp.asarray(mask))
  assert float(got) == pytest.approx(expected, rel=1e-5)
