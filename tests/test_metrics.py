"""Tests of labeleff_jax.metrics against scikit-learn, accumulated over uneven batches and 8 devices."""

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P
from sklearn import metrics as skm

from labeleff_jax import metrics
from labeleff_jax.data import constants

NUM_CLASSES = constants.NUM_LULC_CLASSES
confusion_matrix = jax.jit(metrics.confusion_matrix, static_argnums=2)
multilabel_counts = jax.jit(metrics.multilabel_counts)
regression_sums = jax.jit(metrics.regression_sums)


def _segmentation_batch(seed, batch=12, size=5, absent=(3, 7)):
  """Labels with ignore pixels and classes `absent` never present; predictions that are often right."""
  rng = np.random.default_rng(seed)
  classes = np.setdiff1d(np.arange(NUM_CLASSES), absent)
  labels = rng.choice(classes, size=(batch, size, size))
  preds = np.where(rng.random(labels.shape) < 0.6, labels, rng.choice(classes, size=labels.shape))
  preds[0, 0, 0] = absent[1]  # a class that is predicted but never the label
  labels[rng.random(labels.shape) < 0.15] = constants.LULC_IGNORE
  valid = np.ones(batch, bool)
  valid[-3:] = False  # padding rows of a final evaluation batch
  return labels.astype(np.int32), preds.astype(np.int32), valid


def _kept(labels, preds, valid):
  keep = (labels != constants.LULC_IGNORE) & valid.reshape(valid.shape + (1,) * (labels.ndim - 1))
  return labels[keep], preds[keep]


