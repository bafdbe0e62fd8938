"""Cheap representation-quality probe for pretraining: k-nearest-neighbour classification on frozen features.

Features of the labelled training examples form the memory bank; every validation example is classified
by a similarity-weighted vote of its k most cosine-similar bank entries (as in DINO's k-NN evaluation).
No training, no extra parameters, so it can run every epoch of a pretraining run.
"""

from collections.abc import Callable, Iterable

import numpy as np

from labeleff_jax import sharding


def collect_features(embed: Callable, batches: Iterable[dict], label: str,
                     keep_indices: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(features [N, F], labels [N]) of the valid rows of `batches` (optionally only `keep_indices`)."""
  features, labels = [], []
  keep = None if keep_indices is None else np.zeros(0, bool)
  if keep_indices is not None and len(keep_indices):
    keep = np.zeros(int(np.max(keep_indices)) + 1, bool)
    keep[keep_indices] = True
  for batch in batches:
    host = sharding.to_host({"features": embed(batch), "index": batch["index"], "valid": batch["valid"],
                             "label": batch["labels"][label]})
    rows = host["valid"].astype(bool)
    if keep is not None:
      index = host["index"]
      inside = (index >= 0) & (index < len(keep))  # rows beyond the largest kept index are not kept
      rows &= inside
      rows[inside] &= keep[index[inside]]
    features.append(np.asarray(host["features"], np.float32)[rows])
    labels.append(np.asarray(host["label"])[rows])
  return np.concatenate(features), np.concatenate(labels)


def knn_accuracy(bank_features: np.ndarray, bank_labels: np.ndarray, query_features: np.ndarray,
                 query_labels: np.ndarray, *, k: int = 20, num_classes: int | None = None,
                 temperature: float = 0.07) -> float:
  """Top-1 accuracy of a weighted k-NN vote (weights exp(cosine / temperature))."""
  if len(bank_features) == 0 or len(query_features) == 0:
    raise ValueError("k-NN probe needs at least one bank and one query example")
  num_classes = num_classes or int(max(bank_labels.max(), query_labels.max())) + 1
  normalise = lambda x: x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)  # noqa: E731
  similarity = normalise(query_features) @ normalise(bank_features).T
  k = min(k, len(bank_features))
  neighbours = np.argpartition(-similarity, k - 1, axis=1)[:, :k]
  weights = np.exp(np.take_along_axis(similarity, neighbours, axis=1) / temperature)
  votes = np.zeros((len(query_features), num_classes))
  np.add.at(votes, (np.arange(len(query_features))[:, None], bank_labels[neighbours]), weights)
  return float(np.mean(np.argmax(votes, axis=1) == query_labels))
