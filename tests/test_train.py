"""End-to-end tests of the training engine on tiny synthetic data and 8 fake CPU devices."""

import json
import os
import subprocess
import sys

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from labeleff_jax import models
from labeleff_jax import objectives
from labeleff_jax import train
from labeleff_jax.data import pipeline
from tests import tiny_data

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
P = jax.sharding.PartitionSpec


def _config(module_name, arg="tiny", **data_dirs):
  module = __import__(f"configs.{module_name}", fromlist=["get_config"])
  return tiny_data.point_at(module.get_config(arg), data_dirs)



def _artefacts_complete(workdir):
  for name in ("config.json", "metrics.jsonl", "summary.json"):
    assert (workdir / name).is_file(), name
  assert any((workdir / "tensorboard").iterdir())
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert list((workdir / "plots").glob("curve_*.png"))


@pytest.mark.parametrize("module_name, arg", [
    ("early_fusion", "tiny,season"), ("late_fusion", "tiny"), ("multitask", "tiny,uncertainty"),
])
def test_tiny_configs_run_end_to_end(module_name, arg, data_dirs, tmp_path):
  config = _config(module_name, arg, **data_dirs)
  summary = train.train_and_evaluate(config, tmp_path)
  _artefacts_complete(tmp_path)
  written = json.loads((tmp_path / "summary.json").read_text())
  assert written["num_params"] == models.count_params(
      nnx.eval_shape(lambda: models.create_model(config, rngs=nnx.Rngs(0))))
  for split in ("validation", "test"):
    assert written["final"][split]["num_examples"] == tiny_data.SPLIT_SIZES[split]
    assert np.isfinite(written["final"][split]["loss"])
  assert summary["steps"] == config.train.num_epochs * (tiny_data.SPLIT_SIZES["train"] // 8)
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert {r["split"] for r in records} == {"train", "validation", "test"}
  assert all({"step", "split"} <= set(r) for r in records)
  if module_name == "multitask":
    final = written["final"]["test"]
    assert {"lulc/miou", "climatezone/accuracy", "season/mae"} <= set(final)
    assert (tmp_path / "plots" / "examples.png").is_file()


def test_main_py_runs_a_tiny_config_and_resumes(data_dirs, tmp_path):
  command = [sys.executable, "main.py", "--config", "configs/supervised.py:tiny", "--workdir", str(tmp_path),
             f"--config.data.data_dir={data_dirs['data_dir']}",
             f"--config.data.manual_dir={data_dirs['manual_dir']}"]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  first = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert first.returncode == 0, first.stderr[-3000:]
  assert "test climatezone/accuracy" in first.stdout and "plots:" in first.stdout
  _artefacts_complete(tmp_path)
  summary = json.loads((tmp_path / "summary.json").read_text())
  # Same workdir again: the run is complete, so it resumes at the last step and only re-evaluates.
  second = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert second.returncode == 0, second.stderr[-3000:]
  again = json.loads((tmp_path / "summary.json").read_text())
  assert again["final"]["test"] == summary["final"]["test"]
  bad = subprocess.run(command + ["--config.train.batchsize=3"], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=300)
  assert bad.returncode != 0 and "batchsize" in bad.stderr


class _Crash(Exception):
  pass


def test_killed_and_resumed_run_equals_uninterrupted_run(data_dirs, tmp_path, monkeypatch):
  config = _config("supervised", "tiny", **data_dirs)
  config.train.num_epochs = 3
  # Checkpoints at steps 3, 6, 9 and log points every 2 steps: the resumed run restarts between two log
  # points, and its first one must still average the same steps as the uninterrupted run's.
  config.train.checkpoint_every_steps = 3
  config.optimizer.update(name="adam", learning_rate=1e-3)
  uninterrupted = train.train_and_evaluate(config, tmp_path / "a")

  # Crash while fetching the batch of step 6 (after the step-3 checkpoint), then restart.
  original_next = pipeline.TrainIterator.__next__
  served = {"count": 0}

  def crashing_next(self):
    served["count"] += 1
    if served["count"] == 6:
      raise _Crash()
    return original_next(self)

  monkeypatch.setattr(pipeline.TrainIterator, "__next__", crashing_next)
  with pytest.raises(_Crash):
    train.train_and_evaluate(config, tmp_path / "b")
  monkeypatch.setattr(pipeline.TrainIterator, "__next__", original_next)
  resumed = train.train_and_evaluate(config, tmp_path / "b")

  assert resumed["final"] == uninterrupted["final"]
  # metrics.jsonl reads exactly like the uninterrupted run's, every record, timings aside.
  lines = lambda d: (tmp_path / d / "metrics.jsonl").read_text().splitlines()  # noqa: E731
  strip = lambda l: json.dumps({k: v for k, v in json.loads(l).items() if k != "images_per_second"})  # noqa: E731
  assert [strip(l) for l in lines("b")] == [strip(l) for l in lines("a")]
  final_a = _final_params(tmp_path / "a")
  final_b = _final_params(tmp_path / "b")
  jax.tree.map(np.testing.assert_array_equal, final_a, final_b)


def _final_params(workdir):
  from labeleff_jax import transfer  # pylint: disable=g-import-not-at-top
  return transfer.load_checkpoint_model_state(workdir)


def _one_step(config, mesh, batch):
  setup = train.init_training(config, mesh, objectives.make_objective(config), steps_per_epoch=1,
                              total_steps=1)
  batch = jax.device_put(batch, jax.sharding.NamedSharding(mesh, P("data")))
  with jax.set_mesh(mesh):
    state, step_metrics = setup.train_step(setup.state, setup.rng_state, batch, jnp.int32(0))
  updated = nnx.merge(setup.graphdef, setup.rng_state, state)["model"]
  return jax.device_get(nnx.to_pure_dict(nnx.state(updated, nnx.Param))), jax.device_get(step_metrics)


def test_train_step_on_8_devices_equals_1_device():
  from configs import multitask  # pylint: disable=g-import-not-at-top
  config = multitask.get_config("tiny")
  config.optimizer.update(name="sgd", learning_rate=0.1)
  config.model.dropout = 0.0  # no dropout: the comparison below permutes the batch
  for task in config.tasks:
    task.dropout = 0.0
  rng = np.random.default_rng(0)
  batch = {
      "inputs": {"s2": rng.uniform(0, 1, (8, 32, 32, 12)).astype(np.float32)},
      "labels": {"lulc": rng.integers(0, 11, (8, 32, 32)).astype(np.int32),
                 "climatezone": rng.integers(0, 12, (8,)).astype(np.int32),
                 "season": rng.uniform(0, 1, (8,)).astype(np.float32)},
      "valid": np.array([True] * 7 + [False]), "index": np.arange(8, dtype=np.int32),
  }
  batch["labels"]["lulc"][0, :5] = 255  # ignored pixels
  eight = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  one = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:1])
  before = _flat_params(jax.device_get(nnx.to_pure_dict(nnx.state(
      models.create_model(config, rngs=nnx.Rngs(config.seed)), nnx.Param))))
  state_8, metrics_8 = _one_step(config, eight, batch)
  state_1, metrics_1 = _one_step(config, one, batch)
  np.testing.assert_allclose(metrics_8["loss"], metrics_1["loss"], rtol=1e-5)
  # Tolerance for the parameter update: the float32 noise floor of this very step, measured as the
  # change caused by feeding the same batch in another order to ONE device (mathematically identical:
  # without dropout, BatchNorm and the losses are permutation invariant). Measured on a 2-vCPU Xeon:
  # floor 1.8e-6, 8 devices 2.6e-6 of the update's norm; the gate below leaves other CPUs' summation
  # orders 50x room, while a sharding bug (per-device BatchNorm statistics, a per-device loss mean)
  # changes the update by tens of %.
  order = np.array([3, 1, 0, 2, 6, 5, 4, 7])
  state_perm, _ = _one_step(config, one, jax.tree.map(lambda x: x[order], batch))
  update = lambda state: np.concatenate(  # noqa: E731
      [(value - before[path]).ravel() for path, value in sorted(_flat_params(state).items())])
  reference = update(state_1)
  assert np.linalg.norm(reference) > 0
  relative = lambda state: np.linalg.norm(update(state) - reference) / np.linalg.norm(reference)  # noqa: E731
  noise_floor = relative(state_perm)
  assert noise_floor < 1e-4
  assert relative(state_8) <= max(4 * noise_floor, 1e-5)


