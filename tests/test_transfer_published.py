"""transfer.load_pretrained with published weights: .pth files and catalog:NAME, reports, presets, errors."""

import logging
import pathlib
import shutil

import flax.nnx as nnx
import numpy as np
import pytest

from configs import finetune
from labeleff_jax import models
from labeleff_jax import transfer
from labeleff_jax.weights import catalog

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "pth"
S2_ENCODER = "backbone/encoders/s2"
# An SSL4EO-S12 MoCo ResNet-18 entry: the catalogue publishes no hash for it, so a fixture can stand in.
MOCO_ENTRY = "ssl4eo_resnet18_s2_all_moco"


def _classifier(config):
  model = models.create_model(config, rngs=nnx.Rngs(0))
  model.eval()
  return model


def _pooled_s2_features(model, nchw_input):
  """The classifier's S2 encoder, globally average-pooled, on ben-ge's 12 bands (the input without B10)."""
  nhwc = np.delete(nchw_input, 10, axis=1).transpose(0, 2, 3, 1).astype(np.float32)  # stored as float16
  return np.asarray(model.backbone.encoders["s2"](nhwc)).mean(axis=(1, 2))


def _relative_error(actual, expected):
  return np.max(np.abs(actual - expected)) / np.max(np.abs(expected))


def _catalogue_config(tmp_path, **overrides):
  """finetune.py with catalog:MOCO_ENTRY, its file (our width-2 fixture) in a weights folder of its own."""
  config = finetune.get_config(f"tiny,init_from={catalog.CATALOG_PREFIX}{MOCO_ENTRY}")
  config.model.width = 2
  config.transfer.weights_dir = str(tmp_path)
  for key, value in overrides.items():
    config[key] = value
  return config


def test_a_pth_file_gives_torchs_features_in_the_classifiers_encoder():
  expected = np.load(FIXTURES / "resnet18_w8_s2.npz")
  config = finetune.get_config("tiny")
  config.model.width = 8
  config.init_from = str(FIXTURES / "resnet18_w8_s2.pth")
  model = _classifier(config)
  report = transfer.load_pretrained(model, config)
  # torch's features of the 13-band input with B10 set to zero = ours on the 12 bands without it.
  assert _relative_error(_pooled_s2_features(model, expected["input"]), expected["features_b10_zero"]) < 1e-5
  assert all(path.startswith(S2_ENCODER) for path in report["loaded"]) and len(report["loaded"]) == 100
  assert report["skipped"] == ["fc.bias", "fc.weight"]
  assert report["fresh"] == ["heads/lulc_top/head/dense/bias", "heads/lulc_top/head/dense/kernel"]
  assert report["source"]["layout"] == "torchvision" and report["source"]["architecture"] == "resnet18"
  assert "unknown" in report["source"]["normalization"]


def test_resnet50_weights_need_only_the_model_name():
  expected = np.load(FIXTURES / "resnet50_w4_s2.npz")
  config = finetune.get_config("tiny")
  config.init_from = str(FIXTURES / "resnet50_w4_s2.pth")
  with pytest.raises(transfer.TransferError, match="--config.model.name=resnet50"):
    transfer.load_pretrained(_classifier(config), config)
  config.model.name = "resnet50"
  model = _classifier(config)
  transfer.load_pretrained(model, config)
  assert _relative_error(_pooled_s2_features(model, expected["input"]), expected["features_b10_zero"]) < 1e-5


