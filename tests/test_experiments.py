"""Tests of the label-efficiency runners: tables against numpy, and tiny sweeps/ablations that resume."""

import json
import math
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from configs import ablation_modalities
from configs import sweep_label_fraction
from labeleff_jax import experiments
from labeleff_jax import train
from labeleff_jax import transfer
from labeleff_jax.data import label_fraction
from labeleff_jax.data import pipeline
from labeleff_jax.data import splits
from labeleff_jax.experiments import label_fraction_sweep
from labeleff_jax.experiments import modality_ablation
from labeleff_jax.experiments import runner
from labeleff_jax.experiments import tables
from tests import tiny_data

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
S2_ENCODER = "backbone/encoders/s2"


_with_data = tiny_data.point_at


def _never_train(config, workdir):
  raise AssertionError(f"a finished run was trained again: {workdir}")


def _model_arrays(workdir):
  return transfer._flatten(transfer.load_checkpoint_model_state(workdir))  # pylint: disable=protected-access


def _summary_mtimes(root):
  return {str(path): path.stat().st_mtime_ns for path in root.rglob("summary.json")}


# ---------------------------------------------------------------------------------------------------------
# Tables.
# ---------------------------------------------------------------------------------------------------------
def test_tables_match_numpy_on_constructed_records(tmp_path):
  rng = np.random.default_rng(0)
  accuracy = {("a", 0.1): rng.random(3), ("a", 1.0): rng.random(3), ("b", 0.1): rng.random(2)}
  records = []
  for (method, fraction), values in accuracy.items():
    for seed, value in enumerate(values):
      record = {"method": method, "fraction": fraction, "seed": seed, "acc": float(value)}
      if not (method == "b" and seed == 1):  # one run lacks the second metric
        record["f1"] = float(value) / 2
      records.append(record)
  records.append({"method": "c", "fraction": 0.1, "seed": 0, "acc": 0.25, "f1": float("nan")})

  rows = tables.aggregate(records, ["method", "fraction"], ["acc", "f1"])
  assert [(row["method"], row["fraction"]) for row in rows] == [("a", 0.1), ("a", 1.0), ("b", 0.1), ("c", 0.1)]
  for row in rows[:3]:
    values = accuracy[(row["method"], row["fraction"])]
    assert row["acc"]["n"] == len(values)
    np.testing.assert_allclose(row["acc"]["mean"], values.mean(), rtol=1e-12)
    np.testing.assert_allclose(row["acc"]["std"], values.std(ddof=1), rtol=1e-12)
  # The record without f1 and the NaN f1 do not count: one value (std undefined), and none at all.
  assert rows[2]["f1"]["n"] == 1 and math.isnan(rows[2]["f1"]["std"])
  assert rows[2]["f1"]["mean"] == pytest.approx(accuracy[("b", 0.1)][0] / 2)
  assert rows[3]["f1"]["n"] == 0 and rows[3]["acc"]["mean"] == 0.25

  path = tables.write_csv(rows, ["method", "fraction"], ["acc", "f1"], tmp_path / "t.csv")
  written = tables.read_csv(path)
  assert list(written[0]) == ["method", "fraction", "acc_mean", "acc_std", "acc_n", "f1_mean", "f1_std", "f1_n"]
  values = accuracy[("a", 1.0)]
  assert float(written[1]["acc_mean"]) == pytest.approx(values.mean(), rel=1e-12)
  assert float(written[1]["acc_std"]) == pytest.approx(values.std(ddof=1), rel=1e-12)
  assert written[2]["f1_std"] == "" and written[3]["f1_mean"] == "" and written[3]["f1_n"] == "0"

  markdown = tables.markdown_table(rows, ["method", "fraction"], ["acc"])
  line = markdown.splitlines()[3]
  assert f"{values.mean() * 100:.1f} ± {values.std(ddof=1) * 100:.1f}" in line and line.endswith("| 3 |")
  grid = tables.pivot_markdown(rows, "fraction", "method", "acc").splitlines()
  assert grid[0] == "| fraction | a | b | c |"
  assert grid[3].startswith("| 1.0 |") and grid[3].endswith("| – | – |")  # b and c have no 100 % runs
  plot = tables.plot_against_fraction(rows[:3], "acc", tmp_path / "acc.png")
  assert plot.stat().st_size > 0


def test_batch_size_fits_the_labelled_subset_and_the_devices():
  assert label_fraction_sweep.fitting_batch_size(600, 32, 1, fraction=1.0) == 32
  assert label_fraction_sweep.fitting_batch_size(13, 32, 1, fraction=0.01) == 13
  assert label_fraction_sweep.fitting_batch_size(13, 32, 8, fraction=0.01) == 8
  assert label_fraction_sweep.fitting_batch_size(35, 32, 8, fraction=0.05) == 32
  with pytest.raises(ValueError, match="fraction 0.01 leaves 5 labelled"):
    label_fraction_sweep.fitting_batch_size(5, 32, 8, fraction=0.01)