def test_confusion_matrix_matches_sklearn_with_ignore_pixels_and_masked_rows():
  labels, preds, valid = _segmentation_batch(0)
  y_true, y_pred = _kept(labels, preds, valid)
  cm = np.asarray(confusion_matrix(labels, preds, NUM_CLASSES, valid))
  assert cm.dtype == np.int32
  np.testing.assert_array_equal(cm, skm.confusion_matrix(y_true, y_pred, labels=np.arange(NUM_CLASSES)))


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_scores_match_sklearn_under_the_present_classes_convention():
  labels, preds, valid = _segmentation_batch(1)
  y_true, y_pred = _kept(labels, preds, valid)
  scores = metrics.scores_from_confusion(confusion_matrix(labels, preds, NUM_CLASSES, valid))

  assert scores["accuracy"] == pytest.approx(skm.accuracy_score(y_true, y_pred))
  assert scores["pixel_accuracy"] == scores["accuracy"]
  assert scores["micro_f1"] == pytest.approx(skm.f1_score(y_true, y_pred, average="micro"))
  # scikit-learn's default labels=None averages over classes in y_true or y_pred: the same convention.
  assert scores["macro_f1"] == pytest.approx(skm.f1_score(y_true, y_pred, average="macro"))
  assert scores["miou"] == pytest.approx(skm.jaccard_score(y_true, y_pred, average="macro"))
  assert scores["mean_class_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y_true, y_pred))
  assert scores["count"] == len(y_true)

  present = np.union1d(y_true, y_pred)
  iou = np.asarray(scores["iou_per_class"])
  np.testing.assert_allclose(iou[present], skm.jaccard_score(y_true, y_pred, labels=present, average=None))
  np.testing.assert_allclose(np.asarray(scores["f1_per_class"])[present],
                             skm.f1_score(y_true, y_pred, labels=present, average=None))
  assert np.isnan(iou[3])  # class 3 is neither a label nor a prediction: undefined, skipped by the mean
  assert iou[7] == 0.0  # class 7 is predicted but never the label: IoU 0, counted in the mean


def test_accumulating_uneven_batches_equals_the_whole_split():
  labels, preds, valid = _segmentation_batch(2, batch=15)
  whole = metrics.scores_from_confusion(confusion_matrix(labels, preds, NUM_CLASSES, valid))
  accumulator = metrics.ClassificationAccumulator(NUM_CLASSES)
  for start, stop in [(0, 4), (4, 11), (11, 12), (12, 15)]:
    accumulator.update(confusion_matrix(labels[start:stop], preds[start:stop], NUM_CLASSES,
                                        valid[start:stop]))
  accumulated = accumulator.result()
  assert accumulated["iou_per_class"] == pytest.approx(whole["iou_per_class"], nan_ok=True)
  for key in ("accuracy", "macro_f1", "miou", "mean_class_accuracy", "count"):
    assert accumulated[key] == pytest.approx(whole[key])
  # The mean of per-batch accuracies is not the split's accuracy: the point of accumulating.
  y_true, y_pred = _kept(labels, preds, valid)
  assert accumulated["accuracy"] == pytest.approx(skm.accuracy_score(y_true, y_pred))


def test_classification_labels_of_shape_b():
  rng = np.random.default_rng(3)
  labels = rng.integers(0, 12, size=40).astype(np.int32)
  preds = np.where(rng.random(40) < 0.5, labels, rng.integers(0, 12, size=40)).astype(np.int32)
  scores = metrics.scores_from_confusion(confusion_matrix(labels, preds, 12, None))
  assert scores["accuracy"] == pytest.approx(skm.accuracy_score(labels, preds))
  assert scores["macro_f1"] == pytest.approx(skm.f1_score(labels, preds, average="macro"))


@pytest.mark.parametrize("axis_types", [None, (jax.sharding.AxisType.Auto,)])
def test_confusion_matrix_sharded_over_8_devices_equals_single_device(axis_types):
  labels, preds, valid = _segmentation_batch(4, batch=16)
  expected = np.asarray(confusion_matrix(labels, preds, NUM_CLASSES, valid))
  mesh = jax.make_mesh((8,), ("data",), axis_types=axis_types)
  with jax.set_mesh(mesh):
    sharded = [jax.device_put(x, P("data")) for x in (labels, preds, valid)]
    np.testing.assert_array_equal(np.asarray(confusion_matrix(*sharded[:2], NUM_CLASSES, sharded[2])),
                                  expected)
  if axis_types is None:  # explicitly sharded arrays without a mesh in context
    sharded = [jax.device_put(x, NamedSharding(mesh, P("data"))) for x in (labels, preds, valid)]
    np.testing.assert_array_equal(np.asarray(confusion_matrix(*sharded[:2], NUM_CLASSES, sharded[2])),
                                  expected)


def test_confusion_matrix_rejects_bad_input():
  labels = np.array([0, 1, 2], np.int32)
  with pytest.raises(ValueError, match="preds must lie"):
    metrics.confusion_matrix(labels, np.array([0, 3, 1], np.int32), 3)
  with pytest.raises(ValueError, match="same shape"):
    metrics.confusion_matrix(labels, labels[:2], 3)
  with pytest.raises(TypeError, match="integer"):
    metrics.confusion_matrix(labels, labels.astype(np.float32), 3)
  with pytest.raises(ValueError, match="square"):
    metrics.scores_from_confusion(np.zeros((2, 3)))
  with pytest.raises(ValueError, match="expected a"):
    metrics.ClassificationAccumulator(3).update(np.zeros((4, 4)))


def test_empty_split_gives_nan_not_an_exception():
  scores = metrics.ClassificationAccumulator(4).result()
  assert np.isnan(scores["accuracy"]) and np.isnan(scores["miou"]) and scores["count"] == 0


def test_multilabel_metrics_match_sklearn_over_uneven_masked_batches():
  rng = np.random.default_rng(5)
  num_examples, num_labels = 30, NUM_CLASSES
  targets = rng.random((num_examples, num_labels)) < 0.3
  targets[:, 6] = False  # a label nobody has and nobody predicts: skipped by macro F1
  preds = np.where(rng.random(targets.shape) < 0.75, targets, ~targets)
  preds[:, 6] = False
  preds[:4] = targets[:4]  # some exact matches
  valid = rng.random(num_examples) < 0.8

  accumulator = metrics.MultilabelAccumulator(num_labels)
  for start, stop in [(0, 7), (7, 8), (8, 21), (21, 30)]:
    # Targets as floats and predictions from logits, as an evaluation step has them.
    logits = np.where(preds[start:stop], 2.0, -2.0).astype(np.float32)
    accumulator.update(multilabel_counts(targets[start:stop].astype(np.float32), logits > 0,
                                         valid[start:stop]))
  result = accumulator.result()

  y_true, y_pred = targets[valid].astype(int), preds[valid].astype(int)
  present = np.flatnonzero(y_true.any(axis=0) | y_pred.any(axis=0))
  assert result["micro_f1"] == pytest.approx(skm.f1_score(y_true, y_pred, average="micro"))
  assert result["macro_f1"] == pytest.approx(
      skm.f1_score(y_true, y_pred, average="macro", labels=present))
  assert result["exact_match_accuracy"] == pytest.approx(skm.accuracy_score(y_true, y_pred))
  assert result["hamming_accuracy"] == pytest.approx(1 - skm.hamming_loss(y_true, y_pred))
  assert result["count"] == valid.sum()
  assert np.isnan(result["f1_per_label"][6])


def test_regression_metrics_match_sklearn_over_uneven_masked_batches():
  rng = np.random.default_rng(6)
  targets = rng.random(23).astype(np.float32)
  preds = (targets + 0.2 * rng.normal(size=23)).astype(np.float32)
  valid = rng.random(23) < 0.7
  accumulator = metrics.RegressionAccumulator()
  for start, stop in [(0, 9), (9, 10), (10, 23)]:
    accumulator.update(regression_sums(preds[start:stop], targets[start:stop], valid[start:stop]))
  result = accumulator.result()
  assert result["mae"] == pytest.approx(skm.mean_absolute_error(targets[valid], preds[valid]), rel=1e-5)
  assert result["rmse"] == pytest.approx(np.sqrt(skm.mean_squared_error(targets[valid], preds[valid])),
                                         rel=1e-5)
  assert result["count"] == valid.sum()


def test_multilabel_and_regression_statistics_sharded_over_8_devices_equal_single_device():
  rng = np.random.default_rng(7)
  targets = rng.random((16, 5)) < 0.4
  preds = rng.random((16, 5)) < 0.4
  values, estimates = rng.random(16).astype(np.float32), rng.random(16).astype(np.float32)
  valid = np.arange(16) < 11
  expected_counts = multilabel_counts(targets, preds, valid)
  expected_sums = regression_sums(estimates, values, valid)
  with jax.set_mesh(jax.make_mesh((8,), ("data",))):
    put = lambda x: jax.device_put(x, P("data"))
    counts = multilabel_counts(put(targets), put(preds), put(valid))
    sums = regression_sums(put(estimates), put(values), put(valid))
  for key, value in expected_counts.items():
    np.testing.assert_array_equal(np.asarray(counts[key]), np.asarray(value), err_msg=key)
  for key, value in expected_sums.items():
    np.testing.assert_allclose(np.asarray(sums[key]), np.asarray(value), rtol=1e-6, err_msg=key)


def test_mean_accumulator_weights_batches_by_their_counts():
  accumulator = metrics.MeanAccumulator()
  # Per-example losses 1, 2, 3 (batch of 3) and 10 (batch of 1): the split mean is 4, not (2 + 10) / 2.
  accumulator.update({"loss_sum": 6.0, "matching_sum": 3.0, "count": 3})
  accumulator.update({"loss_sum": np.float32(10.0), "matching_sum": 0.0, "count": np.int32(1)})
  assert accumulator.result() == pytest.approx({"loss": 4.0, "matching": 0.75})
  with pytest.raises(ValueError, match="NAME_sum"):
    accumulator.update({"loss": 1.0, "count": 1})
  with pytest.raises(KeyError, match="count"):
    accumulator.update({"loss_sum": 1.0})
