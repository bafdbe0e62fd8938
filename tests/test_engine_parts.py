"""Tests of the engine's small parts: schedules, optimizers, config arguments and checks, writer, transfer."""

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


def test_unknown_optimizers_are_rejected():
  config = common.base()
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


# Two steps on a two-leaf problem, against the update rules written out in numpy. The weights and gradients
# are chosen so that weight decay flips signs and changes magnitudes: any mix-up of the rules shows.
_PARAMS = {"a": np.array([1.0, -2.0, 0.5]), "b": np.array([[3.0, -1.0], [0.25, 2.0]])}
_GRADS = [{"a": np.array([0.1, 0.3, -0.2]), "b": np.array([[-0.5, 0.05], [1.0, -0.02]])},
          {"a": np.array([-0.3, 0.2, 0.1]), "b": np.array([[0.2, 0.4], [-0.1, 0.3]])}]


def _optimizer_updates(**options):
  """The updates of make_optimizer(config.optimizer = options, constant schedule) over the two steps."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  config = common.base()
  config.optimizer.update(schedule="constant", **options)
  tx = optim.make_optimizer(config, steps_per_epoch=1, total_steps=2)
  params = {key: jnp.asarray(value, jnp.float32) for key, value in _PARAMS.items()}
  state, all_updates = tx.init(params), []
  for grads in _GRADS:
    updates, state = tx.update({k: jnp.asarray(v, jnp.float32) for k, v in grads.items()}, state, params)
    all_updates.append({key: np.asarray(value) for key, value in updates.items()})
    params = {key: params[key] + updates[key] for key in params}
  return all_updates


def _adam_reference(lr, weight_decay, decoupled, b1=0.9, b2=0.999, eps=1e-8):
  """torch.optim.Adam(weight_decay) adds wd * w to the gradient; AdamW subtracts lr * wd * w separately."""
  params = {key: value.copy() for key, value in _PARAMS.items()}
  m = {key: 0.0 for key in params}
  v = {key: 0.0 for key in params}
  all_updates = []
  for t, grads in enumerate(_GRADS, start=1):
    updates = {}
    for key, w in params.items():
      g = grads[key] if decoupled else grads[key] + weight_decay * w
      m[key] = b1 * m[key] + (1 - b1) * g
      v[key] = b2 * v[key] + (1 - b2) * g * g
      direction = (m[key] / (1 - b1**t)) / (np.sqrt(v[key] / (1 - b2**t)) + eps)
      updates[key] = -lr * (direction + (weight_decay * w if decoupled else 0.0))
    all_updates.append(updates)
    params = {key: params[key] + updates[key] for key in params}
  return all_updates


def _assert_updates(got, expected):
  for step, (got_step, expected_step) in enumerate(zip(got, expected)):
    for key in expected_step:
      np.testing.assert_allclose(got_step[key], expected_step[key], rtol=2e-5, atol=1e-7,
                                 err_msg=f"step {step}, {key}")


@pytest.mark.parametrize("name, decoupled", [("adam", False), ("adamw", True)])
def test_adam_is_an_l2_penalty_and_adamw_decoupled_weight_decay(name, decoupled):
  got = _optimizer_updates(name=name, learning_rate=0.1, weight_decay=0.2)
  _assert_updates(got, _adam_reference(0.1, 0.2, decoupled))
  # The two rules give different steps here, so each comparison really tells them apart.
  other = _adam_reference(0.1, 0.2, not decoupled)
  assert not np.allclose(got[1]["a"], other[1]["a"], rtol=1e-3)


def test_lars_scales_each_layer_by_its_trust_ratio():
  # optax.lars as SimCLR uses it: g' = g + wd w; per leaf, trust = 0.001 ||w|| / ||g'||;
  # momentum accumulates -lr * trust * g'.
  lr, weight_decay, momentum = 0.5, 0.1, 0.9
  got = _optimizer_updates(name="lars", learning_rate=lr, weight_decay=weight_decay, momentum=momentum)
  params = {key: value.copy() for key, value in _PARAMS.items()}
  trace, expected = {key: 0.0 for key in params}, []
  for grads in _GRADS:
    updates = {}
    for key, w in params.items():
      decayed = grads[key] + weight_decay * w
      trust = 0.001 * np.linalg.norm(w) / np.linalg.norm(decayed)
      trace[key] = -lr * trust * decayed + momentum * trace[key]
      updates[key] = trace[key]
    expected.append(updates)
    params = {key: params[key] + updates[key] for key in params}
  _assert_updates(got, expected)


def test_grad_clip_norm_rescales_the_global_norm():
  # The gradient is clipped before the optimizer sees it: SGD's step is -lr * g * c / ||g|| when ||g|| > c,
  # ||g|| taken over all leaves together. (lr 0.5: clipping the update instead would leave it unclipped.)
  norms = [np.sqrt(sum(np.sum(np.square(g)) for g in grads.values())) for grads in _GRADS]
  assert norms[0] > 0.6 > 0.5 * norms[0]  # 1.18
  got = _optimizer_updates(name="sgd", learning_rate=0.5, grad_clip_norm=0.6)
  for key, g in _GRADS[0].items():
    np.testing.assert_allclose(got[0][key], -0.5 * g * 0.6 / norms[0], rtol=1e-6, err_msg=key)
  # With the limit just above the second gradient's norm (0.66), that one passes unchanged.
  unclipped = _optimizer_updates(name="sgd", learning_rate=0.5, grad_clip_norm=norms[1] + 0.01)
  for key, g in _GRADS[1].items():
    np.testing.assert_allclose(unclipped[1][key], -0.5 * g, rtol=1e-6, err_msg=key)


def test_backbone_lr_scale_halves_the_backbone_updates_only():
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  config = common.base()
  config.transfer.backbone_lr_scale = 0.5
  # 'backbone_extra' only shares the prefix's letters: it is not under 'backbone'.
  params = {"backbone": {"encoders": {"s2": {"kernel": jnp.array([1.0, -2.0])}}},
            "backbone_extra": {"bias": jnp.array([0.5])},
            "heads": {"lulc": {"kernel": jnp.array([[0.3, -0.4]])}}}
  grads = {"backbone": {"encoders": {"s2": {"kernel": jnp.array([0.2, -0.6])}}},
           "backbone_extra": {"bias": jnp.array([0.1])},
           "heads": {"lulc": {"kernel": jnp.array([[-1.0, 0.7]])}}}
  for inner in (optax.sgd(0.1), optax.adam(0.1)):
    plain, _ = inner.update(grads, inner.init(params), params)
    tx = transfer.scale_backbone_updates(inner, config)
    scaled, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(scaled["backbone"]["encoders"]["s2"]["kernel"],
                               0.5 * np.asarray(plain["backbone"]["encoders"]["s2"]["kernel"]), rtol=1e-6)
    np.testing.assert_array_equal(scaled["backbone_extra"]["bias"], plain["backbone_extra"]["bias"])
    np.testing.assert_array_equal(scaled["heads"]["lulc"]["kernel"], plain["heads"]["lulc"]["kernel"])
  # SGD at lr 0.1: the backbone moves by 0.5 * 0.1 * g, by hand.
  tx = transfer.scale_backbone_updates(optax.sgd(0.1), config)
  scaled, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(scaled["backbone"]["encoders"]["s2"]["kernel"], [-0.01, 0.03], rtol=1e-6)


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
    ({"data.presets.s1": "s2_div10000"}, r"data.presets.s1='s2_div10000' scales s2"),
    ({"transfer.source": "simclr"}, "transfer.source='simclr'"),
    ({"transfer.modality": "dem"}, "transfer.modality='dem'"),
    ({"init_from": "catalog:torchgeo_resnet18_s2_moco"}, r"init_from: .*torchgeo_resnet18_s2_all_moco"),
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


def _plain(value):
  """A config's values as JSON would hold them: dicts, lists, str, numbers, bools, None."""
  if isinstance(value, (dict, ml_collections.ConfigDict)):
    return {key: _plain(item) for key, item in value.items()}
  if isinstance(value, (list, tuple)):
    return [_plain(item) for item in value]
  assert value is None or isinstance(value, (str, int, float, bool)), f"{value!r} is not a JSON value"
  return value


@pytest.mark.parametrize("name", ["quickstart", "supervised", "early_fusion", "late_fusion", "multitask",
                                  "contrastive", "simclr", "finetune", "ablation_modalities",
                                  "sweep_label_fraction"])
def test_config_json_round_trip_of_every_config(name):
  # config.json in a workdir must hold every value of the run's config, unchanged and without the
  # best-effort fallback to strings (a value JSON cannot hold would come back as its repr).
  module = __import__(f"configs.{name}", fromlist=["get_config"])
  config = module.get_config("tiny")
  assert isinstance(config, ml_collections.ConfigDict)
  expected = _plain(config)
  assert json.loads(config.to_json_best_effort()) == expected
  assert _plain(ml_collections.ConfigDict(json.loads(config.to_json()))) == expected