def test_catalogue_entry_sets_architecture_and_preset_and_loads_from_the_weights_dir(tmp_path, caplog):
  entry = catalog.get(MOCO_ENTRY)
  config = _catalogue_config(tmp_path)
  assert config.model.name == entry.architecture and config.data.presets.s2 == entry.normalization
  # SSL4EO-S12's originals are Google Drive pages: the error says where to save the file by hand.
  with pytest.raises(catalog.WeightsNotFoundError, match=f"save it as\n  {tmp_path / entry.file_name}"):
    transfer.load_pretrained(_classifier(config), config)

  shutil.copy(FIXTURES / "moco_resnet18_w2.pth", tmp_path / entry.file_name)
  model = _classifier(config)
  with caplog.at_level(logging.WARNING):
    report = transfer.load_pretrained(model, config)
  assert not [r for r in caplog.records if "trained on inputs scaled" in r.getMessage()]
  source = report["source"]
  assert source["catalog"] == MOCO_ENTRY and source["layout"] == "moco"
  assert source["normalization"] == "data.presets.s2='s2_div10000': the scaling the weights were trained with"
  expected = np.load(FIXTURES / "moco_resnet18_w2.npz")
  assert _relative_error(_pooled_s2_features(model, expected["input"]), expected["features_b10_zero"]) < 1e-5

  # The reference scaling instead of the weights' own: loaded all the same, with a warning naming the fix.
  config.data.presets.s2 = ""
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    report = transfer.load_pretrained(_classifier(config), config)
  assert "but this run scales s2 by data.normalization='reference'" in report["source"]["normalization"]
  assert "set --config.data.presets.s2=s2_div10000" in report["source"]["normalization"]
  assert any("--config.data.presets.s2=s2_div10000" in r.getMessage() for r in caplog.records)

  # Under a z-score scaling a dropped B10 is not a zero B10: the report says what it is instead.
  config.data.presets.s2 = "s2_l1c_zscore_ssl4eo"
  report = transfer.load_pretrained(_classifier(config), config)
  assert any("equals a B10 at the preset's mean" in line for line in report["source"]["bands"])


def test_a_damaged_catalogue_file_is_named(tmp_path):
  entry = catalog.get("torchgeo_resnet18_s2_all_moco")  # published with a SHA-256 prefix
  shutil.copy(FIXTURES / "resnet18_w8_s2.pth", tmp_path / entry.file_name)
  config = finetune.get_config(f"tiny,init_from={catalog.CATALOG_PREFIX}{entry.name}")
  config.transfer.weights_dir = str(tmp_path)
  with pytest.raises(catalog.WeightsHashError, match=entry.file_name):
    transfer.load_pretrained(_classifier(config), config)


def test_one_encoder_entry_of_a_dual_file_loads_only_that_encoder(tmp_path):
  # The dual fixture as the Scheibenreif S2 entry (its backbone2): the S1 encoder is not loaded.
  entry = next(e for e in map(catalog.get, catalog.names())
               if e.layout == "dual_resnet" and e.modality == "s2" and e.architecture == "resnet18")
  shutil.copy(FIXTURES / "dual_resnet18_w2.pth", tmp_path / entry.file_name)
  config = finetune.get_config("tiny")
  config.update(init_from=f"{catalog.CATALOG_PREFIX}{entry.name}")
  config.model.width = 2
  config.transfer.weights_dir = str(tmp_path)
  model = _classifier(config)
  report = transfer.load_pretrained(model, config)
  assert report["source"]["loaded"] == {"s2": S2_ENCODER}
  assert all(path.startswith(S2_ENCODER) for path in report["loaded"]) and len(report["loaded"]) == 100
  expected = np.load(FIXTURES / "dual_resnet18_w2.npz")
  assert _relative_error(_pooled_s2_features(model, expected["input_s2"]),
                         expected["features_s2_b10_zero"]) < 1e-5


def test_a_file_that_is_no_checkpoint_of_a_resnet_is_refused(tmp_path):
  config = finetune.get_config("tiny")
  config.init_from = str(FIXTURES / "dtypes.pth")
  with pytest.raises(transfer.TransferError, match="transfer.source"):
    transfer.load_pretrained(_classifier(config), config)
  config.init_from = str(FIXTURES / "forbidden_global.pth")
  with pytest.raises(ValueError, match="forbidden|not allowed|refus"):
    transfer.load_pretrained(_classifier(config), config)