def test_configs_reject_unknown_rows_and_methods(tmp_path):
  assert modality_ablation.row_modalities("S2+S1+Weather") == ["s2", "s1", "era5"]
  with pytest.raises(ValueError, match="'Clouds'"):
    modality_ablation.plan(ablation_modalities.get_config("tiny,rows=S2:S2+Clouds"))
  with pytest.raises(ValueError, match="boosting"):
    label_fraction_sweep.plan(sweep_label_fraction.get_config("tiny,methods=scratch:boosting"), tmp_path)
  config = ablation_modalities.get_config("quick")
  assert len(config.rows) == 11 and config.base.data.image_size == 32 and config.base.model.name == "unet"


# ---------------------------------------------------------------------------------------------------------
# Tiny experiments end to end.
# ---------------------------------------------------------------------------------------------------------
def test_label_fraction_sweep_with_published_weights(data_dirs, tmp_path):
  # A torchvision-layout ResNet-18 of width 8 with 13 input bands, written by torch (tests/fixtures/pth).
  weights = os.path.join(REPO, "tests", "fixtures", "pth", "resnet18_w8_s2.pth")
  config = _with_data(sweep_label_fraction.get_config(
      f"tiny,seeds=1,fractions=1.0,published={weights},published_width=8"), data_dirs)
  assert list(config.methods) == ["scratch", "finetune", "linear_probe", "published_finetune",
                                  "published_linear_probe"]
  config.unlock()
  config.methods = ["published_finetune", "published_linear_probe"]  # no pretraining run is needed then
  assert [run.name for run in label_fraction_sweep.plan(config, tmp_path)] == [
      "published_finetune/frac1/seed0", "published_linear_probe/frac1/seed0"]
  results = experiments.run(config, tmp_path)
  assert "published weights + linear probe" in results["markdown"] and weights in results["markdown"]
  # Both runs start from the file's S2 encoder (B10's input kernel dropped); the probe keeps it exactly.
  from labeleff_jax.weights import pth  # pylint: disable=g-import-not-at-top
  torch_state = pth.read_pth(weights)
  stem = np.delete(torch_state["conv1.weight"], 10, axis=1).transpose(2, 3, 1, 0)  # OIHW, no B10 -> HWIO
  probe = _model_arrays(tmp_path / "published_linear_probe" / "frac1" / "seed0")
  tuned = _model_arrays(tmp_path / "published_finetune" / "frac1" / "seed0")
  np.testing.assert_array_equal(probe[f"{S2_ENCODER}/conv1/kernel"], stem)
  np.testing.assert_array_equal(probe[f"{S2_ENCODER}/bn1/var"], torch_state["bn1.running_var"])
  np.testing.assert_array_equal(probe[f"{S2_ENCODER}/blocks/7/conv2/kernel"],
                                torch_state["layer4.1.conv2.weight"].transpose(2, 3, 1, 0))
  assert not np.array_equal(tuned[f"{S2_ENCODER}/conv1/kernel"], stem)
  for method in config.methods:
    report = runner.read_summary(tmp_path / method / "frac1" / "seed0")["transfer"]
    assert report["source"]["layout"] == "torchvision" and report["source"]["width"] == 8
    assert report["source"]["bands"] == ["dropped B10 from 13-band weights"]
    assert report["fresh"] == ["heads/lulc_top/head/dense/bias", "heads/lulc_top/head/dense/kernel"]


