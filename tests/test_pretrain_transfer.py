"""Contrastive pretraining and transfer learning end to end on tiny synthetic data (8 fake CPU devices)."""

import json
import logging

import flax.nnx as nnx
import jax
import numpy as np
import pytest

from configs import contrastive
from configs import finetune
from labeleff_jax import models
from labeleff_jax import sharding
from labeleff_jax import train
from labeleff_jax import transfer
from labeleff_jax.data import constants
from labeleff_jax.data import label_fraction
from labeleff_jax.data import pipeline
from labeleff_jax.data import splits
from tests import test_losses
from tests import test_probe
from tests import tiny_data

S2_ENCODER = "backbone/encoders/s2"


_with_data = tiny_data.point_at


@pytest.fixture(scope="module")
def pretrained(data_dirs, tmp_path_factory):
  """A tiny S2/S1 dual-encoder pretraining run (4 epochs of 4 steps); the probe's bank is half the labels."""
  workdir = tmp_path_factory.mktemp("pretrain")
  config = _with_data(contrastive.get_config("tiny"), data_dirs)
  # Pretraining still sees every training image; only the probe's memory bank is limited to the labelled half.
  config.data.label_fraction = 0.5
  config.probe.k = 5  # fewer than the 19 labelled examples, so the vote's top-k selection matters
  config.train.num_epochs = 4
  config.optimizer.learning_rate = 3e-3
  config.train.log_every_steps = 1
  # Above every spread a run can have (at most sqrt(D)): each log step is a collapse, so the detection's
  # bookkeeping (first step, one warning per log step) is checked on a run that stays cheap.
  config.contrastive.collapse_threshold = 100.0
  warnings = _WarningRecorder()
  logging.getLogger("absl").addHandler(warnings)
  try:
    summary = train.train_and_evaluate(config, workdir)
  finally:
    logging.getLogger("absl").removeHandler(warnings)
  return workdir, summary, warnings.messages


class _WarningRecorder(logging.Handler):
  """Keeps the messages of warnings logged through absl during one run."""

  def __init__(self):
    super().__init__(logging.WARNING)
    self.messages = []

  def emit(self, record):
    self.messages.append(record.getMessage())


def _first_collapse(records, threshold):
  """The first logged train step whose embedding spread is below `threshold` (None if there is none)."""
  return next((r["step"] for r in records if r["split"] == "train" and r["embedding_spread"] < threshold),
              None)


