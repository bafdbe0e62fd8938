"""Deterministic, class-stratified, nested subsets of the training labels (label-efficiency experiments).

Each class gets its own seeded permutation of its members; a fraction f keeps the first ceil(f * n_class)
of them (at least one per class present). Because the permutation does not depend on f and the count
grows with f, the 1 % subset lies inside the 10 % subset, which lies inside the 50 % subset, and so on:
curves over label fractions then compare nested training sets rather than unrelated draws.
"""

from __future__ import annotations

import math

import numpy as np

# Keeps the per-class permutation streams apart from any other use of the experiment seed.
_STREAM_TAG = 0x1ABE1


def check_fraction(fraction: float) -> float:
  """Returns `fraction` as a float, or raises naming data.label_fraction unless 0 < fraction <= 1."""
  if isinstance(fraction, bool) or not isinstance(fraction, (int, float, np.floating, np.integer)):
    raise TypeError(f"data.label_fraction must be a number, got {fraction!r}.")
  if not 0.0 < float(fraction) <= 1.0:
    raise ValueError(f"data.label_fraction must satisfy 0 < f <= 1, got {fraction}.")
  return float(fraction)


def _check(class_labels: np.ndarray, fraction: float) -> np.ndarray:
  check_fraction(fraction)
  class_labels = np.asarray(class_labels)
  if class_labels.ndim != 1:
    raise ValueError(f"class_labels must be one label per example ([N]), got shape {class_labels.shape}.")
  if class_labels.size and not np.issubdtype(class_labels.dtype, np.integer):
    raise ValueError(f"class_labels must be integers, got dtype {class_labels.dtype}.")
  if class_labels.size and class_labels.min() < 0:
    raise ValueError(f"class_labels must be >= 0, found {class_labels.min()}.")
  return class_labels


def labelled_count(class_size: int, fraction: float) -> int:
  """How many of a class's `class_size` examples keep their label at `fraction` (>= 1 when present)."""
  if class_size == 0:
    return 0
  # Rounding first stops float noise (0.07 * 100 = 7.000000000000001) from adding one example.
  return min(class_size, max(1, math.ceil(round(float(fraction) * class_size, 6))))


def class_permutation(members: np.ndarray, class_id: int, seed: int) -> np.ndarray:
  """The fixed order in which the members of one class receive labels (independent of the fraction)."""
  rng = np.random.default_rng([_STREAM_TAG, int(seed) % 2**63, int(class_id)])
  return members[rng.permutation(len(members))]


def label_fraction_indices(class_labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
  """Sorted indices (int64) of the examples that keep their labels at `fraction`.

  Args:
    class_labels: [N] integer class of every training example (the stratification label).
    fraction: 0 < fraction <= 1; 1 returns every index.
    seed: picks the per-class permutations; the same seed gives nested subsets across fractions.
  """
  class_labels = _check(class_labels, fraction)
  if float(fraction) == 1.0:
    return np.arange(class_labels.size, dtype=np.int64)
  chosen = []
  for class_id in np.unique(class_labels):
    members = np.flatnonzero(class_labels == class_id)
    order = class_permutation(members, class_id, seed)
    chosen.append(order[: labelled_count(len(members), fraction)])
  if not chosen:
    return np.zeros(0, np.int64)
  return np.sort(np.concatenate(chosen)).astype(np.int64)


def unlabelled_indices(class_labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
  """Sorted indices (int64) of the examples whose labels are withheld at `fraction`.

  The complement of `label_fraction_indices` with the same arguments: these images remain available to
  self-supervised pretraining, which never reads their labels.
  """
  class_labels = _check(class_labels, fraction)
  labelled = np.zeros(class_labels.size, bool)
  labelled[label_fraction_indices(class_labels, fraction, seed)] = True
  return np.flatnonzero(~labelled).astype(np.int64)