def test_label_fraction_sweep_tiny_is_complete_and_resumes(data_dirs, tmp_path, monkeypatch):
  config = _with_data(sweep_label_fraction.get_config("tiny,seeds=1,fractions=0.5:1.0"), data_dirs)
  # Records the source indices every run's training iterator is built on, by run folder: equal counts would
  # not tell two stratified subsets of one size apart.
  trained_on, running = {}, []
  make_train_iterator = pipeline.make_train_iterator

  def recording_iterator(*args, **kwargs):
    iterator = make_train_iterator(*args, **kwargs)
    trained_on[running[-1]] = iterator.indices
    return iterator

  def recording_train(run_config, workdir):
    running.append(pathlib.Path(workdir).relative_to(tmp_path).as_posix())
    return train.train_and_evaluate(run_config, workdir)

  monkeypatch.setattr(pipeline, "make_train_iterator", recording_iterator)
  results = experiments.run(config, tmp_path, train_fn=recording_train)
  assert sorted(trained_on) == sorted(running) and len(running) == 7

  written = tables.read_csv(tmp_path / "results.csv")
  assert [(row["fraction"], row["method"]) for row in written] == [
      (fraction, method) for fraction in ("0.5", "1.0") for method in ("scratch", "finetune", "linear_probe")]
  # One seed: each cell is its run's own final test metric.
  for row in written:
    summary = runner.read_summary(tmp_path / row["method"] / f"frac{float(row['fraction']):g}" / "seed0")
    for metric in config.metrics:
      assert row[f"{metric}_n"] == "1"
      assert float(row[f"{metric}_mean"]) == pytest.approx(summary["final"]["test"][metric], abs=1e-12)
  assert "contrastive + linear probe" in (tmp_path / "results.md").read_text()
  assert (tmp_path / "lulc_top_accuracy_vs_fraction.png").is_file()

  # All methods of one fraction trained on the very same labelled examples, the independent selection's;
  # pretraining on every training image.
  source = splits.open_split(_with_data(runner.clone(config.downstream), data_dirs), "train")
  labels = np.array([int(source[i]["lulc_top"]) for i in range(len(source))])
  np.testing.assert_array_equal(np.sort(trained_on["pretrain/seed0"]), np.arange(len(source)))
  for fraction in (0.5, 1.0):
    expected = label_fraction.label_fraction_indices(labels, fraction, 0)
    # Stratified: ceil(fraction * n) of each class's n examples.
    np.testing.assert_array_equal(np.bincount(labels[expected], minlength=11),
                                  np.ceil(fraction * np.bincount(labels, minlength=11)))
    for method in ("scratch", "finetune", "linear_probe"):
      name = f"{method}/frac{fraction:g}/seed0"
      np.testing.assert_array_equal(np.sort(trained_on[name]), expected, err_msg=name)
      summary = runner.read_summary(tmp_path / name)
      assert summary["train_examples"] == len(expected)
      assert summary["steps"] == config.steps
      assert (summary["transfer"] is None) == (method == "scratch")

  # The linear probe kept the pretrained S2 encoder; fine-tuning started from it and moved it.
  pretrained = _model_arrays(tmp_path / "pretrain" / "seed0")
  probe = _model_arrays(tmp_path / "linear_probe" / "frac1" / "seed0")
  tuned = _model_arrays(tmp_path / "finetune" / "frac1" / "seed0")
  encoder_keys = [key for key in pretrained if key.startswith(S2_ENCODER) and "kernel" in key]
  assert encoder_keys
  for key in encoder_keys:
    np.testing.assert_array_equal(probe[key], pretrained[key])
  assert any(not np.array_equal(tuned[key], pretrained[key]) for key in encoder_keys)

  # A second invocation trains nothing and reports the same table.
  before = _summary_mtimes(tmp_path)
  again = experiments.run(config, tmp_path, train_fn=_never_train)
  assert _summary_mtimes(tmp_path) == before and len(before) == 7
  assert all(record["skipped"] for record in again["records"])
  assert again["rows"] == results["rows"]


def test_modality_ablation_tiny_is_complete_and_resumes_through_main(data_dirs, tmp_path):
  arg = "tiny,seeds=2,rows=S2:Season"
  config = _with_data(ablation_modalities.get_config(arg), data_dirs)
  experiments.run(config, tmp_path)

  written = tables.read_csv(tmp_path / "results.csv")
  assert [row["row"] for row in written] == ["S2", "Season"]
  for row in written:
    for metric in config.metrics:
      assert row[f"{metric}_n"] == "2"
  # Each cell is the mean and sample std of its two seeds' test metrics, read straight from their summaries.
  for row in written:
    for metric in config.metrics:
      values = [runner.read_summary(tmp_path / "late" / row["row"] / f"seed{seed}")["final"]["test"][metric]
                for seed in (0, 1)]
      assert float(row[f"{metric}_mean"]) == pytest.approx(np.mean(values), abs=1e-12)
      assert float(row[f"{metric}_std"]) == pytest.approx(np.std(values, ddof=1), abs=1e-12)
  season = json.loads((tmp_path / "late" / "Season" / "seed0" / "config.json").read_text())
  assert season["data"]["modalities"] == ["season"] and season["model"]["fusion"] == "late"

  # The same command through main.py: every run is found finished, nothing retrains, the table is printed.
  before = _summary_mtimes(tmp_path)
  command = [sys.executable, "main.py", "--config", f"configs/ablation_modalities.py:{arg}",
             "--workdir", str(tmp_path), f"--config.data.data_dir={data_dirs['data_dir']}",
             f"--config.data.manual_dir={data_dirs['manual_dir']}"]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  second = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert second.returncode == 0, second.stderr[-3000:]
  assert "segmentation: mIoU" in second.stdout and "results.md" in second.stdout
  assert second.stdout.count("done before, skipped") == 4
  assert _summary_mtimes(tmp_path) == before and len(before) == 4
