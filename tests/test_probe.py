"""Tests of the k-NN probe (labeleff_jax/probe.py) against a plain numpy re-implementation of its vote."""

import numpy as np
import pytest

from labeleff_jax import probe


def reference_knn(bank, bank_labels, queries, query_labels, k, num_classes, temperature):
  """The weighted vote written out one query at a time: full sort, explicit sums per class."""
  bank = bank / np.linalg.norm(bank, axis=1, keepdims=True)
  correct = 0
  for query, label in zip(queries, query_labels):
    similarity = bank @ (query / np.linalg.norm(query))
    nearest = np.argsort(-similarity, kind="stable")[:min(k, len(bank))]
    votes = [sum(np.exp(similarity[i] / temperature) for i in nearest if bank_labels[i] == c)
             for c in range(num_classes)]
    correct += int(np.argmax(votes) == label)
  return correct / len(queries)


def _problem(seed, num_bank=40, num_query=25, dim=6, num_classes=4):
  """Class-dependent clusters with enough noise that k, the temperature and the weights matter."""
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(num_classes, dim))
  bank_labels = rng.integers(0, num_classes, num_bank)
  query_labels = rng.integers(0, num_classes, num_query)
  bank = centres[bank_labels] + 1.2 * rng.normal(size=(num_bank, dim))
  queries = centres[query_labels] + 1.2 * rng.normal(size=(num_query, dim))
  return bank.astype(np.float32), bank_labels, queries.astype(np.float32), query_labels


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("k,temperature", [(1, 0.07), (5, 0.07), (9, 0.5), (15, 10.0)])
def test_knn_accuracy_matches_a_numpy_vote(seed, k, temperature):
  bank, bank_labels, queries, query_labels = _problem(seed)
  expected = reference_knn(bank, bank_labels, queries, query_labels, k, 4, temperature)
  got = probe.knn_accuracy(bank, bank_labels, queries, query_labels, k=k, num_classes=4,
                           temperature=temperature)
  assert got == pytest.approx(expected, abs=1e-12)


def test_the_vote_is_weighted_by_similarity_not_counted():
  # Two close class-1 neighbours against three far class-0 ones: counting says 0, the exp(cos / T) weights 1.
  bank = np.array([[1.0, 0.0], [1.0, 0.05], [0.0, 1.0], [-0.1, 1.0], [0.1, 1.0]], np.float32)
  bank_labels = np.array([1, 1, 0, 0, 0])
  query = np.array([[1.0, 0.02]], np.float32)
  assert reference_knn(bank, bank_labels, query, [1], 5, 2, 0.07) == 1.0
  assert probe.knn_accuracy(bank, bank_labels, query, np.array([1]), k=5, num_classes=2) == 1.0
  # With a very high temperature every weight is ~1 and the majority (class 0) wins.
  assert probe.knn_accuracy(bank, bank_labels, query, np.array([1]), k=5, num_classes=2,
                            temperature=1e6) == 0.0


def test_k_larger_than_the_bank_votes_with_the_whole_bank():
  bank, bank_labels, queries, query_labels = _problem(7, num_bank=6)
  whole = reference_knn(bank, bank_labels, queries, query_labels, 6, 4, 0.5)
  assert probe.knn_accuracy(bank, bank_labels, queries, query_labels, k=50, num_classes=4,
                            temperature=0.5) == pytest.approx(whole)
  # ... which is not what k = 1 gives on this problem, so the clamp is really exercised.
  assert whole != reference_knn(bank, bank_labels, queries, query_labels, 1, 4, 0.5)


def test_ties_go_to_the_lowest_class_and_scale_does_not_matter():
  # Two bank entries at the same cosine from the query, classes 2 and 1: equal votes, argmax picks 1.
  bank = np.array([[1.0, 1.0], [1.0, -1.0]], np.float32)
  bank_labels = np.array([2, 1])
  query = np.array([[5.0, 0.0]], np.float32)  # any length: cosine similarity ignores it
  assert probe.knn_accuracy(bank, bank_labels, query, np.array([1]), k=2, num_classes=3) == 1.0
  assert probe.knn_accuracy(bank, bank_labels, query, np.array([2]), k=2, num_classes=3) == 0.0
  assert probe.knn_accuracy(3.0 * bank, bank_labels, query / 5, np.array([1]), k=2, num_classes=3) == 1.0