def _flat(tree):
  """{'a/b/0/c': leaf} of a nested dict (list entries keyed by int, as in nnx pure dicts)."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(str(part.key) for part in path): leaf for path, leaf in leaves}


def test_contrastive_pretraining_lowers_the_loss_and_logs_its_diagnostics(pretrained):
  workdir, summary, _ = pretrained
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  train_losses = [r["loss"] for r in records if r["split"] == "train"]
  assert len(train_losses) == 16
  assert np.mean(train_losses[-4:]) < np.mean(train_losses[:4]) - 0.05
  train_record = next(r for r in records if r["split"] == "train")
  assert {"matching_accuracy", "embedding_spread"} <= set(train_record)
  assert summary["num_params"] > 0


def test_final_contrastive_metrics_are_the_numpy_nt_xent_of_each_evaluation_batch(pretrained, data_dirs):
  workdir, summary, _ = pretrained
  config = _with_data(contrastive.get_config("tiny"), data_dirs)
  model, stats = _trained_model(workdir, config)
  for split in ("validation", "test"):
    # Negatives are the other pairs of the same evaluation batch: per batch, then weighted by its pairs.
    loss_sum = accuracy_sum = count = 0.0
    for batch in pipeline.make_eval_batches(pipeline.DataSpec.from_config(config),
                                            splits.open_split(config, split), sharding.make_mesh(-1),
                                            stats=stats):
      valid = np.asarray(batch["valid"]).astype(bool)
      outputs = model(batch["inputs"])
      loss, accuracy = test_losses.numpy_nt_xent(np.asarray(outputs["z_a"])[valid],
                                                 np.asarray(outputs["z_b"])[valid],
                                                 config.contrastive.temperature)
      loss_sum, accuracy_sum, count = loss_sum + loss * valid.sum(), accuracy_sum + accuracy * valid.sum(), \
          count + valid.sum()
    final = summary["final"][split]
    assert count == tiny_data.SPLIT_SIZES[split]
    assert final["contrastive/loss"] == pytest.approx(loss_sum / count, rel=1e-4), split
    assert final["contrastive/matching_accuracy"] == pytest.approx(accuracy_sum / count, abs=1e-6), split


def test_a_spread_below_the_threshold_is_reported_as_a_collapse(pretrained):
  workdir, summary, warnings = pretrained
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  train_records = [r for r in records if r["split"] == "train"]
  assert summary["collapsed_at_step"] == _first_collapse(records, 100.0) == 1
  collapse_warnings = [m for m in warnings if "embeddings are collapsing" in m]
  assert len(collapse_warnings) == len(train_records)  # one per log step below the threshold
  for message, record in zip(collapse_warnings, train_records):
    assert message.startswith(f"step {record['step']}:")
    assert f"(spread {record['embedding_spread']:.4f} < 100.0000)" in message


def _features(model, config, split, stats):
  """(features, lulc_top labels) of every real example of `split`: the model applied batch by batch."""
  spec = pipeline.DataSpec.from_config(config)
  features, labels, indices = [], [], []
  for batch in pipeline.make_eval_batches(spec, splits.open_split(config, split), sharding.make_mesh(-1),
                                          stats=stats):
    valid = np.asarray(batch["valid"]).astype(bool)
    features.append(np.asarray(model.features(batch["inputs"]), np.float64)[valid])
    labels.append(np.asarray(batch["labels"]["lulc_top"])[valid])
    indices.append(np.asarray(batch["index"])[valid])
  assert np.array_equal(np.concatenate(indices), np.arange(tiny_data.SPLIT_SIZES[split]))
  return np.concatenate(features), np.concatenate(labels)


def _trained_model(workdir, config):
  """The run's final model (from its checkpoint, in eval mode) and its normalisation statistics."""
  model = models.create_model(config, rngs=nnx.Rngs(0))
  state = nnx.state(model)
  nnx.replace_by_pure_dict(state, transfer.load_checkpoint_model_state(workdir))
  nnx.update(model, state)
  model.eval()
  stats = pipeline.normalization_stats(pipeline.DataSpec.from_config(config),
                                       splits.open_split(config, "train"), workdir=workdir)
  return model, stats


def _recomputed_knn(workdir, config, split):
  """The k-NN accuracy on `split` recomputed outside the engine: the final weights from the checkpoint in a
  model of our own; the bank the labelled training subset (label_fraction's draw, stratified by
  data.stratify_by); the numpy vote of tests/test_probe.py."""
  model, stats = _trained_model(workdir, config)
  bank, bank_labels = _features(model, config, "train", stats)
  train_split = splits.open_split(config, "train")
  strata = np.array([int(train_split[i][config.data.stratify_by]) for i in range(len(train_split))])
  labelled = label_fraction.label_fraction_indices(strata, config.data.label_fraction,
                                                   config.data.label_fraction_seed)
  queries, query_labels = _features(model, config, split, stats)
  return test_probe.reference_knn(bank[labelled], bank_labels[labelled], queries, query_labels,
                                  config.probe.k, constants.LABELS["lulc_top"].num_classes, 0.07)


def test_the_final_knn_accuracy_is_the_vote_on_the_checkpoints_features(pretrained, data_dirs):
  workdir, summary, _ = pretrained
  config = _with_data(contrastive.get_config("tiny"), data_dirs)
  config.data.label_fraction, config.probe.k = 0.5, 5  # as the fixture's run
  for split in ("validation", "test"):
    expected = _recomputed_knn(workdir, config, split)
    assert summary["final"][split]["probe/knn_accuracy"] == pytest.approx(expected, abs=1e-9), split