def _flat_params(tree):
  from labeleff_jax import transfer  # pylint: disable=g-import-not-at-top
  return transfer._flatten(tree)  # pylint: disable=protected-access


def test_steps_compile_once(data_dirs, tmp_path, monkeypatch):
  traces = {"loss": 0, "eval": 0}
  original_loss = objectives.SupervisedObjective.loss
  original_stats = objectives.SupervisedObjective.eval_stats

  def counting_loss(self, *args):
    traces["loss"] += 1
    return original_loss(self, *args)

  def counting_stats(self, *args):
    traces["eval"] += 1
    return original_stats(self, *args)

  monkeypatch.setattr(objectives.SupervisedObjective, "loss", counting_loss)
  monkeypatch.setattr(objectives.SupervisedObjective, "eval_stats", counting_stats)
  config = _config("supervised", "tiny", **data_dirs)
  config.train.num_epochs = 3  # 12 train steps, 3 validation passes, 1 test pass
  train.train_and_evaluate(config, tmp_path)
  # The loss is traced once by the train step and once by the eval step; eval_stats once.
  assert traces == {"loss": 2, "eval": 1}


def test_non_finite_loss_stops_the_run(data_dirs, tmp_path):
  config = _config("supervised", "tiny", **data_dirs)
  config.optimizer.update(learning_rate=1e30, schedule="constant")
  config.train.log_every_steps = 1
  with pytest.raises(train.NonFiniteLossError, match="training loss became"):
    train.train_and_evaluate(config, tmp_path)


def test_bfloat16_compute_keeps_float32_state(data_dirs, tmp_path):
  config = _config("supervised", "tiny", **data_dirs)
  config.train.update(compute_dtype="bfloat16", num_epochs=1, log_every_steps=1)
  summary = train.train_and_evaluate(config, tmp_path / "bfloat16")
  params = _final_params(tmp_path / "bfloat16")
  assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {np.dtype(np.float32)}
  # The first step's loss (same weights, batch and dropout masks before any update) as in float32, within
  # a few of bfloat16's rounding steps (2**-8 relative); the run's other numbers stay as finite.
  config.train.update(compute_dtype="float32", max_steps=1)
  train.train_and_evaluate(config, tmp_path / "float32")
  first_loss = {}
  for name in ("bfloat16", "float32"):
    records = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
    first_loss[name] = next(r["loss"] for r in map(json.loads, records) if r["split"] == "train")
  assert first_loss["bfloat16"] == pytest.approx(first_loss["float32"], rel=4 * 2.0 ** -8)
  assert first_loss["bfloat16"] != first_loss["float32"]  # the step did compute in bfloat16
  assert np.isfinite(summary["final"]["test"]["loss"])