def test_an_empty_bank_or_query_is_an_error():
  bank, bank_labels, queries, query_labels = _problem(0)
  with pytest.raises(ValueError, match="at least one bank and one query"):
    probe.knn_accuracy(bank[:0], bank_labels[:0], queries, query_labels)
  with pytest.raises(ValueError, match="at least one bank and one query"):
    probe.knn_accuracy(bank, bank_labels, queries[:0], query_labels[:0])


def _batches(features, labels, batch_size):
  """Padded batches as the eval pipeline yields them: index, valid mask (0 on padding), labels by name.

  The padding rows carry index 0 (an index that may be kept) and features that would win any vote.
  """
  batches = []
  for start in range(0, len(features), batch_size):
    rows = np.arange(start, min(start + batch_size, len(features)))
    pad = batch_size - len(rows)
    batches.append({
        "inputs": np.concatenate([features[rows], np.full((pad, features.shape[1]), 99.0, np.float32)]),
        "index": np.concatenate([rows, np.zeros(pad, np.int64)]),
        "valid": np.concatenate([np.ones(len(rows), np.int32), np.zeros(pad, np.int32)]),
        "labels": {"lulc": np.concatenate([labels[rows], np.full(pad, 3)])},
    })
  return batches


def test_collect_features_drops_padding_and_keeps_only_the_given_indices():
  rng = np.random.default_rng(0)
  features = rng.normal(size=(11, 3)).astype(np.float32)
  labels = rng.integers(0, 3, 11)
  embed = lambda batch: 2.0 * batch["inputs"]  # noqa: E731  (any function of the batch)
  batches = _batches(features, labels, batch_size=4)  # 11 rows in 3 batches, one padding row

  got_features, got_labels = probe.collect_features(embed, batches, "lulc")
  np.testing.assert_array_equal(got_features, 2.0 * features)
  np.testing.assert_array_equal(got_labels, labels)

  keep = np.array([0, 3, 4, 9])  # the labelled subset: the bank holds exactly these rows, in order
  got_features, got_labels = probe.collect_features(embed, batches, "lulc", keep_indices=keep)
  np.testing.assert_array_equal(got_features, 2.0 * features[keep])
  np.testing.assert_array_equal(got_labels, labels[keep])

  # Indices beyond the largest kept one are dropped too.
  got_features, _ = probe.collect_features(embed, batches, "lulc", keep_indices=np.array([1]))
  np.testing.assert_array_equal(got_features, 2.0 * features[[1]])


# An empty subset once indexed an empty mask (IndexError). Training never passes one (every label fraction
# keeps at least one example per class), but the function should not depend on that.
def test_an_empty_subset_collects_nothing():
  features = np.ones((5, 3), np.float32)
  batches = _batches(features, np.zeros(5, int), batch_size=4)
  got_features, got_labels = probe.collect_features(lambda batch: batch["inputs"], batches, "lulc",
                                                    keep_indices=np.zeros(0, int))
  assert got_features.shape == (0, 3) and got_labels.shape == (0,)


def test_the_probe_on_collected_features_equals_the_vote_on_the_subset():
  # End to end through both functions: the bank limited to the kept rows, padding never in bank or query.
  bank, bank_labels, queries, query_labels = _problem(3, num_bank=30, num_query=13)
  keep = np.flatnonzero(bank_labels != 0)  # no class-0 entry in the bank: class-0 queries must miss
  identity = lambda batch: batch["inputs"]  # noqa: E731
  got_bank = probe.collect_features(identity, _batches(bank, bank_labels, 8), "lulc", keep_indices=keep)
  got_query = probe.collect_features(identity, _batches(queries, query_labels, 8), "lulc")
  expected = reference_knn(bank[keep], bank_labels[keep], queries, query_labels, 5, 4, 0.07)
  assert probe.knn_accuracy(*got_bank, *got_query, k=5, num_classes=4) == pytest.approx(expected)
  # The subset matters on this problem: the whole bank votes differently.
  assert expected != reference_knn(bank, bank_labels, queries, query_labels, 5, 4, 0.07)
