"""Tests of the nested, class-stratified label subsets."""

import math

import numpy as np
import pytest

from labeleff_jax.data import label_fraction

CLASS_SIZES = {0: 500, 1: 120, 2: 30, 3: 3, 5: 1}  # imbalanced, with a gap (no class 4)
FRACTIONS = (0.01, 0.1, 0.5, 1.0)


def imbalanced_labels(seed=0):
  labels = np.concatenate([np.full(n, c) for c, n in CLASS_SIZES.items()])
  return np.random.default_rng(seed).permutation(labels)


def test_subsets_are_nested_across_fractions():
  labels = imbalanced_labels()
  subsets = [set(label_fraction.label_fraction_indices(labels, f, seed=7)) for f in FRACTIONS]
  for smaller, larger in zip(subsets, subsets[1:]):
    assert smaller < larger
  assert subsets[-1] == set(range(len(labels)))


def test_every_class_keeps_its_share_and_at_least_one_example():
  labels = imbalanced_labels()
  for fraction in FRACTIONS:
    chosen = label_fraction.label_fraction_indices(labels, fraction, seed=7)
    for class_id, size in CLASS_SIZES.items():
      expected = max(1, math.ceil(fraction * size - 1e-9))
      assert np.sum(labels[chosen] == class_id) == expected, (fraction, class_id)
  # 10 %: 50 + 12 + 3 + 1 + 1
  assert len(label_fraction.label_fraction_indices(labels, 0.1, seed=7)) == 67


def test_float_noise_does_not_add_an_example():
  labels = np.zeros(100, np.int64)
  assert 0.07 * 100 > 7  # the product is 7.000000000000001
  assert len(label_fraction.label_fraction_indices(labels, 0.07, seed=0)) == 7


def test_indices_are_sorted_deterministic_and_seed_dependent():
  labels = imbalanced_labels()
  first = label_fraction.label_fraction_indices(labels, 0.1, seed=3)
  np.testing.assert_array_equal(first, np.sort(first))
  assert first.dtype == np.int64
  np.testing.assert_array_equal(first, label_fraction.label_fraction_indices(labels, 0.1, seed=3))
  assert not np.array_equal(first, label_fraction.label_fraction_indices(labels, 0.1, seed=4))


def test_unlabelled_indices_are_the_complement():
  labels = imbalanced_labels()
  for fraction in FRACTIONS:
    labelled = label_fraction.label_fraction_indices(labels, fraction, seed=1)
    unlabelled = label_fraction.unlabelled_indices(labels, fraction, seed=1)
    assert not set(labelled) & set(unlabelled)
    np.testing.assert_array_equal(np.sort(np.concatenate([labelled, unlabelled])), np.arange(len(labels)))
  assert len(label_fraction.unlabelled_indices(labels, 1.0, seed=1)) == 0


def test_invalid_fractions_and_labels_are_rejected():
  labels = imbalanced_labels()
  for bad in (0.0, -0.1, 1.5):
    with pytest.raises(ValueError, match="label_fraction"):
      label_fraction.label_fraction_indices(labels, bad, seed=0)
  with pytest.raises(ValueError, match="integers"):
    label_fraction.label_fraction_indices(labels.astype(np.float32), 0.5, seed=0)
  with pytest.raises(ValueError, match=">= 0"):
    label_fraction.label_fraction_indices(np.array([0, -1, 2]), 0.5, seed=0)
