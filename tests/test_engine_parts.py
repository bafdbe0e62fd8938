"""Tests of the engine's small parts: schedules, config arguments and checks, metric writer, transfer mapping."""

import json
import math

import ml_collections
import numpy as np
import pytest

from configs import common
from labeleff_jax import config_checks
from labeleff_jax import optim
from labeleff_jax import transfer
from labeleff_jax import writers


def test_epoch_cosine_matches_torch_cosine_annealing_formula():
  # torch CosineAnnealingLR stepped per epoch: lr_e = base * (1 + cos(pi * e / T_max)) / 2.
  config = common.base()
  steps_per_epoch = 19
  schedule = optim.make_schedule(config, steps_per_epoch=steps_per_epoch, total_steps=5 * steps_per_epoch)
  for epoch in range(5):
    expected = 1e-4 * (1 + math.cos(math.pi * epoch / 300)) / 2
    for step in (epoch * steps_per_epoch, (epoch + 1) * steps_per_epoch - 1):
      assert float(schedule(step)) == pytest.approx(expected, rel=1e-6)


def test_warmup_cosine_schedule_shape():
  config = common.base()
  config.optimizer.update(schedule="warmup_cosine", schedule_unit="step", warmup_steps=10,
                          decay_steps=0, learning_rate=1.0)
  schedule = optim.make_schedule(config, steps_per_epoch=10, total_steps=100)
  assert float(schedule(0)) == pytest.approx(0.0)
  assert float(schedule(10)) == pytest.approx(1.0)
  assert float(schedule(55)) == pytest.approx((1 + math.cos(math.pi * 45 / 90)) / 2, rel=1e-5)
  assert float(schedule(100)) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw", "lars"])
def test_optimizers_build_and_reject_unknown(name):
  config = common.base()
  config.optimizer.name = name
  config.optimizer.grad_clip_norm = 1.0
  optim.make_optimizer(config, steps_per_epoch=2, total_steps=4)
  config.optimizer.name = "adagrad"
  with pytest.raises(ValueError, match="optimizer.name='adagrad'"):
    optim.make_optimizer(config, steps_per_epoch=2, total_steps=4)


def test_sgd_step_is_plain_gradient_descent():
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  config = common.base()
  config.optimizer.update(schedule="constant", learning_rate=0.5)
  tx = optim.make_optimizer(config, steps_per_epoch=1, total_steps=1)
  params = {"w": jnp.array([1.0, -2.0])}
  updates, _ = tx.update({"w": jnp.array([0.2, 0.4])}, tx.init(params), params)
  np.testing.assert_allclose(updates["w"], [-0.1, -0.2])


def test_parse_arg_flags_values_and_unknown_keys():
  parsed = common.parse_arg("tiny,label_fraction=0.1,seed=3", tiny=False, label_fraction=1.0, seed=0)
  assert parsed.tiny is True and parsed.label_fraction == 0.1 and parsed.seed == 3
  with pytest.raises(KeyError, match="'bogus'"):
    common.parse_arg("bogus=1", tiny=False)


def test_locked_config_rejects_unknown_override_keys():
  from configs import supervised  # pylint: disable=g-import-not-at-top
  config = supervised.get_config("tiny")
  with pytest.raises(AttributeError):
    config.train.batchsize = 3
  with pytest.raises(AttributeError):
    config.dta = 1


def _supervised(**changes):
  from configs import supervised  # pylint: disable=g-import-not-at-top
  config = supervised.get_config("tiny")
  config.unlock()
  for key, value in changes.items():
    section, _, field = key.rpartition(".")
    target = config
    for part in filter(None, section.split(".")):
      target = target[part]
    target[field] = value
  return config


@pytest.mark.parametrize("changes, message", [
    ({"data.modalities": ["s2", "sar"]}, "'sar' is not a ben-ge modality"),
    ({"data.modalities": []}, "data.modalities is empty"),
    ({"data.label_fraction": 0.0}, "label_fraction=0.0"),
    ({"train.batch_size": 12}, "train.batch_size=12 is not a positive multiple of the 8 devices"),
    ({"data.name": "ben-ge-9k"}, "data.name='ben-ge-9k'"),
    ({"train.compute_dtype": "float16"}, "compute_dtype='float16'"),
    ({"data.modalities": ["s2", "climatezone"]}, "leaks the answer"),
])
def test_config_checks_name_the_key(changes, message):
  with pytest.raises(config_checks.ConfigError, match=message):
    config_checks.check(_supervised(**changes), num_data_devices=8)


def test_config_checks_task_label_and_kind():
  config = _supervised()
  config.tasks = [common.task("cz", "classification", 12, label="koeppen")]
  with pytest.raises(config_checks.ConfigError, match="label='koeppen' is not a label"):
    config_checks.check(config, num_data_devices=1)
  config.tasks = [common.task("lulc", "classification", 11)]
  with pytest.raises(config_checks.ConfigError, match="needs kind='segmentation'"):
    config_checks.check(config, num_data_devices=1)
  config.tasks = [common.task("climatezone", "classification", 10)]
  with pytest.raises(config_checks.ConfigError, match="num_classes=10"):
    config_checks.check(config, num_data_devices=1)
  config.tasks = [common.task("lulc", "segmentation", 11, head="conv1x1")]
  config.model.name = "resnet18"
  with pytest.raises(config_checks.ConfigError, match="segmentation needs a dense backbone"):
    config_checks.check(config, num_data_devices=1)