def _finetune(data_dirs, init_from, workdir, mode):
  config = _with_data(finetune.get_config(f"tiny,init_from={init_from},mode={mode}"), data_dirs)
  config.optimizer.learning_rate = 1e-2
  return train.train_and_evaluate(config, workdir)


def test_finetuning_changes_loaded_weights_and_linear_probing_keeps_them(pretrained, data_dirs, tmp_path):
  source_dir, _, _ = pretrained
  source = _flat(transfer.load_checkpoint_model_state(source_dir))
  source_s2 = {path: value for path, value in source.items() if path.startswith(S2_ENCODER)}
  assert source_s2

  results = {}
  for mode in ("finetune", "linear_probe"):
    summary = _finetune(data_dirs, source_dir, tmp_path / mode, mode)
    report = summary["transfer"]
    # Exactly the S2 encoder is loaded; the S1 encoder and projector are skipped; the head is fresh.
    assert sorted(report["loaded"]) == sorted(source_s2)
    assert all(p.startswith(("backbone/encoders/s1", "projector")) for p in report["skipped"])
    assert report["fresh"] and all(p.startswith("heads/") for p in report["fresh"])
    results[mode] = _flat(transfer.load_checkpoint_model_state(tmp_path / mode))

  tuned = results["finetune"]
  assert any(not np.allclose(tuned[p], source_s2[p]) for p in source_s2 if p.endswith("kernel"))
  probed = results["linear_probe"]
  for path, value in source_s2.items():  # kernels, BatchNorm scales and running statistics alike
    np.testing.assert_array_equal(probed[path], value, err_msg=path)
  # ... while its freshly initialised head did train.
  config = finetune.get_config("tiny,mode=linear_probe")
  initial = _flat(nnx.to_pure_dict(nnx.state(models.create_model(config, rngs=nnx.Rngs(config.seed)),
                                             nnx.Param)))
  head = [p for p in initial if p.startswith("heads/")]
  assert head and all(np.any(probed[p] != initial[p]) for p in head)


def test_transfer_refuses_shape_mismatches(pretrained, data_dirs, tmp_path):
  source_dir, _, _ = pretrained
  config = _with_data(finetune.get_config(f"tiny,init_from={source_dir}"), data_dirs)
  config.model.width = 8  # the pretrained encoder has width 4
  with pytest.raises(transfer.TransferError, match="shape mismatch"):
    train.train_and_evaluate(config, tmp_path)


def test_linear_probe_without_a_pretrained_run_is_an_error(data_dirs, tmp_path):
  config = _with_data(finetune.get_config("tiny,mode=linear_probe"), data_dirs)
  with pytest.raises(transfer.TransferError, match="needs config.init_from"):
    train.train_and_evaluate(config, tmp_path)



def test_simclr_two_views_run_end_to_end(data_dirs, tmp_path):
  from configs import simclr  # pylint: disable=g-import-not-at-top
  config = _with_data(simclr.get_config("tiny,optimizer=lars"), data_dirs)
  config.train.num_epochs = 1
  summary = train.train_and_evaluate(config, tmp_path)
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  train_records = [r for r in records if r["split"] == "train"]
  assert train_records and all(np.isfinite(r["loss"]) and 0 < r["embedding_spread"] for r in train_records)
  # The default threshold: the summary names the first logged spread below it, or None.
  assert summary["collapsed_at_step"] == _first_collapse(records, config.contrastive.collapse_threshold)
  # Two views of one encoder: the probe embeds with the same features() as the dual encoder's S2 branch.
  expected = _recomputed_knn(tmp_path, config, "test")
  assert summary["final"]["test"]["probe/knn_accuracy"] == pytest.approx(expected, abs=1e-9)