def test_metric_writer_drops_lines_after_the_resumed_checkpoint(tmp_path):
  writer = writers.MetricWriter(tmp_path)
  for step in (2, 4, 6):
    writer.write(step, "train", {"loss": 1.0 / step})
  writer.write(6, "validation", {"loss": float("nan")})
  writer.close()
  assert [r["step"] for r in writers.read_metrics(tmp_path)] == [2, 4, 6, 6]
  assert writers.read_metrics(tmp_path)[-1]["loss"] == "nan"  # still valid JSON
  writers.MetricWriter(tmp_path, resume_step=4).close()
  assert [r["step"] for r in writers.read_metrics(tmp_path)] == [2, 4]
  writers.MetricWriter(tmp_path).close()  # a fresh run in the same directory starts a fresh log
  assert writers.read_metrics(tmp_path) == []
  assert any((tmp_path / "tensorboard").iterdir())


def test_transfer_mapping_reports_loaded_skipped_fresh():
  source = {"encoder_a": {"conv": {"kernel": np.ones((3, 3))}, "bn": {"mean": np.full(3, 2.0)}},
            "encoder_b": {"conv": {"kernel": np.zeros((3, 3))}},
            "projector": {"kernel": np.ones((3, 2))}}
  target = {"backbone": {"conv": {"kernel": np.zeros((3, 3))}, "bn": {"mean": np.zeros(3)}},
            "head": {"kernel": np.zeros((3, 5))}}
  new, report = transfer.apply_mapping(target, source, [("encoder_a", "backbone")])
  np.testing.assert_array_equal(new["backbone/conv/kernel"], np.ones((3, 3)))
  np.testing.assert_array_equal(new["backbone/bn/mean"], np.full(3, 2.0))
  np.testing.assert_array_equal(new["head/kernel"], np.zeros((3, 5)))
  assert report["loaded"] == ["backbone/bn/mean", "backbone/conv/kernel"]
  assert report["fresh"] == ["head/kernel"]
  assert report["skipped"] == ["encoder_b/conv/kernel", "projector/kernel"]
  _, report = transfer.apply_mapping(target, source, [("encoder_a", "backbone")], dont_load=["bn"])
  assert report["fresh"] == ["backbone/bn/mean", "head/kernel"]


def test_transfer_mapping_fails_loudly():
  source = {"projector": {"kernel": np.ones((3, 2))}}
  target = {"head": {"kernel": np.zeros((3, 5))}}
  with pytest.raises(transfer.TransferError, match=r"projector/kernel \(3, 2\) -> head/kernel \(3, 5\)"):
    transfer.apply_mapping(target, source, [("projector", "head")])
  with pytest.raises(transfer.TransferError, match="matched no array; no checkpoint array lies under"):
    transfer.apply_mapping(target, source, [("encoder", "backbone")])
  # Arrays on both sides under the prefixes, none with the same name: another architecture, said so.
  unet = {"backbone": {"down1": {"conv": {"kernel": np.ones((3, 3))}}}}
  resnet = {"backbone": {"stem": {"conv": {"kernel": np.ones((7, 7))}}}}
  with pytest.raises(transfer.TransferError, match="different architectures.*backbone/down1/conv/kernel"
                                                   ".*backbone/stem/conv/kernel"):
    transfer.apply_mapping(resnet, unet, [("backbone", "backbone")])


def test_list_valued_config_keys_can_be_overridden_on_the_command_line(monkeypatch):
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  argv = ["main.py", "--config=configs/early_fusion.py:tiny", "--config.data.modalities=s2",
          "--config.data.modalities=dem", "--config.transfer.load=('backbone=backbone',)"]
  monkeypatch.setattr("sys.argv", argv)  # config_flags finds the override flags in sys.argv
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, flag_values=values, lock_config=True)
  values(argv)
  assert tuple(values.config.data.modalities) == ("s2", "dem")
  assert tuple(values.config.transfer.load) == ("backbone=backbone",)
  assert isinstance(values.config.tasks, list)  # lists of ConfigDicts stay lists
  with pytest.raises(transfer.TransferError, match="SOURCE=TARGET"):
    transfer._parse_mapping(["encoder"])  # pylint: disable=protected-access


def test_config_json_round_trip_of_every_config():
  from configs import early_fusion, late_fusion, multitask, supervised  # pylint: disable=g-import-not-at-top
  for module in (supervised, early_fusion, late_fusion, multitask):
    config = module.get_config("tiny")
    assert isinstance(config, ml_collections.ConfigDict)
    json.loads(config.to_json_best_effort())
